"""postprocess: InferenceOutput -> DetectionResult, stored in Cassandra, then published.

Per record: candidates above the request's score threshold and in its class filter, class-aware NMS,
at most max_detections, boxes mapped from the letterboxed input back to the EXIF-oriented original
(pixels and normalised). The batch's results and cache rows are written to Cassandra (idempotent
upserts) before anything is published, so a reply always means a stored result; Cassandra away is a
TransientError (the runtime retries; nothing is lost). Then each result goes to `detections`, and to
the waiting gateway's reply partition when there is one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from infra.settings import PipelineSettings
from model_store.catalog import ModelCatalog, ModelNotFound
from model_store.detect import Candidates, nms, unletterbox
from processors import metrics as PM
from processors.params import CacheKey, EffectiveParams, effective_params
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Record, now_ms, result_outputs
from stream.serde import epoch_ms
from stream.topics import LANES, lane_topic


class Results(Protocol):
    def save_results(self, results: Sequence[Mapping[str, Any]]) -> None: ...
    def cache_put(self, entries: Sequence[tuple[CacheKey, Mapping[str, Any]]]) -> None: ...


def to_candidates(rows: Sequence[Mapping[str, Any]]) -> Candidates:
    if not rows:
        return Candidates(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    boxes = np.asarray([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in rows], dtype=np.float32)
    return Candidates(boxes, np.asarray([r["score"] for r in rows], np.float32),
                      np.asarray([r["class_id"] for r in rows], np.int64))


def detections(value: Mapping[str, Any], params: EffectiveParams, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The request's detections, best first, in pixels of the oriented original and normalised."""
    cands = to_candidates(value["candidates"])
    keep = cands.scores >= params.score_threshold
    if params.classes:
        wanted = [class_names.index(c) for c in params.classes]
        keep &= np.isin(cands.class_ids, wanted)
    kept = nms(cands.take(np.nonzero(keep)[0]), params.nms_iou, params.max_detections)
    lb = value["letterbox"]
    w, h = value["original_width"], value["original_height"]
    boxes = unletterbox(kept.boxes, lb["scale"], (lb["pad_x"], lb["pad_y"]), (w, h))
    out = []
    for b, s, c in zip(boxes, kept.scores, kept.class_ids, strict=True):
        x1, y1, x2, y2 = (float(v) for v in b)
        out.append({"class_id": int(c), "class_name": class_names[int(c)], "score": float(s),
                    "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
                    "box_norm": {"x1": x1 / w, "y1": y1 / h, "x2": x2 / w, "y2": y2 / h}})
    return out


class PostprocessStage:
    name = "postprocess"
    input_event = "InferenceOutput"
    emits_terminal_results = True

    def __init__(self, catalog: ModelCatalog, results: Results, settings: PipelineSettings):
        self.catalog = catalog
        self.results = results
        self.settings = settings
        self.prefix = settings.stream.topic_prefix

    def input_topics(self) -> list[str]:
        return [lane_topic(self.prefix, lane, "inferred") for lane in LANES]

    def process(self, batch: list[Record]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        stored: list[tuple[int, dict[str, Any], CacheKey]] = []
        for rec in batch:
            try:
                result, key = self._result(rec)
            except InvalidRecord as exc:
                outcomes.append(Failure(exc))
                continue
            stored.append((len(outcomes), result, key))
            outcomes.append([])
        if stored:
            try:
                self.results.save_results([r for _, r, _ in stored])
                self.results.cache_put([(k, r) for _, r, k in stored])
            except TransientError as exc:
                return [Failure(exc) for _ in batch]
        for i, result, _ in stored:
            outcomes[i] = result_outputs(self.prefix, result, dict(batch[i].headers))
        return outcomes

    def _result(self, rec: Record) -> tuple[dict[str, Any], CacheKey]:
        value = rec.value
        ctx = value["context"]
        t0 = time.perf_counter()
        try:
            mv = self.catalog.get(value["model_name"], int(value["model_version"]))
        except ModelNotFound as exc:
            raise InvalidRecord("MODEL_NOT_FOUND", str(exc)) from exc
        params = effective_params(ctx.get("params"), self.settings, mv.config.class_names)
        dets = detections(value, params, mv.config.class_names)
        PM.DETECTIONS.labels(mv.name).observe(len(dets))
        done = now_ms()
        submitted = epoch_ms(ctx.get("submitted_at")) or done
        timings = {**value.get("timings_ms", {}), "postprocess": (time.perf_counter() - t0) * 1000,
                   "end_to_end": float(done - submitted)}
        result = {
            "request_id": ctx["request_id"], "tenant": ctx["tenant"], "status": "OK", "detections": dets,
            "image_width": value["original_width"], "image_height": value["original_height"],
            "image_sha256": value["image_sha256"], "model_name": mv.name, "model_version": mv.version,
            "timings_ms": timings, "error_code": None, "error_message": None, "job_id": ctx.get("job_id"),
            "lane": ctx.get("lane") or rec.lane.upper(), "cache_hit": False, "completed_at": done,
        }
        key = CacheKey(ctx["tenant"], value["image_sha256"], mv.name, mv.version, params.digest())
        return result, key
