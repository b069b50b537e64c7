"""How ImagePreprocessed carries the model input: the one encoder (preprocess) and decoder (inference, shadow).

Two encodings, named by the event's ``encoding`` field (docs/events.md):

- ``raw``: ``tensor`` is the whole letterboxed input, padding included: uint8 CHW [3, H, W] (519 KB at
  416x416). Every record written before the field existed reads as ``raw``.
- ``region``: ``tensor`` is only the letterbox's content rectangle, uint8 CHW [3, h, w] as ``shape`` says,
  whose top-left corner is at (``letterbox.pad_x``, ``letterbox.pad_y``); the reader pads it back with the
  pad value of the model that runs. 27% fewer bytes over the sample images (none for a square
  image, 44% for 16:9), at no CPU cost (docs/performance.md, "Tensor hop").

Anything in a record that does not fit the model's input is ``InvalidRecord("INVALID_TENSOR")``, never a
crash: the record goes to the DLQ and its request is closed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from imaging.letterbox import place
from model_store.serving.config import InputSpec
from stream.errors import InvalidRecord

RAW = "raw"
REGION = "region"
ENCODINGS = (RAW, REGION)


def encoded(region: np.ndarray, pad: tuple[int, int], size: tuple[int, int], pad_value: int,
            encoding: str = REGION) -> dict[str, Any]:
    """The event's tensor fields for a letterbox ``region`` (uint8 [3, h, w]) at ``pad`` in an input of ``size``."""
    if encoding == RAW:
        region = place(region, size, pad_value, pad)
    elif encoding != REGION:
        raise ValueError(f"unknown tensor encoding {encoding!r}; expected one of {ENCODINGS}")
    return {"tensor": region.tobytes(), "shape": list(region.shape), "dtype": str(region.dtype), "layout": "CHW",
            "encoding": encoding}


def _invalid(message: str) -> InvalidRecord:
    return InvalidRecord("INVALID_TENSOR", message)


def _offset(letterbox: Mapping[str, Any], name: str) -> int:
    value = letterbox.get(name)
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0 or value != int(value):
        raise _invalid(f"letterbox {name} {value!r} is not a whole number of pixels >= 0")
    return int(value)


def model_input(value: Mapping[str, Any], spec: InputSpec) -> np.ndarray:
    """The record's letterboxed uint8 [3, H, W] model input, checked against ``spec`` (the model that runs)."""
    want = [3, spec.height, spec.width]
    encoding = value.get("encoding", RAW)
    layout = value.get("layout", "CHW")
    shape = list(value["shape"])
    if encoding not in ENCODINGS:
        raise _invalid(f"unknown tensor encoding {encoding!r}; expected one of {ENCODINGS}")
    if value["dtype"] != "uint8" or layout != "CHW" or len(shape) != 3 or shape[0] != 3:
        raise _invalid(f"expected uint8 CHW [3, h, w], got {value['dtype']} {layout} {shape}")
    data = value["tensor"]
    if len(data) != math.prod(shape):
        raise _invalid(f"tensor has {len(data)} bytes for shape {shape}")
    if encoding == RAW:
        if shape != want:
            raise _invalid(f"expected uint8 CHW {want}, got {value['dtype']} {layout} {shape}")
        return np.frombuffer(data, dtype=np.uint8).reshape(want)
    lb = value["letterbox"]
    if (lb.get("input_width"), lb.get("input_height")) != (spec.width, spec.height):
        raise _invalid(f"letterboxed for {lb.get('input_width')}x{lb.get('input_height')}, "
                       f"the model takes {spec.width}x{spec.height}")
    left, top = _offset(lb, "pad_x"), _offset(lb, "pad_y")
    _, h, w = shape
    if not (1 <= h and 1 <= w and top + h <= spec.height and left + w <= spec.width):
        raise _invalid(f"region {w}x{h} at ({left}, {top}) does not fit the {spec.width}x{spec.height} input")
    region = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    return place(region, (spec.width, spec.height), spec.pad_value, (left, top))
