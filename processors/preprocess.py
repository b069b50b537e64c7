"""preprocess: ImageScanned -> ImagePreprocessed (the letterboxed uint8 tensor the model's config asks for).

Sniff by magic bytes, check byte and pixel limits from the header before decoding (decompression
bombs), decode, apply the EXIF orientation, normalise to 8-bit BGR (grayscale, alpha, 16-bit, CMYK),
then letterbox as the served model version's config says; the tensor leaves without its padding
(``processors.tensor_encoding``, encoding ``region``) and inference pads it back. Bad input closes the
request REJECTED with the precise code from processors.imaging.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any, Protocol

from config import PipelineSettings
from model_store.catalog import ModelCatalog, ModelNotFound
from model_store.detect import letterbox_region
from processors import metrics as PM
from processors.imaging import ImageLimits, ImageRejected, prepare
from processors.tensor_encoding import ENCODINGS, REGION, encoded
from schemas import events
from stream.errors import InvalidRecord
from stream.records import Outcome, Output, Record, per_record
from stream.topics import LANES, lane_topic


class Objects(Protocol):
    def get(self, bucket: str, key: str, max_bytes: int) -> bytes: ...


def scanned_bytes(value: Mapping[str, Any], objects: Objects, settings: PipelineSettings) -> bytes:
    """The bytes scan passed. A re-fetched object must still be those bytes (fail closed on a swap)."""
    image = value["image"]
    if "data" in image:
        data = bytes(image["data"])
    else:
        data = objects.get(image["bucket"], image["key"], settings.image_max_bytes)
    if hashlib.sha256(data).hexdigest() != value["sha256"]:
        raise InvalidRecord("CHECKSUM_MISMATCH", "the image changed after it was scanned")
    return data


class PreprocessStage:
    name = "preprocess"
    input_event = "ImageScanned"
    emits_terminal_results = True

    def __init__(self, objects: Objects, catalog: ModelCatalog, settings: PipelineSettings,
                 tensor_encoding: str = REGION):
        if tensor_encoding not in ENCODINGS:
            raise ValueError(f"unknown tensor encoding {tensor_encoding!r}; expected one of {ENCODINGS}")
        self.objects = objects
        # "raw" writes what an inference older than the `encoding` field reads (docs/events.md).
        self.tensor_encoding = tensor_encoding
        self.catalog = catalog
        self.settings = settings
        self.prefix = settings.stream.topic_prefix
        self.limits = ImageLimits(max_bytes=settings.image_max_bytes, max_pixels=settings.image_max_pixels,
                                  max_side=settings.image_max_side, max_decoded_bytes=settings.image_max_decoded_bytes)

    def input_topics(self) -> list[str]:
        return [lane_topic(self.prefix, lane, "scanned") for lane in LANES]

    def process(self, batch: list[Record]) -> list[Outcome]:
        return per_record(batch, self._one)

    def _one(self, rec: Record) -> list[Output]:
        value = rec.value
        ctx = value["context"]
        data = scanned_bytes(value, self.objects, self.settings)
        try:
            model = self.catalog.get(ctx["model"]["name"], int(ctx["model"]["version"]))
        except (ModelNotFound, TypeError, ValueError) as exc:
            raise InvalidRecord("MODEL_NOT_FOUND", str(exc)) from exc
        try:
            prepared = prepare(data, self.limits)
        except ImageRejected as exc:
            PM.REJECTED.labels(exc.code).inc()
            raise InvalidRecord(exc.code, exc.message) from exc
        spec = model.config.input
        t0 = time.perf_counter()
        size = (spec.width, spec.height)
        region, scale, (pad_x, pad_y) = letterbox_region(prepared.image, size)
        tensor = encoded(region, (pad_x, pad_y), size, spec.pad_value, self.tensor_encoding)
        t1 = time.perf_counter()
        event = events.image_preprocessed(
            context=ctx, **tensor, image_sha256=value["sha256"], image_format=prepared.format,
            original_width=prepared.width, original_height=prepared.height, exif_orientation=prepared.orientation,
            letterbox=events.letterbox(scale=scale, pad_x=float(pad_x), pad_y=float(pad_y), input_width=spec.width,
                                       input_height=spec.height),
            timings_ms={**value.get("timings_ms", {}), **prepared.timings_ms, "letterbox": (t1 - t0) * 1000})
        return [Output(lane_topic(self.prefix, rec.lane, "preprocessed"), ctx["request_id"], event,
                       "ImagePreprocessed")]
