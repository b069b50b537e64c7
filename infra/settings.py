"""Every setting detectflow reads from the environment, in one place.

Nothing else in the code base reads ``os.environ``: a deployable builds its
settings once (``StackSettings.from_env()``) and passes them down.  Secrets are
never part of ``repr`` and never logged.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

ENV_PREFIX = "DETECTFLOW_"


class SettingsError(ValueError):
    """A setting from the environment is malformed."""


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(ENV_PREFIX + name, default)


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name}={raw!r} is not a port number") from exc
    if not 0 < value < 65536:
        raise SettingsError(f"{ENV_PREFIX}{name}={value} is out of range")
    return value


def _num(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name, str(default))
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name}={raw!r} is not a number") from exc


def _at_least(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    """A whole number >= ``low``."""
    value = _num(env, name, default)
    if value != int(value) or value < low:
        raise SettingsError(f"{ENV_PREFIX}{name}={value:g} must be a whole number, at least {low}")
    return int(value)


def _days(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number of days >= 1 (S3 lifecycle rules count in days)."""
    value = _num(env, name, default)
    if value != int(value) or value < 1:
        raise SettingsError(f"{ENV_PREFIX}{name}={value:g} must be a whole number of days, at least 1")
    return int(value)


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _num(env, name, default)
    if not value > 0:
        raise SettingsError(f"{ENV_PREFIX}{name}={value:g} must be positive")
    return value


def _heap(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _get(env, name, default).strip().lower()
    if not raw[:-1].isdigit() or raw[-1] not in "mg":
        raise SettingsError(f"{ENV_PREFIX}{name}={raw!r} must look like 512m or 1g")
    return raw


@dataclass(frozen=True)
class Versions:
    """Pinned versions of every component the stack installs."""

    kafka: str = "4.1.2"
    apicurio: str = "3.3.3"
    cassandra: str = "5.0.6"
    # MinIO publishes source only; this is the pseudo-version the Go module proxy serves.
    minio: str = "v0.0.0-20260212201848-7aac2a2c5b7c"


@dataclass(frozen=True)
class StackSettings:
    """Where the local stack lives and how it is reached."""

    home: Path
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    # The broker's mutual-TLS listener (inter-broker traffic and the stack's own admin bootstrap).
    kafka_internal_port: int = 9094
    registry_port: int = 8081
    # Apicurio's management interface (health): its readiness covers the kafkasql journal replay.
    registry_management_port: int = 8082
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    minio_port: int = 9000
    minio_console_port: int = 9001
    clamd_port: int = 3310
    kafka_heap: str = "384m"
    registry_heap: str = "192m"
    cassandra_heap: str = "768m"
    # Max size of one Kafka record; images travel inline up to this size.
    kafka_max_message_bytes: int = 16 * 1024 * 1024
    clamd_stream_max_bytes: int = 32 * 1024 * 1024
    start_timeout_s: float = 240.0
    versions: Versions = field(default_factory=Versions)
    # The local model repository (converted models, the registry's fetch cache); default <home>/models.
    # The test suite points it at its own folder so that it never serves or changes a user's versions.
    models_root: Path | None = None
    # Bucket lifecycle (ILM) rules `stack up` sets (infra/stack/minio.py, docs/security.md): whole days.
    uploads_retention_days: int = 7
    quarantine_retention_days: int = 30
    # Pre-signed uploads carry a tag until a job claims them; unclaimed ones expire after this many days
    # (must exceed the URL's life plus a grace period: GatewaySettings refuses a longer URL life).
    unclaimed_upload_days: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackSettings:
        env = os.environ if env is None else env
        home = Path(_get(env, "HOME", str(Path.home() / ".detectflow"))).expanduser()
        return cls(
            home=home.resolve(),
            kafka_port=_port(env, "KAFKA_PORT", 9092),
            kafka_internal_port=_port(env, "KAFKA_INTERNAL_PORT", 9094),
            kafka_controller_port=_port(env, "KAFKA_CONTROLLER_PORT", 9093),
            registry_port=_port(env, "REGISTRY_PORT", 8081),
            registry_management_port=_port(env, "REGISTRY_MANAGEMENT_PORT", 8082),
            cassandra_port=_port(env, "CASSANDRA_PORT", 9042),
            cassandra_storage_port=_port(env, "CASSANDRA_STORAGE_PORT", 7000),
            minio_port=_port(env, "MINIO_PORT", 9000),
            minio_console_port=_port(env, "MINIO_CONSOLE_PORT", 9001),
            clamd_port=_port(env, "CLAMD_PORT", 3310),
            kafka_heap=_heap(env, "KAFKA_HEAP", "384m"),
            registry_heap=_heap(env, "REGISTRY_HEAP", "192m"),
            cassandra_heap=_heap(env, "CASSANDRA_HEAP", "768m"),
            start_timeout_s=float(_get(env, "START_TIMEOUT_S", "240")),
            models_root=Path(env[ENV_PREFIX + "MODELS_DIR"]).expanduser() if env.get(ENV_PREFIX + "MODELS_DIR")
            else None,
            uploads_retention_days=_days(env, "UPLOADS_RETENTION_DAYS", 7),
            quarantine_retention_days=_days(env, "QUARANTINE_RETENTION_DAYS", 30),
            unclaimed_upload_days=_days(env, "UNCLAIMED_UPLOAD_DAYS", 1),
        )

    # Layout of the state directory: everything the stack downloads, builds and
    # stores lives below ``home`` so that a re-run finds it warm.
    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def opt_dir(self) -> Path:
        return self.home / "opt"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def models_dir(self) -> Path:
        return self.models_root if self.models_root is not None else self.home / "models"

    @property
    def samples_dir(self) -> Path:
        return self.home / "samples"

    # Client-side addresses.
    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return f"https://{self.host}:{self.registry_port}/apis/ccompat/v7"

    @property
    def minio_endpoint(self) -> str:
        return f"{self.host}:{self.minio_port}"

    def minio_credentials(self) -> MinioCredentials:
        """MinIO's root credentials: only `detectflow stack` (and the test suite, as the operator) uses them."""
        return MinioCredentials.load_or_create(self.secrets_dir / "minio.json")

    @property
    def tls_dir(self) -> Path:
        """The project CA and every service's certificate (infra/stack/pki.py), made by `stack up`."""
        return self.secrets_dir / "tls"

    @property
    def kafka_users_dir(self) -> Path:
        """One SCRAM credentials file per Kafka principal (infra/stack/kafka_access.py), made by `stack up`."""
        return self.secrets_dir / "kafka"

    @property
    def minio_roles_dir(self) -> Path:
        """One credentials file per MinIO role (infra/stack/minio_access.py), made by `stack up`."""
        return self.secrets_dir / "minio"

    @property
    def cassandra_roles_dir(self) -> Path:
        """One credentials file per Cassandra role (infra/stack/cassandra_access.py), made by `stack up`."""
        return self.secrets_dir / "cassandra"

    @property
    def tls_ca_file(self) -> Path:
        """The project CA's certificate (infra/stack/pki.py): clients verify the services' certificates with it."""
        return self.tls_dir / "ca.crt"


@dataclass(frozen=True)
class MinioCredentials:
    """Root credentials of the local MinIO, generated once and kept 0600."""

    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> MinioCredentials:
        try:
            data = json.loads(path.read_text())
            return cls(access_key=data["access_key"], secret_key=data["secret_key"])
        except (OSError, ValueError, KeyError) as exc:
            raise SettingsError(f"cannot read MinIO credentials {path} ({type(exc).__name__}); "
                                "`detectflow stack up` creates them") from exc

    @classmethod
    def load_or_create(cls, path: Path, access_key: str | None = None) -> MinioCredentials:
        if path.exists():
            return cls.load(path)
        creds = cls(access_key=access_key or "detectflow-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(32))
        write_private(path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}).encode())
        return creds


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: the file 0600 (atomically, replacing any), its directory 0700."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Login:
    """A username and password (a Cassandra role, a Kafka SCRAM principal), generated once and kept 0600."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Login:
        try:
            data = json.loads(path.read_text())
            return cls(username=data["username"], password=data["password"])
        except (OSError, ValueError, KeyError) as exc:
            raise SettingsError(f"cannot read credentials {path} ({type(exc).__name__}); "
                                "`detectflow stack up` creates them") from exc

    @classmethod
    def load_or_create(cls, path: Path, username: str) -> Login:
        if path.exists():
            return cls.load(path)
        return cls.create(path, username)

    @classmethod
    def create(cls, path: Path, username: str) -> Login:
        """New credentials written over ``path`` (0600, atomically): a new password for ``username``."""
        creds = cls(username=username, password=secrets.token_urlsafe(32))
        write_private(path, json.dumps({"username": creds.username, "password": creds.password}).encode())
        return creds


def _path(env: Mapping[str, str], name: str, default: Path) -> Path:
    raw = _get(env, name, str(default)).strip()
    if not raw:
        raise SettingsError(f"{ENV_PREFIX}{name} is empty; unset it for the default ({default})")
    return Path(raw).expanduser()


@dataclass(frozen=True)
class StreamSettings:
    """Settings of a stream-runtime process (a pipeline stage, the bridge)."""

    bootstrap: str = "127.0.0.1:9092"
    # HTTPS, verified against tls_ca_file (the project CA).
    registry_url: str = "https://127.0.0.1:8081/apis/ccompat/v7"
    # Kafka: SASL_SSL with SCRAM-SHA-512 as this principal (a pipeline role, `admin` for operator tools);
    # its password is read on use from <kafka_users_dir>/<kafka_user>.json, never part of repr.
    kafka_user: str = "admin"
    kafka_users_dir: Path | None = None
    tls_ca_file: Path | None = None
    cassandra_hosts: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = 9042
    keyspace: str = "detectflow"
    # Cassandra accepts only authenticated TLS clients: each process logs in as its role with the credentials in
    # <cassandra_secrets_dir>/<role>.json (made by `stack up`, read on use, never in repr) and verifies the
    # node's certificate against cassandra_ca_file. None: not configured (connect refuses, naming the variable).
    cassandra_secrets_dir: Path | None = None
    cassandra_ca_file: Path | None = None
    # A batch leaves the poll when it has max_batch records or max_wait_ms passed.
    max_batch: int = 64
    max_wait_ms: int = 50
    # Transient failures: in-loop backoff attempts, then the retry topic, then the DLQ. The retry topic is
    # budgeted by time, not attempts: a record is retried (delays from retry_delay_ms doubling up to
    # retry_delay_max_ms) until retry_budget_ms after its first failure, so a dependency down for up to
    # 10 minutes delays its records instead of failing them.
    backoff_attempts: int = 3
    backoff_initial_ms: int = 200
    backoff_max_ms: int = 2000
    retry_delay_ms: int = 2000
    retry_delay_max_ms: int = 30000
    retry_budget_ms: int = 900000
    # A record whose processing killed its process this many times (the same offset, seen again after each
    # restart) is set aside to the DLQ without being processed again. Tracked in <state_dir>/poison.
    poison_max_crashes: int = 3
    state_dir: Path | None = None
    flush_timeout_s: float = 30.0
    # How often the online backlog is measured to pause/resume batch partitions.
    lane_check_interval_ms: int = 100
    # Checkpoints: a stage commits its offsets (and its open exactly-once transaction) when it has caught up,
    # or at the latest this long after the last commit while it has a backlog (one commit for many batches).
    commit_interval_ms: int = 250
    metrics_port: int = 0
    max_message_bytes: int = 16 * 1024 * 1024
    # The bound of a stage consumer's local queue of pre-fetched records (librdkafka's
    # queued.max.messages.kbytes; its default, 64 MiB, can hold ~120 tensors in inference's memory). A
    # record larger than the bound is still fetched, one at a time.
    prefetch_kbytes: int = 8192
    # Producer compression (lz4 shrinks the letterboxed tensors' padding; JPEG/PNG bytes do not
    # shrink). Measured with `detectflow bench pipeline`: no CPU difference against "none" here.
    compression: str = "lz4"
    # Topics that hold image bytes or tensors (the lanes, their retry and DLQ topics) keep records at most
    # this long (`detectflow topics apply` sets retention.ms). Must exceed the longest backlog a lane may hold.
    raw_retention_hours: float = 6.0
    topic_prefix: str = ""
    # Stable per deployment slot (e.g. a pod name): the transactional id of exactly-once stages
    # derives from it, so a restarted instance fences its predecessor. Empty: random per process.
    instance_id: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StreamSettings:
        env = os.environ if env is None else env
        stack = StackSettings.from_env(env)

        def num(name: str, default: float) -> float:
            return _num(env, name, default)

        return cls(
            bootstrap=_get(env, "KAFKA_BOOTSTRAP", stack.kafka_bootstrap),
            kafka_user=_get(env, "KAFKA_USER", "admin"),
            kafka_users_dir=Path(_get(env, "KAFKA_USERS_DIR", str(stack.kafka_users_dir))),
            tls_ca_file=_path(env, "TLS_CA_FILE", stack.tls_ca_file),
            registry_url=_get(env, "REGISTRY_URL", stack.registry_url),
            cassandra_hosts=tuple(_get(env, "CASSANDRA_HOSTS", stack.host).split(",")),
            cassandra_port=stack.cassandra_port,
            keyspace=_get(env, "CASSANDRA_KEYSPACE", "detectflow"),
            cassandra_secrets_dir=_path(env, "CASSANDRA_SECRETS_DIR", stack.cassandra_roles_dir),
            cassandra_ca_file=_path(env, "CASSANDRA_CA_FILE", stack.tls_ca_file),
            max_batch=int(num("MAX_BATCH", 64)),
            max_wait_ms=int(num("MAX_WAIT_MS", 50)),
            backoff_attempts=int(num("BACKOFF_ATTEMPTS", 3)),
            backoff_initial_ms=int(num("BACKOFF_INITIAL_MS", 200)),
            backoff_max_ms=int(num("BACKOFF_MAX_MS", 2000)),
            flush_timeout_s=num("FLUSH_TIMEOUT_S", 30.0),
            lane_check_interval_ms=int(num("LANE_CHECK_INTERVAL_MS", 100)),
            commit_interval_ms=int(num("COMMIT_INTERVAL_MS", 250)),
            max_message_bytes=int(num("MAX_MESSAGE_BYTES", 16 * 1024 * 1024)),
            prefetch_kbytes=int(num("PREFETCH_KBYTES", 8192)),
            instance_id=_get(env, "INSTANCE_ID", ""),
            retry_delay_ms=int(num("RETRY_DELAY_MS", 2000)),
            retry_delay_max_ms=int(num("RETRY_DELAY_MAX_MS", 30000)),
            retry_budget_ms=int(num("RETRY_BUDGET_MS", 900000)),
            poison_max_crashes=int(num("POISON_MAX_CRASHES", 3)),
            state_dir=_path(env, "STATE_DIR", stack.home / "run"),
            metrics_port=int(num("METRICS_PORT", 0)),
            topic_prefix=_get(env, "TOPIC_PREFIX", ""),
            compression=_get(env, "COMPRESSION", "lz4"),
            raw_retention_hours=_positive(env, "RAW_RETENTION_HOURS", 6.0),
        )

    def cassandra_credentials(self, role: str) -> Login:
        """The login of one Cassandra role (its grants cover only the tables that role uses)."""
        if self.cassandra_secrets_dir is None:
            raise SettingsError(f"no Cassandra credentials directory configured ({ENV_PREFIX}CASSANDRA_SECRETS_DIR)")
        if not role.replace("-", "").isalnum():
            raise SettingsError(f"invalid Cassandra role {role!r}")
        return Login.load(self.cassandra_secrets_dir / f"{role}.json")


@dataclass(frozen=True)
class LifecycleSettings:
    """The model registry, its release gate and the canary guardrails (model_store/, processors/monitor.py)."""

    models_bucket: str = "models"
    # Release gate on push: mAP@0.5 on the evaluation set may be at most this far below production's,
    # and the P95 of single-image latency (batch 1, this host) must stay within the budget.
    gate_max_map_drop: float = 0.03
    gate_p95_budget_ms: float = 400.0
    gate_latency_rounds: int = 3
    # Canary guardrails: compared over the last window_s of results, once both sides have
    # min_samples; a breach rolls the canary back automatically.
    guard_window_s: float = 300.0
    guard_min_samples: int = 20
    guard_max_error_rate_delta: float = 0.05  # canary FAILED share minus production's
    guard_latency_factor: float = 1.5  # canary P95 model latency over production's ...
    guard_latency_slack_ms: float = 20.0  # ... plus this slack
    guard_check_interval_s: float = 2.0
    # Inference keeps at most this many versions of a model loaded (production, canary, the previous
    # production for an instant rollback, recent pins); others load on demand.
    max_loaded_versions: int = 3
    # How long a process waits at start to read the `models` topic to its end.
    watch_catch_up_s: float = 30.0
    # promote/canary wait this long for an inference process to report the version READY.
    ready_wait_s: float = 60.0
    # Shadow/production result pairs waiting for their other half (bounded; the oldest are dropped).
    shadow_pending_max: int = 10_000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LifecycleSettings:
        def num(name: str, default: float) -> float:
            return _num(env, name, default)

        return cls(
            models_bucket=_get(env, "MODELS_BUCKET", "models"),
            gate_max_map_drop=num("GATE_MAX_MAP_DROP", 0.03),
            gate_p95_budget_ms=num("GATE_P95_BUDGET_MS", 400.0),
            gate_latency_rounds=int(num("GATE_LATENCY_ROUNDS", 3)),
            guard_window_s=num("GUARD_WINDOW_S", 300.0),
            guard_min_samples=int(num("GUARD_MIN_SAMPLES", 20)),
            guard_max_error_rate_delta=num("GUARD_MAX_ERROR_RATE_DELTA", 0.05),
            guard_latency_factor=num("GUARD_LATENCY_FACTOR", 1.5),
            guard_latency_slack_ms=num("GUARD_LATENCY_SLACK_MS", 20.0),
            guard_check_interval_s=num("GUARD_CHECK_INTERVAL_S", 2.0),
            max_loaded_versions=int(num("MAX_LOADED_VERSIONS", 3)),
            watch_catch_up_s=num("WATCH_CATCH_UP_S", 30.0),
            ready_wait_s=num("READY_WAIT_S", 60.0),
            shadow_pending_max=int(num("SHADOW_PENDING_MAX", 10_000)),
        )


# The review copies' lifetimes the review bucket has lifecycle rules for (infra/stack/minio.py): a tenant
# policy's override, and DETECTFLOW_REVIEW_RETENTION_DAYS, must be one of them.
REVIEW_RETENTION_DAYS = (7, 30, 90, 365)


def _review_days(env: Mapping[str, str]) -> int:
    value = _num(env, "REVIEW_RETENTION_DAYS", 30)
    if value not in REVIEW_RETENTION_DAYS:
        raise SettingsError(f"{ENV_PREFIX}REVIEW_RETENTION_DAYS={value:g} must be one of {REVIEW_RETENTION_DAYS}")
    return int(value)


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of the detection pipeline's roles (scan, preprocess, inference, postprocess, recorder)."""

    stream: StreamSettings
    models_dir: Path
    minio_endpoint: str = "127.0.0.1:9000"
    # One credentials file per MinIO role (<dir>/<role>.json, made by `stack up`): read on use, never in repr.
    minio_secrets_dir: Path | None = None
    clamd_host: str = "127.0.0.1"
    clamd_port: int = 3310
    clamd_timeout_s: float = 30.0
    default_model: str = "yolov4-tiny"
    uploads_bucket: str = "uploads"
    quarantine_bucket: str = "quarantine"
    # Images up to this size travel inline from scan to preprocess: the bytes scanned are the bytes
    # decoded (no re-fetch, no swap between the two). Larger ones are re-fetched and their sha256 checked.
    inline_max_bytes: int = 4 * 1024 * 1024
    image_max_bytes: int = 20 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    image_max_side: int = 20_000
    # Decode budget: what an image's pixels may cost once decoded (width x height x channels x bytes per sample,
    # read from the header); over it, the image is REJECTED (DECODE_BUDGET_EXCEEDED) before decoding.
    image_max_decoded_bytes: int = 128 * 1024 * 1024
    # Inference micro-batching (Triton-style): a batch leaves when it has inference_max_batch records or
    # its oldest record has waited the lane's queue delay.
    # On this CPU a batch of 8 runs no faster per image than batch 1 (yolov4-tiny: 40-48 ms/img for
    # batch 1, 4 and 8) but doubles the arena (145 -> 207 -> 353 MiB), so 4 is the CPU default; a GPU
    # wants more (DETECTFLOW_INFERENCE_MAX_BATCH).
    inference_max_batch: int = 4
    batch_queue_delay_ms: int = 25
    # Records per batch of the per-image stages (scan, preprocess, postprocess): small enough that the
    # stages overlap (one stage's batch is in the next stage while it scans the following one).
    stage_max_batch: int = 8
    online_queue_delay_ms: int = 0
    intra_op_threads: int = 0
    # Only candidates at or above the request's score threshold leave inference (records stay small);
    # no request may ask for less than min_score.
    min_score: float = 0.01
    max_candidates: int = 1000
    default_score_threshold: float = 0.25
    nms_iou: float = 0.45
    default_max_detections: int = 100
    max_detections_limit: int = 300
    cache_ttl_s: int = 7 * 24 * 3600
    result_ttl_s: int = 30 * 24 * 3600
    # Content policy (processors/governance.py, docs/security.md): policies are cached in-process this long,
    # so a policy change applies within it. (Tombstones are never cached: they are read per batch.)
    policy_cache_s: float = 10.0
    # The recorder's job tracker counts again, this often, the jobs whose completion check failed (Cassandra
    # away), at most 50 per round, so a job whose last result was stored completes after an outage (0: never).
    job_recheck_s: float = 30.0
    review_bucket: str = "review"
    # How long a review copy is kept unless the tenant's policy overrides it; one of REVIEW_RETENTION_DAYS.
    review_retention_days: int = 30
    # The pipeline stages deliver the batch lane in Kafka transactions, so a crash never duplicates an
    # output for read_committed consumers (job counts stay exact). The online lane is at-least-once by
    # default (a transaction per hop costs it ~15-25 ms here); consumers dedupe by request id and the
    # Cassandra writes are idempotent upserts. online_exactly_once=True puts it in transactions too.
    exactly_once: bool = True
    online_exactly_once: bool = False
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PipelineSettings:
        env = os.environ if env is None else env
        stack = StackSettings.from_env(env)

        def num(name: str, default: float) -> float:
            return _num(env, name, default)

        return cls(
            stream=StreamSettings.from_env(env),
            models_dir=Path(_get(env, "MODELS_DIR", str(stack.models_dir))).expanduser(),
            minio_endpoint=_get(env, "MINIO_ENDPOINT", stack.minio_endpoint),
            minio_secrets_dir=Path(_get(env, "MINIO_SECRETS_DIR", str(stack.minio_roles_dir))),
            clamd_host=_get(env, "CLAMD_HOST", stack.host),
            clamd_port=stack.clamd_port,
            clamd_timeout_s=num("CLAMD_TIMEOUT_S", 30.0),
            default_model=_get(env, "DEFAULT_MODEL", "yolov4-tiny"),
            inline_max_bytes=int(num("INLINE_MAX_BYTES", 4 * 1024 * 1024)),
            image_max_bytes=int(num("IMAGE_MAX_BYTES", 20 * 1024 * 1024)),
            image_max_pixels=int(num("IMAGE_MAX_PIXELS", 40_000_000)),
            image_max_side=int(num("IMAGE_MAX_SIDE", 20_000)),
            image_max_decoded_bytes=int(_positive(env, "IMAGE_MAX_DECODED_BYTES", 128 * 1024 * 1024)),
            inference_max_batch=int(num("INFERENCE_MAX_BATCH", 4)),
            stage_max_batch=int(num("STAGE_MAX_BATCH", 8)),
            batch_queue_delay_ms=int(num("BATCH_QUEUE_DELAY_MS", 25)),
            online_queue_delay_ms=int(num("ONLINE_QUEUE_DELAY_MS", 0)),
            intra_op_threads=int(num("INTRA_OP_THREADS", 0)),
            default_score_threshold=num("SCORE_THRESHOLD", 0.25),
            nms_iou=num("NMS_IOU", 0.45),
            cache_ttl_s=int(num("CACHE_TTL_S", 7 * 24 * 3600)),
            result_ttl_s=int(num("RESULT_TTL_S", 30 * 24 * 3600)),
            policy_cache_s=num("POLICY_CACHE_S", 10.0),
            job_recheck_s=num("JOB_RECHECK_S", 30.0),
            review_retention_days=_review_days(env),
            exactly_once=_get(env, "EXACTLY_ONCE", "true").lower() in ("1", "true", "yes"),
            online_exactly_once=_get(env, "ONLINE_EXACTLY_ONCE", "false").lower() in ("1", "true", "yes"),
            lifecycle=LifecycleSettings.from_env(env),
        )

    @property
    def exactly_once_lanes(self) -> frozenset[str]:
        return frozenset({"batch", "online"} if self.online_exactly_once else {"batch"})

    def minio_credentials(self, role: str) -> MinioCredentials:
        """The credentials of one MinIO role (its user's policy grants only what that role does)."""
        if self.minio_secrets_dir is None:
            raise SettingsError("no MinIO credentials directory configured (DETECTFLOW_MINIO_SECRETS_DIR)")
        if not role.replace("-", "").isalnum():
            raise SettingsError(f"invalid MinIO role {role!r}")
        return MinioCredentials.load(self.minio_secrets_dir / f"{role}.json")


# An unclaimed pre-signed upload lives its URL's life plus at least this grace before its lifecycle rule may
# expire it (DETECTFLOW_UNCLAIMED_UPLOAD_DAYS), so a slow client's upload is never removed under it.
UPLOAD_GRACE_S = 3600


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name, "true" if default else "false").strip().lower()
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise SettingsError(f"{ENV_PREFIX}{name}={raw!r} must be true or false")
    return raw in ("1", "true", "yes")


def _upload_ttl(env: Mapping[str, str], stack: StackSettings) -> int:
    value = int(_num(env, "UPLOAD_URL_TTL_S", 900))
    if not 0 < value <= stack.unclaimed_upload_days * 86400 - UPLOAD_GRACE_S:
        raise SettingsError(f"{ENV_PREFIX}UPLOAD_URL_TTL_S={value} must be positive and leave {UPLOAD_GRACE_S} s "
                            f"before {ENV_PREFIX}UNCLAIMED_UPLOAD_DAYS={stack.unclaimed_upload_days} expires uploads")
    return value


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of the HTTP gateway (gateway/)."""

    pipeline: PipelineSettings
    host: str = "127.0.0.1"
    port: int = 8080
    # HTTPS (docs/security.md): the certificate chain and key the gateway serves, PEM; by default the project
    # CA's `gateway` certificate, which `stack up` issues. insecure_http serves plain HTTP instead, for
    # development only (DETECTFLOW_GATEWAY_INSECURE_HTTP=true; the gateway warns when it starts so).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False
    # Where the gateway's URLs point clients (Location headers); pre-signed URLs use public_minio_endpoint.
    public_minio_endpoint: str = "127.0.0.1:9000"
    minio_region: str = "us-east-1"
    # Auth (docs/security.md): RS256 keys from an OpenID provider (oidc_issuer, by discovery) or from a
    # JWKS file. auth_dev turns on the development mode: the local dev keys and, if allowed, HS256.
    auth_dev: bool = False
    oidc_issuer: str | None = None
    jwks_file: Path | None = None
    hs256_secret_file: Path | None = None
    allow_hs256: bool = False
    issuer: str = "detectflow"
    audience: str = "detectflow-api"
    tenant_claim: str = "tenant"
    clock_skew_s: int = 30
    # exp - iat may not exceed this: a leaked long-lived token would otherwise outlive any key rotation.
    max_token_lifetime_s: int = 24 * 3600
    # Key reloads: on an unknown kid at most once per jwks_refresh_min_s; at least every jwks_max_age_s.
    jwks_refresh_min_s: float = 30.0
    jwks_max_age_s: float = 3600.0
    # Fetches from the provider (discovery, JWKS): total deadline, size bound, CA bundle (else the system's).
    idp_timeout_s: float = 5.0
    idp_max_bytes: int = 256 * 1024
    idp_ca_bundle: Path | None = None
    # Sync calls wait for their reply this long by default, at most sync_timeout_max_s.
    sync_timeout_s: float = 10.0
    sync_timeout_max_s: float = 60.0
    max_body_bytes: int = 20 * 1024 * 1024
    # JSON bodies: at most this many bytes and levels of nesting (checked before parsing).
    max_json_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 32
    # Request bodies held by this instance at once (reserved before a body is read; 503 past it).
    max_inflight_body_bytes: int = 256 * 1024 * 1024
    # Per-tenant token bucket and daily quota of images, both shared by every gateway instance: the rate is
    # divided by the live instances (heartbeat rows every instance_heartbeat_s), the quota is one row per day.
    rate_per_s: float = 50.0
    rate_burst: int = 100
    daily_quota: int = 1_000_000
    # The sync path charges the quota row in leases of at most quota_lease_max images (fewer near the limit)
    # and spends them locally; a lease not taken from for quota_lease_idle_s is given back. 1 = one
    # lightweight transaction per call.
    quota_lease_max: int = 50
    quota_lease_idle_s: float = 10.0
    instance_heartbeat_s: float = 5.0
    # Backpressure (docs/api.md, "Overload and fairness"): max_inflight sync calls per instance, each tenant
    # a share of them (capacity / (tenants active in the last active_tenant_window_s + 1), at least
    # sync_share_floor); past max_online_lag only tenants over their share of recent calls are refused, past
    # max_online_lag_hard (default 4 x max_online_lag) every sync call is.
    max_inflight: int = 256
    max_online_lag: int = 500
    max_online_lag_hard: int = 2000
    sync_share_floor: int = 4
    active_tenant_window_s: float = 5.0
    lag_check_interval_s: float = 1.0
    idempotency_ttl_s: int = 24 * 3600
    upload_url_ttl_s: int = 900
    job_max_items: int = 10_000
    page_size_default: int = 100
    page_size_max: int = 1000
    # A results page stops before its encoded items pass this many bytes (the rest is on the next page).
    page_max_bytes: int = 8 * 1024 * 1024
    # This instance's reply partition of detect.replies (one per gateway instance); -1 = pick at random.
    reply_partition: int = -1
    audit_ttl_s: int = 400 * 24 * 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = os.environ if env is None else env
        stack = StackSettings.from_env(env)

        def num(name: str, default: float) -> float:
            return _num(env, name, default)

        def path(name: str, default: Path) -> Path:
            return Path(_get(env, name, str(default))).expanduser()

        pipeline = PipelineSettings.from_env(env)
        return cls(
            pipeline=pipeline,
            host=_get(env, "GATEWAY_HOST", stack.host),
            port=_port(env, "GATEWAY_PORT", 8080),
            **cls._tls_from_env(env, stack),
            public_minio_endpoint=_get(env, "PUBLIC_MINIO_ENDPOINT", pipeline.minio_endpoint),
            **cls._auth_from_env(env, stack),
            audience=_get(env, "JWT_AUDIENCE", "detectflow-api"),
            tenant_claim=_get(env, "JWT_TENANT_CLAIM", "tenant"),
            sync_timeout_s=num("SYNC_TIMEOUT_S", 10.0),
            sync_timeout_max_s=num("SYNC_TIMEOUT_MAX_S", 60.0),
            max_body_bytes=int(num("MAX_BODY_BYTES", 20 * 1024 * 1024)),
            max_json_bytes=_at_least(env, "MAX_JSON_BYTES", 8 * 1024 * 1024, 1024),
            max_json_depth=_at_least(env, "MAX_JSON_DEPTH", 32, 4),
            max_inflight_body_bytes=_at_least(env, "MAX_INFLIGHT_BODY_BYTES", 256 * 1024 * 1024, 1024 * 1024),
            rate_per_s=num("RATE_PER_S", 50.0),
            rate_burst=int(num("RATE_BURST", 100)),
            daily_quota=int(num("DAILY_QUOTA", 1_000_000)),
            quota_lease_max=_at_least(env, "QUOTA_LEASE_MAX", 50, 1),
            quota_lease_idle_s=_positive(env, "QUOTA_LEASE_IDLE_S", 10.0),
            instance_heartbeat_s=num("INSTANCE_HEARTBEAT_S", 5.0),
            max_inflight=int(num("MAX_INFLIGHT", 256)),
            max_online_lag=int(num("MAX_ONLINE_LAG", 500)),
            max_online_lag_hard=_at_least(env, "MAX_ONLINE_LAG_HARD", 4 * int(num("MAX_ONLINE_LAG", 500)), 1),
            sync_share_floor=_at_least(env, "SYNC_SHARE_FLOOR", 4, 1),
            active_tenant_window_s=num("ACTIVE_TENANT_WINDOW_S", 5.0),
            page_max_bytes=_at_least(env, "PAGE_MAX_BYTES", 8 * 1024 * 1024, 64 * 1024),
            lag_check_interval_s=num("LAG_CHECK_INTERVAL_S", 1.0),
            upload_url_ttl_s=_upload_ttl(env, stack),
            job_max_items=int(num("JOB_MAX_ITEMS", 10_000)),
            reply_partition=int(num("REPLY_PARTITION", -1)),
        )

    @property
    def base_url(self) -> str:
        """Where this gateway is reached: https unless insecure_http."""
        return f"{'http' if self.insecure_http else 'https'}://{self.host}:{self.port}"

    @classmethod
    def _tls_from_env(cls, env: Mapping[str, str], stack: StackSettings) -> dict[str, object]:
        insecure = _flag(env, "GATEWAY_INSECURE_HTTP", False)
        cert, key = (_get(env, name, "").strip() for name in ("GATEWAY_TLS_CERT", "GATEWAY_TLS_KEY"))
        if insecure and (cert or key):
            raise SettingsError(f"{ENV_PREFIX}GATEWAY_INSECURE_HTTP=true serves plain HTTP: unset "
                                f"{ENV_PREFIX}GATEWAY_TLS_CERT and {ENV_PREFIX}GATEWAY_TLS_KEY, or the flag")
        if bool(cert) != bool(key):
            raise SettingsError(f"set both {ENV_PREFIX}GATEWAY_TLS_CERT and {ENV_PREFIX}GATEWAY_TLS_KEY, or neither "
                                "(the project CA's gateway certificate)")
        if insecure:
            return {"insecure_http": True, "tls_cert": None, "tls_key": None}
        return {"insecure_http": False,
                "tls_cert": Path(cert).expanduser() if cert else stack.tls_dir / "gateway.crt",
                "tls_key": Path(key).expanduser() if key else stack.tls_dir / "gateway.key"}

    @classmethod
    def _auth_from_env(cls, env: Mapping[str, str], stack: StackSettings) -> dict[str, object]:
        def flag(name: str, default: bool) -> bool:
            raw = _get(env, name, "true" if default else "false").strip().lower()
            if raw not in ("1", "true", "yes", "0", "false", "no"):
                raise SettingsError(f"{ENV_PREFIX}{name}={raw!r} must be true or false")
            return raw in ("1", "true", "yes")

        def positive(name: str, default: float) -> float:
            value = _num(env, name, default)
            if not value > 0:
                raise SettingsError(f"{ENV_PREFIX}{name}={value:g} must be positive")
            return value

        def optional_path(name: str) -> Path | None:
            raw = _get(env, name, "").strip()
            return Path(raw).expanduser() if raw else None

        dev = flag("AUTH_DEV", False)
        oidc_issuer = _get(env, "OIDC_ISSUER", "").strip() or None
        if oidc_issuer is not None and (why := cls.idp_url_problem(oidc_issuer)):
            raise SettingsError(f"{ENV_PREFIX}OIDC_ISSUER={oidc_issuer!r}: {why}")
        jwks_file = optional_path("JWKS_FILE")
        if oidc_issuer is not None and jwks_file is not None:
            raise SettingsError(f"set {ENV_PREFIX}OIDC_ISSUER or {ENV_PREFIX}JWKS_FILE, not both")
        if dev and oidc_issuer is None and jwks_file is None:
            jwks_file = stack.secrets_dir / "jwks.json"  # the dev keys (gateway/devkeys.py)
        # HS256 is a shared secret: anyone who can verify can also mint. Development only.
        allow_hs256 = flag("ALLOW_HS256", dev)
        if allow_hs256 and not dev:
            raise SettingsError(f"{ENV_PREFIX}ALLOW_HS256=true needs {ENV_PREFIX}AUTH_DEV=true (HS256 is for "
                                "development only)")
        ca_bundle = optional_path("OIDC_CA_BUNDLE")
        if ca_bundle is not None and not ca_bundle.is_file():
            raise SettingsError(f"{ENV_PREFIX}OIDC_CA_BUNDLE={str(ca_bundle)!r} is not a file")
        return {
            "auth_dev": dev,
            "oidc_issuer": oidc_issuer,
            "jwks_file": jwks_file,
            "hs256_secret_file": (optional_path("HS256_SECRET_FILE") or stack.secrets_dir / "jwt-hs256.key"
                                  if allow_hs256 else None),
            "allow_hs256": allow_hs256,
            # Tokens from the provider carry its issuer URL as iss.
            "issuer": _get(env, "JWT_ISSUER", oidc_issuer or "detectflow"),
            "clock_skew_s": int(_num(env, "JWT_CLOCK_SKEW_S", 30)),
            "max_token_lifetime_s": int(positive("JWT_MAX_LIFETIME_S", 24 * 3600)),
            "jwks_refresh_min_s": _num(env, "JWKS_REFRESH_MIN_S", 30.0),
            "jwks_max_age_s": positive("JWKS_MAX_AGE_S", 3600.0),
            "idp_timeout_s": positive("OIDC_TIMEOUT_S", 5.0),
            "idp_max_bytes": int(positive("OIDC_MAX_BYTES", 256 * 1024)),
            "idp_ca_bundle": ca_bundle,
        }

    @staticmethod
    def idp_url_problem(url: str) -> str | None:
        """Why the gateway will not fetch keys from ``url``, or None when it may."""
        import ipaddress
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if not parts.hostname:
            return "not an absolute URL"
        if parts.scheme == "https":
            return None
        if parts.scheme != "http":
            return "only https (or http to a loopback host) is allowed"
        # Plain http would let anyone on the path swap the keys, and so mint any token. On a loopback host
        # nothing is on the path: that is a provider on this machine (a test, a sidecar), so http is allowed.
        try:
            loopback = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        return None if loopback else "plain http is only allowed to a loopback host; use https"

    def require_auth_source(self) -> None:
        """The gateway refuses to start with no way to verify tokens (it never creates keys on its own)."""
        if self.oidc_issuer is None and self.jwks_file is None:
            raise SettingsError(
                f"the gateway needs {ENV_PREFIX}OIDC_ISSUER (an OpenID provider's issuer URL) or {ENV_PREFIX}"
                f"JWKS_FILE (a JWKS file of RS256 keys); for local development set {ENV_PREFIX}AUTH_DEV=true")
