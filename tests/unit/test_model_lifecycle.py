"""The model lifecycle's pure parts: routing transitions, request-id hashing, the routing table, the
registry's commands on in-memory backends, guardrail verdicts and shadow agreement."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from config import LifecycleSettings, PipelineSettings
from infra.models_cmd import summarize_agreement
from model_store.control.registry import Registry, RegistryError, VersionInfo
from model_store.serving.routing import BUCKETS, Routing, RoutingError, RoutingTable, bucket_of
from processors.monitor import MonitorStage, Window, WindowStats, agreement, breach
from stream.records import Record


# ---------------------------------------------------------------------------------------------- routing
def test_bucket_is_stable_and_uniform() -> None:
    assert bucket_of("req-1") == bucket_of("req-1")
    ids = [str(uuid.UUID(int=i)) for i in range(20_000)]
    below = sum(bucket_of(i) < BUCKETS // 10 for i in ids)
    sd = math.sqrt(len(ids) * 0.1 * 0.9)
    assert abs(below - len(ids) * 0.1) < 4 * sd


def test_first_push_is_production_later_pushes_are_not() -> None:
    r = Routing("m").pushed(1)
    assert r.production == 1 and r.versions == (1,)
    r = r.pushed(2)
    assert r.production == 1 and r.versions == (1, 2)


def test_canary_routes_its_share_and_pins_bypass_nothing() -> None:
    r = Routing("m").pushed(1).pushed(2).with_canary(2, 25.0)
    ids = [f"r{i}" for i in range(4000)]
    routed = [r.route(i) for i in ids]
    assert all(v == (2 if bucket_of(i) < 2500 else 1) for i, v in zip(ids, routed, strict=True))
    assert 0.2 < routed.count(2) / len(ids) < 0.3


def test_promote_rollback_and_retire() -> None:
    r = Routing("m").pushed(1).pushed(2).pushed(3).with_canary(2, 10).with_shadow(3)
    r = r.promoted(2)
    assert (r.production, r.canary, r.canary_percent, r.previous, r.shadow) == (2, None, 0.0, (1,), 3)
    assert r.rolled_back().production == 1  # no canary: the previous production comes back
    r = r.with_canary(3, 5)
    aborted = r.rolled_back()
    assert (aborted.production, aborted.canary) == (2, None)  # a canary: only the canary goes
    with pytest.raises(RoutingError):
        aborted.retired(2)  # serving
    assert 1 not in aborted.retired(1).versions and 1 not in aborted.retired(1).previous
    with pytest.raises(RoutingError):
        Routing("m").pushed(1).rolled_back()
    with pytest.raises(RoutingError):
        Routing("m").pushed(1).with_canary(7, 10)
    with pytest.raises(RoutingError):
        Routing("m").pushed(1).pushed(2).with_canary(2, 100)


def test_failed_versions_are_routed_around() -> None:
    r = Routing("m").pushed(1).pushed(2).promoted(2).pushed(3).with_canary(3, 50)
    ids = [f"x{i}" for i in range(200)]
    assert {r.route(i, frozenset({3})) for i in ids} == {2}
    assert {r.route(i, frozenset({2, 3})) for i in ids} == {1}  # production failed: the previous one serves


def test_event_round_trip() -> None:
    r = Routing("m").pushed(1).pushed(2).with_canary(2, 12.5, guardrail=False).with_shadow(None)
    back = Routing.from_event({"model_name": "m", **r.event_fields()})
    assert replace(back, revision=r.revision) == r


def test_routing_table_reports() -> None:
    table = RoutingTable()
    state = Routing("m").pushed(1).pushed(2).with_canary(2, 50)
    assert table.apply({"model_name": "m", "version": 2, "action": "CANARY", **state.event_fields()}) == "m"
    report = {"model_name": "m", "version": 2, "actor": "inference@a:1", "at": 10}
    table.apply({**report, "action": "LOAD_FAILED", "reason": "boom"})
    assert table.unavailable("m") == {2}
    assert {table.route("m", f"r{i}") for i in range(100)} == {1}
    table.apply({**report, "action": "READY", "at": 20, "actor": "inference@b:2"})
    assert table.unavailable("m") == frozenset()
    table.mark_failed("m", 1)
    assert table.unavailable("m") == {1}


# ---------------------------------------------------------------------------------------------- registry
class MemoryStore:
    def __init__(self) -> None:
        self.routes: dict[str, Routing] = {}
        self.rows: dict[tuple[str, int], VersionInfo] = {}
        self.audits: list[dict[str, Any]] = []

    def routing(self, model: str) -> Routing | None:
        return self.routes.get(model)

    def compare_and_set(self, new: Routing, expected: int | None, actor: str) -> bool:
        current = self.routes.get(new.model)
        if (current.revision if current else None) != expected:
            return False
        self.routes[new.model] = replace(new, revision=new.revision + 1)
        return True

    def versions(self, model: str) -> list[VersionInfo]:
        return sorted((v for (m, _), v in self.rows.items() if m == model), key=lambda v: v.version)

    def version(self, model: str, version: int) -> VersionInfo | None:
        return self.rows.get((model, version))

    def insert_version(self, info: VersionInfo) -> bool:
        return self.rows.setdefault((info.model, info.version), info) is info

    def audit(self, event: dict[str, Any], day: str) -> None:
        self.audits.append(event)

    def delete_model(self, model: str) -> None:
        self.routes.pop(model, None)
        self.rows = {k: v for k, v in self.rows.items() if k[0] != model}


class MemoryObjects:
    def __init__(self) -> None:
        self.configs: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, int], str] = {}

    def config(self, model: str) -> dict[str, Any] | None:
        return self.configs.get(model)

    def put_config(self, model: str, config: dict[str, Any]) -> None:
        self.configs[model] = config

    def put_version(self, model: str, version: int, model_file: Path, sha: str, docs: dict[str, Any]) -> None:
        self.files[(model, version)] = sha

    def delete_model(self, model: str) -> None:
        self.configs.pop(model, None)
        self.files = {k: v for k, v in self.files.items() if k[0] != model}


class MemoryEvents:
    def __init__(self) -> None:
        self.published: list[tuple[str, Routing]] = []
        self.audited: list[dict[str, Any]] = []

    def publish_state(self, routing: Routing, action: str, version: int, **kw: Any) -> None:
        self.published.append((action, routing))

    def audit(self, event: dict[str, Any]) -> None:
        self.audited.append(event)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    from model_store.serving.config import InputSpec, ModelConfig, OutputSpec, Provenance

    cfg = ModelConfig(name="x", decoder="yolov8", input=InputSpec("images", 32, 32),
                      outputs=(OutputSpec("output0", ("N", 6, 21), "boxes"),), class_names=("a", "b"), heads=(),
                      max_batch=4, provenance=Provenance("pkg", "1", (), "", "", "", "test", 17))
    cfg.save(tmp_path / "config.json")
    (tmp_path / "model.onnx").write_bytes(b"first model bytes")
    return tmp_path


def test_registry_push_gate_and_forced_promotion(model_dir: Path) -> None:
    store, events = MemoryStore(), MemoryEvents()
    registry = Registry(store, MemoryObjects(), events)  # type: ignore[arg-type]
    passing = {"passed": True, "checks": [], "metrics": {"map50": 0.5}}
    failing = {"passed": False, "checks": [{"name": "map", "passed": False, "detail": "too low"}], "metrics": {}}
    first = registry.push("det", model_dir, actor="alice", gate=lambda *a: passing)
    assert (first.version, first.created, registry.routing("det").production) == (1, True, 1)
    again = registry.push("det", model_dir, actor="alice", gate=lambda *a: pytest.fail("gate re-run"))
    assert (again.version, again.created) == (1, False)  # same bytes: the same version
    (model_dir / "model.onnx").write_bytes(b"second model bytes")
    second = registry.push("det", model_dir, actor="alice", gate=lambda *a: failing)
    assert (second.version, second.gate_status) == (2, "FAILED")
    with pytest.raises(RegistryError, match="release gate"):
        registry.promote("det", 2, actor="bob")
    assert registry.routing("det").production == 1
    registry.canary("det", 2, 10, actor="bob", force=True)
    assert registry.routing("det").canary == 2
    forced = [e for e in store.audits if e["action"] == "models.canary"]
    assert forced and "FORCED" in forced[-1]["detail"]
    denied = [e for e in store.audits if e["outcome"] == "denied"]
    assert denied and denied[0]["subject"] == "bob"
    assert [a for a, _ in events.published] == ["PUSHED", "PUSHED", "CANARY"]
    # The guardrail only undoes the canary it saw.
    with pytest.raises(RegistryError):
        registry.rollback("det", actor="guardrail", only_canary=3)
    assert registry.rollback("det", actor="guardrail", only_canary=2).canary is None
    registry.purge("det", actor="carol")
    assert store.routing("det") is None and store.versions("det") == []
    assert store.audits[-1]["action"] == "models.purged"
    with pytest.raises(RegistryError):
        registry.purge("det", actor="carol")


def test_push_refuses_a_config_of_another_model(model_dir: Path) -> None:
    import json

    registry = Registry(MemoryStore(), MemoryObjects(), MemoryEvents())  # type: ignore[arg-type]
    ok = {"passed": True, "checks": [], "metrics": {}}
    registry.push("det", model_dir, actor="a", gate=lambda *a: ok)
    doc = json.loads((model_dir / "config.json").read_text())
    doc["class_names"] = ["a", "c"]
    (model_dir / "config.json").write_text(json.dumps(doc))
    (model_dir / "model.onnx").write_bytes(b"other")
    with pytest.raises(RegistryError, match="different model name"):
        registry.push("det", model_dir, actor="a", gate=lambda *a: ok)
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.push("../etc", model_dir, actor="a", gate=lambda *a: ok)


# ---------------------------------------------------------------------------------------------- guardrails
def test_breach_needs_samples_and_a_real_difference() -> None:
    s = LifecycleSettings(guard_min_samples=10, guard_max_error_rate_delta=0.05, guard_latency_factor=1.5,
                          guard_latency_slack_ms=20)
    prod = WindowStats(100, 0.01, 50.0)
    assert breach(prod, WindowStats(5, 1.0, 500.0), s) is None  # too few canary results to judge
    assert breach(prod, WindowStats(50, 0.05, 90.0), s) is None  # within +5 points and 50*1.5+20=95 ms
    cause, why = breach(prod, WindowStats(50, 0.10, 60.0), s) or ("", "")
    assert cause == "error_rate" and "10.0%" in why
    assert (breach(prod, WindowStats(50, 0.0, 120.0), s) or ("",))[0] == "latency"


def test_window_forgets_old_results() -> None:
    w = Window(span_s=10)
    for t in range(20):
        w.add(float(t), t % 2 == 0, float(t))
    stats = w.stats(now=19.0)
    assert stats.samples == 11 and stats.p95_ms is not None and stats.p95_ms >= 18


class RollbackRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def rollback(self, model: str, *, actor: str, reason: str, only_canary: int) -> None:
        self.calls.append((model, only_canary))


def _result(version: int, ms: float, n: int) -> Record:
    value = {"request_id": f"r{n}", "model_name": "m", "model_version": version, "status": "OK",
             "cache_hit": False, "timings_ms": {"inference": ms}, "detections": []}
    return Record("u.detections", 0, n, f"r{n}", value, {}, "batch")


def test_a_canary_is_judged_only_against_production_results_of_its_own_pair() -> None:
    settings = PipelineSettings.from_env({"DETECTFLOW_TOPIC_PREFIX": "u.", "DETECTFLOW_GUARD_MIN_SAMPLES": "8"})
    table, registry, now = RoutingTable(), RollbackRecorder(), [0.0]
    table._routing["m"] = Routing("m", production=1, canary=2, canary_percent=50, versions=(1, 2, 4))
    stage = MonitorStage(table, registry, settings, clock=lambda: now[0])
    # Canary v2 runs while production is slow (a burst): production's P95 is 200 ms, v2 is fine.
    stage.process([_result(v, 200.0 if v == 1 else 30.0, i) for i, v in enumerate([1, 2] * 10)])
    assert registry.calls == []
    # v2 is aborted by hand and v4 (60 ms, 3x production's 20 ms now) comes in a minute later. Against the
    # burst's samples (200 x 1.5 + 20 ms) it would pass; against production of its own time it is rolled back.
    table._routing["m"] = Routing("m", production=1, canary=4, canary_percent=50, versions=(1, 2, 4))
    now[0] = 60.0
    stage.process([_result(v, 20.0 if v == 1 else 60.0, 100 + i) for i, v in enumerate([1, 4] * 10)])
    assert registry.calls == [("m", 4)]


# ---------------------------------------------------------------------------------------------- shadow agreement
def _det(cls: str, score: float, x: float) -> dict[str, Any]:
    return {"class_name": cls, "score": score, "box": {"x1": x, "y1": 0.0, "x2": x + 10, "y2": 10.0}}


def test_agreement_matches_per_class_at_iou_half() -> None:
    prod = [_det("person", 0.9, 0), _det("person", 0.8, 100), _det("bus", 0.7, 200)]
    shadow = [_det("person", 0.85, 1), _det("bus", 0.6, 300), _det("dog", 0.5, 0)]
    a = agreement(prod, shadow)
    assert (a["person"].matched, a["person"].production_only, a["person"].shadow_only) == (1, 1, 0)
    assert a["person"].score_deltas == [pytest.approx(0.05)]
    assert (a["bus"].matched, a["bus"].production_only, a["bus"].shadow_only) == (0, 1, 1)
    assert (a["dog"].matched, a["dog"].shadow_only) == (0, 1)  # same box, other class: no match


def test_summarize_agreement() -> None:
    rows = [{"production_version": 1, "shadow_version": 2, "class_name": "*", "images": 4, "matched": 9,
             "production_only": 1, "shadow_only": 2, "score_delta_sum": 0.09, "production_ms_sum": 400.0,
             "shadow_ms_sum": 200.0},
            {"production_version": 1, "shadow_version": 2, "class_name": "person", "images": 0, "matched": 9,
             "production_only": 1, "shadow_only": 2, "score_delta_sum": 0.09, "production_ms_sum": 0,
             "shadow_ms_sum": 0}]
    (pair,) = summarize_agreement(rows)
    assert pair["agreement"] == pytest.approx(0.9) and pair["mean_abs_score_delta"] == pytest.approx(0.01)
    assert (pair["production_ms_mean"], pair["shadow_ms_mean"]) == (100.0, 50.0)
    assert pair["classes"]["person"]["shadow_only"] == 2
