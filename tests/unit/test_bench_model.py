"""The pure parts of a bench's served model (infra/bench_model.py) and the `--int8` wiring of the bench CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.bench_model import (
    FP32,
    STATIC_INT8,
    ServedModel,
    describe,
    format_runs,
    int8_name,
    label,
    runs_by_version,
)
from infra.cli import main

INT8 = ServedModel("yolov4-tiny-int8", 1, STATIC_INT8, Path("/h/build/yolov4-tiny-int8"), "PASSED", "yolov4-tiny v1")
DEFAULT = ServedModel("yolov4-tiny", 1, FP32, Path("/h/models/yolov4-tiny/1"))


def test_the_int8_model_has_a_name_of_its_own() -> None:
    assert int8_name("yolov4-tiny") == "yolov4-tiny-int8"


def test_the_header_names_the_model_version_precision_and_folder() -> None:
    assert label(INT8) == "yolov4-tiny-int8 v1 (static INT8)"
    line = describe(INT8, "bench1a2b3c.")
    assert line.startswith("model measured: yolov4-tiny-int8 v1 (static INT8 of yolov4-tiny v1, release gate PASSED)")
    assert "bench1a2b3c." in line and "/h/build/yolov4-tiny-int8" in line
    line = describe(DEFAULT, "bench1a2b3c.")
    assert line.startswith("model measured: yolov4-tiny v1 (FP32), production")  # no gate: the bench pushed nothing
    assert "/h/models/yolov4-tiny/1" in line


def test_model_runs_by_version_over_an_interval() -> None:
    before = {'detectflow_inference_batch_size_count{model="yolov4-tiny-int8",version="1"}': 3.0,
              'detectflow_inference_batch_size_sum{model="yolov4-tiny-int8",version="1"}': 3.0}
    after = {'detectflow_inference_batch_size_count{model="yolov4-tiny-int8",version="1"}': 19.0,
             'detectflow_inference_batch_size_sum{model="yolov4-tiny-int8",version="1"}': 40.0,
             'detectflow_inference_batch_size_count{model="yolov4-tiny",version="1"}': 2.0,
             'detectflow_inference_seconds_count{model="yolov4-tiny",version="1"}': 2.0}
    runs = runs_by_version(before, after)
    assert runs == {"yolov4-tiny-int8 v1": 16.0, "yolov4-tiny v1": 2.0}
    assert "NOT all yolov4-tiny-int8 v1" in format_runs(runs, INT8)
    line = format_runs({"yolov4-tiny-int8 v1": 16.0}, INT8)
    assert "yolov4-tiny-int8 v1 16" in line and "(all yolov4-tiny-int8 v1)" in line
    assert "none" in format_runs({}, INT8)


def test_int8_reaches_both_benches(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.bench
    import infra.bench_sync

    calls: dict[str, dict[str, Any]] = {}

    def recorder(bench: str) -> Any:
        def run(_stack: Any, **kwargs: Any) -> int:
            calls[bench] = kwargs
            return 0
        return run

    monkeypatch.setattr(infra.bench_sync, "run_bench_sync", recorder("sync"))
    monkeypatch.setattr(infra.bench, "run_bench", recorder("pipeline"))
    for argv in (["bench", "sync", "--int8", "--levels", "1", "--requests", "16"], ["bench", "pipeline", "--int8"]):
        assert main(argv) == 0  # the benches are stand-ins
    assert calls["sync"]["int8"] is True and calls["sync"]["levels"] == (1,) and calls["sync"]["requests"] == 16
    assert calls["pipeline"]["int8"] is True
    assert main(["bench", "sync"]) == 0 and calls["sync"]["int8"] is False


def test_int8_is_refused_where_a_bench_loads_no_model(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import infra.bench_hop

    monkeypatch.setattr(infra.bench_hop, "run_bench_hop", lambda *a, **k: pytest.fail("the bench ran"))
    assert main(["bench", "hop", "--int8"]) == 2  # refused before the bench starts
    assert "--int8 applies to the pipeline and sync benches only" in capsys.readouterr().err
