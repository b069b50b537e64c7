"""`make demo`: bring the stack and the pipeline up, then detect objects in the sample images.

The sample images (read from package files) go through Kafka like any client's: ImageSubmitted on
the online lane -> scan -> preprocess -> inference -> postprocess -> reply; the table printed is
what came back. The pipeline runs as `detectflow run all` would, and is stopped at the end (the
stack stays up: `detectflow stack down` stops it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from config import PipelineSettings, StackSettings
from infra.detect_cmd import detect_files, format_results, make_client
from infra.models_cmd import actor_name
from infra.roles import LIFECYCLE_ROLES, ROLES
from infra.stack import manager
from infra.stack.kafka_access import provision
from infra.supervisor import Supervisor
from model_store.control.registry import connect_registry
from model_store.tools.convert import convert
from model_store.tools.evalset import ensure_eval_set
from model_store.tools.gate import gate_runner
from model_store.tools.samples import ensure_samples
from stream import topics
from stream.kafka import kafka_connection

if TYPE_CHECKING:
    from model_store.serving.routing import Routing


def bootstrap_default_model(pipeline: PipelineSettings, settings: StackSettings, *, quiet: bool = False) -> Routing:
    """The converted default model is the registry's first version of it (idempotent: pushes by content), and
    its routing is published on the settings' topic prefix (serving follows only the registry's routing);
    returns that routing."""
    registry = connect_registry(pipeline)
    source = pipeline.models_dir / pipeline.default_model / "1"
    outcome = registry.push(pipeline.default_model, source, actor=actor_name(),
                            gate=gate_runner(pipeline.lifecycle, ensure_eval_set(settings)))
    routing = registry.routing(pipeline.default_model) if outcome.created else \
        registry.republish(pipeline.default_model, actor=actor_name())
    registry.close()
    if quiet:
        return routing
    print(f"model registry: {pipeline.default_model} v{outcome.version} "
          f"({'pushed' if outcome.created else 'already there'}, gate {outcome.gate_status}); "
          f"production v{routing.production}")
    return routing


def run_demo(settings: StackSettings, *, bring_up: bool = True, timeout_s: float = 180.0) -> int:
    pipeline = PipelineSettings.from_env()
    if bring_up:
        t0 = time.monotonic()
        manager.up(settings)
        print(manager.format_status(manager.status(settings)))
        print(f"stack healthy in {time.monotonic() - t0:.1f}s")
        print(f"secured: TLS on every service (project CA: {settings.tls_dir / 'ca.crt'}); Kafka SCRAM per role + "
              "ACLs; Cassandra a login per role; MinIO a user per role, objects encrypted at rest (SSE-S3); "
              f"credentials in {settings.secrets_dir} (0600; docs/security.md)\n")
    prefix = pipeline.stream.topic_prefix
    created = [n for n, a in provision(kafka_connection(pipeline.stream), prefix, topics.all_topics(prefix)).items()
               if a == "created"]
    if created:
        print(f"created {len(created)} topics")
    convert(pipeline.models_dir / pipeline.default_model / "1")
    bootstrap_default_model(pipeline, settings)
    images = ensure_samples(settings.samples_dir, settings.cache_dir)

    sup = Supervisor((*ROLES, *LIFECYCLE_ROLES), settings.log_dir)
    sup.start()
    print(f"pipeline started: {', '.join(f'{r}[{p}]' for r, p in sup.pids().items())} "
          f"(logs: {settings.log_dir}/pipeline-<role>.log)")
    try:
        t0 = time.monotonic()
        with make_client(pipeline, tenant="demo") as client:
            results = detect_files(client, images, lane="online", timeout_s=timeout_s)
        took = time.monotonic() - t0
        sup.check()
    finally:
        sup.stop()
    print()
    print(format_results([p.name for p in images], results))
    ok = sum(r["status"] == "OK" for r in results)
    print(f"\n{ok}/{len(results)} images detected through the pipeline in {took:.1f}s "
          "(first run includes the roles' start-up and model warm-up)")
    return 0 if ok == len(results) else 1
