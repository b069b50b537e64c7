"""The pipeline's roles: how each one is built from settings and run on the stream runtime."""

from __future__ import annotations

import logging
from typing import Any

from infra.settings import PipelineSettings

ROLES = ("bridge", "scan", "preprocess", "inference", "postprocess", "recorder")
# What `detectflow run all` starts: the pipeline and the HTTP gateway.
SERVICES = (*ROLES, "gateway")

log = logging.getLogger(__name__)


def _results(settings: PipelineSettings, session: Any = None) -> Any:
    from processors.results import ResultStore
    from stream.cassandra import connect

    return ResultStore(session or connect(settings.stream), result_ttl_s=settings.result_ttl_s,
                       cache_ttl_s=settings.cache_ttl_s)


def build(role: str, settings: PipelineSettings) -> tuple[Any, dict[str, Any]]:
    """The stage object of ``role`` and the runtime options it runs with."""
    from model_store.catalog import ModelCatalog

    stream = settings.stream
    txn = {"exactly_once": settings.exactly_once, "exactly_once_lanes": settings.exactly_once_lanes}
    eos: dict[str, Any] = {**txn, "max_batch": settings.stage_max_batch}
    if role == "bridge":
        from stream.bridge import BridgeStage, CassandraClaims
        from stream.cassandra import connect

        return BridgeStage(CassandraClaims(connect(stream)), prefix=stream.topic_prefix), {"exactly_once": True}
    if role == "scan":
        from processors.objects import ObjectStore, minio_client
        from processors.scan import ScanStage
        from processors.scanner import ClamdScanner

        scanner = ClamdScanner(settings.clamd_host, settings.clamd_port, settings.clamd_timeout_s)
        return ScanStage(ObjectStore(minio_client(settings)), scanner, ModelCatalog(settings.models_dir),
                         _results(settings), settings), eos
    if role == "preprocess":
        from processors.objects import ObjectStore, minio_client
        from processors.preprocess import PreprocessStage

        return PreprocessStage(ObjectStore(minio_client(settings)), ModelCatalog(settings.models_dir), settings), eos
    if role == "inference":
        from processors.inference import InferenceStage

        stage = InferenceStage(ModelCatalog(settings.models_dir), settings)
        loaded = stage.warm_up()  # load -> warm-up -> only then consume
        log.info("inference: serving %s v%s on %s", loaded.version.name, loaded.version.version,
                 ", ".join(loaded.providers))
        return stage, {**txn, "max_batch": settings.inference_max_batch,
                       "queue_delay_ms": {"online": settings.online_queue_delay_ms,
                                          "batch": settings.batch_queue_delay_ms}}
    if role == "postprocess":
        from model_store.catalog import ModelCatalog
        from processors.postprocess import PostprocessStage

        return PostprocessStage(ModelCatalog(settings.models_dir), _results(settings), settings), eos
    if role == "recorder":
        from processors.jobs import CassandraJobs, JobTracker
        from processors.recorder import RecorderStage
        from stream.cassandra import connect

        session = connect(stream)
        jobs = JobTracker(CassandraJobs(session), stream.topic_prefix)
        return RecorderStage(_results(settings, session), stream.topic_prefix, jobs), {}
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


def run_role(role: str, settings: PipelineSettings) -> None:
    if role == "gateway":
        run_gateway()
        return
    from stream.runtime import run_stage

    stage, options = build(role, settings)
    run_stage(stage, settings.stream, **options)


def run_gateway() -> None:
    from gateway.app import run_gateway as serve
    from gateway.auth import ensure_dev_keys
    from infra.settings import GatewaySettings, StackSettings

    settings = GatewaySettings.from_env()
    secrets_dir = StackSettings.from_env().secrets_dir
    if settings.jwks_file is not None and settings.jwks_file.parent == secrets_dir:
        ensure_dev_keys(secrets_dir)  # the local stack's development keys (`detectflow token` signs with them)
    log.info("gateway: serving on http://%s:%s", settings.host, settings.port)
    serve(settings)
