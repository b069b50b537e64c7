"""`python -m infra.bench_gpu` on a host without a GPU: the CPU rows, the stage's CPU work, every missing
provider or package recorded instead of raised; and the onnx2torch constant placement, on stand-ins."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from infra.bench_gpu import Report, fp16_model, keep_shape_constants_on_host, main, parse_batches
from model_store.serving.config import InputSpec, ModelConfig, OutputSpec, Provenance, YoloHeadSpec


def _tiny_model(folder: Path) -> Path:
    """A 32x32 darknet_yolo-shaped model: every one of its 3 boxes is the image's per-channel means, 6 times."""
    nodes = [helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["means", "axis2"], ["column"]),
             helper.make_node("Concat", ["column"] * 6, ["detections"], axis=2)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 3, 6])],
        [helper.make_tensor("axis2", TensorProto.INT64, [1], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    ModelConfig(name="tiny", decoder="darknet_yolo", input=InputSpec("images", 32, 32),
                outputs=(OutputSpec("detections", ("N", 3, 6), "boxes"),), class_names=("thing",),
                heads=(YoloHeadSpec((0, 1, 2), ((4, 4), (8, 8), (16, 16)), 32, (1, 1), 1.0),), max_batch=4,
                provenance=Provenance("test", "1", (), "", "", "", "test", 17)).save(folder / "config.json")
    return folder


def test_batches_are_sorted_distinct_and_positive() -> None:
    assert parse_batches("8,1, 8,64") == [1, 8, 64]
    with pytest.raises(ValueError, match="positive integers"):
        parse_batches("0,4")


def test_dry_run_on_the_cpu_records_what_it_cannot_run(tmp_path: Path) -> None:
    model_dir = _tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["--model-dir", str(model_dir), "--batches", "1,3", "--iters", "2", "--tax-seconds", "0.01",
                 "--out", str(out)]) == 0

    body = json.loads((out / "bench_gpu.json").read_text())
    cpu_rows = [r for r in body["rows"] if r["section"] == "ort-cpu"]
    assert [r["batch"] for r in cpu_rows] == [1, 3]
    assert all(r["provider"] == "CPUExecutionProvider" and r["iters"] == 2 and r["ms_per_img"] > 0 for r in cpu_rows)
    assert body["env"]["inputs"] == "8 random tensors (synthetic)"
    # No GPU here: the GPU sections say why they did not run, and the run still finished.
    said = {e["section"]: e["what"] for e in body["events"] if e["what"] != "done"}
    assert all(said[s].startswith("skipped") for s in ("ort-cuda", "ort-cuda-fp16", "ort-cuda-graph", "ort-trt"))
    assert said["torch"].startswith(("skipped", "section failed"))
    assert [t["batch"] for t in body["tax"]] == [1, 3]
    assert all(t["to_model_input_cpu_ms_per_img"] >= 0 and "decode_outputs_cpu_ms_per_img" in t for t in body["tax"])
    text = (out / "bench_gpu.txt").read_text()
    assert "CPUExecutionProvider" in text and "to_model_input cpu ms/img" in text


class _Tensor:
    def __init__(self, device: str = "cuda"):
        self.device = device

    def cpu(self) -> _Tensor:
        return _Tensor("cpu")


def _node(op: str, target: str, args: tuple[Any, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(op=op, target=target, args=args, users=[])


def test_only_constants_read_as_shapes_move_to_the_host() -> None:
    """A Reshape's shape and a Resize's scales are read as numbers every call; an Add's constant is
    arithmetic on the device and must stay there."""
    shape, scales, bias, x = (_node("get_attr", f"initializers.{n}") for n in ("shape", "scales", "bias", "x"))
    reshape = _node("call_module", "reshape", (x, shape))
    resize = _node("call_module", "resize", (x,))  # scales passed by keyword
    add = _node("call_module", "add", (x, bias))
    for const, user in ((shape, reshape), (scales, resize), (bias, add), (x, reshape)):
        const.users.append(user)
    modules = {"reshape": type("OnnxReshape", (), {})(), "resize": type("OnnxResize", (), {})(),
               "add": type("OnnxBinaryMathOperation", (), {})()}
    initializers = SimpleNamespace(shape=_Tensor(), scales=_Tensor(), bias=_Tensor(), x=_Tensor())
    net = SimpleNamespace(graph=SimpleNamespace(nodes=[shape, scales, bias, x, reshape, resize, add]),
                          named_modules=lambda: modules.items(), get_submodule=lambda name: initializers)

    assert keep_shape_constants_on_host(net) == 2
    assert (initializers.shape.device, initializers.scales.device) == ("cpu", "cpu")
    assert (initializers.bias.device, initializers.x.device) == ("cuda", "cuda")


def test_synthetic_batches_cycle_the_tensors(tmp_path: Path) -> None:
    from infra.bench_gpu import load_inputs

    inputs = load_inputs(_tiny_model(tmp_path / "model"), None)
    batch = inputs.float32(10)
    assert batch.shape == (10, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_array_equal(inputs.uint8(10)[8], inputs.tensors[0])


def test_fp16_copy_keeps_float32_io_and_is_made_once(tmp_path: Path) -> None:
    model_dir = _tiny_model(tmp_path / "model")
    args = SimpleNamespace(model_dir=model_dir)
    report = Report(tmp_path / "out")
    path = fp16_model(report, "ort-cuda-fp16", args)

    converted = onnx.load(str(path))
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert "Cast" in {n.op_type for n in converted.graph.node}  # float32 in, half inside
    assert fp16_model(report, "ort-cuda-fp16", args) == path
    assert [e["what"] for e in report.events] == ["fp16 model converted"]


def test_nvidia_library_dirs_are_the_nvidia_lib_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from infra import bench_gpu

    for sub in ("cu13/lib", "cudnn/lib", "cudnn/include"):
        (tmp_path / "nvidia" / sub).mkdir(parents=True)
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path / "nvidia")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "nvidia" else None)
    root = tmp_path / "nvidia"
    assert bench_gpu.nvidia_library_dirs() == [str(root / "cu13/lib"), str(root / "cudnn/lib")]

    # Already on LD_LIBRARY_PATH: no restart (os.execv would replace the test process).
    monkeypatch.setenv("LD_LIBRARY_PATH", ":".join(bench_gpu.nvidia_library_dirs()))
    monkeypatch.setattr(bench_gpu.os, "execv", lambda *a: pytest.fail("restarted"))
    bench_gpu._restart_with_nvidia_libs()
