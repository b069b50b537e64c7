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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackSettings:
        env = os.environ if env is None else env
        home = Path(_get(env, "HOME", str(Path.home() / ".detectflow"))).expanduser()
        return cls(
            home=home.resolve(),
            kafka_port=_port(env, "KAFKA_PORT", 9092),
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
        return self.home / "models"

    @property
    def samples_dir(self) -> Path:
        return self.home / "samples"

    # Client-side addresses.
    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return f"http://{self.host}:{self.registry_port}/apis/ccompat/v7"

    @property
    def minio_endpoint(self) -> str:
        return f"{self.host}:{self.minio_port}"

    def minio_credentials(self) -> MinioCredentials:
        return MinioCredentials.load_or_create(self.secrets_dir / "minio.json")


@dataclass(frozen=True)
class MinioCredentials:
    """Root credentials of the local MinIO, generated once and kept 0600."""

    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def load_or_create(cls, path: Path) -> MinioCredentials:
        if path.exists():
            data = json.loads(path.read_text())
            return cls(access_key=data["access_key"], secret_key=data["secret_key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        creds = cls(access_key="detectflow-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(32))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"access_key": creds.access_key, "secret_key": creds.secret_key}, fh)
        return creds


@dataclass(frozen=True)
class StreamSettings:
    """Settings of a stream-runtime process (a pipeline stage, the bridge)."""

    bootstrap: str = "127.0.0.1:9092"
    registry_url: str = "http://127.0.0.1:8081/apis/ccompat/v7"
    cassandra_hosts: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = 9042
    keyspace: str = "detectflow"
    # A batch leaves the poll when it has max_batch records or max_wait_ms passed.
    max_batch: int = 64
    max_wait_ms: int = 50
    # Transient failures: in-loop backoff attempts, then the retry topic, then the DLQ.
    backoff_attempts: int = 3
    backoff_initial_ms: int = 200
    backoff_max_ms: int = 2000
    retry_max_attempts: int = 5
    retry_delay_ms: int = 2000
    flush_timeout_s: float = 30.0
    # How often the online backlog is measured to pause/resume batch partitions.
    lane_check_interval_ms: int = 100
    metrics_port: int = 0
    max_message_bytes: int = 16 * 1024 * 1024
    # The bound of a stage consumer's local queue of pre-fetched records (librdkafka's
    # queued.max.messages.kbytes; its default, 64 MiB, can hold ~120 tensors in inference's memory). A
    # record larger than the bound is still fetched, one at a time.
    prefetch_kbytes: int = 8192
    # Producer compression (lz4 shrinks the letterboxed tensors' padding; JPEG/PNG bytes do not
    # shrink). Measured with `detectflow bench pipeline`: no CPU difference against "none" here.
    compression: str = "lz4"
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
            registry_url=_get(env, "REGISTRY_URL", stack.registry_url),
            cassandra_hosts=tuple(_get(env, "CASSANDRA_HOSTS", stack.host).split(",")),
            cassandra_port=stack.cassandra_port,
            keyspace=_get(env, "CASSANDRA_KEYSPACE", "detectflow"),
            max_batch=int(num("MAX_BATCH", 64)),
            max_wait_ms=int(num("MAX_WAIT_MS", 50)),
            backoff_attempts=int(num("BACKOFF_ATTEMPTS", 3)),
            backoff_initial_ms=int(num("BACKOFF_INITIAL_MS", 200)),
            backoff_max_ms=int(num("BACKOFF_MAX_MS", 2000)),
            flush_timeout_s=num("FLUSH_TIMEOUT_S", 30.0),
            lane_check_interval_ms=int(num("LANE_CHECK_INTERVAL_MS", 100)),
            max_message_bytes=int(num("MAX_MESSAGE_BYTES", 16 * 1024 * 1024)),
            prefetch_kbytes=int(num("PREFETCH_KBYTES", 8192)),
            instance_id=_get(env, "INSTANCE_ID", ""),
            retry_max_attempts=int(num("RETRY_MAX_ATTEMPTS", 5)),
            retry_delay_ms=int(num("RETRY_DELAY_MS", 2000)),
            metrics_port=int(num("METRICS_PORT", 0)),
            topic_prefix=_get(env, "TOPIC_PREFIX", ""),
            compression=_get(env, "COMPRESSION", "lz4"),
        )


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


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of the detection pipeline's roles (scan, preprocess, inference, postprocess, recorder)."""

    stream: StreamSettings
    models_dir: Path
    minio_endpoint: str = "127.0.0.1:9000"
    minio_secrets_file: Path | None = None  # read on use; never part of repr
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
            minio_secrets_file=Path(_get(env, "MINIO_SECRETS_FILE", str(stack.secrets_dir / "minio.json"))),
            clamd_host=_get(env, "CLAMD_HOST", stack.host),
            clamd_port=stack.clamd_port,
            clamd_timeout_s=num("CLAMD_TIMEOUT_S", 30.0),
            default_model=_get(env, "DEFAULT_MODEL", "yolov4-tiny"),
            inline_max_bytes=int(num("INLINE_MAX_BYTES", 4 * 1024 * 1024)),
            image_max_bytes=int(num("IMAGE_MAX_BYTES", 20 * 1024 * 1024)),
            image_max_pixels=int(num("IMAGE_MAX_PIXELS", 40_000_000)),
            image_max_side=int(num("IMAGE_MAX_SIDE", 20_000)),
            inference_max_batch=int(num("INFERENCE_MAX_BATCH", 4)),
            stage_max_batch=int(num("STAGE_MAX_BATCH", 8)),
            batch_queue_delay_ms=int(num("BATCH_QUEUE_DELAY_MS", 25)),
            online_queue_delay_ms=int(num("ONLINE_QUEUE_DELAY_MS", 0)),
            intra_op_threads=int(num("INTRA_OP_THREADS", 0)),
            default_score_threshold=num("SCORE_THRESHOLD", 0.25),
            nms_iou=num("NMS_IOU", 0.45),
            cache_ttl_s=int(num("CACHE_TTL_S", 7 * 24 * 3600)),
            result_ttl_s=int(num("RESULT_TTL_S", 30 * 24 * 3600)),
            exactly_once=_get(env, "EXACTLY_ONCE", "true").lower() in ("1", "true", "yes"),
            online_exactly_once=_get(env, "ONLINE_EXACTLY_ONCE", "false").lower() in ("1", "true", "yes"),
            lifecycle=LifecycleSettings.from_env(env),
        )

    @property
    def exactly_once_lanes(self) -> frozenset[str]:
        return frozenset({"batch", "online"} if self.online_exactly_once else {"batch"})

    def minio_credentials(self) -> MinioCredentials:
        if self.minio_secrets_file is None:
            raise SettingsError("no MinIO credentials file configured")
        return MinioCredentials.load_or_create(self.minio_secrets_file)


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of the HTTP gateway (gateway/)."""

    pipeline: PipelineSettings
    host: str = "127.0.0.1"
    port: int = 8080
    # Where the gateway's URLs point clients (Location headers); pre-signed URLs use public_minio_endpoint.
    public_minio_endpoint: str = "127.0.0.1:9000"
    minio_region: str = "us-east-1"
    # Auth: RS256 keys from a JWKS file; HS256 (a shared secret file) only when allowed (development).
    jwks_file: Path | None = None
    hs256_secret_file: Path | None = None
    allow_hs256: bool = True
    issuer: str = "detectflow"
    audience: str = "detectflow-api"
    tenant_claim: str = "tenant"
    clock_skew_s: int = 30
    # Sync calls wait for their reply this long by default, at most sync_timeout_max_s.
    sync_timeout_s: float = 10.0
    sync_timeout_max_s: float = 60.0
    max_body_bytes: int = 20 * 1024 * 1024
    # Per-tenant token bucket (per gateway instance) and daily quota of images (shared, in Cassandra).
    rate_per_s: float = 50.0
    rate_burst: int = 100
    daily_quota: int = 1_000_000
    # Backpressure: sync calls are refused fast (503) past these bounds.
    max_inflight: int = 256
    max_online_lag: int = 500
    lag_check_interval_s: float = 1.0
    idempotency_ttl_s: int = 24 * 3600
    upload_url_ttl_s: int = 900
    job_max_items: int = 10_000
    page_size_default: int = 100
    page_size_max: int = 1000
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
            public_minio_endpoint=_get(env, "PUBLIC_MINIO_ENDPOINT", pipeline.minio_endpoint),
            jwks_file=path("JWKS_FILE", stack.secrets_dir / "jwks.json"),
            hs256_secret_file=path("HS256_SECRET_FILE", stack.secrets_dir / "jwt-hs256.key"),
            allow_hs256=_get(env, "ALLOW_HS256", "true").lower() in ("1", "true", "yes"),
            issuer=_get(env, "JWT_ISSUER", "detectflow"),
            audience=_get(env, "JWT_AUDIENCE", "detectflow-api"),
            tenant_claim=_get(env, "JWT_TENANT_CLAIM", "tenant"),
            sync_timeout_s=num("SYNC_TIMEOUT_S", 10.0),
            sync_timeout_max_s=num("SYNC_TIMEOUT_MAX_S", 60.0),
            max_body_bytes=int(num("MAX_BODY_BYTES", 20 * 1024 * 1024)),
            rate_per_s=num("RATE_PER_S", 50.0),
            rate_burst=int(num("RATE_BURST", 100)),
            daily_quota=int(num("DAILY_QUOTA", 1_000_000)),
            max_inflight=int(num("MAX_INFLIGHT", 256)),
            max_online_lag=int(num("MAX_ONLINE_LAG", 500)),
            lag_check_interval_s=num("LAG_CHECK_INTERVAL_S", 1.0),
            upload_url_ttl_s=int(num("UPLOAD_URL_TTL_S", 900)),
            job_max_items=int(num("JOB_MAX_ITEMS", 10_000)),
            reply_partition=int(num("REPLY_PARTITION", -1)),
        )
