"""INT8 versions of a model folder, made with ``onnxruntime.quantization``.

``quantize_version(src, dst)`` reads ``src/{config.json,model.onnx}`` and writes a quantised
``dst/{model.onnx,config.json}``: the same config (input spec, heads, classes, ``max_batch`` and the
dynamic batch axis) with its provenance naming the quantiser, the method and the source model.

Methods:
- ``static`` (default): QDQ, weights int8 per output channel, activations uint8 with ranges
  calibrated (MinMax) on sample images letterboxed exactly as serving does.  uint8 activations take
  onnxruntime's U8S8 kernels, the fast path on x86; int8 activations give the same accuracy (the
  same asymmetric grid shifted by 128) but measured 1.5x slower here.
- ``dynamic``: ``quantize_dynamic`` (weights int8, activation ranges computed per call).  Conv
  becomes ConvInteger, which has no fast CPU kernel: several times slower than FP32 (measured).

In both, the in-graph YOLO decoder (every node after the last Conv on its path) stays float: it
concatenates box centres in input pixels (0..416) with probabilities (0..1) into one tensor, which
one int8 scale cannot hold (scores would be rounded to steps of ~1.6), and onnxruntime cannot even
load its quantised grid-offset Add ("Scale and Zero-point must be a scalar").  Excluding the two
head convs as well, leaving the first conv float, percentile or entropy calibration and the ORT
pre-processing pass (``quant_pre_process``) all measured within the eval set's noise, so none is
used.

``detectflow model quantize [--method static|dynamic] [--source DIR] [--out DIR]`` quantises the
default model into ``<home>/build/yolov4-tiny-int8`` (not under ``models/``: version folders
there are served), calibrating on the sample images; it reuses an output made from the same source
model by the same method and onnxruntime version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from imaging.letterbox import letterbox, to_model_input
from model_store.serving.config import CONFIG_FILE, MODEL_FILE, InputSpec, ModelConfig, ModelConfigError
from model_store.tools.convert import ConversionError, convert
from model_store.tools.convert import default_out_dir as default_source_dir
from model_store.tools.samples import SamplesError, ensure_samples

log = logging.getLogger(__name__)

STATIC = "static"
DYNAMIC = "dynamic"
METHODS = (STATIC, DYNAMIC)
DEFAULT_METHOD = STATIC
QUANTIZER = "onnxruntime.quantization"
OUT_NAME = "yolov4-tiny-int8"
METHOD_DETAILS = {
    STATIC: "static QDQ int8 (uint8 activations, MinMax; int8 per-channel weights)",
    DYNAMIC: "dynamic int8 (int8 weights, per-call activation ranges)",
}


class QuantizeError(RuntimeError):
    """A model version cannot be quantised."""


# --------------------------------------------------------------------------- pure helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def calibration_batches(images_bgr: Sequence[np.ndarray], spec: InputSpec) -> list[np.ndarray]:
    """One float32 [1, 3, H, W] model input per image, letterboxed exactly as serving does."""
    return [to_model_input([letterbox(image, (spec.width, spec.height), spec.pad_value)[0]], spec.scale)
            for image in images_bgr]


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds prepared batches to the calibrator, one ``{input name: batch}`` per call."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def float_tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes no Conv depends on: the decoder after the last Conv of each path."""
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    feeds_conv: set[int] = set()
    # Graph nodes are topologically sorted, so walking backwards sees every consumer first.
    for i in reversed(range(len(nodes))):
        downstream = (c for out in nodes[i].output for c in consumers.get(out, []))
        if nodes[i].op_type == "Conv" or any(c in feeds_conv for c in downstream):
            feeds_conv.add(i)
    return [node.name for i, node in enumerate(nodes) if i not in feeds_conv]


def converter_description(method: str, calibration_count: int, source_sha256: str) -> str:
    """The provenance ``converter_version``: quantiser, version, method, calibration and source model."""
    text = f"{QUANTIZER} {ort.__version__} {METHOD_DETAILS[method]}"
    if method == STATIC:
        text += f", calibrated on {calibration_count} sample images"
    return f"{text}; from model.onnx sha256 {source_sha256[:16]}"


def quantized_config(source: ModelConfig, converter: str, onnx_sha256: str, opset: int) -> ModelConfig:
    """The source config with provenance naming the quantised file; everything else is kept."""
    provenance = dataclasses.replace(source.provenance, onnx_sha256=onnx_sha256, converter_version=converter,
                                     opset=opset)
    return dataclasses.replace(source, provenance=provenance)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --------------------------------------------------------------------------- quantisation


def _read_source(src_dir: Path) -> tuple[ModelConfig, bytes]:
    try:
        config = ModelConfig.load(src_dir / CONFIG_FILE)
        payload = (src_dir / MODEL_FILE).read_bytes()
    except (ModelConfigError, OSError) as exc:
        raise QuantizeError(f"cannot read the model in {src_dir}: {exc}") from exc
    if sha256_bytes(payload) != config.provenance.onnx_sha256:
        raise QuantizeError(f"{src_dir / CONFIG_FILE} does not describe {src_dir / MODEL_FILE} (sha256 differs)")
    return config, payload


def _existing(dst_dir: Path, source: ModelConfig, converter: str) -> ModelConfig | None:
    """The quantised version in ``dst_dir`` if it was made from this source by the same method."""
    config_path, model_path = dst_dir / CONFIG_FILE, dst_dir / MODEL_FILE
    if not (config_path.is_file() and model_path.is_file()):
        return None
    try:
        config = ModelConfig.load(config_path)
    except ModelConfigError as exc:
        log.warning("re-quantising: %s", exc)
        return None
    digest = sha256_bytes(model_path.read_bytes())
    return config if config == quantized_config(source, converter, digest, config.provenance.opset) else None


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


@contextlib.contextmanager
def _without_preprocessing_hint() -> Iterator[None]:
    """Silence the quantiser's root-logger advice to run ``quant_pre_process``: measured no gain here."""
    hint = _DropPreprocessingHint()
    logging.root.addFilter(hint)
    try:
        yield
    finally:
        logging.root.removeFilter(hint)


def _quantize_file(source: Path, target: Path, method: str, batches: Sequence[np.ndarray], input_name: str,
                   exclude: Sequence[str]) -> None:
    if method == DYNAMIC:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=list(exclude))
        return
    quantize_static(source, target, ImageCalibrationReader(input_name, batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude))


def quantize_version(src_dir: Path, dst_dir: Path, *, method: str = DEFAULT_METHOD,
                     calibration_images: Sequence[np.ndarray] | None = None) -> ModelConfig:
    """Write an INT8 ``model.onnx`` + ``config.json`` of the version in ``src_dir`` into ``dst_dir``.

    ``calibration_images`` (BGR uint8, any size) are required for ``static``.  A no-op when
    ``dst_dir`` already holds a quantisation of the same source model by the same method.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    images = list(calibration_images) if calibration_images is not None else []
    if method == STATIC and not images:
        raise QuantizeError("static quantisation needs calibration images")
    source, payload = _read_source(src_dir)
    converter = converter_description(method, len(images) if method == STATIC else 0, sha256_bytes(payload))
    existing = _existing(dst_dir, source, converter)
    if existing is not None:
        return existing
    batches = calibration_batches(images, source.input) if method == STATIC else []
    exclude = float_tail_nodes(onnx.load_from_string(payload))
    if "" in exclude:
        raise QuantizeError(f"{src_dir / MODEL_FILE} has unnamed decoder nodes: they cannot be kept float")
    dst_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst_dir / (MODEL_FILE + ".tmp")
    try:
        with _without_preprocessing_hint():
            _quantize_file(src_dir / MODEL_FILE, tmp, method, batches, source.input.name, exclude)
        model = onnx.load(tmp)
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx, ORT's pybind errors (not RuntimeError) and ValueErrors share no base
        tmp.unlink(missing_ok=True)
        raise QuantizeError(f"cannot quantise {src_dir / MODEL_FILE} ({method}): {exc}") from exc
    digest = sha256_bytes(tmp.read_bytes())
    # Model first, config last: a config on disk always describes a complete model file.
    os.replace(tmp, dst_dir / MODEL_FILE)
    config = quantized_config(source, converter, digest, default_opset(model))
    config.save(dst_dir / CONFIG_FILE)
    log.info("quantised %s (%s) -> %s", src_dir, method, dst_dir)
    return config


# --------------------------------------------------------------------------- CLI


def read_images(paths: Sequence[Path]) -> list[np.ndarray]:
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise QuantizeError(f"cannot read image {path}")
        images.append(image)
    return images


def default_out_dir(home: Path, method: str) -> Path:
    """``<home>/build/yolov4-tiny-int8[-dynamic]``: beside, not inside, the served model repository."""
    return Path(home) / "build" / (OUT_NAME if method == STATIC else f"{OUT_NAME}-{method}")


def run_cli(*, method: str, source: Path | None, out: Path | None) -> int:
    """``detectflow model quantize``: quantise ``source`` (default: the default model, converted first) by ``method``
    into ``out`` (default: ``default_out_dir``) and print what was written: 0, or 1 when it fails."""
    from config import StackSettings  # only entry points read settings

    settings = StackSettings.from_env()
    source_dir = source or default_source_dir()
    out_dir = out or default_out_dir(settings.home, method)
    t0 = time.monotonic()
    try:
        if source is None:
            convert(source_dir)
        paths = ensure_samples(settings.samples_dir, settings.cache_dir) if method == STATIC else []
        config = quantize_version(source_dir, out_dir, method=method, calibration_images=read_images(paths))
    except (QuantizeError, ConversionError, SamplesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size_in, size_out = ((d / MODEL_FILE).stat().st_size / 2**20 for d in (source_dir, out_dir))
    print(f"{config.name} {method}: {out_dir / MODEL_FILE} ({time.monotonic() - t0:.1f}s)")
    print(f"  from   {source_dir / MODEL_FILE} ({size_in:.1f} MiB -> {size_out:.1f} MiB)")
    print(f"  by     {config.provenance.converter_version}")
    print(f"  onnx sha256 {config.provenance.onnx_sha256[:16]}… opset {config.provenance.opset}")
    return 0
