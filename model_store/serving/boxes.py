"""Candidate boxes and what is done to them after the model: NMS, back to original pixels, detections.

A decoder (``model_store.serving.decoders``) turns a model's outputs into ``Candidates`` per image, in
model-input pixels; ``nms`` keeps the best per overlap and class, ``unletterbox`` maps boxes back to the original
image, ``to_detections`` names the classes. The postprocess stage, the shadow stage, the monitor and the
in-process ``Detector`` share these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class DetectError(ValueError):
    """An image or model output cannot be processed."""


@dataclass(frozen=True)
class Candidates:
    """Boxes of one image: ``boxes`` float32 [K, 4] as x1, y1, x2, y2; ``scores`` [K]; ``class_ids`` [K]."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(self.boxes[index], self.scores[index], self.class_ids[index])

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class Detection:
    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against [K, 4] boxes."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(candidates: Candidates, iou_threshold: float, max_detections: int = 300) -> Candidates:
    """Class-aware greedy NMS: a box suppresses only same-class boxes overlapping more than
    ``iou_threshold``.  Result sorted by descending score (ties keep input order)."""
    if len(candidates) == 0:
        return candidates
    # Shift each class into its own coordinate region so one greedy pass never mixes classes.
    span = float(np.abs(candidates.boxes).max()) + 1.0
    shifted = candidates.boxes + (candidates.class_ids.astype(np.float64) * 2 * span)[:, None]
    order = np.argsort(-candidates.scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        order = rest[box_iou(shifted[best], shifted[rest]) <= iou_threshold]
    return candidates.take(np.asarray(keep, dtype=np.int64))


def unletterbox(boxes: np.ndarray, scale: float, pad: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Map xyxy boxes from letterboxed input pixels back to the original image (width, height), clipped."""
    left, top = pad
    out = (boxes - np.asarray([left, top, left, top], dtype=np.float32)) / np.float32(scale)
    w, h = original_size
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
    return out


def to_detections(candidates: Candidates, class_names: Sequence[str]) -> list[Detection]:
    return [
        Detection(int(c), class_names[int(c)], float(s), (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        for b, s, c in zip(candidates.boxes, candidates.scores, candidates.class_ids, strict=True)
    ]
