"""Pure pre/post-processing stages: letterbox, decode, NMS, unletterbox (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from imaging.letterbox import LetterboxError, letterbox, to_model_input
from model_store.serving.boxes import Candidates, DetectError, box_iou, nms, unletterbox
from model_store.serving.config import InputSpec, ModelConfig, OutputSpec, Provenance, YoloHeadSpec
from model_store.serving.decoders import decode


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(h * 1000 + w)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h, w", [(1080, 810), (480, 640), (416, 416), (100, 50), (7, 300)])
def test_letterbox_shape_padding_and_colour_order(h: int, w: int) -> None:
    image = _image(h, w)
    tensor, scale, (left, top) = letterbox(image, (416, 416), 128)
    assert tensor.shape == (3, 416, 416) and tensor.dtype == np.uint8 and tensor.flags.c_contiguous
    new_w, new_h = round(w * scale), round(h * scale)
    assert max(new_w, new_h) == 416 and (left == 0 or top == 0)
    assert abs(left - (416 - new_w - left)) <= 1 and abs(top - (416 - new_h - top)) <= 1  # centred
    # Padding bands hold the pad value; the content is RGB (channel 0 is the image's red = BGR[2]).
    assert (tensor[:, :top] == 128).all() and (tensor[:, top + new_h :] == 128).all()
    assert (tensor[:, :, :left] == 128).all() and (tensor[:, :, left + new_w :] == 128).all()
    if scale == 1:
        np.testing.assert_array_equal(tensor[0], image[:, :, 2])


def test_letterbox_red_square_lands_as_rgb() -> None:
    image = np.zeros((200, 400, 3), np.uint8)
    image[:, :] = (0, 0, 255)  # pure red in BGR
    tensor, _, (_, top) = letterbox(image, (416, 416), 0)
    centre = tensor[:, top + 50, 208]
    assert centre.tolist() == [255, 0, 0]


@pytest.mark.parametrize("h, w", [(1080, 810), (480, 640), (100, 50)])
def test_letterbox_unletterbox_round_trip(h: int, w: int) -> None:
    _, scale, pad = letterbox(_image(h, w), (416, 416), 128)
    original = np.asarray([[0, 0, w, h], [10.5, 20.25, 40, 45], [w / 3, h / 2, w * 0.9, h * 0.95]], np.float32)
    boxed = original * scale + np.asarray([pad[0], pad[1], pad[0], pad[1]], np.float32)
    assert (boxed >= 0).all() and (boxed[:, [0, 2]] <= 416).all() and (boxed[:, [1, 3]] <= 416).all()
    np.testing.assert_allclose(unletterbox(boxed, scale, pad, (w, h)), original, atol=1e-3 * max(w, h))


def test_unletterbox_clips_to_the_image() -> None:
    boxes = np.asarray([[-20, -5, 500, 430]], np.float32)
    out = unletterbox(boxes, 0.5, (8, 0), (800, 832))
    assert out.tolist() == [[0, 0, 800, 832]]


def test_letterbox_rejects_non_bgr_images() -> None:
    with pytest.raises(LetterboxError):
        letterbox(np.zeros((10, 10), np.uint8), (416, 416), 128)
    with pytest.raises(LetterboxError):
        letterbox(np.zeros((10, 10, 3), np.float32), (416, 416), 128)


def test_to_model_input_scales_to_unit_range() -> None:
    batch = to_model_input([np.full((3, 2, 2), 255, np.uint8), np.zeros((3, 2, 2), np.uint8)])
    assert batch.dtype == np.float32 and batch.shape == (2, 3, 2, 2)
    assert batch[0].max() == pytest.approx(1.0) and batch[1].max() == 0


# --------------------------------------------------------------------------- decode


def _config(classes: int = 3) -> ModelConfig:
    return ModelConfig(
        name="t", decoder="darknet_yolo", input=InputSpec("images", 32, 32),
        outputs=(OutputSpec("detections", ("N", 4, 5 + classes), ""),),
        class_names=tuple(f"c{i}" for i in range(classes)),
        heads=(YoloHeadSpec((0,), ((4.0, 4.0),), 16, (2, 2), 1.0),), max_batch=4,
        provenance=Provenance("p", "0", (), "", "", "", "0", 17),
    )


def test_decode_thresholds_on_objectness_times_class_probability() -> None:
    out = np.zeros((2, 4, 8), np.float32)
    out[0, 0] = [10, 20, 4, 6, 0.9, 0.1, 0.8, 0.3]  # best class 1, score 0.72
    out[0, 1] = [5, 5, 2, 2, 0.5, 0.9, 0.0, 0.0]  # 0.45 < 0.5
    out[0, 2] = [5, 5, 2, 2, 0.4, 1.0, 1.0, 1.0]  # objectness alone below threshold
    out[1, 3] = [16, 16, 32, 8, 1.0, 0.0, 0.0, 0.6]
    first, second = decode(out, _config(), conf_threshold=0.5)
    assert first.class_ids.tolist() == [1] and first.scores.tolist() == pytest.approx([0.72])
    assert first.boxes.tolist() == [[8, 17, 12, 23]]
    assert second.class_ids.tolist() == [2] and second.boxes.tolist() == [[0, 12, 32, 20]]


def test_decode_rejects_wrong_width() -> None:
    with pytest.raises(DetectError):
        decode(np.zeros((1, 4, 7), np.float32), _config(), 0.5)


# --------------------------------------------------------------------------- NMS


def _cands(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Candidates:
    return Candidates(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(classes, np.int64))


def test_box_iou() -> None:
    iou = box_iou(np.asarray([0, 0, 10, 10.0]), np.asarray([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30],
                                                            [3, 3, 3, 3]], np.float64))
    np.testing.assert_allclose(iou, [1, 1 / 3, 0, 0])


def test_nms_suppresses_same_class_overlaps_only() -> None:
    cands = _cands([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]],
                   [0.6, 0.9, 0.8, 0.3], [0, 0, 1, 0])
    kept = nms(cands, iou_threshold=0.5)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.3])
    assert kept.class_ids.tolist() == [0, 1, 0]
    assert kept.boxes[0].tolist() == [1, 1, 11, 11]


def test_nms_threshold_is_exclusive_and_limit_applies() -> None:
    cands = _cands([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], [2, 2])  # IoU 1/3
    assert len(nms(cands, iou_threshold=0.34)) == 2
    assert len(nms(cands, iou_threshold=0.33)) == 1
    many = _cands([[i * 20, 0, i * 20 + 10, 10] for i in range(10)], [0.1 * i for i in range(10)], [0] * 10)
    kept = nms(many, 0.5, max_detections=3)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_nms_on_nothing() -> None:
    assert len(nms(_cands([], [], []), 0.5)) == 0


def test_nms_handles_negative_and_large_coordinates() -> None:
    # Offsetting classes must not make far-apart classes collide.
    cands = _cands([[-100, -100, 5000, 5000], [-100, -100, 5000, 5000], [0, 0, 1, 1]], [0.9, 0.8, 0.7], [0, 1, 2])
    assert len(nms(cands, 0.5)) == 3
