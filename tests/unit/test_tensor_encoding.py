"""The tensor hop's encodings (processors/tensor_encoding.py): bit-exact against the old padded tensor, old
records still read, a record that does not fit the model refused as INVALID_TENSOR, detections unchanged."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import cv2
import fastavro
import numpy as np
import pytest

import schemas
from config import PipelineSettings, StreamSettings
from model_store.catalog import ModelCatalog
from model_store.config import InputSpec
from model_store.detect import letterbox, letterbox_region
from processors.imaging import ImageLimits, prepare
from processors.inference import InferenceStage, load_onnx
from processors.preprocess import PreprocessStage
from processors.tensor_encoding import RAW, REGION, encoded, model_input
from stream.errors import InvalidRecord
from stream.records import Failure, Record, now_ms

SETTINGS = PipelineSettings(stream=StreamSettings(topic_prefix="u."), models_dir=Path("/nonexistent"))
SPEC = InputSpec(name="images", width=416, height=416)


def padded_reference(image_bgr: np.ndarray, size: tuple[int, int], pad_value: int) -> np.ndarray:
    """The model input as preprocess shipped it before the region encoding (the old ``letterbox``, verbatim)."""
    h, w = image_bgr.shape[:2]
    out_w, out_h = size
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
    canvas = np.full((out_h, out_w, 3), pad_value, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1))


def context(request_id: str = "r1") -> dict[str, Any]:
    return {"request_id": request_id, "tenant": "t1", "lane": "BATCH", "model": {"name": "yolov4-tiny", "version": 1},
            "params": {}, "deadline_ms": None, "job_id": None, "submitted_at": now_ms(), "source": None}


def event(image_bgr: np.ndarray, spec: InputSpec, encoding: str) -> dict[str, Any]:
    """An ImagePreprocessed value as preprocess writes it, through Avro and back (the wire format's reader)."""
    size = (spec.width, spec.height)
    region, scale, (px, py) = letterbox_region(image_bgr, size)
    value = {"context": context(), **encoded(region, (px, py), size, spec.pad_value, encoding),
             "image_sha256": "s" * 64, "image_format": "png", "original_width": image_bgr.shape[1],
             "original_height": image_bgr.shape[0], "exif_orientation": 1,
             "letterbox": {"scale": scale, "pad_x": float(px), "pad_y": float(py), "input_width": spec.width,
                           "input_height": spec.height}, "timings_ms": {}}
    parsed = schemas.parsed("ImagePreprocessed")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, value)
    return fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), parsed, parsed)


def odd_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    sizes = {"417x311": (311, 417), "1x1": (1, 1), "very wide 4000x3": (3, 4000), "very tall 2x3000": (3000, 2),
             "416x416": (416, 416), "415x417": (417, 415), "832x1": (1, 832), "7x5": (5, 7)}
    images = {name: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for name, (h, w) in sizes.items()}
    gray = rng.integers(0, 256, (240, 321), dtype=np.uint8)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    images["grayscale png 321x240"] = prepare(png.tobytes(), ImageLimits()).image  # decoded as preprocess does
    return images


@pytest.mark.parametrize("spec", [SPEC, InputSpec(name="images", width=608, height=320, pad_value=0),
                                  InputSpec(name="images", width=320, height=608, pad_value=255)],
                         ids=["416x416 pad 128", "608x320 pad 0", "320x608 pad 255"])
def test_both_encodings_decode_to_the_old_padded_tensor_bit_for_bit(spec: InputSpec) -> None:
    for name, image in odd_images().items():
        want = padded_reference(image, (spec.width, spec.height), spec.pad_value)
        for encoding in (RAW, REGION):
            got = model_input(event(image, spec, encoding), spec)
            assert got.dtype == np.uint8 and got.shape == want.shape, (name, encoding)
            assert np.array_equal(got, want), (name, encoding)


def test_the_sample_images_decode_bit_for_bit_and_lose_their_padding(sample_images: dict[str, Path]) -> None:
    assert sample_images
    for name, path in sorted(sample_images.items()):
        image = prepare(path.read_bytes(), ImageLimits()).image
        want = padded_reference(image, (416, 416), 128)
        assert np.array_equal(letterbox(image, (416, 416), 128)[0], want), name
        value = event(image, SPEC, REGION)
        assert np.array_equal(model_input(value, SPEC), want), name
        h, w = value["shape"][1:]
        assert len(value["tensor"]) == 3 * h * w <= want.nbytes, name
        assert h == 416 or w == 416, name  # the long side fills the input; only padding is left out


def test_a_record_written_before_the_encoding_field_reads_as_raw() -> None:
    image = odd_images()["417x311"]
    old_schema = json.loads(schemas.expanded("ImagePreprocessed"))
    old_schema["fields"] = [f for f in old_schema["fields"] if f["name"] != "encoding"]
    old_parsed = fastavro.parse_schema(old_schema)
    value = event(image, SPEC, RAW)
    value.pop("encoding")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old_parsed, value)
    read = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), old_parsed, schemas.parsed("ImagePreprocessed"))
    assert read["encoding"] == "raw"
    assert np.array_equal(model_input(read, SPEC), padded_reference(image, (416, 416), 128))


def _region_value(**changes: Any) -> dict[str, Any]:
    value = event(odd_images()["417x311"], SPEC, REGION)  # region [3, 310, 416] at (0, 53)
    letterbox_changes = {k: changes.pop(k) for k in list(changes) if k in value["letterbox"]}
    value["letterbox"] = {**value["letterbox"], **letterbox_changes}
    return {**value, **changes}


def _raw_value(**changes: Any) -> dict[str, Any]:
    return {**event(odd_images()["417x311"], SPEC, RAW), **changes}


@pytest.mark.parametrize("value", [
    _region_value(encoding="region-zstd"),
    _region_value(encoding=""),
    _region_value(pad_y=53.5),
    _region_value(pad_y=-1.0),
    _region_value(pad_x=float("nan")),
    _region_value(pad_x=float("inf")),
    _region_value(pad_y=107.0),                  # 107 + 310 > 416: the region would run off the bottom
    _region_value(pad_x=1.0),                    # 1 + 416 > 416
    _region_value(input_width=608),              # letterboxed for another input size
    _region_value(shape=[3, 310, 417]),          # bytes do not match the shape
    _region_value(shape=[3, 0, 0], tensor=b""),  # an empty region
    _region_value(shape=[3, -310, -416]),        # negative sizes whose product is right
    _region_value(shape=[3, 417, 310]),
    _region_value(shape=[310, 416, 3], layout="HWC"),
    _region_value(shape=[3, 310 * 416]),
    _region_value(shape=[1, 3, 310, 416]),
    _region_value(dtype="float32"),
    _region_value(tensor=b""),
    _raw_value(shape=[3, 100, 100]),
    _raw_value(shape=[3, 310, 416]),             # a region's shape, labelled raw
    _raw_value(tensor=b"\x00" * 10),
    _raw_value(layout="HWC"),
    _raw_value(encoding="RAW"),
], ids=lambda v: f"{v.get('encoding')}-{v['shape']}-{v['layout']}-{v['dtype']}-{len(v['tensor'])}-"
                 f"{v['letterbox']['pad_x']}-{v['letterbox']['pad_y']}-{v['letterbox']['input_width']}")
def test_a_tensor_that_does_not_fit_the_model_is_invalid_never_a_crash(value: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecord) as info:
        model_input(value, SPEC)
    assert info.value.code == "INVALID_TENSOR"


def test_a_region_letterboxed_for_another_model_is_refused_by_the_stage() -> None:
    bigger = InputSpec(name="images", width=608, height=608)
    value = event(odd_images()["417x311"], bigger, REGION)  # [3, 453, 608]: larger than a 416 input
    with pytest.raises(InvalidRecord) as info:
        model_input(value, SPEC)
    assert info.value.code == "INVALID_TENSOR"


# ---- the stages, with the real model: detections unchanged ------------------------------------------------


class InlineObjects:
    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        raise AssertionError("the images are inline")


@pytest.fixture(scope="module")
def model_catalog() -> ModelCatalog:
    from model_store.config import CONFIG_FILE, MODEL_FILE
    from model_store.convert import default_out_dir

    version_dir = default_out_dir()
    if not (version_dir / CONFIG_FILE).is_file() or not (version_dir / MODEL_FILE).is_file():
        pytest.skip("default model not converted")
    return ModelCatalog(version_dir.parent.parent)


def _scanned(data: bytes, request_id: str) -> Record:
    value = {"context": context(request_id), "image": {"data": data}, "sha256": hashlib.sha256(data).hexdigest(),
             "size": len(data), "timings_ms": {}}
    return Record(topic="u.detect.batch.scanned", partition=0, offset=0, key=request_id, value=value, headers={},
                  lane="batch")


def test_region_records_give_the_same_detections_as_raw_ones(model_catalog: ModelCatalog,
                                                             sample_images: dict[str, Path]) -> None:
    names = sorted(sample_images)
    scanned = [_scanned(sample_images[n].read_bytes(), n) for n in names]
    ok, gray = cv2.imencode(".png", cv2.cvtColor(prepare(scanned[0].value["image"]["data"], ImageLimits()).image,
                                                 cv2.COLOR_BGR2GRAY))
    assert ok
    scanned.append(_scanned(gray.tobytes(), "grayscale"))
    inference = InferenceStage(model_catalog, SETTINGS, loader=lambda mv: load_onnx(mv, 2))
    candidates: dict[str, list[Any]] = {}
    sizes: dict[str, int] = {}
    for encoding in (RAW, REGION):
        preprocess = PreprocessStage(InlineObjects(), model_catalog, SETTINGS, tensor_encoding=encoding)
        outs = preprocess.process(scanned)
        assert not any(isinstance(o, Failure) for o in outs), outs
        values = [o[0].value for o in outs]  # type: ignore[index]
        assert {v["encoding"] for v in values} == {encoding}
        sizes[encoding] = sum(len(v["tensor"]) for v in values)
        recs = [Record(topic="u.detect.batch.preprocessed", partition=0, offset=0, key=None, value=v, headers={},
                       lane="batch") for v in values]
        # One record per batch: the same batches in both runs, so the outputs compare exactly.
        inferred = [inference.process([r])[0] for r in recs]
        assert not any(isinstance(o, Failure) for o in inferred), inferred
        candidates[encoding] = [o[0].value["candidates"] for o in inferred]  # type: ignore[index]
    assert candidates[REGION] == candidates[RAW]
    assert sum(len(c) for c in candidates[RAW]) > 0
    assert sizes[REGION] < 0.8 * sizes[RAW]
