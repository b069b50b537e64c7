"""postprocess: InferenceOutput -> DetectionResult, stored in Cassandra, then published.

Per record: candidates above the request's score threshold and in its class filter, class-aware NMS,
at most max_detections, boxes mapped from the letterboxed input back to the EXIF-oriented original
(pixels and normalised). The batch's results and cache rows are written to Cassandra (idempotent
upserts) before anything is published, so a reply always means a stored result; Cassandra away is a
TransientError (the runtime retries; nothing is lost). Then each result goes to `detections`, and to
the waiting gateway's reply partition when there is one.

Governance (processors/governance.py, docs/security.md): the cache keeps the model's answer; the
tenant's content policy is applied to what is stored and published (hidden classes dropped; a review
class flags the image: a tagged copy in the review bucket, `review: true`, an AbuseEvent on `abuse`);
a result of an image deleted before it was stored is superseded by REJECTED IMAGE_DELETED.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from config import PipelineSettings
from model_store.catalog import ModelCatalog, ModelNotFound
from model_store.detect import Candidates, nms, unletterbox
from processors import metrics as PM
from processors.governance import (
    IMAGE_DELETED,
    Policy,
    abuse_event,
    apply_policy,
    review_key,
    store_unless_deleted,
)
from processors.params import CacheKey, EffectiveParams, effective_params
from schemas import events
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Output, Record, now_ms, result_outputs
from stream.serde import epoch_ms
from stream.topics import LANES, abuse_topic, lane_topic


class Results(Protocol):
    def save_results(self, results: Sequence[Mapping[str, Any]], *, supersede: bool = False, index: bool = True,
                     cache: Sequence[tuple[CacheKey, Mapping[str, Any]]] = ()) -> None: ...


class Governance(Protocol):
    def tombstones(self, images: Any) -> dict[tuple[str, str], int]: ...
    def policies(self, tenants: Any) -> dict[str, Policy]: ...


class ReviewObjects(Protocol):
    def remove(self, bucket: str, key: str) -> None: ...
    def review_copy(self, dest_bucket: str, dest_key: str, *, retention_days: int, data: bytes | None = None,
                    source: tuple[str, str] | None = None) -> bool: ...


def flag_for_review(result: Mapping[str, Any], flagged: Sequence[str], policy: Policy, objects: ReviewObjects | None,
                    settings: PipelineSettings, *, data: bytes | None = None,
                    source: Mapping[str, Any] | None = None) -> Output:
    """Copy a flagged image to the review bucket and make its AbuseEvent (postprocess and scan's cache hits)."""
    days = policy.review_retention_days or settings.review_retention_days
    key = review_key(result["tenant"], result["image_sha256"])
    src = (source["bucket"], source["key"]) if source and source.get("bucket") and source.get("key") else None
    copied = objects is not None and objects.review_copy(settings.review_bucket, key, retention_days=days,
                                                         data=data, source=src)
    PM.FLAGGED.inc()
    event = abuse_event(result, flagged, f"{settings.review_bucket}/{key}" if copied else None, days, policy.revision)
    return Output(abuse_topic(settings.stream.topic_prefix), f"{result['tenant']}/{result['image_sha256']}", event,
                  "AbuseEvent")


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
        out.append(events.detection(class_id=int(c), class_name=class_names[int(c)], score=float(s),
                                    box=events.box(x1=x1, y1=y1, x2=x2, y2=y2),
                                    box_norm=events.box(x1=x1 / w, y1=y1 / h, x2=x2 / w, y2=y2 / h)))
    return out


class PostprocessStage:
    name = "postprocess"
    input_event = "InferenceOutput"
    emits_terminal_results = True

    def __init__(self, catalog: ModelCatalog, results: Results, settings: PipelineSettings,
                 governance: Governance | None = None, objects: ReviewObjects | None = None):
        self.catalog = catalog
        self.results = results
        self.settings = settings
        self.governance = governance
        self.objects = objects
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
                final = self._store(batch, stored)
            except TransientError as exc:
                return [Failure(exc) for _ in batch]
            for (i, _, _), (result, extra) in zip(stored, final, strict=True):
                outcomes[i] = result_outputs(self.prefix, result, dict(batch[i].headers)) + extra
        return outcomes

    def _store(self, batch: list[Record], stored: list[tuple[int, dict[str, Any], CacheKey]]
               ) -> list[tuple[dict[str, Any], list[Output]]]:
        """Cache the model's answers, store the policy's view of them (unless deleted), flag for review."""
        if self.governance is None:
            self.results.save_results([r for _, r, _ in stored], cache=[(k, r) for _, r, k in stored])
            return [(r, []) for _, r, _ in stored]
        policies = self.governance.policies({r["tenant"] for _, r, _ in stored})
        applied = [apply_policy(r, policies[r["tenant"]]) for _, r, _ in stored]
        # The cache holds what the model found; the policy applies at every serve (here and on scan's hits).
        # Scan indexed each request by image before its own tombstone check (processors/scan.py), so the
        # results go without a second, identical image_requests row; the cache rows go with them.
        final = store_unless_deleted(self.results, self.governance, [a.result for a in applied], index=False,
                                     cache=[(k, r) for _, r, k in stored])
        out: list[tuple[dict[str, Any], list[Output]]] = []
        for (i, _, _), a, result in zip(stored, applied, final, strict=True):
            extra: list[Output] = []
            if result.get("error_code") == IMAGE_DELETED:
                PM.DELETED_DROPPED.labels(self.name).inc()
                self._remove_upload(batch[i].value["context"])
            elif a.flagged:
                ctx = batch[i].value["context"]
                extra.append(flag_for_review(result, a.flagged, policies[result["tenant"]], self.objects,
                                             self.settings, source=ctx.get("source")))
            out.append((result, extra))
        return out

    def _remove_upload(self, ctx: Mapping[str, Any]) -> None:
        """The upload of a deleted image that was past scan when it was deleted (scan removes the others)."""
        src = ctx.get("source") or {}
        if (self.objects is not None and src.get("bucket") == self.settings.uploads_bucket
                and str(src.get("key") or "").startswith(f"{ctx['tenant']}/")):
            self.objects.remove(src["bucket"], src["key"])

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
        result = events.detection_result(
            request_id=ctx["request_id"], tenant=ctx["tenant"], status="OK", detections=dets,
            image_width=value["original_width"], image_height=value["original_height"],
            image_sha256=value["image_sha256"], model_name=mv.name, model_version=mv.version, timings_ms=timings,
            job_id=ctx.get("job_id"), lane=ctx.get("lane") or rec.lane.upper(),
            submitted_at=epoch_ms(ctx.get("submitted_at")), completed_at=done)
        key = CacheKey(ctx["tenant"], value["image_sha256"], mv.name, mv.version, params.digest())
        return result, key
