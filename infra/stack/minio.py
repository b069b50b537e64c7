"""MinIO built from source with ``go install`` (MinIO publishes source only since late 2025).

Bucket notifications go to Kafka (``minio.events``) through MinIO's built-in Kafka
target; a queue directory keeps events while Kafka is down.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from minio.commonconfig import ENABLED, Filter, Tag
from minio.credentials import StaticProvider
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from minio.minioadmin import MinioAdmin
from minio.notificationconfig import NotificationConfig, QueueConfig
from minio.sseconfig import Rule as SseRule
from minio.sseconfig import SSEConfig

from config import REVIEW_RETENTION_DAYS, write_private
from infra.stack.base import Service, StackError, http_ok, is_marked, mark_installed, run_logged
from infra.stack.kafka_access import internal_admin
from infra.stack.kafka_admin import ensure_topic
from infra.stack.minio_access import ensure_role_users
from infra.stack.pki import Pki, issue
from stream.objectstore import RETENTION_TAG, UNCLAIMED_TAG, https_pool, minio_at

NOTIFY_ID = "PRIMARY"
NOTIFY_ARN = f"arn:minio:sqs::{NOTIFY_ID}:kafka"
EVENTS_TOPIC = "minio.events"
BUCKETS = ("uploads", "derived", "quarantine", "models", "review")
# The object tags the lifecycle rules read (UNCLAIMED_TAG, RETENTION_TAG) are stream/objectstore.py's.
# Buckets whose object-created events feed the pipeline.
NOTIFIED_BUCKETS = ("uploads",)
# The Kafka protocol generation MinIO's client (sarama) speaks; Kafka 4 dropped the oldest ones.
SARAMA_KAFKA_VERSION = "3.6.0"


class MinioService(Service):
    name = "minio"
    depends_on = ("kafka",)
    stop_timeout_s = 30.0

    @property
    def address(self) -> str:
        return f"https://{self.settings.minio_endpoint}"

    @property
    def binary(self) -> Path:
        return self.opt / "bin" / "minio"

    @property
    def _marker(self) -> Path:
        return self.opt / "installed"

    def installed(self) -> bool:
        return self.binary.exists() and is_marked(self._marker, self.settings.versions.minio)

    def go_env(self) -> dict[str, str]:
        gopath = self.settings.cache_dir / "go"
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("DETECTFLOW_")},
            "GOPATH": str(gopath),
            "GOMODCACHE": str(gopath / "pkg" / "mod"),
            "GOCACHE": str(gopath / "build"),
            "GOBIN": str(self.binary.parent),
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "-buildvcs=false",
            "CGO_ENABLED": "0",
        }

    def install(self, log: Callable[[str], None]) -> None:
        go = shutil.which("go") or ("/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go") else None)
        if go is None:
            raise StackError("Go >= 1.24 is needed to build MinIO (go install); it is not on PATH")
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        log("  building MinIO from source: 10-20 minutes on 2 cores the first time, cached afterwards")
        run_logged([go, "install", f"github.com/minio/minio@{self.settings.versions.minio}"], log,
                   env=self.go_env(), cwd=self.settings.cache_dir, timeout_s=3600)
        if not self.binary.exists():
            raise StackError(f"go install finished but {self.binary} is missing")
        mark_installed(self._marker, self.settings.versions.minio)

    def environment(self) -> Mapping[str, str]:
        creds = self.settings.minio_credentials()
        kafka_password = json.loads((self.settings.kafka_users_dir / "minio.json").read_text())["password"]
        queue_dir = self.data / "notify-queue"
        queue_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DETECTFLOW_", "MINIO_"))}
        env.update({
            "MINIO_ROOT_USER": creds.access_key,
            "MINIO_ROOT_PASSWORD": creds.secret_key,
            "MINIO_UPDATE": "off",
            # MinIO's built-in KMS: one key from the secrets dir encrypts every object at rest (SSE-S3, set
            # as each bucket's default encryption by ensure_buckets).
            "MINIO_KMS_SECRET_KEY": kms_key(self.settings),
            "MINIO_CALLHOME_ENABLE": "off",
            f"MINIO_NOTIFY_KAFKA_ENABLE_{NOTIFY_ID}": "on",
            f"MINIO_NOTIFY_KAFKA_BROKERS_{NOTIFY_ID}": self.settings.kafka_bootstrap,
            # As the principal `minio` (may only write minio.events), SCRAM over TLS verified against the
            # project CA, which MinIO reads from <certs-dir>/CAs.
            f"MINIO_NOTIFY_KAFKA_SASL_{NOTIFY_ID}": "on",
            f"MINIO_NOTIFY_KAFKA_SASL_MECHANISM_{NOTIFY_ID}": "sha512",
            f"MINIO_NOTIFY_KAFKA_SASL_USERNAME_{NOTIFY_ID}": "minio",
            f"MINIO_NOTIFY_KAFKA_SASL_PASSWORD_{NOTIFY_ID}": kafka_password,
            f"MINIO_NOTIFY_KAFKA_TLS_{NOTIFY_ID}": "on",
            f"MINIO_NOTIFY_KAFKA_TLS_SKIP_VERIFY_{NOTIFY_ID}": "off",
            f"MINIO_NOTIFY_KAFKA_TOPIC_{NOTIFY_ID}": EVENTS_TOPIC,
            f"MINIO_NOTIFY_KAFKA_VERSION_{NOTIFY_ID}": SARAMA_KAFKA_VERSION,
            # Events wait here while Kafka is unreachable instead of being dropped.
            f"MINIO_NOTIFY_KAFKA_QUEUE_DIR_{NOTIFY_ID}": str(queue_dir),
            f"MINIO_NOTIFY_KAFKA_QUEUE_LIMIT_{NOTIFY_ID}": "100000",
        })
        return env

    def command(self) -> Sequence[str]:
        return [
            str(self.binary), "server", str(self.data / "export"),
            "--address", f"{self.settings.host}:{self.settings.minio_port}",
            "--console-address", f"{self.settings.host}:{self.settings.minio_console_port}",
            "--certs-dir", str(self.certs_dir),
            "--quiet",
        ]

    @property
    def certs_dir(self) -> Path:
        return self.data / "certs"

    def prepare(self, log: Callable[[str], None]) -> None:
        # MinIO serves HTTPS only once <certs-dir> holds public.crt (leaf + CA chain) and private.key; it
        # trusts <certs-dir>/CAs for its own outbound TLS (the Kafka notifier).
        pki = Pki(self.settings.tls_dir)
        leaf = issue(pki, "minio")
        (self.certs_dir / "CAs").mkdir(parents=True, exist_ok=True)
        self.certs_dir.chmod(0o700)
        shutil.copyfile(pki.ca_cert, self.certs_dir / "CAs" / "detectflow-ca.crt")
        shutil.copyfile(leaf.cert, self.certs_dir / "public.crt")
        write_private(self.certs_dir / "private.key", leaf.key.read_bytes())

    def probe(self) -> tuple[bool, str]:
        return http_ok(f"{self.address}/minio/health/ready", ca_file=self.settings.tls_ca_file)

    def after_start(self, log: Callable[[str], None]) -> None:
        ensure_buckets(self.settings)
        ensure_role_users(admin_client(self.settings), self.settings, log)


def ensure_buckets(settings) -> None:  # type: ignore[no-untyped-def]
    """Create the buckets and the uploads notification (idempotent)."""
    ensure_topic(internal_admin(settings), EVENTS_TOPIC, partitions=3)
    client = minio_at(settings.minio_endpoint, settings.minio_credentials(), settings.tls_ca_file)
    for bucket in BUCKETS:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    ensure_lifecycle(client, settings)
    for bucket in BUCKETS:
        encrypt_by_default(client, bucket)
    for bucket in NOTIFIED_BUCKETS:
        client.set_bucket_notification(bucket, NotificationConfig(queue_config_list=[
            QueueConfig(events=["s3:ObjectCreated:*"], config_id="detectflow-pipeline", queue=NOTIFY_ARN),
        ]))


KMS_KEY_NAME = "detectflow-key"


def kms_key(settings) -> str:  # type: ignore[no-untyped-def]
    """``<name>:<base64 of 32 random bytes>``, made once into <secrets>/minio-kms.key (0600)."""
    path = settings.secrets_dir / "minio-kms.key"
    if not path.exists():
        write_private(path, f"{KMS_KEY_NAME}:{base64.b64encode(secrets.token_bytes(32)).decode()}\n".encode())
    return path.read_text().strip()


def encrypt_by_default(client, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """SSE-S3 for every object written to ``bucket`` from now on (objects written before stay as they are)."""
    client.set_bucket_encryption(bucket, SSEConfig(SseRule.new_sse_s3_rule()))


def lifecycle_rules(settings) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """bucket -> its lifecycle (ILM) rules. S3 rules filter by a literal prefix or a tag and count whole
    days; when several match an object the earliest expiry wins."""
    def rule(rule_id: str, days: int, tag: tuple[str, str] | None = None) -> Rule:
        return Rule(ENABLED, rule_filter=Filter(tag=Tag(*tag)) if tag else Filter(prefix=""), rule_id=rule_id,
                    expiration=Expiration(days=days))

    return {
        "uploads": [rule("detectflow-uploads-retention", settings.uploads_retention_days),
                    rule("detectflow-unclaimed-uploads", settings.unclaimed_upload_days, UNCLAIMED_TAG)],
        "quarantine": [rule("detectflow-quarantine-retention", settings.quarantine_retention_days)],
        "review": [rule("detectflow-review-retention", max(REVIEW_RETENTION_DAYS))]
        + [rule(f"detectflow-review-{d}d", d, (RETENTION_TAG, str(d))) for d in REVIEW_RETENTION_DAYS],
    }


def ensure_lifecycle(client, settings) -> None:  # type: ignore[no-untyped-def]
    """Set every bucket's lifecycle rules (replaces the bucket's configuration: idempotent)."""
    for bucket, rules in lifecycle_rules(settings).items():
        client.set_bucket_lifecycle(bucket, LifecycleConfig(rules))


def admin_client(settings) -> MinioAdmin:  # type: ignore[no-untyped-def]
    """MinIO's admin API with the root key (users, policies: infra/stack/minio_access.py), over https_pool."""
    root = settings.minio_credentials()
    return MinioAdmin(endpoint=settings.minio_endpoint, credentials=StaticProvider(root.access_key, root.secret_key),
                      secure=True, http_client=https_pool(settings.tls_ca_file))
