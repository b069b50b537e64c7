"""Model versions for the lifecycle tests, made from the converted default model with onnx tooling."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_store.config import CONFIG_FILE, MODEL_FILE


def variant(src: Path, dst: Path, *, tag: str, slow_matmuls: int = 0) -> Path:
    """The same model (same detections) with other bytes; ``slow_matmuls`` adds real work per image
    (a chain of [416 x 416] MatMuls on the input whose sum, times zero, is added to the output)."""
    model = onnx.load(str(src / MODEL_FILE))
    onnx.helper.set_model_props(model, {"detectflow_test_variant": tag})
    if slow_matmuls:
        graph = model.graph
        out = graph.output[0].name
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == out:
                    node.output[i] = f"{out}_raw"
        width = graph.input[0].type.tensor_type.shape.dim[3].dim_value
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, -1, width], dtype=np.int64), "slow_shape"),
            numpy_helper.from_array(np.full((width, width), 1.0 / width, dtype=np.float32), "slow_w"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "slow_zero"),
        ])
        nodes = [helper.make_node("Reshape", [graph.input[0].name, "slow_shape"], ["slow_0"])]
        for k in range(slow_matmuls):
            nodes.append(helper.make_node("MatMul", [f"slow_{k}", "slow_w"], [f"slow_{k + 1}"]))
        nodes += [helper.make_node("ReduceSum", [f"slow_{slow_matmuls}"], ["slow_sum"], keepdims=0),
                  helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
                  helper.make_node("Add", [f"{out}_raw", "slow_nothing"], [out])]
        graph.node.extend(nodes)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / MODEL_FILE))
    shutil.copy(src / CONFIG_FILE, dst / CONFIG_FILE)
    return dst


def wrong_shape(src: Path, dst: Path) -> Path:
    """A valid ONNX model with the right input whose output breaks the decoder's contract ([N, 3])."""
    config_src = src / CONFIG_FILE
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["detections"], axis=1)],
        "wrong_shape",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 416, 416])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / MODEL_FILE))
    shutil.copy(config_src, dst / CONFIG_FILE)
    return dst


def corrupt(src: Path, dst: Path) -> Path:
    """A model.onnx whose bytes are cut in the middle (a broken upload)."""
    dst.mkdir(parents=True, exist_ok=True)
    data = (src / MODEL_FILE).read_bytes()
    (dst / MODEL_FILE).write_bytes(data[: len(data) // 3])
    shutil.copy(src / CONFIG_FILE, dst / CONFIG_FILE)
    return dst


TEST_MODEL = re.compile(r"lc-it[0-9a-f]{8}")  # "lc-" + a test prefix (stream_kit.new_prefix)


def purge_test_models() -> list[str]:
    """Remove the lifecycle tests' models (this session's and any a killed run left) from the dev
    registry. Called once at the session's end: a purge at the lifecycle module's teardown was
    followed by timeouts of the next module's first requests in two CI runs."""
    from infra.settings import PipelineSettings
    from model_store.registry import connect_registry

    registry = connect_registry(PipelineSettings.from_env())
    try:
        doomed = [m for m in registry.store.models() if TEST_MODEL.fullmatch(m)]
        for model in doomed:
            registry.purge(model, actor="tests")
        return doomed
    finally:
        registry.close()
