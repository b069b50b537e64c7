"""Darknet model files: the .cfg parser, the .weights reader and a numpy reference forward pass.

The forward pass here is deliberately naive (im2col + matmul, float64) and shares no code with the
ONNX graph built in ``convert.py``: it is the independent reference the converted model is tested
against.  Only the layer types YOLOv4-tiny (and YOLOv3-tiny) use are supported; anything else is a
``DarknetError`` rather than a silently wrong network.

Darknet semantics reproduced here (AlexeyAB fork, which trained YOLOv4-tiny):
- ``[convolutional]``: ``pad=1`` means ``size // 2`` on every side; batch norm is
  ``scale * (x - mean) / sqrt(var + 1e-5) + bias`` and is folded into the kernel at load time.
- ``[route]``: concatenation on channels; ``groups``/``group_id`` take channel slice ``group_id``
  of ``groups`` equal slices of each input.
- ``[maxpool]``: ``padding`` defaults to ``size - 1``, output is ``(w + padding - size) // stride + 1``
  and the window starts ``padding // 2`` before the input, so a stride-1 pool pads only right/bottom.
- ``[upsample]``: nearest neighbour by an integer ``stride``.
- ``[yolo]``: x, y = (cell + sigmoid(t) * s - (s - 1) / 2) * stride with ``s = scale_x_y``;
  w, h = exp(t) * anchor (input pixels); objectness and class scores are independent sigmoids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEAKY_SLOPE = 0.1
BN_EPSILON = 1e-5
# Darknet writes `seen` as int64 from format version 0.2 on, as int32 before.
_SEEN_INT64_FROM_VERSION = 2


class DarknetError(ValueError):
    """A darknet .cfg or .weights file is malformed or uses an unsupported feature."""


@dataclass(frozen=True)
class Shape:
    """Per-image feature map shape (channels, height, width)."""

    c: int
    h: int
    w: int


@dataclass(frozen=True)
class Convolutional:
    index: int
    filters: int
    size: int
    stride: int
    padding: int
    batch_normalize: bool
    activation: str


@dataclass(frozen=True)
class Route:
    index: int
    layers: tuple[int, ...]  # absolute layer indices
    groups: int
    group_id: int


@dataclass(frozen=True)
class MaxPool:
    index: int
    size: int
    stride: int
    padding: int  # total padding; pad_begin = padding // 2, the rest goes after


@dataclass(frozen=True)
class Upsample:
    index: int
    stride: int


@dataclass(frozen=True)
class Yolo:
    index: int
    mask: tuple[int, ...]
    anchors: tuple[tuple[float, float], ...]  # all anchors of the cfg, (w, h) in input pixels
    classes: int
    scale_x_y: float

    @property
    def masked_anchors(self) -> tuple[tuple[float, float], ...]:
        return tuple(self.anchors[m] for m in self.mask)


Layer = Convolutional | Route | MaxPool | Upsample | Yolo

ACTIVATIONS = ("leaky", "linear", "logistic", "relu", "mish")


@dataclass(frozen=True)
class Network:
    width: int
    height: int
    channels: int
    layers: tuple[Layer, ...]
    shapes: tuple[Shape, ...]  # output shape of each layer

    @property
    def yolo_layers(self) -> tuple[Yolo, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, Yolo))

    def input_shape(self, index: int) -> Shape:
        """Shape feeding layer ``index`` (the previous layer's output, or the image)."""
        return self.shapes[index - 1] if index > 0 else Shape(self.channels, self.height, self.width)


# --------------------------------------------------------------------------- cfg parsing


def read_sections(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split a darknet cfg into ``(section, {key: value})`` in file order."""
    sections: list[tuple[str, dict[str, str]]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            sections.append((header.group(1), {}))
            continue
        if "=" not in line or not sections:
            raise DarknetError(f"cfg line {lineno}: expected key=value inside a section, got {raw!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        sections[-1][1][key] = value
    return sections


def _int(options: dict[str, str], key: str, default: int | None = None) -> int:
    if key not in options:
        if default is None:
            raise DarknetError(f"missing required option {key!r}")
        return default
    try:
        return int(options[key])
    except ValueError as exc:
        raise DarknetError(f"option {key}={options[key]!r} is not an integer") from exc


def _ints(options: dict[str, str], key: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in options[key].split(",") if v.strip())
    except (KeyError, ValueError) as exc:
        raise DarknetError(f"option {key!r} must be a list of integers") from exc


def _parse_conv(index: int, o: dict[str, str], prev: Shape) -> tuple[Convolutional, Shape]:
    size = _int(o, "size", 1)
    stride = _int(o, "stride", 1)
    padding = size // 2 if _int(o, "pad", 0) else _int(o, "padding", 0)
    if _int(o, "groups", 1) != 1 or _int(o, "dilation", 1) != 1:
        raise DarknetError(f"layer {index}: grouped or dilated convolutions are not supported")
    activation = o.get("activation", "logistic")
    if activation not in ACTIVATIONS:
        raise DarknetError(f"layer {index}: activation {activation!r} is not supported")
    layer = Convolutional(index, _int(o, "filters", 1), size, stride, padding, bool(_int(o, "batch_normalize", 0)),
                          activation)
    out = Shape(layer.filters, (prev.h + 2 * padding - size) // stride + 1, (prev.w + 2 * padding - size) // stride + 1)
    return layer, out


def _parse_route(index: int, o: dict[str, str], shapes: list[Shape]) -> tuple[Route, Shape]:
    absolute = tuple(i + index if i < 0 else i for i in _ints(o, "layers"))
    if not absolute or any(not 0 <= i < index for i in absolute):
        raise DarknetError(f"layer {index}: route refers to layers {absolute} outside 0..{index - 1}")
    groups, group_id = _int(o, "groups", 1), _int(o, "group_id", 0)
    if not 0 <= group_id < groups:
        raise DarknetError(f"layer {index}: group_id {group_id} not in 0..{groups - 1}")
    inputs = [shapes[i] for i in absolute]
    if len({(s.h, s.w) for s in inputs}) != 1 or any(s.c % groups for s in inputs):
        raise DarknetError(f"layer {index}: route inputs {inputs} do not line up (groups={groups})")
    out = Shape(sum(s.c // groups for s in inputs), inputs[0].h, inputs[0].w)
    return Route(index, absolute, groups, group_id), out


def _parse_maxpool(index: int, o: dict[str, str], prev: Shape) -> tuple[MaxPool, Shape]:
    stride = _int(o, "stride", 1)
    size = _int(o, "size", stride)
    padding = _int(o, "padding", size - 1)
    if any(k in o for k in ("stride_x", "stride_y", "maxpool_depth", "antialiasing")):
        raise DarknetError(f"layer {index}: maxpool options beyond size/stride/padding are not supported")
    out = Shape(prev.c, (prev.h + padding - size) // stride + 1, (prev.w + padding - size) // stride + 1)
    return MaxPool(index, size, stride, padding), out


def _parse_upsample(index: int, o: dict[str, str], prev: Shape) -> tuple[Upsample, Shape]:
    if float(o.get("scale", "1")) != 1.0:
        raise DarknetError(f"layer {index}: upsample scale != 1 is not supported")
    stride = _int(o, "stride", 2)
    return Upsample(index, stride), Shape(prev.c, prev.h * stride, prev.w * stride)


def _parse_yolo(index: int, o: dict[str, str], prev: Shape) -> tuple[Yolo, Shape]:
    classes = _int(o, "classes", 20)
    values = [float(v) for v in o.get("anchors", "").split(",") if v.strip()]
    anchors = tuple((values[i], values[i + 1]) for i in range(0, len(values) - 1, 2))
    mask = _ints(o, "mask") if "mask" in o else tuple(range(len(anchors)))
    if not anchors or any(not 0 <= m < len(anchors) for m in mask):
        raise DarknetError(f"layer {index}: yolo mask {mask} does not index its {len(anchors)} anchors")
    if prev.c != len(mask) * (5 + classes):
        raise DarknetError(f"layer {index}: yolo expects {len(mask) * (5 + classes)} input channels, got {prev.c}")
    if int(o.get("new_coords", "0")):
        raise DarknetError(f"layer {index}: yolo new_coords=1 (scaled-YOLOv4 decoding) is not supported")
    return Yolo(index, mask, anchors, classes, float(o.get("scale_x_y", "1"))), prev


def parse_cfg(text: str) -> Network:
    """Parse a darknet cfg into a ``Network`` with every layer's output shape resolved."""
    sections = read_sections(text)
    if not sections or sections[0][0] not in ("net", "network"):
        raise DarknetError("cfg must start with a [net] section")
    net = sections[0][1]
    width, height, channels = _int(net, "width"), _int(net, "height"), _int(net, "channels", 3)
    layers: list[Layer] = []
    shapes: list[Shape] = []
    for index, (kind, options) in enumerate(sections[1:]):
        prev = shapes[-1] if shapes else Shape(channels, height, width)
        try:
            if kind == "convolutional":
                layer, shape = _parse_conv(index, options, prev)
            elif kind == "route":
                layer, shape = _parse_route(index, options, shapes)
            elif kind == "maxpool":
                layer, shape = _parse_maxpool(index, options, prev)
            elif kind == "upsample":
                layer, shape = _parse_upsample(index, options, prev)
            elif kind == "yolo":
                layer, shape = _parse_yolo(index, options, prev)
            else:
                raise DarknetError(f"layer {index}: section [{kind}] is not supported")
        except (ValueError, IndexError) as exc:
            if isinstance(exc, DarknetError):
                raise
            raise DarknetError(f"layer {index} [{kind}]: {exc}") from exc
        layers.append(layer)
        shapes.append(shape)
    return Network(width, height, channels, tuple(layers), tuple(shapes))


def load_cfg(path: Path) -> Network:
    return parse_cfg(Path(path).read_text())


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightsHeader:
    major: int
    minor: int
    revision: int
    seen: int


@dataclass(frozen=True)
class ConvWeights:
    """A convolution with batch norm already folded in: ``y = conv(x, kernel) + bias``."""

    kernel: np.ndarray  # float32 [filters, channels, size, size]
    bias: np.ndarray  # float32 [filters]


@dataclass(frozen=True)
class Weights:
    header: WeightsHeader
    convs: dict[int, ConvWeights]  # by layer index


def _read_header(data: bytes) -> tuple[WeightsHeader, int]:
    if len(data) < 16:
        raise DarknetError("weights file is too short for a header")
    major, minor, revision = (int(v) for v in np.frombuffer(data, dtype="<i4", count=3))
    if major * 10 + minor >= _SEEN_INT64_FROM_VERSION:
        seen, offset = int(np.frombuffer(data, dtype="<i8", count=1, offset=12)[0]), 20
    else:
        seen, offset = int(np.frombuffer(data, dtype="<i4", count=1, offset=12)[0]), 16
    return WeightsHeader(major, minor, revision, seen), offset


def fold_batch_norm(
    kernel: np.ndarray, scale: np.ndarray, mean: np.ndarray, var: np.ndarray, beta: np.ndarray
) -> ConvWeights:
    """Fold darknet's inference batch norm into the preceding (bias-free) convolution."""
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPSILON)
    folded_kernel = kernel.astype(np.float64) * factor[:, None, None, None]
    folded_bias = beta.astype(np.float64) - mean.astype(np.float64) * factor
    return ConvWeights(folded_kernel.astype(np.float32), folded_bias.astype(np.float32))


def parse_weights(data: bytes, network: Network) -> Weights:
    """Read darknet weights: per conv ``bias[n]``, then ``(scale, mean, var)[n]`` when batch-normalised,
    then the kernel ``[n, c, k, k]``; the whole file must be consumed."""
    header, offset = _read_header(data)
    if (len(data) - offset) % 4:
        raise DarknetError("weights payload is not a whole number of float32 values")
    values = np.frombuffer(data, dtype="<f4", offset=offset)
    pos = 0

    def take(count: int) -> np.ndarray:
        nonlocal pos
        if pos + count > values.size:
            raise DarknetError(f"weights file ends early: need {pos + count} floats, have {values.size}")
        chunk = values[pos : pos + count]
        pos += count
        return chunk

    convs: dict[int, ConvWeights] = {}
    for layer in network.layers:
        if not isinstance(layer, Convolutional):
            continue
        n, c, k = layer.filters, network.input_shape(layer.index).c, layer.size
        bias = take(n)
        if layer.batch_normalize:
            scale, mean, var = take(n), take(n), take(n)
            kernel = take(n * c * k * k).reshape(n, c, k, k)
            convs[layer.index] = fold_batch_norm(kernel, scale, mean, var, bias)
        else:
            kernel = take(n * c * k * k).reshape(n, c, k, k)
            convs[layer.index] = ConvWeights(kernel.copy(), bias.copy())
    if pos != values.size:
        raise DarknetError(f"weights file has {values.size - pos} floats left over: cfg and weights do not match")
    return Weights(header, convs)


def load_weights(path: Path, network: Network) -> Weights:
    return parse_weights(Path(path).read_bytes(), network)


# --------------------------------------------------------------------------- numpy reference


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "leaky":
        return np.where(x > 0, x, LEAKY_SLOPE * x)
    if activation == "linear":
        return x
    if activation == "relu":
        return np.maximum(x, 0)
    if activation == "logistic":
        return _sigmoid(x)
    if activation == "mish":
        return x * np.tanh(np.logaddexp(0, x))
    raise DarknetError(f"activation {activation!r} is not supported")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _conv(x: np.ndarray, layer: Convolutional, weights: ConvWeights) -> np.ndarray:
    """im2col convolution: gather every k*k window, then one tensordot with the kernel."""
    p, k, s = layer.padding, layer.size, layer.stride
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    out = np.tensordot(windows, weights.kernel.astype(np.float64), axes=([1, 4, 5], [1, 2, 3]))  # [N, H, W, F]
    out = out.transpose(0, 3, 1, 2) + weights.bias.astype(np.float64)[None, :, None, None]
    return _activate(out, layer.activation)


def _maxpool(x: np.ndarray, layer: MaxPool, out_shape: Shape) -> np.ndarray:
    begin = layer.padding // 2
    end_h = max(0, (out_shape.h - 1) * layer.stride + layer.size - x.shape[2] - begin)
    end_w = max(0, (out_shape.w - 1) * layer.stride + layer.size - x.shape[3] - begin)
    padded = np.pad(x, ((0, 0), (0, 0), (begin, end_h), (begin, end_w)), constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (layer.size, layer.size), axis=(2, 3))
    windows = windows[:, :, :: layer.stride, :: layer.stride][:, :, : out_shape.h, : out_shape.w]
    return windows.max(axis=(4, 5))


def _route(outputs: list[np.ndarray], layer: Route) -> np.ndarray:
    parts = []
    for i in layer.layers:
        c = outputs[i].shape[1] // layer.groups
        parts.append(outputs[i][:, layer.group_id * c : (layer.group_id + 1) * c])
    return np.concatenate(parts, axis=1)


def forward(network: Network, weights: Weights, images: np.ndarray) -> list[np.ndarray]:
    """Run the network in float64 numpy; return the raw (pre-activation) input of each yolo layer.

    ``images``: [N, channels, height, width], RGB, values 0..1 (darknet's own input contract).
    """
    expected = (network.channels, network.height, network.width)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise DarknetError(f"images must be [N, {', '.join(map(str, expected))}], got {list(images.shape)}")
    x = images.astype(np.float64)
    outputs: list[np.ndarray] = []
    heads: list[np.ndarray] = []
    for layer in network.layers:
        if isinstance(layer, Convolutional):
            x = _conv(x, layer, weights.convs[layer.index])
        elif isinstance(layer, Route):
            x = _route(outputs, layer)
        elif isinstance(layer, MaxPool):
            x = _maxpool(x, layer, network.shapes[layer.index])
        elif isinstance(layer, Upsample):
            x = x.repeat(layer.stride, axis=2).repeat(layer.stride, axis=3)
        elif isinstance(layer, Yolo):
            heads.append(x)
        outputs.append(x)
    return heads


def decode_heads(network: Network, heads: list[np.ndarray]) -> np.ndarray:
    """Decode raw yolo maps into ``[N, boxes, 4 + 1 + classes]``: centre x, centre y, w, h in input
    pixels, objectness, per-class probabilities.  Box order: yolo layer, then anchor, row, column."""
    decoded = []
    for layer, head in zip(network.yolo_layers, heads, strict=True):
        n, _, gh, gw = head.shape
        a = len(layer.mask)
        t = head.reshape(n, a, 5 + layer.classes, gh, gw).transpose(0, 1, 3, 4, 2)  # [N, A, H, W, 5+C]
        cols, rows = np.meshgrid(np.arange(gw), np.arange(gh))
        s = layer.scale_x_y
        x = (cols + _sigmoid(t[..., 0]) * s - (s - 1) / 2) * (network.width / gw)
        y = (rows + _sigmoid(t[..., 1]) * s - (s - 1) / 2) * (network.height / gh)
        anchors = np.asarray(layer.masked_anchors, dtype=np.float64)
        w = np.exp(t[..., 2]) * anchors[:, 0][None, :, None, None]
        h = np.exp(t[..., 3]) * anchors[:, 1][None, :, None, None]
        box = np.concatenate([np.stack([x, y, w, h], axis=-1), _sigmoid(t[..., 4:])], axis=-1)
        decoded.append(box.reshape(n, a * gh * gw, 5 + layer.classes))
    return np.concatenate(decoded, axis=1)
