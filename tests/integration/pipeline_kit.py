"""The whole pipeline (every role as its own process, supervised) on a fresh topic prefix."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from config import PipelineSettings, StackSettings, kafka_client
from infra.roles import ROLES
from infra.stack.kafka_access import deprovision, provision
from infra.supervisor import Supervisor
from stream.client import DetectClient


@dataclass
class Pipeline:
    stack: StackSettings
    settings: PipelineSettings
    supervisor: Supervisor
    prefix: str

    def client(self, tenant: str) -> DetectClient:
        from infra.detect_cmd import make_client

        return make_client(self.settings, tenant)

    def pid(self, role: str, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.supervisor.pids().get(role)
            if pid:
                return pid
            time.sleep(0.1)
        raise TimeoutError(f"{role} is not running")


# Short retry delays so that failure tests finish quickly; six attempts still span ~30 s.
TEST_ENV = {"DETECTFLOW_RETRY_DELAY_MS": "1000", "DETECTFLOW_RETRY_MAX_ATTEMPTS": "6",
            "DETECTFLOW_BACKOFF_INITIAL_MS": "100", "DETECTFLOW_LANE_CHECK_INTERVAL_MS": "50"}


def start_pipeline(stack: StackSettings, prefix: str, log_dir: Path, *, roles: Sequence[str] = ROLES,
                   extra_env: Mapping[str, str] | None = None, convert_default: bool = True) -> Iterator[Pipeline]:
    from model_store.convert import convert

    env = {**os.environ, **TEST_ENV, **(extra_env or {}), "DETECTFLOW_TOPIC_PREFIX": prefix}
    settings = PipelineSettings.from_env(env)
    settings = settings.replace(stream=settings.stream.replace(topic_prefix=prefix))
    admin = kafka_client(settings.stream, "admin")
    provision(admin, prefix)
    if convert_default:  # the suite registry's default model (tests/conftest.py), routed on this prefix
        from model_store.registry import connect_registry

        convert(settings.models_dir / settings.default_model / "1")
        registry = connect_registry(settings)
        try:
            assert registry.republish(settings.default_model, actor="tests").production == 1
        finally:
            registry.close()
    sup = Supervisor(roles, log_dir, env=env)
    sup.start_monitor()
    try:
        yield Pipeline(stack, settings, sup, prefix)
    finally:
        sup.stop()
        deprovision(admin, prefix)
