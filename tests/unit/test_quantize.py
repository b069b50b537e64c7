"""INT8 quantisation of a model folder, on a tiny synthetic detector (two convs and a YOLO-like decoder)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from imaging.letterbox import letterbox, to_model_input
from model_store.serving.config import (
    CONFIG_FILE,
    MODEL_FILE,
    InputSpec,
    ModelConfig,
    OutputSpec,
    Provenance,
    YoloHeadSpec,
)
from model_store.tools import quantize
from model_store.tools.quantize import (
    DYNAMIC,
    STATIC,
    QuantizeError,
    calibration_batches,
    float_tail_nodes,
    quantize_version,
)

SIZE = 32
CHANNELS = 6  # x, y, w, h, objectness, one class
MAX_BATCH = 4
PIXEL_SCALE = 32.0  # the decoder multiplies box columns into input pixels, as the real one does
# Tolerance on every output column, as a fraction of its range (pixels for boxes, 1 for scores).
# Activations are uint8 over their calibrated range (one step ~ range/255) and weights int8 per
# channel, so each conv output carries an error of a few steps; the float sigmoid (slope <= 0.25)
# shrinks it further.  Measured at most 0.009 (static) and 0.005 (dynamic); 0.05 leaves room for
# other ORT kernels' rounding, while a broken quantisation (decoder quantised: scores in steps of
# 32/255, channels mixed, wrong scales) misses it by far.
TOLERANCE = 0.05


def _tiny_model(seed: int = 0) -> onnx.ModelProto:
    """[N,3,32,32] -> Conv3x3 -> LeakyRelu -> Conv1x1 -> decoder -> [N, 1024, 6], dynamic batch N."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (CHANNELS, 8, 1, 1)).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(w1, "w1"),
        onnx.numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
        onnx.numpy_helper.from_array(w2, "w2"),
        onnx.numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), "b2"),
        onnx.numpy_helper.from_array(np.asarray([-1, SIZE * SIZE, CHANNELS], dtype=np.int64), "shape3"),
        onnx.numpy_helper.from_array(np.asarray([4, 2], dtype=np.int64), "split"),
        onnx.numpy_helper.from_array(np.asarray([PIXEL_SCALE], dtype=np.float32), "pixels"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["a1"], name="leaky1", alpha=0.1),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="head_conv"),
        helper.make_node("Transpose", ["c2"], ["t"], name="dec_transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape3"], ["r"], name="dec_reshape"),
        helper.make_node("Split", ["r", "split"], ["box", "score"], name="dec_split", axis=2),
        helper.make_node("Sigmoid", ["box"], ["box_s"], name="dec_box_sigmoid"),
        helper.make_node("Mul", ["box_s", "pixels"], ["box_px"], name="dec_box_pixels"),
        helper.make_node("Sigmoid", ["score"], ["score_s"], name="dec_score_sigmoid"),
        helper.make_node("Concat", ["box_px", "score_s"], ["detections"], name="dec_concat", axis=2),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", SIZE * SIZE, CHANNELS])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _write_source(folder: Path, seed: int = 0) -> ModelConfig:
    payload = _tiny_model(seed).SerializeToString()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(payload)
    config = ModelConfig(
        name="tiny", decoder="darknet_yolo",
        input=InputSpec(name="images", width=SIZE, height=SIZE),
        outputs=(OutputSpec("detections", ("N", SIZE * SIZE, CHANNELS), "decoded boxes"),),
        class_names=("thing",),
        heads=(YoloHeadSpec(mask=(0,), anchors=((8.0, 8.0),), stride=1, grid=(SIZE, SIZE), scale_x_y=1.0),),
        max_batch=MAX_BATCH,
        provenance=Provenance(source_package="synthetic", source_version="0", source_files=("tiny.cfg",),
                              weights_sha256="w" * 64, cfg_sha256="c" * 64,
                              onnx_sha256=hashlib.sha256(payload).hexdigest(), converter_version="test 1",
                              opset=17),
    )
    config.save(folder / CONFIG_FILE)
    return config


def _images(seed: int, count: int) -> list[np.ndarray]:
    """Smooth random BGR images of assorted sizes (letterboxing pads them), like photos more than noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        smooth = np.stack([np.kron(coarse[:, :, c], np.ones((16, 16)))[:h, :w] for c in range(3)], axis=2)
        images.append(np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8))
    return images


def _run(model_path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["detections"], {"images": batch})[0]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    _write_source(tmp_path / "src")
    return tmp_path / "src"


# --------------------------------------------------------------------------- pure parts


def test_float_tail_is_everything_after_the_last_conv() -> None:
    tail = float_tail_nodes(_tiny_model())
    assert set(tail) == {"dec_transpose", "dec_reshape", "dec_split", "dec_box_sigmoid", "dec_box_pixels",
                         "dec_score_sigmoid", "dec_concat"}


def test_calibration_batches_are_letterboxed_like_serving() -> None:
    spec = InputSpec(name="images", width=SIZE, height=SIZE)
    image = _images(1, 1)[0]
    (batch,) = calibration_batches([image], spec)
    expected = to_model_input([letterbox(image, (SIZE, SIZE), spec.pad_value)[0]], spec.scale)
    assert batch.shape == (1, 3, SIZE, SIZE) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, expected)


# --------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("method", [STATIC, DYNAMIC])
def test_quantized_version_runs_every_batch_size_close_to_fp32(source: Path, tmp_path: Path, method: str) -> None:
    src_config = ModelConfig.load(source / CONFIG_FILE)
    out = tmp_path / f"int8-{method}"
    config = quantize_version(source, out, method=method, calibration_images=_images(1, 8))

    model = onnx.load(out / MODEL_FILE)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert ({"QuantizeLinear", "DequantizeLinear"} if method == STATIC else {"ConvInteger"}) <= ops, ops
    # The decoder stays float: the output comes straight from the float Concat.
    assert next(n for n in model.graph.node if "detections" in n.output).op_type == "Concat"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"

    spec = src_config.input
    batch = to_model_input([letterbox(i, (SIZE, SIZE), spec.pad_value)[0] for i in _images(2, MAX_BATCH)])
    column_range = np.asarray([PIXEL_SCALE] * 4 + [1.0] * (CHANNELS - 4), dtype=np.float32)
    for n in (1, 3, MAX_BATCH):
        expected, got = _run(source / MODEL_FILE, batch[:n]), _run(out / MODEL_FILE, batch[:n])
        assert got.shape == expected.shape == (n, SIZE * SIZE, CHANNELS)
        error = np.abs(got - expected) / column_range
        assert error.max() <= TOLERANCE, (n, float(error.max()))
    assert not np.array_equal(got, expected)  # it really computed in int8

    p = config.provenance
    assert p.onnx_sha256 == hashlib.sha256((out / MODEL_FILE).read_bytes()).hexdigest()
    assert p.converter_version.startswith(f"onnxruntime.quantization {ort.__version__} {method} ")
    assert src_config.provenance.onnx_sha256[:16] in p.converter_version
    assert ("calibrated on 8 sample images" in p.converter_version) == (method == STATIC)
    # Everything but the file's identity is the source's: same input, heads, classes, batch range.
    assert dataclasses.replace(config, provenance=src_config.provenance) == src_config
    assert (p.source_package, p.weights_sha256, p.cfg_sha256) == ("synthetic", "w" * 64, "c" * 64)
    assert ModelConfig.load(out / CONFIG_FILE) == config
    assert not list(out.glob("*.tmp"))


def test_same_source_and_method_is_reused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    first = quantize_version(source, out, calibration_images=_images(1, 4))
    written = (out / MODEL_FILE).stat().st_mtime_ns
    again = quantize_version(source, out, calibration_images=_images(1, 4))
    assert again == first and (out / MODEL_FILE).stat().st_mtime_ns == written

    other_method = quantize_version(source, out, method=DYNAMIC)
    assert other_method.provenance.onnx_sha256 != first.provenance.onnx_sha256

    src_config = ModelConfig.load(source / CONFIG_FILE)  # a config change alone is carried over
    dataclasses.replace(src_config, max_batch=2).save(source / CONFIG_FILE)
    assert quantize_version(source, out, method=DYNAMIC).max_batch == 2

    _write_source(source, seed=1)  # a new source model is quantised afresh
    renewed = quantize_version(source, out, method=DYNAMIC)
    assert renewed.provenance.converter_version != other_method.provenance.converter_version
    assert renewed.provenance.onnx_sha256 == hashlib.sha256((out / MODEL_FILE).read_bytes()).hexdigest()


def test_bad_requests_are_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="calibration images"):
        quantize_version(source, tmp_path / "out", method=STATIC)
    with pytest.raises(QuantizeError, match="unknown method"):
        quantize_version(source, tmp_path / "out", method="fp8", calibration_images=_images(1, 1))
    with pytest.raises(QuantizeError, match="cannot read"):
        quantize_version(tmp_path / "missing", tmp_path / "out", method=DYNAMIC)
    (source / MODEL_FILE).write_bytes(_tiny_model(seed=5).SerializeToString())
    with pytest.raises(QuantizeError, match="does not describe"):
        quantize_version(source, tmp_path / "out", method=DYNAMIC)
    assert not (tmp_path / "out").exists()


def test_the_cli_passes_its_defaults_and_flags_to_run_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """`detectflow model quantize` calls run_cli with its flags as keywords and exits with run_cli's code."""
    from infra.cli import main

    calls: list[dict[str, Any]] = []

    def run_cli(**kwargs: Any) -> int:
        inspect.signature(quantize.run_cli).bind(**kwargs)  # keywords the real run_cli takes, every one given
        calls.append(kwargs)
        return 3

    monkeypatch.setattr(quantize, "run_cli", run_cli)
    assert main(["model", "quantize"]) == 3
    assert calls[-1] == {"method": STATIC, "source": None, "out": None}
    assert main(["model", "quantize", "--method", "dynamic", "--source", "src", "--out", "dst"]) == 3
    assert calls[-1] == {"method": DYNAMIC, "source": Path("src"), "out": Path("dst")}
