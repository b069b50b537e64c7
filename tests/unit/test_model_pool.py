"""ModelPool: load once with warm-up, LRU eviction of unwanted versions, typed failures, listeners; routing reaching
the stages through model watcher listeners."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config import PipelineSettings, StreamSettings
from model_store.control.watch import ModelWatcher
from model_store.serving import pool as pool_module
from model_store.serving.catalog import ModelCatalog, ModelNotFound, ModelVersion
from model_store.serving.config import MODEL_FILE, InputSpec, ModelConfig, OutputSpec, Provenance
from model_store.serving.pool import (
    LOAD_FAILED,
    READY,
    UNLOADED,
    LoadedModel,
    LoadFailed,
    ModelPool,
    PoolEvent,
    StillLoading,
    load_onnx,
)
from model_store.serving.routing import Routing, RoutingTable
from model_store.serving.session import SessionError
from processors.inference import InferenceStage
from processors.shadow import ShadowStage
from stream.errors import InvalidRecord, TransientError


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    """Versions 1..4 of ``m`` on disk (config and a placeholder model file: the fake loaders never open it)."""
    cfg = ModelConfig(name="m", decoder="yolov8", input=InputSpec("images", 32, 32),
                      outputs=(OutputSpec("output0", ("N", 6, 21), "boxes"),), class_names=("a", "b"), heads=(),
                      max_batch=4, provenance=Provenance("pkg", "1", (), "", "", "", "test", 17))
    for version in (1, 2, 3, 4):
        folder = tmp_path / "m" / str(version)
        folder.mkdir(parents=True)
        cfg.save(folder / "config.json")
        (folder / MODEL_FILE).write_bytes(b"not a model")
    return ModelCatalog(tmp_path, table=RoutingTable())


class Loader:
    """Counts loads per version; ``broken`` versions fail to open; ``gate`` holds every load until set."""

    def __init__(self, broken: tuple[int, ...] = (), gate: threading.Event | None = None) -> None:
        self.loads: list[int] = []
        self.broken = broken
        self.gate = gate

    def __call__(self, mv: ModelVersion) -> LoadedModel:
        if self.gate is not None:
            self.gate.wait(10)
        self.loads.append(mv.version)
        if mv.version in self.broken:
            raise SessionError(f"cannot open v{mv.version}: broken graph")
        return LoadedModel(mv, lambda batch: {"output0": batch}, ["CPUExecutionProvider"])


def events_of(pool: ModelPool) -> list[PoolEvent]:
    seen: list[PoolEvent] = []
    pool.add_listener(seen.append)
    return seen


def wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    """Polls ``condition`` (a background load's outcome) until it holds, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_version_loads_once_and_is_reported_ready(catalog: ModelCatalog) -> None:
    loader = Loader()
    pool = ModelPool(catalog, loader)
    events = events_of(pool)
    first = pool.get("m", 2)
    assert pool.get("m", 2) is first and loader.loads == [2]  # the second get serves the loaded one
    assert first.version.version == 2 and pool.loaded_versions() == [("m", 2)]
    assert [(e.version, e.action, e.provider) for e in events] == [(2, READY, "CPUExecutionProvider")]


def test_load_onnx_warms_the_session_up_before_it_serves(catalog: ModelCatalog,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[tuple[int, ...]] = []

    class Session:
        def get_outputs(self) -> list[Any]:
            return [type("Output", (), {"name": "output0"})()]

        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            runs.append(feeds["images"].shape)
            return [feeds["images"]]

    monkeypatch.setattr(pool_module, "create_session", lambda *a, **k: (Session(), ["CPUExecutionProvider"]))
    loaded = load_onnx(catalog.get("m", 1), threads=1)
    assert runs == [(1, 3, 32, 32), (2, 3, 32, 32)]  # batches of 1 and 2 ran (planned, allocated) before return
    assert loaded.run(np.zeros((3, 3, 32, 32), np.float32))["output0"].shape == (3, 3, 32, 32)
    runs.clear()
    mv = catalog.get("m", 1)
    load_onnx(mv, threads=1, max_batch=4)
    assert runs == [(n, 3, 32, 32) for n in sorted({1, 2, min(4, mv.config.max_batch)})]  # and the stage's largest
    runs.clear()
    load_onnx(mv, threads=1, max_batch=10_000)
    assert runs[-1] == (mv.config.max_batch, 3, 32, 32)  # never past the model's own limit


def test_the_least_recently_used_unwanted_version_is_unloaded_first(catalog: ModelCatalog) -> None:
    pool = ModelPool(catalog, Loader(), max_loaded=2)
    events = events_of(pool)
    pool.get("m", 1)
    pool.get("m", 2)
    pool.get("m", 1)  # 1 is used again: 2 is now the least recently used
    pool.get("m", 3)
    assert pool.loaded_versions() == [("m", 1), ("m", 3)]
    assert [(e.version, e.action) for e in events if e.action == UNLOADED] == [(2, UNLOADED)]
    pool.get("m", 4)
    assert pool.loaded_versions() == [("m", 3), ("m", 4)]  # then 1, older than 3


def test_a_wanted_version_is_loaded_in_the_background_and_never_evicted(catalog: ModelCatalog) -> None:
    gate = threading.Event()
    loader = Loader(gate=gate)
    pool = ModelPool(catalog, loader, max_loaded=2)
    pool.want("m", {1})
    assert pool.loaded_versions() == []  # want returned before the load finished
    gate.set()
    wait_until(lambda: pool.loaded_versions() == [("m", 1)])
    pool.get("m", 2)
    pool.get("m", 3)  # over the limit: 2 goes although 1 was used longest ago, because 1 is wanted
    assert pool.loaded_versions() == [("m", 1), ("m", 3)]
    pool.want("m", {3})  # 1 no longer wanted: it is the first to go now
    pool.get("m", 4)
    assert pool.loaded_versions() == [("m", 3), ("m", 4)] and loader.loads == [1, 2, 3, 4]


def test_a_request_waits_for_the_background_load_of_its_version(catalog: ModelCatalog) -> None:
    gate = threading.Event()
    loader = Loader(gate=gate)
    pool = ModelPool(catalog, loader)
    pool.want("m", {2})
    threading.Timer(0.05, gate.set).start()
    assert pool.get("m", 2).version.version == 2 and loader.loads == [2]  # one load, not a second one


def test_a_background_load_that_outlives_the_wait_is_still_loading(catalog: ModelCatalog) -> None:
    gate = threading.Event()
    pool = ModelPool(catalog, Loader(gate=gate), load_wait_s=0.05)
    pool.want("m", {2})
    try:
        with pytest.raises(StillLoading, match="still loading"):
            pool.get("m", 2)
    finally:
        gate.set()


def test_a_failed_load_is_typed_reported_and_routed_around(catalog: ModelCatalog) -> None:
    pool = ModelPool(catalog, Loader(broken=(3,)))
    events = events_of(pool)
    pool.get("m", 1)
    with pytest.raises(LoadFailed) as failed:
        pool.get("m", 3)
    assert (failed.value.model, failed.value.version) == ("m", 3) and "broken graph" in failed.value.reason
    assert [(e.version, e.action) for e in events] == [(1, READY), (3, LOAD_FAILED)]
    assert "broken graph" in (events[-1].reason or "")
    assert catalog.table is not None and catalog.table.unavailable("m") == {3}
    assert pool.loaded_versions() == [("m", 1)]  # the loaded version keeps serving


def test_a_version_that_loads_after_failing_is_routable_again(catalog: ModelCatalog) -> None:
    loader = Loader(broken=(2,))
    pool = ModelPool(catalog, loader)
    with pytest.raises(LoadFailed):
        pool.get("m", 2)
    assert catalog.table is not None and catalog.table.unavailable("m") == {2}
    loader.broken = ()
    pool.get("m", 2)
    assert catalog.table.unavailable("m") == frozenset()


def test_a_background_load_of_a_missing_version_is_reported_load_failed(catalog: ModelCatalog) -> None:
    pool = ModelPool(catalog, Loader())
    events = events_of(pool)
    pool.want("m", {9})
    wait_until(lambda: bool(events))
    assert [(e.version, e.action) for e in events] == [(9, LOAD_FAILED)]
    with pytest.raises(ModelNotFound):
        pool.get("m", 9)  # on the caller's thread: the error itself, for the stage to map


def test_every_listener_gets_every_event_in_order(catalog: ModelCatalog) -> None:
    pool = ModelPool(catalog, Loader(broken=(2,)), max_loaded=1)
    first, second = events_of(pool), events_of(pool)
    pool.get("m", 1)
    with pytest.raises(LoadFailed):
        pool.get("m", 2)
    pool.get("m", 3)
    assert [(e.version, e.action) for e in first] == [(1, READY), (2, LOAD_FAILED), (3, READY), (1, UNLOADED)]
    assert first == second


def test_the_inference_stage_maps_pool_errors_to_record_failure_paths(catalog: ModelCatalog) -> None:
    gate = threading.Event()
    pool = ModelPool(catalog, Loader(broken=(3,), gate=gate), load_wait_s=0.05)
    stage = InferenceStage(catalog, PipelineSettings(stream=StreamSettings(), models_dir=catalog.root), pool)
    with pytest.raises(InvalidRecord) as missing:
        stage.model("m", 9)
    assert missing.value.code == "MODEL_NOT_FOUND"
    gate.set()
    with pytest.raises(TransientError, match="m v3 failed to load: cannot open v3"):
        stage.model("m", 3)
    gate.clear()
    pool.want("m", {4})
    try:
        with pytest.raises(TransientError, match="still loading"):
            stage.model("m", 4)
    finally:
        gate.set()


def test_routing_reaches_the_stages_through_watcher_listeners(catalog: ModelCatalog) -> None:
    assert catalog.table is not None
    routing = Routing("m").pushed(1).pushed(2).promoted(2)
    catalog.table.apply({"action": "PROMOTED", "model_name": "m", **routing.event_fields()})
    watcher = ModelWatcher({}, "https://registry.invalid", table=catalog.table)  # never started: no Kafka here
    settings = PipelineSettings(stream=StreamSettings(), models_dir=catalog.root)
    inference_loader, shadow_loader = Loader(), Loader()
    inference = InferenceStage(catalog, settings, ModelPool(catalog, inference_loader))
    shadow = ShadowStage(catalog, settings, ModelPool(catalog, shadow_loader))
    watcher.add_listener(inference.on_routing, current=True)  # the routing as it stands reaches it at once
    watcher.add_listener(shadow.on_routing, current=True)
    wait_until(lambda: inference.pool.loaded_versions() == [("m", 1), ("m", 2)])  # production, previous, newest
    assert shadow.pool.loaded_versions() == [] and shadow_loader.loads == []  # no shadow version: nothing
    changed = routing.pushed(3).with_shadow(3)
    catalog.table.apply({"action": "SHADOW", "model_name": "m", **changed.event_fields()})
    watcher._notify("m")  # what the watcher thread does after folding in a change
    wait_until(lambda: ("m", 3) in shadow.pool.loaded_versions() and ("m", 3) in inference.pool.loaded_versions())
    assert shadow.pool.loaded_versions() == [("m", 3)]  # the shadow (also the newest)
