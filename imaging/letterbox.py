"""The letterbox: an oriented BGR image resized into a model's input size, aspect kept, centred, padded.

    image (BGR uint8, any size)
      -> letterbox_region     RGB uint8 [3, h, w] content, the scale applied, its (left, top) in the input
      -> place                uint8 [3, H, W]: the region on a ``pad_value`` canvas
      -> to_model_input       float32 [N, 3, H, W], 0..1 (batched)

Preprocess ships the region (``processors/tensor_encoding.py``); inference places it and batches. A point p of
the original image lands at ``p * scale + pad``; ``model_store.serving.boxes.unletterbox`` maps boxes back.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


class LetterboxError(ValueError):
    """The array is not a BGR uint8 image [H, W, 3]."""


def letterbox_region(image_bgr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The content of the letterbox without its padding: ``image_bgr`` resized keeping its aspect ratio to fit
    ``size`` = (width, height), as an RGB uint8 tensor [3, h, w], with the scale applied and the (left, top) at
    which it sits, centred, in the input. ``place`` pads it into the model input."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise LetterboxError(f"expected a BGR uint8 image [H, W, 3], got {image_bgr.dtype} {list(image_bgr.shape)}")
    h, w = image_bgr.shape[:2]
    out_w, out_h = size
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # Bilinear, like darknet's own resize the model was trained with; INTER_AREA would anti-alias
    # but costs ~12 ms instead of ~0.5 ms on a 1080p image here.
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    region = np.ascontiguousarray(resized[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
    return region, scale, ((out_w - new_w) // 2, (out_h - new_h) // 2)


def place(region: np.ndarray, size: tuple[int, int], pad_value: int, at: tuple[int, int]) -> np.ndarray:
    """The model input [3, height, width]: ``pad_value`` everywhere but the [3, h, w] ``region``, whose top-left
    corner is at ``at`` = (left, top). The caller checks that the region fits."""
    out_w, out_h = size
    left, top = at
    canvas = np.full((3, out_h, out_w), pad_value, dtype=np.uint8)
    canvas[:, top : top + region.shape[1], left : left + region.shape[2]] = region
    return canvas


def letterbox(
    image_bgr: np.ndarray, size: tuple[int, int], pad_value: int
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping aspect ratio into ``size`` = (width, height), centred, padded with ``pad_value``.

    Returns the RGB uint8 tensor [3, height, width], the scale applied, and the (left, top) padding:
    a point p in the original image lands at ``p * scale + pad``.
    """
    region, scale, pad = letterbox_region(image_bgr, size)
    return place(region, size, pad_value, pad), scale, pad


def to_model_input(tensors: Sequence[np.ndarray], scale: float = 1.0 / 255.0) -> np.ndarray:
    """Stack letterboxed uint8 [3, H, W] tensors into the float32 [N, 3, H, W] model input."""
    batch = np.stack(tensors).astype(np.float32)
    batch *= np.float32(scale)
    return batch
