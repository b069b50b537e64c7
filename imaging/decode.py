"""Decoding: a whole, header-checked image to an oriented BGR uint8 image, and ``prepare``, the full chain.

    bytes -> read_header         (imaging.headers) format, size, orientation, limits
          -> decode              completeness checked first (a cut upload is TRUNCATED_IMAGE, not a grey-filled
                                 image), cv2.imdecode, normalised to BGR uint8 [H, W, 3], image as stored
          -> apply_orientation   the EXIF orientation, applied exactly once: the result is what a viewer shows

``prepare`` chains them and times each step. Pure: no I/O; every refusal is an ``ImageRejected``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np

from imaging.headers import ImageHeader, check_complete, read_header
from imaging.limits import CORRUPT_IMAGE, DEFAULT_LIMITS, UNSUPPORTED_FORMAT, ImageLimits, ImageRejected


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays field-wise is ambiguous
class PreparedImage:
    image: np.ndarray  # BGR uint8 [height, width, 3], C-contiguous, oriented
    format: str
    orientation: int
    width: int  # of the oriented image
    height: int
    stored_width: int
    stored_height: int
    timings_ms: dict[str, float]  # "sniff" (magic + header), "decode", "orient"


# Transparent pixels are composited on the letterbox grey (ModelConfig.pad_value's default), so the model sees
# them as padding rather than as whatever colour the encoder left under alpha 0 (often black).
ALPHA_BACKGROUND: Final = 128

# IMREAD_UNCHANGED keeps 16-bit depth and alpha for us to normalise; it also skips OpenCV's EXIF rotation (the
# loader rotates only when flags != IMREAD_UNCHANGED). -1 | 128 == -1: IGNORE_ORIENTATION states the intent.
_IMREAD_FLAGS: Final = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION

# OpenCV's TIFF decoder applies tag 274 itself, whatever the flags (grfmt_tiff.cpp fixOrientation).
_DECODER_ORIENTS: Final = frozenset({"tiff"})

# --------------------------------------------------------------------------- decode


def decode(data: bytes, header: ImageHeader, *, alpha_background: int = ALPHA_BACKGROUND) -> np.ndarray:
    """The pixels as stored (before orientation) as BGR uint8 [H, W, 3].

    Grey becomes BGR; alpha is composited on ``alpha_background`` grey; 16 bits become 8 by ``>> 8``.
    """
    image, oriented = _decode_normalised(data, header, alpha_background)
    if oriented:  # undo the TIFF decoder's rotation so this function means the same for every format
        image = apply_orientation(image, _INVERSE_ORIENTATION[header.orientation])
    return image


def _decode_normalised(data: bytes, header: ImageHeader, alpha_background: int) -> tuple[np.ndarray, bool]:
    """Decoded, normalised image, and whether the decoder has already applied ``header.orientation``."""
    check_complete(data, header.format)  # cv2 grey-fills a cut JPEG rather than failing
    try:
        raw = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD_FLAGS)
    except cv2.error as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"{header.format} decoder failed: {exc.err}") from exc
    if raw is None:
        raise ImageRejected(CORRUPT_IMAGE, f"{header.format} decoder could not read the image")
    oriented = header.format in _DECODER_ORIENTS and header.orientation != 1
    width, height = header.oriented_size if oriented else (header.width, header.height)
    if raw.shape[:2] != (height, width):
        raise ImageRejected(
            CORRUPT_IMAGE, f"decoded {raw.shape[1]}x{raw.shape[0]} but the header says {width}x{height}"
        )
    return _to_bgr8(raw, alpha_background), oriented


def _to_bgr8(image: np.ndarray, background: int) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)  # keep the top byte: a linear map, no clipping
    elif image.dtype != np.uint8:
        raise ImageRejected(UNSUPPORTED_FORMAT, f"pixel type {image.dtype} is not supported")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return _composite(image[:, :, :3], image[:, :, 3], background)
    if channels == 2:
        grey = _composite(image[:, :, :1], image[:, :, 1], background)
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    raise ImageRejected(UNSUPPORTED_FORMAT, f"images with {channels} channels are not supported")


def _composite(colour: np.ndarray, alpha: np.ndarray, background: int) -> np.ndarray:
    """``colour`` over a flat ``background`` grey, exact to rounding, in uint16."""
    if alpha.min() == 255:
        return np.ascontiguousarray(colour)  # opaque (most "RGBA" uploads): no arithmetic
    a = alpha[:, :, None].astype(np.uint16)
    mixed = colour * a + np.uint16(background) * (255 - a)  # at most 255 * 255: fits uint16
    mixed += 128
    return ((mixed + (mixed >> 8)) >> 8).astype(np.uint8)  # round(x / 255) without a division


# --------------------------------------------------------------------------- orientation

_INVERSE_ORIENTATION: Final = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """The image as a viewer shows it, given its EXIF orientation (1..8); 1 returns ``image`` itself."""
    if orientation == 1:
        return image
    if orientation == 2:
        return cv2.flip(image, 1)  # mirror left-right
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)  # mirror top-bottom
    if orientation == 5:
        return cv2.transpose(image)  # mirror along the top-left/bottom-right diagonal
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(image), -1)  # mirror along the other diagonal
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")


# --------------------------------------------------------------------------- pipeline


def prepare(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, alpha_background: int = ALPHA_BACKGROUND
) -> PreparedImage:
    """sniff -> read_header -> decode -> apply_orientation, timed; raises ImageRejected."""
    t0 = time.perf_counter()
    header = read_header(data, limits)
    t1 = time.perf_counter()
    image, oriented = _decode_normalised(data, header, alpha_background)
    t2 = time.perf_counter()
    if not oriented:
        image = apply_orientation(image, header.orientation)
    t3 = time.perf_counter()
    height, width = image.shape[:2]
    return PreparedImage(
        image=image,
        format=header.format,
        orientation=header.orientation,
        width=width,
        height=height,
        stored_width=header.width,
        stored_height=header.height,
        timings_ms={"sniff": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3, "orient": (t3 - t2) * 1e3},
    )
