"""How infra/roles.py wires the inference and shadow roles: pool listeners and watcher listeners, no holder lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from config import PipelineSettings, StreamSettings
from infra import roles
from model_store.serving.catalog import ModelCatalog
from model_store.serving.config import MODEL_FILE, InputSpec, ModelConfig, OutputSpec, Provenance
from model_store.serving.pool import READY, LoadedModel, PoolEvent
from model_store.serving.routing import Routing, RoutingTable
from processors import inference


class FakeWatcher:
    """A started watcher's surface: its table and the listeners added to it."""

    def __init__(self, table: RoutingTable) -> None:
        self.table = table
        self.listeners: list[tuple[Any, bool]] = []

    def add_listener(self, listener: Any, *, current: bool = False) -> None:
        self.listeners.append((listener, current))


@pytest.fixture
def wired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeWatcher, list[PoolEvent], PipelineSettings]:
    cfg = ModelConfig(name="m", decoder="yolov8", input=InputSpec("images", 32, 32),
                      outputs=(OutputSpec("output0", ("N", 6, 21), "boxes"),), class_names=("a", "b"), heads=(),
                      max_batch=4, provenance=Provenance("pkg", "1", (), "", "", "", "test", 17))
    for version in (1, 2):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
        cfg.save(tmp_path / "m" / str(version) / "config.json")
        (tmp_path / "m" / str(version) / MODEL_FILE).write_bytes(b"not a model")
    table = RoutingTable()
    routing = Routing("m").pushed(1).pushed(2).promoted(2)
    table.apply({"action": "PROMOTED", "model_name": "m", **routing.event_fields()})
    watcher = FakeWatcher(table)
    reports: list[PoolEvent] = []
    monkeypatch.setattr(roles, "model_watcher", lambda settings: watcher)
    monkeypatch.setattr(roles, "catalog", lambda settings, role, *, watch, table=None: ModelCatalog(tmp_path, table))
    monkeypatch.setattr(roles, "_reporter", lambda role, settings: reports.append)
    monkeypatch.setattr(inference, "load_onnx", lambda mv, threads, max_batch=2: LoadedModel(mv, lambda b: {}, ["CPU"]))
    return watcher, reports, PipelineSettings(stream=StreamSettings(), models_dir=tmp_path, default_model="m")


def test_inference_warms_up_then_follows_the_watcher_and_reports_through_its_pool(wired: Any) -> None:
    watcher, reports, settings = wired
    stage, options = roles.build("inference", settings)
    assert reports[0] == PoolEvent("m", 2, READY, reports[0].reason, "CPU")  # production loaded before consuming
    assert watcher.listeners == [(stage.on_routing, True)]  # the current routing, then every change
    assert options["max_batch"] == settings.inference_max_batch


def test_shadow_follows_the_watcher_with_its_own_pool(wired: Any) -> None:
    watcher, reports, settings = wired
    stage, _ = roles.build("shadow", settings)
    assert watcher.listeners == [(stage.on_routing, True)]
    assert stage.runner.pool is stage.pool and reports == []  # no shadow version: nothing loaded, nothing reported
