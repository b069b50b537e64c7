"""The pipeline's roles: how each one is built from settings and run on the stream runtime."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from config import PipelineSettings

# The detection pipeline.
ROLES = ("bridge", "scan", "preprocess", "inference", "postprocess", "recorder")
# The model lifecycle beside it: the shadow version's runner and the guardrail/agreement monitor.
LIFECYCLE_ROLES = ("shadow", "monitor")
# What `detectflow run all` starts: the pipeline, the lifecycle roles and the HTTP gateway.
SERVICES = (*ROLES, *LIFECYCLE_ROLES, "gateway")

log = logging.getLogger(__name__)

# Every role runs in its own process and imports only what its stage needs (below, inside the functions): the
# inference process alone loads ONNX Runtime, scan alone the clamd client, and `detectflow --help` or the supervisor
# none of them. Each such import says so in a short comment ("own stage only").


def _results(settings: PipelineSettings, role: str, session: Any = None) -> Any:
    # own stage only (see the note at the top)
    from processors.results import ResultStore
    from stream.cassandra import connect

    return ResultStore(session or connect(settings.stream, role), result_ttl_s=settings.result_ttl_s,
                       cache_ttl_s=settings.cache_ttl_s)


def _governance(settings: PipelineSettings, results: Any) -> Any:
    """Tombstones and tenant policies (processors/governance.py), on the result store's session."""
    # own stage only (see the note at the top)
    from processors.governance import Governance

    return Governance(results.session, policy_cache_s=settings.policy_cache_s)


def instance_name(role: str, settings: PipelineSettings) -> str:
    return f"{role}@{settings.stream.instance_id or socket.gethostname()}:{os.getpid()}"


def catalog(settings: PipelineSettings, role: str, *, watch: bool, table: Any = None) -> Any:
    """The role's model catalog: version folders fetched from the registry on first use; with ``watch``,
    routed by the registry's `models` topic (read to its end before this returns); else by ``table`` if given
    (a ``model_watcher``'s)."""
    # own stage only (see the note at the top)
    from model_store.control.registry import ModelObjects, fetcher
    from model_store.serving.catalog import ModelCatalog
    from stream.objectstore import minio_client

    objects = ModelObjects(minio_client(settings, role), settings.lifecycle.models_bucket)
    fetch = fetcher(objects, settings.models_dir)
    if watch:
        table = model_watcher(settings).table
    return ModelCatalog(settings.models_dir, table=table, fetch=fetch)


def model_watcher(settings: PipelineSettings) -> Any:
    """A started ModelWatcher: the registry's `models` topic read to its end (within the catch-up deadline)."""
    # own stage only (see the note at the top)
    from model_store.control.watch import ModelWatcher
    from stream.kafka import kafka_connection

    watcher = ModelWatcher(kafka_connection(settings.stream), settings.stream.registry_url,
                           settings.stream.topic_prefix, registry_ca=settings.stream.tls_ca_file)
    return watcher.start(settings.lifecycle.watch_catch_up_s)


def _reporter(role: str, settings: PipelineSettings) -> Any:
    """A ModelPool listener that reports READY and LOAD_FAILED on `models` (the registry and the other
    processes route around a version no instance could load)."""
    # own stage only (see the note at the top)
    from model_store.control.registry import ModelEventLog
    from model_store.serving.pool import LOAD_FAILED, READY
    from stream.kafka import kafka_connection

    events = ModelEventLog(kafka_connection(settings.stream), settings.stream.registry_url,
                           settings.stream.topic_prefix, registry_ca=settings.stream.tls_ca_file)
    instance = instance_name(role, settings)

    def report(event: Any) -> None:
        if event.action not in (READY, LOAD_FAILED):
            return
        try:
            events.report(event.model, event.version, event.action, instance, event.reason)
        except Exception as exc:  # a report is information; serving must not stop when Kafka hiccups
            log.warning("could not report %s %s v%s: %s", event.action, event.model, event.version, exc)
    return report


def build(role: str, settings: PipelineSettings) -> tuple[Any, dict[str, Any]]:
    """The stage object of ``role`` and the runtime options it runs with."""
    stream = settings.stream
    txn = {"exactly_once": settings.exactly_once, "exactly_once_lanes": settings.exactly_once_lanes}
    eos: dict[str, Any] = {**txn, "max_batch": settings.stage_max_batch}
    if role == "bridge":
        # own stage only (see the note at the top)
        from stream.bridge import BridgeStage, CassandraClaims
        from stream.cassandra import connect

        return BridgeStage(CassandraClaims(connect(stream, role)), default_model=settings.default_model,
                           prefix=stream.topic_prefix), {"exactly_once": True}
    if role == "scan":
        # own stage only (see the note at the top)
        from processors.objects import ObjectStore
        from processors.scan import ScanStage
        from processors.scanner import ClamdScanner
        from stream.objectstore import minio_client

        scanner = ClamdScanner(settings.clamd_host, settings.clamd_port, settings.clamd_timeout_s)
        results = _results(settings, role)
        return ScanStage(ObjectStore(minio_client(settings, role)), scanner, catalog(settings, role, watch=True),
                         results, settings, _governance(settings, results)), eos
    if role == "preprocess":
        # own stage only (see the note at the top)
        from processors.objects import ObjectStore
        from processors.preprocess import PreprocessStage
        from stream.objectstore import minio_client

        return PreprocessStage(ObjectStore(minio_client(settings, role)), catalog(settings, role, watch=False),
                               settings), eos
    if role == "inference":
        # own stage only (see the note at the top)
        from processors.inference import InferenceStage, model_pool

        watcher = model_watcher(settings)
        cat = catalog(settings, role, watch=False, table=watcher.table)
        pool = model_pool(cat, settings)
        pool.add_listener(_reporter(role, settings))
        stage = InferenceStage(cat, settings, pool)
        loaded = stage.warm_up()  # load -> warm-up -> only then consume
        watcher.add_listener(stage.on_routing, current=True)  # what the registry routes to, loaded in the background
        if loaded is not None:
            log.info("inference: serving %s v%s on %s", loaded.version.name, loaded.version.version,
                     ", ".join(loaded.providers))
        return stage, {**txn, "max_batch": settings.inference_max_batch,
                       "queue_delay_ms": {"online": settings.online_queue_delay_ms,
                                          "batch": settings.batch_queue_delay_ms}}
    if role == "postprocess":
        # own stage only (see the note at the top)
        from processors.objects import ObjectStore
        from processors.postprocess import PostprocessStage
        from stream.objectstore import minio_client

        results = _results(settings, role)
        return PostprocessStage(catalog(settings, role, watch=False), results, settings,
                                _governance(settings, results), ObjectStore(minio_client(settings, role))), eos
    if role == "shadow":
        # own stage only (see the note at the top)
        from processors.shadow import ShadowStage

        watcher = model_watcher(settings)
        shadow = ShadowStage(catalog(settings, role, watch=False, table=watcher.table), settings)
        watcher.add_listener(shadow.on_routing, current=True)
        return shadow, {"max_batch": settings.inference_max_batch,
                        "queue_delay_ms": {"online": settings.batch_queue_delay_ms,
                                           "batch": settings.batch_queue_delay_ms}}
    if role == "monitor":
        # own stage only (see the note at the top)
        from model_store.control.registry import connect_registry
        from processors.monitor import MonitorStage

        registry = connect_registry(settings, role=role)
        return MonitorStage(catalog(settings, role, watch=True).table, registry, settings), {}
    if role == "recorder":
        # own stage only (see the note at the top)
        from processors.jobs import CassandraJobs, JobTracker
        from processors.recorder import RecorderStage
        from stream.cassandra import AuditLog, connect

        session = connect(stream, role)
        jobs = JobTracker(CassandraJobs(session), stream.topic_prefix, recheck_s=settings.job_recheck_s)
        results = _results(settings, role, session)
        return RecorderStage(results, stream.topic_prefix, jobs, _governance(settings, results),
                             audit=AuditLog(session)), {}
    raise ValueError(f"unknown role {role!r}; one of {', '.join((*ROLES, *LIFECYCLE_ROLES))}")


def run_role(role: str, settings: PipelineSettings) -> None:
    if role == "gateway":
        run_gateway()
        return

    # own stage only (see the note at the top)
    from stream.runtime import run_stage

    # Each role is its own Kafka principal (its ACLs: infra/stack/kafka_access.py).
    settings = settings.replace(stream=settings.stream.replace(kafka_user=role))
    stage, options = build(role, settings)
    run_stage(stage, settings.stream, **options)


def run_gateway() -> None:
    # own stage only (see the note at the top)
    from config import GatewaySettings, StackSettings
    from gateway.app import run_gateway as serve
    from gateway.devkeys import ensure_dev_keys

    settings = GatewaySettings.from_env()
    stream = settings.pipeline.stream.replace(kafka_user="gateway")  # its own Kafka principal
    settings = settings.replace(pipeline=settings.pipeline.replace(stream=stream))
    settings.require_auth_source()  # refused here, naming the variables, rather than deep in the app's start
    secrets_dir = StackSettings.from_env().secrets_dir
    # Only in dev mode, never silently: the local stack's development keys (`detectflow token` signs with them).
    if settings.auth_dev and settings.jwks_file is not None and settings.jwks_file.parent == secrets_dir:
        ensure_dev_keys(secrets_dir)
        log.warning("gateway: development auth mode (DETECTFLOW_AUTH_DEV=true): tokens signed with the dev keys "
                    "in %s are accepted", secrets_dir)
    if settings.insecure_http:
        log.warning("gateway: plain HTTP (DETECTFLOW_GATEWAY_INSECURE_HTTP=true): tokens and images cross the network "
                    "unencrypted; for development only")
    log.info("gateway: serving on %s", settings.base_url)
    serve(settings)
