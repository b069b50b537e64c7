"""Settings of the detection pipeline's roles and of the model lifecycle (registry, release gate, canaries)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import AfterValidator, Field

from config.base import EnvPath, OptionalPath, Port, Settings, SettingsError, setting
from config.credentials import MinioCredentials
from config.stack import StackSettings
from config.stream import StreamSettings

# The review copies' lifetimes the review bucket has lifecycle rules for (infra/stack/minio.py): a tenant
# policy's override, and DETECTFLOW_REVIEW_RETENTION_DAYS, must be one of them.
REVIEW_RETENTION_DAYS = (7, 30, 90, 365)


def _review_days(days: int) -> int:
    if days not in REVIEW_RETENTION_DAYS:
        raise ValueError(f"must be one of {REVIEW_RETENTION_DAYS}")
    return days


Share = Annotated[float, Field(ge=0, le=1)]


class LifecycleSettings(Settings):
    """The model registry, its release gate and the canary guardrails (model_store/, processors/monitor.py)."""

    models_bucket: str = setting("models", doc="MinIO bucket of the model registry", min_length=1)
    # Release gate on push: mAP@0.5 on the evaluation set may be at most this far below production's,
    # and the P95 of single-image latency (batch 1, this host) must stay within the budget.
    gate_max_map_drop: Share = setting(0.03, doc="Release gate: largest mAP@0.5 drop against production")
    gate_p95_budget_ms: float = setting(400.0, doc="Release gate: P95 single-image latency budget (ms)", gt=0)
    gate_latency_rounds: int = setting(3, doc="Release gate: latency measurement rounds", ge=1)
    # Canary guardrails: compared over the last window_s of results, once both sides have
    # min_samples; a breach rolls the canary back automatically.
    guard_window_s: float = setting(300.0, doc="Canary guardrails: window of results compared (s)", gt=0)
    guard_min_samples: int = setting(20, doc="Canary guardrails: results each side needs before comparing", ge=1)
    guard_max_error_rate_delta: Share = setting(0.05, doc="Canary guardrails: largest FAILED share over production's")
    guard_latency_factor: float = setting(1.5, doc="Canary guardrails: largest P95 latency ratio to production's",
                                          gt=0)
    guard_latency_slack_ms: float = setting(20.0, doc="Canary guardrails: latency slack over the ratio (ms)", ge=0)
    guard_check_interval_s: float = setting(2.0, doc="Canary guardrails: how often they are checked (s)", gt=0)
    # Inference keeps at most this many versions of a model loaded (production, canary, the previous
    # production for an instant rollback, recent pins); others load on demand.
    max_loaded_versions: int = setting(3, doc="Versions of one model inference keeps loaded", ge=1)
    # How long a process waits at start to read the `models` topic to its end.
    watch_catch_up_s: float = setting(30.0, doc="How long a process waits at start to read the models topic (s)",
                                      ge=0)
    # promote/canary wait this long for an inference process to report the version READY.
    ready_wait_s: float = setting(60.0, doc="How long promote/canary wait for a version READY (s)", ge=0)
    # Shadow/production result pairs waiting for their other half (bounded; the oldest are dropped).
    shadow_pending_max: int = setting(10_000, doc="Shadow result pairs waiting for their other half, at most",
                                      ge=1)


class PipelineSettings(Settings):
    """Settings of the detection pipeline's roles (scan, preprocess, inference, postprocess, recorder)."""

    stream: StreamSettings = Field(description="The stream runtime's settings")
    models_dir: EnvPath = setting(doc="Local model repository; default <home>/models", empty_unsets=True)
    minio_endpoint: str = setting("127.0.0.1:9000", doc="MinIO S3 endpoint (host:port); default <host>:<minio_port>",
                                  min_length=1)
    # One credentials file per MinIO role (<dir>/<role>.json, made by `stack up`): read on use, never in repr.
    minio_secrets_dir: OptionalPath = setting(None, doc="Directory of MinIO roles' credentials files; "
                                                        "default <home>/secrets/minio")
    clamd_host: str = setting("127.0.0.1", doc="clamd host; default the stack's host", min_length=1)
    clamd_port: Port = setting(3310, doc="clamd TCP port")
    clamd_timeout_s: float = setting(30.0, doc="Deadline of one clamd scan (s)", gt=0)
    default_model: str = setting("yolov4-tiny", doc="Model a request without one is served by", min_length=1)
    uploads_bucket: str = setting("uploads", doc="MinIO bucket of uploaded images", min_length=1)
    quarantine_bucket: str = setting("quarantine", doc="MinIO bucket of infected or refused images", min_length=1)
    # Images up to this size travel inline from scan to preprocess: the bytes scanned are the bytes
    # decoded (no re-fetch, no swap between the two). Larger ones are re-fetched and their sha256 checked.
    inline_max_bytes: int = setting(4 * 1024 * 1024, doc="Images up to this size travel inline (bytes)", ge=0)
    image_max_bytes: int = setting(20 * 1024 * 1024, doc="Largest image accepted (bytes)", ge=1)
    image_max_pixels: int = setting(40_000_000, doc="Largest image accepted (pixels)", ge=1)
    image_max_side: int = setting(20_000, doc="Largest image side accepted (pixels)", ge=1)
    # Decode budget: what an image's pixels may cost once decoded (width x height x channels x bytes per sample,
    # read from the header); over it, the image is REJECTED (DECODE_BUDGET_EXCEEDED) before decoding.
    image_max_decoded_bytes: int = setting(128 * 1024 * 1024, doc="Decode budget of one image (bytes)", ge=1)
    # Inference micro-batching (Triton-style): a batch leaves when it has inference_max_batch records or
    # its oldest record has waited the lane's queue delay.
    # On this CPU a batch of 8 runs no faster per image than batch 1 (yolov4-tiny: 40-48 ms/img for
    # batch 1, 4 and 8) but doubles the arena (145 -> 207 -> 353 MiB), so 4 is the CPU default; a GPU
    # wants more (DETECTFLOW_INFERENCE_MAX_BATCH).
    inference_max_batch: int = setting(4, doc="Images per inference batch, at most", ge=1)
    batch_queue_delay_ms: int = setting(25, doc="Batch lane: longest wait of a batch's oldest image (ms)", ge=0)
    # Records per batch of the per-image stages (scan, preprocess, postprocess): small enough that the
    # stages overlap (one stage's batch is in the next stage while it scans the following one).
    stage_max_batch: int = setting(8, doc="Records per batch of the per-image stages, at most", ge=1)
    online_queue_delay_ms: int = setting(0, doc="Online lane: longest wait of a batch's oldest image (ms)", ge=0)
    intra_op_threads: int = setting(0, doc="ONNX Runtime intra-op threads (0: its default)", ge=0)
    # Only candidates at or above the request's score threshold leave inference (records stay small);
    # no request may ask for less than min_score.
    min_score: Share = setting(0.01, doc="Lowest score threshold a request may ask for")
    max_candidates: int = setting(1000, doc="Candidates per image leaving inference, at most", ge=1)
    default_score_threshold: Share = setting(0.25, doc="Score threshold of a request without one",
                                             env="SCORE_THRESHOLD")
    nms_iou: Share = setting(0.45, doc="IoU above which non-maximum suppression drops a box")
    default_max_detections: int = setting(100, doc="Detections per image of a request without a limit", ge=1)
    max_detections_limit: int = setting(300, doc="Detections per image a request may ask for, at most", ge=1)
    cache_ttl_s: int = setting(7 * 24 * 3600, doc="Lifetime of a cached result by content hash (s)", ge=1)
    result_ttl_s: int = setting(30 * 24 * 3600, doc="Lifetime of a stored result (s)", ge=1)
    # Content policy (processors/governance.py, docs/security.md): policies are cached in-process this long,
    # so a policy change applies within it. (Tombstones are never cached: they are read per batch.)
    policy_cache_s: float = setting(10.0, doc="How long a tenant's content policy is cached (s)", ge=0)
    # The recorder's job tracker counts again, this often, the jobs whose completion check failed (Cassandra
    # away), at most 50 per round, so a job whose last result was stored completes after an outage (0: never).
    job_recheck_s: float = setting(30.0, doc="How often unfinished job counts are re-checked (s; 0: never)", ge=0)
    review_bucket: str = setting("review", doc="MinIO bucket of review copies", min_length=1)
    # How long a review copy is kept unless the tenant's policy overrides it; one of REVIEW_RETENTION_DAYS.
    review_retention_days: Annotated[int, AfterValidator(_review_days)] = setting(
        30, doc=f"Days a review copy is kept, one of {REVIEW_RETENTION_DAYS}")
    # The pipeline stages deliver the batch lane in Kafka transactions, so a crash never duplicates an
    # output for read_committed consumers (job counts stay exact). The online lane is at-least-once by
    # default (a transaction per hop costs it ~15-25 ms here); consumers dedupe by request id and the
    # Cassandra writes are idempotent upserts. online_exactly_once=True puts it in transactions too.
    exactly_once: bool = setting(True, doc="Batch lane in Kafka transactions (true/false)")
    online_exactly_once: bool = setting(False, doc="Online lane in Kafka transactions too (true/false)")
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings, description="The model lifecycle")

    @classmethod
    def _env_base(cls, env: Mapping[str, str]) -> dict[str, Any]:
        return {"stream": StreamSettings.from_env(env), "lifecycle": LifecycleSettings.from_env(env),
                "models_dir": StackSettings.from_env(env).models_dir}

    def _env_defaults(self, env: Mapping[str, str]) -> dict[str, Any]:
        stack = StackSettings.from_env(env)
        return {"minio_endpoint": stack.minio_endpoint, "minio_secrets_dir": stack.minio_roles_dir,
                "clamd_host": stack.host, "clamd_port": stack.clamd_port}

    @property
    def exactly_once_lanes(self) -> frozenset[str]:
        return frozenset({"batch", "online"} if self.online_exactly_once else {"batch"})

    def minio_credentials(self, role: str) -> MinioCredentials:
        """The credentials of one MinIO role (its user's policy grants only what that role does)."""
        if self.minio_secrets_dir is None:
            raise SettingsError("no MinIO credentials directory configured (DETECTFLOW_MINIO_SECRETS_DIR)")
        if not role.replace("-", "").isalnum():
            raise SettingsError(f"invalid MinIO role {role!r}")
        return MinioCredentials.load(Path(self.minio_secrets_dir) / f"{role}.json")
