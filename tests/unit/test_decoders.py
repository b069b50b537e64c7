"""Decoders per model family on synthetic tensors with known answers, plus parity with detect.decode."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
from darknet_fixtures import random_weights_file

from config import StackSettings
from model_store import darknet
from model_store.config import InputSpec, ModelConfig, OutputSpec, Provenance, YoloHeadSpec
from model_store.decoders import (
    DECODERS,
    SSD_DEFAULT_OUTPUTS,
    DecoderError,
    check_output_contract,
    decode_outputs,
    decoder_for,
)
from model_store.detect import Candidates, Detector, decode, letterbox, to_model_input
from model_store.session import CPU, SessionSettings

PROVENANCE = Provenance("p", "0", (), "", "", "", "0", 17)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _config(decoder: str, outputs: tuple[OutputSpec, ...], *, classes: int = 3, width: int = 32, height: int = 32,
            heads: tuple[YoloHeadSpec, ...] = (), box_layout: str = "cxcywh_obj_cls",
            class_id_offset: int = 0) -> ModelConfig:
    return ModelConfig(name="t", decoder=decoder, input=InputSpec("images", width, height), outputs=outputs,
                       class_names=tuple(f"c{i}" for i in range(classes)), heads=heads, max_batch=4,
                       provenance=PROVENANCE, box_layout=box_layout, class_id_offset=class_id_offset)


def _assert_same(got: list[Candidates], want: list[Candidates]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.boxes.dtype == np.float32 and g.scores.dtype == np.float32 and g.class_ids.dtype == np.int64
        assert g.boxes.shape == (len(g), 4)
        np.testing.assert_array_equal(g.boxes, w.boxes)
        np.testing.assert_array_equal(g.scores, w.scores)
        np.testing.assert_array_equal(g.class_ids, w.class_ids)


# --------------------------------------------------------------------------- darknet_yolo / yolov5

DARKNET = _config("darknet_yolo", (OutputSpec("detections", ("N", 4, 8), ""),),
                  heads=(YoloHeadSpec((0,), ((4.0, 4.0),), 16, (2, 2), 1.0),))
YOLOV5 = _config("yolov5", (OutputSpec("output0", ("N", 4, 8), ""),))


def _obj_cls_batch() -> np.ndarray:
    out = np.zeros((2, 4, 8), np.float32)
    out[0, 0] = [10, 20, 4, 6, 0.9, 0.1, 0.8, 0.3]  # best class 1, score 0.72
    out[0, 1] = [5, 5, 2, 2, 0.5, 0.9, 0.0, 0.0]  # 0.45
    out[0, 2] = [5, 5, 2, 2, 0.4, 1.0, 1.0, 1.0]  # objectness alone is below 0.5
    out[1, 3] = [16, 16, 32, 8, 1.0, 0.0, 0.0, 0.6]
    return out


@pytest.mark.parametrize("config", [DARKNET, YOLOV5], ids=["darknet_yolo", "yolov5"])
def test_obj_cls_families_known_answer(config: ModelConfig) -> None:
    first, second = decode_outputs({config.outputs[0].name: _obj_cls_batch()}, config, 0.5)
    assert first.class_ids.tolist() == [1] and first.scores.tolist() == pytest.approx([0.72])
    assert first.boxes.tolist() == [[8, 17, 12, 23]]
    assert second.class_ids.tolist() == [2] and second.boxes.tolist() == [[0, 12, 32, 20]]
    # A lower floor lets the 0.45 box in; a floor above every score leaves empty, well-formed results.
    assert len(decode_outputs({config.outputs[0].name: _obj_cls_batch()}, config, 0.42)[0]) == 2
    empty = decode_outputs({config.outputs[0].name: _obj_cls_batch()}, config, 0.99)
    assert [len(c) for c in empty] == [0, 0] and empty[0].boxes.shape == (0, 4)


def test_darknet_yolo_is_detect_decode_on_random_outputs() -> None:
    rng = np.random.default_rng(3)
    out = rng.uniform(0, 1, (3, 500, 8)).astype(np.float32)
    out[..., :4] *= 32
    config = replace(DARKNET, outputs=(OutputSpec("detections", ("N", 500, 8), ""),), heads=())
    for floor in (0.0, 0.1, 0.3):
        _assert_same(DECODERS["darknet_yolo"]({"detections": out}, config, floor), decode(out, config, floor))


def test_yolov5_is_its_own_registry_entry_with_an_open_box_count() -> None:
    assert decoder_for(YOLOV5) is DECODERS["yolov5"] and DECODERS["yolov5"] is not DECODERS["darknet_yolo"]
    check_output_contract(YOLOV5, {"output0": ["batch", 25200, 8]})
    # Our converter's box count follows from its heads (2x2 grid, one anchor): 4 boxes, no other.
    check_output_contract(DARKNET, {"detections": ["N", 4, 8]})
    with pytest.raises(DecoderError, match="axis 1"):
        check_output_contract(DARKNET, {"detections": ["N", 5, 8]})


def test_darknet_yolo_matches_detect_decode_on_the_real_model() -> None:
    settings = StackSettings.from_env()
    model_dir, bus_path = settings.models_dir / "yolov4-tiny" / "1", settings.samples_dir / "bus.jpg"
    if not (model_dir / "config.json").is_file() or not bus_path.is_file():
        pytest.skip(f"needs the converted model in {model_dir} and {bus_path}")
    detector = Detector.from_model_dir(model_dir, SessionSettings(providers=(CPU,)))
    spec = detector.config.input
    bus = cv2.imread(str(bus_path), cv2.IMREAD_COLOR)
    out = detector.infer(to_model_input([letterbox(bus, (spec.width, spec.height), spec.pad_value)[0]] * 2))
    check_output_contract(detector.config, {o.name: o.shape for o in detector.config.outputs})
    for floor in (0.01, 0.25):
        got = decode_outputs({detector.config.outputs[0].name: out}, detector.config, floor, max_candidates=10_000)
        want = decode(out, detector.config, floor)
        assert len(want[0]) > 0
        _assert_same(got, want)


# --------------------------------------------------------------------------- darknet_yolo_raw

RAW_HEADS = (
    YoloHeadSpec((3, 4), ((4.0, 6.0), (10.0, 5.0)), 16, (2, 3), 1.1),
    YoloHeadSpec((0, 1), ((3.0, 4.0), (6.0, 6.0)), 8, (4, 6), 1.0),
)
RAW = _config("darknet_yolo_raw", (OutputSpec("head16", ("N", 14, 2, 3), ""), OutputSpec("head8", ("N", 14, 4, 6), "")),
              classes=2, width=48, height=32, heads=RAW_HEADS)


def _raw_batch() -> dict[str, np.ndarray]:
    """Image 1: one box on the stride-16 head; image 0: one box on the stride-8 head; the rest is off."""
    coarse = np.full((2, 2, 7, 2, 3), -30.0, np.float32)  # [N, A, 5 + C, H, W]
    # anchor 1 (10x5), row 1, col 2: x = (0.5 * 1.1 - 0.05 + 2) * 16 = 40, y = (0.75 * 1.1 - 0.05 + 1) * 16 = 28.4
    coarse[1, 1, :, 1, 2] = [0.0, math.log(3), math.log(2), 0.0, _logit(0.8), -30.0, _logit(0.9)]
    fine = np.full((2, 2, 7, 4, 6), -30.0, np.float32)
    # anchor 0 (3x4), row 3, col 5: x = (0.5 + 5) * 8 = 44, y = (0.5 + 3) * 8 = 28, score 0.6 * 1.0
    fine[0, 0, :, 3, 5] = [0.0, 0.0, 0.0, 0.0, _logit(0.6), 30.0, -30.0]
    return {"head16": coarse.reshape(2, 14, 2, 3), "head8": fine.reshape(2, 14, 4, 6)}


def test_raw_heads_decode_a_hand_encoded_box() -> None:
    first, second = decode_outputs(_raw_batch(), RAW, 0.5)
    assert first.class_ids.tolist() == [0] and first.scores.tolist() == pytest.approx([0.6])
    np.testing.assert_allclose(first.boxes, [[42.5, 26, 45.5, 30]], atol=1e-4)
    assert second.class_ids.tolist() == [1] and second.scores.tolist() == pytest.approx([0.72])
    np.testing.assert_allclose(second.boxes, [[30, 25.9, 50, 30.9]], atol=1e-4)
    assert [len(c) for c in decode_outputs(_raw_batch(), RAW, 0.65)] == [0, 1]
    assert [len(c) for c in decode_outputs(_raw_batch(), RAW, 0.75)] == [0, 0]


def test_raw_heads_agree_with_the_darknet_reference_and_converter_order() -> None:
    """darknet.forward exposes the raw head maps and darknet.decode_heads is the converter's in-graph
    decode: decoding the maps here must give what darknet_yolo gives on the decoded tensor."""
    network = darknet.parse_cfg("""
[net]
width=24
height=16
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky
[route]
layers=-1
[convolutional]
filters=14
size=1
stride=2
pad=1
activation=linear
[yolo]
mask=1,2
anchors=4,5, 9,12, 7,3
classes=2
scale_x_y=1.1
[route]
layers=0
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1
anchors=4,5, 9,12, 7,3
classes=2
""")
    rng = np.random.default_rng(11)
    weights = darknet.parse_weights(random_weights_file(network, rng, conv_std=0.5, seen=0), network)
    images = rng.uniform(0, 1, (3, 3, 16, 24))
    maps = darknet.forward(network, weights, images)
    decoded = darknet.decode_heads(network, maps)

    heads = tuple(YoloHeadSpec(y.mask, y.masked_anchors, network.width // network.shapes[y.index].w,
                               (network.shapes[y.index].h, network.shapes[y.index].w), y.scale_x_y)
                  for y in network.yolo_layers)
    raw = _config("darknet_yolo_raw", tuple(OutputSpec(f"h{i}", ("N", *m.shape[1:]), "") for i, m in enumerate(maps)),
                  classes=2, width=24, height=16, heads=heads)
    assert [h.grid for h in heads] == [(4, 6), (8, 12)]
    as_float32 = {f"h{i}": m.astype(np.float32) for i, m in enumerate(maps)}
    everything = [2 * 4 * 6 + 2 * 8 * 12] * 3
    for floor in (0.0, 0.3):  # 0.0 keeps every box; 0.3 exercises the objectness pre-filter
        ours = decode_outputs(as_float32, raw, floor, max_candidates=10_000)
        reference = decode(decoded, raw, floor)
        assert [len(c) for c in ours] == [len(c) for c in reference]
        assert (sum(len(c) for c in ours) == sum(everything)) == (floor == 0.0)
        for got, want in zip(ours, reference, strict=True):
            np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(got.class_ids, want.class_ids)


def test_raw_contract_checks_heads_against_outputs() -> None:
    check_output_contract(RAW, {"head16": ["N", 14, 2, 3], "head8": ["N", 14, 4, 6]})
    with pytest.raises(DecoderError, match="head8"):
        check_output_contract(RAW, {"head16": ["N", 14, 2, 3], "head8": ["N", 14, 3, 6]})
    with pytest.raises(DecoderError, match="one output per yolo head"):
        check_output_contract(replace(RAW, outputs=RAW.outputs[:1]), {"head16": ["N", 14, 2, 3]})
    with pytest.raises(DecoderError, match="does not cover"):
        check_output_contract(replace(RAW, heads=(replace(RAW_HEADS[0], stride=8), RAW_HEADS[1])), {})
    batch = _raw_batch()
    with pytest.raises(DecoderError, match="N=2"):  # heads of one batch must agree on its size
        decode_outputs({"head16": batch["head16"], "head8": batch["head8"][:1]}, RAW, 0.5)


# --------------------------------------------------------------------------- yolov8


def _yolov8_rows() -> np.ndarray:
    rows = np.zeros((2, 5, 7), np.float32)  # [N, boxes, 4 + 3]
    rows[0, 1] = [10, 20, 4, 6, 0.1, 0.7, 0.3]
    rows[0, 3] = [16, 16, 8, 8, 0.55, 0.2, 0.5]
    rows[0, 4] = [1, 1, 2, 2, 0.2, 0.2, 0.2]
    rows[1, 0] = [30, 2, 4, 4, 0.0, 0.0, 0.9]
    return rows


@pytest.mark.parametrize("layout", ["cxcywh_cls_transposed", "cxcywh_cls"])
def test_yolov8_scores_are_the_best_class(layout: str) -> None:
    transposed = layout == "cxcywh_cls_transposed"
    tensor = _yolov8_rows().transpose(0, 2, 1).copy() if transposed else _yolov8_rows()
    config = _config("yolov8", (OutputSpec("output0", ("N", 7, 5) if transposed else ("N", 5, 7), ""),),
                     box_layout=layout)
    first, second = decode_outputs({"output0": tensor}, config, 0.5)
    assert first.class_ids.tolist() == [1, 0] and first.scores.tolist() == pytest.approx([0.7, 0.55])
    assert first.boxes.tolist() == [[8, 17, 12, 23], [12, 12, 20, 20]]
    assert second.class_ids.tolist() == [2] and second.boxes.tolist() == [[28, 0, 32, 4]]
    assert [len(c) for c in decode_outputs({"output0": tensor}, config, 0.6)] == [1, 1]
    assert [len(c) for c in decode_outputs({"output0": tensor}, config, 0.95)] == [0, 0]
    assert decode_outputs({"output0": tensor[:0]}, config, 0.5) == []


def test_yolov8_layout_decides_which_axis_holds_the_classes() -> None:
    native = _config("yolov8", (OutputSpec("output0", ("N", 84, 8400), ""),), classes=80,
                     box_layout="cxcywh_cls_transposed")
    check_output_contract(native, {"output0": ["batch", 84, "anchors"]})
    with pytest.raises(DecoderError, match="axis 1"):
        check_output_contract(native, {"output0": ["batch", 8400, 84]})
    check_output_contract(replace(native, box_layout="cxcywh_cls"), {"output0": ["batch", 8400, 84]})
    with pytest.raises(DecoderError, match="box_layout"):  # the dataclass default belongs to the obj families
        check_output_contract(replace(native, box_layout="cxcywh_obj_cls"), {"output0": ["batch", 84, 8400]})


# --------------------------------------------------------------------------- ssd


def _ssd_batch() -> dict[str, np.ndarray]:
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[0, 0] = [0.25, 0.5, 0.75, 1.0]  # ymin, xmin, ymax, xmax
    boxes[0, 1] = [0.0, 0.0, 0.5, 0.25]
    boxes[0, 2] = [0.1, 0.1, 0.2, 0.2]  # beyond num_detections: ignored whatever its score
    boxes[1, 0] = [0.5, 0.5, 1.0, 1.0]
    scores = np.asarray([[0.9, 0.6, 0.95, 0.0], [0.4, 0.0, 0.0, 0.0]], np.float32)
    classes = np.asarray([[3, 1, 7, 0], [2, 0, 0, 0]], np.float32)  # 1-based; padding rows hold 0 or junk
    return {"detection_boxes": boxes, "detection_scores": scores, "detection_classes": classes,
            "num_detections": np.asarray([2, 1], np.float32)}


SSD = _config("ssd", SSD_DEFAULT_OUTPUTS, width=200, height=100, box_layout="yxyx_norm", class_id_offset=1)


def test_ssd_keeps_valid_rows_and_scales_to_input_pixels() -> None:
    first, second = decode_outputs(_ssd_batch(), SSD, 0.3)
    assert first.boxes.tolist() == [[100, 25, 200, 75], [0, 0, 50, 50]]
    assert first.scores.tolist() == pytest.approx([0.9, 0.6]) and first.class_ids.tolist() == [2, 0]
    assert second.boxes.tolist() == [[100, 50, 200, 100]] and second.class_ids.tolist() == [1]
    assert [len(c) for c in decode_outputs(_ssd_batch(), SSD, 0.5)] == [2, 0]
    assert [len(c) for c in decode_outputs(_ssd_batch(), SSD, 0.95)] == [0, 0]


def test_ssd_names_come_from_the_config_and_ids_must_fit_the_class_names() -> None:
    renamed = replace(SSD, outputs=tuple(replace(o, name=f"out{i}") for i, o in enumerate(SSD.outputs)))
    batch = {f"out{i}": a for i, a in enumerate(_ssd_batch().values())}
    assert [len(c) for c in decode_outputs(batch, renamed, 0.3)] == [2, 1]
    with pytest.raises(DecoderError, match="class_id_offset=0"):  # 0-based reading of id 3 is past 3 names
        decode_outputs(_ssd_batch(), replace(SSD, class_id_offset=0), 0.3)
    with pytest.raises(DecoderError, match="4 outputs"):
        decode_outputs(_ssd_batch(), replace(SSD, outputs=SSD.outputs[:3]), 0.3)


def test_ssd_contract() -> None:
    check_output_contract(SSD, {"detection_boxes": ["N", 100, 4], "detection_scores": ["N", 100],
                                "detection_classes": ["N", 100], "num_detections": ["N"], "raw_scores": [1, 2, 3]})
    check_output_contract(SSD, {"detection_boxes": ["b", "k1", 4], "detection_scores": ["b", "k2"],
                                "detection_classes": ["b", "k3"], "num_detections": ["b"]})
    with pytest.raises(DecoderError, match="K=100"):
        check_output_contract(SSD, {"detection_boxes": ["N", 100, 4], "detection_scores": ["N", 50],
                                    "detection_classes": ["N", 100], "num_detections": ["N"]})
    with pytest.raises(DecoderError, match="must be 4"):
        check_output_contract(SSD, {"detection_boxes": ["N", 100, "four"], "detection_scores": ["N", 100],
                                    "detection_classes": ["N", 100], "num_detections": ["N"]})


# --------------------------------------------------------------------------- common behaviour


def test_max_candidates_keeps_the_best_in_model_order() -> None:
    out = np.zeros((1, 6, 8), np.float32)
    out[0, :, :4] = [[i * 10, 5, 2, 2] for i in range(6)]
    out[0, :, 4] = 1.0
    out[0, :, 5] = [0.3, 0.9, 0.5, 0.9, 0.8, 0.1]
    config = replace(YOLOV5, outputs=(OutputSpec("output0", ("N", 6, 8), ""),))
    (kept,) = decode_outputs({"output0": out}, config, 0.2, max_candidates=3)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.9, 0.8])
    assert kept.boxes[:, 0].tolist() == [9, 29, 39]  # boxes 1, 3, 4, in the model's order
    (tied,) = decode_outputs({"output0": out}, config, 0.2, max_candidates=1)
    assert tied.boxes[:, 0].tolist() == [9]  # equal scores: the earlier box wins
    assert len(decode_outputs({"output0": out}, config, 0.2, max_candidates=100)[0]) == 5


def test_wrong_shapes_are_decoder_errors() -> None:
    bad = np.zeros((2, 4, 7), np.float32)  # one column short for 3 classes
    with pytest.raises(DecoderError, match="axis 2"):
        check_output_contract(YOLOV5, {"output0": ["N", 4, 7]})
    with pytest.raises(DecoderError, match="axis 2"):
        decode_outputs({"output0": bad}, YOLOV5, 0.5)
    with pytest.raises(DecoderError, match="axis 2 is 'C'"):  # the class axis must be fixed
        check_output_contract(YOLOV5, {"output0": ["N", 4, "C"]})
    with pytest.raises(DecoderError, match="expected"):
        decode_outputs({"output0": bad[0]}, YOLOV5, 0.5)
    with pytest.raises(DecoderError, match="no output 'output0'"):
        decode_outputs({"detections": bad}, YOLOV5, 0.5)


def test_unknown_family_and_bad_arguments() -> None:
    unknown = replace(YOLOV5, decoder="rtdetr")
    with pytest.raises(DecoderError, match="rtdetr"):
        decoder_for(unknown)
    with pytest.raises(DecoderError, match="rtdetr"):
        check_output_contract(unknown, {"output0": ["N", 4, 8]})
    batch = {"output0": _obj_cls_batch()}
    with pytest.raises(DecoderError, match="floor"):
        decode_outputs(batch, YOLOV5, 1.5)
    with pytest.raises(DecoderError, match="max_candidates"):
        decode_outputs(batch, YOLOV5, 0.5, max_candidates=0)


def test_class_id_offset_round_trips_and_defaults_to_zero() -> None:
    assert ModelConfig.from_dict(SSD.to_dict()) == SSD
    data = YOLOV5.to_dict()
    del data["class_id_offset"]
    assert ModelConfig.from_dict(data).class_id_offset == 0


class _FixedSession:
    """An ONNX Runtime stand-in answering every run with fixed outputs (the first image's rows)."""

    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs

    def get_outputs(self) -> list[object]:
        return [type("Out", (), {"name": n})() for n in self.outputs]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = next(iter(feeds.values())).shape[0]
        return [np.repeat(self.outputs[k][:1], n, axis=0) for k in names]


@pytest.mark.parametrize("family", ["yolov8", "ssd"])
def test_detector_decodes_with_the_config_family(family: str) -> None:
    """The in-process Detector (the release gate's mAP, `detectflow eval`) decodes every family, all outputs."""
    if family == "yolov8":
        config, outputs = _config("yolov8", (OutputSpec("output0", ("N", 5, 7), ""),), box_layout="cxcywh_cls"), \
            {"output0": _yolov8_rows()}
        want = {1, 0}
    else:
        config, outputs = SSD, _ssd_batch()
        want = {2, 0}
    detector = Detector(_FixedSession(outputs), config, conf_threshold=0.5)  # type: ignore[arg-type]
    image = np.zeros((config.input.height, config.input.width, 3), np.uint8)
    (dets,) = detector.detect([image])
    assert {d.class_id for d in dets} == want
