"""Which version serves: the registry's routing decides, never the newest folder on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store.serving.catalog import ModelCatalog, ModelNotFound
from model_store.serving.config import MODEL_FILE, InputSpec, ModelConfig, OutputSpec, Provenance
from model_store.serving.routing import Routing, RoutingTable


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A local repository holding versions 1, 2 and 3 of ``m`` (what a fetch cache looks like after pushes)."""
    cfg = ModelConfig(name="m", decoder="yolov8", input=InputSpec("images", 32, 32),
                      outputs=(OutputSpec("output0", ("N", 6, 21), "boxes"),), class_names=("a", "b"), heads=(),
                      max_batch=4, provenance=Provenance("pkg", "1", (), "", "", "", "test", 17))
    for version in (1, 2, 3):
        folder = tmp_path / "m" / str(version)
        folder.mkdir(parents=True)
        cfg.save(folder / "config.json")
        (folder / MODEL_FILE).write_bytes(b"bytes of version %d" % version)
    return tmp_path


def table_with(routing: Routing) -> RoutingTable:
    table = RoutingTable()
    table.apply({"action": "PROMOTED", "model_name": routing.model, **routing.event_fields()})
    return table


def test_production_serves_not_the_newest_folder(repo: Path) -> None:
    # v2 and v3 were pushed (v3 then retired from routing): both are on disk, neither is production.
    routing = Routing("m").pushed(1).pushed(2)
    catalog = ModelCatalog(repo, table=table_with(routing))
    assert catalog.resolve("m", request_id="r1").version == 1
    assert catalog.resolve("m", 2).version == 2  # a pin to a registered version
    with pytest.raises(ModelNotFound, match="no servable version 3"):
        catalog.resolve("m", 3)  # on disk, not in the registry's versions


def test_a_model_without_routing_serves_nothing(repo: Path) -> None:
    catalog = ModelCatalog(repo, table=RoutingTable())
    for version in (None, 1, 3):
        with pytest.raises(ModelNotFound, match="no production version"):
            catalog.resolve("m", version)
        with pytest.raises(ModelNotFound, match="no production version"):
            catalog.check("m", version)


def test_without_a_table_only_pins_resolve(repo: Path) -> None:
    catalog = ModelCatalog(repo)
    assert catalog.resolve("m", 3).version == 3  # a stage downstream of routing runs the version it was given
    with pytest.raises(ModelNotFound, match="only a pinned version"):
        catalog.resolve("m")
    with pytest.raises(ModelNotFound, match="no servable version 4"):
        catalog.resolve("m", 4)


@pytest.mark.parametrize("name", ["", "..", "a/b", "a\\b", "x" * 129])
def test_names_that_climb_out_are_refused(repo: Path, name: str) -> None:
    with pytest.raises(ModelNotFound, match="invalid model name"):
        ModelCatalog(repo, table=RoutingTable()).check(name, 1)
