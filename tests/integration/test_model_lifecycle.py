"""The model lifecycle on the real stack: registry, canary by request-id hash, promote, rollback under
traffic, the release gate refusing broken models while serving goes on, shadow agreement, and the
guardrail rolling back a slow canary.

One pipeline (every role, shadow and monitor included) serves a model pushed under a test-only name,
on a fresh topic prefix and a fresh local model cache; the tests run in file order on one registry
history: v1 = the converted FP32 model, v2 = its static INT8 quantization, v3 = v1 in other bytes (the
shadow), v4 = a slow FP32 variant.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pipeline_kit import Pipeline, start_pipeline
from stream_kit import new_prefix

from config import PipelineSettings, StackSettings
from infra.stack.kafka_access import provision
from model_store.serving.routing import bucket_of
from stream.kafka import kafka_connection

pytestmark = pytest.mark.integration

GUARD_ENV = {"DETECTFLOW_GUARD_MIN_SAMPLES": "8", "DETECTFLOW_GUARD_CHECK_INTERVAL_S": "0.5",
             "DETECTFLOW_GUARD_LATENCY_FACTOR": "1.3", "DETECTFLOW_GUARD_LATENCY_SLACK_MS": "10",
             "DETECTFLOW_READY_WAIT_S": "90", "DETECTFLOW_GATE_LATENCY_ROUNDS": "1"}


@dataclass
class Lifecycle:
    pipeline: Pipeline
    model: str
    env: dict[str, str]
    registry: Any
    source: Path
    work: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "infra.cli", "models", *args], env=self.env, text=True,
                              capture_output=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
        if check:
            assert proc.returncode == 0, f"models {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def detect_many(self, n: int, *, tenant: str, lane: str = "batch", params_of: Any = None,
                    version: int | None = None) -> list[dict[str, Any]]:
        from model_store.tools.samples import ensure_samples

        stack = self.pipeline.stack
        images = [p.read_bytes() for p in ensure_samples(stack.samples_dir, stack.cache_dir)]
        with self.pipeline.client(tenant) as client:
            subs = [client.submit(images[i % len(images)], lane=lane, timeout_s=240, model=self.model,
                                  version=version, params=params_of(i) if params_of else None) for i in range(n)]
            client.flush()
            return [{**client.wait(s), "_request_id": s.request_id} for s in subs]


@pytest.fixture(scope="module")
def lc(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    from model_store.control.registry import connect_registry
    from model_store.tools.convert import convert
    from model_store.tools.evalset import ensure_eval_set
    from model_store.tools.gate import gate_runner

    prefix = new_prefix()
    model = "lc-" + prefix.rstrip(".")
    work = tmp_path_factory.mktemp("lifecycle")
    env = {**os.environ, **GUARD_ENV, "DETECTFLOW_TOPIC_PREFIX": prefix, "DETECTFLOW_DEFAULT_MODEL": model,
           "DETECTFLOW_MODELS_DIR": str(work / "cache")}
    settings = PipelineSettings.from_env(env)
    source = StackSettings.from_env().models_dir / "yolov4-tiny" / "1"
    convert(source)
    provision(kafka_connection(settings.stream, "admin"), prefix)
    registry = connect_registry(settings)
    gate = gate_runner(settings.lifecycle, ensure_eval_set(stack))
    assert registry.push(model, source, actor="test", gate=gate).version == 1
    from model_store.tools.quantize import quantize_version, read_images
    from model_store.tools.samples import ensure_samples

    quantize_version(source, work / "v2", calibration_images=read_images(ensure_samples(stack.samples_dir,
                                                                                        stack.cache_dir)))
    assert registry.push(model, work / "v2", actor="test", gate=gate).version == 2
    roles = ("bridge", "scan", "preprocess", "inference", "postprocess", "recorder", "shadow", "monitor")
    for running in start_pipeline(stack, prefix, work / "logs", roles=roles, extra_env=env, convert_default=False):
        running.settings = running.settings.replace(default_model=model)
        # The suite's registry (keyspace, bucket) is dropped at the session's end (conftest).
        yield Lifecycle(running, model, env, registry, source, work)


def _versions(results: list[dict[str, Any]]) -> list[int]:
    assert all(r["status"] == "OK" for r in results), [r for r in results if r["status"] != "OK"][:2]
    return [r["model_version"] for r in results]


def test_canary_share_is_the_request_id_hash_then_promote_serves_everything(lc: Lifecycle) -> None:
    state = lc.registry.routing(lc.model)
    assert (state.production, state.versions) == (1, (1, 2))
    out = lc.cli("canary", lc.model, "2", "10")
    assert "READY" in out.stdout, out.stdout + out.stderr  # it waited for inference to load v2
    n = 240
    results = lc.detect_many(n, tenant="canary")
    versions = _versions(results)
    on_canary = sum(v == 2 for v in versions)
    # Binomial(n, 0.10): within 4 standard deviations of the mean.
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(on_canary - n * 0.1) <= 4 * sd, f"{on_canary}/{n} on the canary"
    # ... and exactly the requests whose id hashes below 10%: routing is deterministic.
    for r in results:
        assert r["model_version"] == (2 if bucket_of(r["_request_id"]) < 1000 else 1), r["_request_id"]
    pinned = lc.detect_many(20, tenant="canary-pin", version=1)
    assert set(_versions(pinned)) == {1}

    lc.cli("promote", lc.model, "2")
    assert set(_versions(lc.detect_many(60, tenant="promoted"))) == {2}
    state = lc.registry.routing(lc.model)
    assert (state.production, state.canary, state.previous[:1]) == (2, None, (1,))


def test_rollback_under_traffic_fails_no_request(lc: Lifecycle) -> None:
    assert lc.registry.routing(lc.model).production == 2
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        from model_store.tools.samples import ensure_samples

        stack = lc.pipeline.stack
        images = [p.read_bytes() for p in ensure_samples(stack.samples_dir, stack.cache_dir)]
        try:
            with lc.pipeline.client("rollback") as client:
                i = 0
                while not stop.is_set() and i < 400:
                    # Distinct params: no cache hits, every request runs a model.
                    seen.append(client.detect(images[i % len(images)], lane="online", timeout_s=60, model=lc.model,
                                              params={"score_threshold": 0.3 + i * 1e-4}))
                    i += 1
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while len(seen) < 10 and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    lc.cli("rollback", lc.model, "--reason", "test: back to v1")
    switched_at = len(seen)
    while time.monotonic() < deadline and not errors and \
            sum(r.get("model_version") == 1 for r in seen[switched_at:]) < 10:
        time.sleep(0.05)
    stop.set()
    worker.join(90)
    assert not errors, errors
    assert len(seen) > switched_at + 10
    assert [r for r in seen if r["status"] != "OK"] == []
    assert {r["model_version"] for r in seen[:10]} == {2}
    assert {r["model_version"] for r in seen[-10:]} == {1}
    state = lc.registry.routing(lc.model)
    assert state.production == 1 and 2 not in state.previous  # a rollback pops the history


def test_gate_refuses_broken_models_while_serving_goes_on(lc: Lifecycle) -> None:
    import model_kit

    before = [v.version for v in lc.registry.store.versions(lc.model)]
    for make, check in ((model_kit.corrupt, "onnx"), (model_kit.wrong_shape, "outputs")):
        folder = make(lc.source, lc.work / make.__name__)
        out = lc.cli("push", lc.model, str(folder), check=False)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "refused by the release gate" in out.stderr and check in out.stderr, out.stderr
    assert [v.version for v in lc.registry.store.versions(lc.model)] == before
    assert set(_versions(lc.detect_many(8, tenant="after-gate", lane="online"))) == {1}
    day = time.strftime("%Y-%m-%d", time.gmtime())
    refused = [e for e in lc.registry.store.audit_events(day) if e["action"] == "models.push"
               and e["resource"] == lc.model and e["outcome"] == "rejected"]
    assert len(refused) >= 2


def test_shadow_writes_its_own_topic_and_agreement_is_reported(lc: Lifecycle) -> None:
    import model_kit

    # The shadow is v1's graph in other bytes, so a correct pipeline reports full agreement whatever the
    # onnxruntime/numpy versions (an INT8 shadow's agreement is a property of the quantizer, not of this code).
    twin = model_kit.variant(lc.source, lc.work / "twin", tag="shadow-twin")
    lc.cli("push", lc.model, str(twin))
    twin_version = max(v.version for v in lc.registry.store.versions(lc.model))
    lc.cli("shadow", lc.model, str(twin_version))
    results = lc.detect_many(16, tenant="shadowed", params_of=lambda i: {"score_threshold": 0.25 + i * 1e-4})
    assert set(_versions(results)) == {1}  # the shadow never answers a request
    deadline = time.monotonic() + 120
    pairs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        pairs = json.loads(lc.cli("compare", lc.model, "--json").stdout)
        if pairs and pairs[0].get("images", 0) >= 16:
            break
        time.sleep(0.5)
    assert pairs and pairs[0]["production_version"] == 1 and pairs[0]["shadow_version"] == twin_version, pairs
    pair = pairs[0]
    assert pair["images"] >= 16
    # Same graph, same weights: the two sides differ only by float reordering between batch shapes
    # (~1e-6 on a score), so every detection pairs up at IoU 0.5 (a box at the threshold may flip: 5%).
    assert pair["agreement"] >= 0.95, pair
    assert pair["mean_abs_score_delta"] < 0.01, pair
    assert pair["production_ms_mean"] > 0 and pair["shadow_ms_mean"] > 0
    text = lc.cli("compare", lc.model).stdout
    assert "agreement" in text and "person" in text
    lc.cli("shadow", lc.model, "off")


def test_guardrail_rolls_back_a_slow_canary(lc: Lifecycle) -> None:
    import model_kit

    slow = model_kit.variant(lc.source, lc.work / "v3", tag="slow", slow_matmuls=40)
    lc.cli("push", lc.model, str(slow), check=False)  # the latency gate may fail it; --force below
    v3 = max(v.version for v in lc.registry.store.versions(lc.model))
    lc.cli("canary", lc.model, str(v3), "50", "--force")
    assert lc.registry.routing(lc.model).canary == v3
    deadline = time.monotonic() + 180
    batches = 0
    while lc.registry.routing(lc.model).canary is not None and time.monotonic() < deadline:
        batches += 1
        lc.detect_many(16, tenant=f"guard{batches}", params_of=lambda i, b=batches: {"score_threshold": 0.2 + b * 0.01
                                                                                     + i * 1e-4})
    state = lc.registry.routing(lc.model)
    assert state.canary is None and state.production == 1, state
    day = time.strftime("%Y-%m-%d", time.gmtime())
    rolled = [e for e in lc.registry.store.audit_events(day) if e["action"] == "models.rolled_back"
              and e["subject"] == "guardrail" and e["resource"] == f"{lc.model}/{v3}"]
    assert rolled and "latency" in rolled[0]["detail"], rolled
    forced = [e for e in lc.registry.store.audit_events(day) if e["action"] == "models.canary"
              and e["resource"] == f"{lc.model}/{v3}"]
    assert forced
