"""One constructor per Avro record: what every producer builds its events with.

Each function takes exactly the fields of ``schemas/io.detectflow.events.<Record>.avsc`` as keyword arguments,
with the schema's defaults, and returns the plain dict that stream/serde.py encodes (and that a stage reads
back after decoding). A field added to an .avsc is added here once; tests/unit/test_events.py checks every
constructor against its parsed schema, and fails when a producer outside this module writes an event out as a
dict literal. Timestamps (``timestamp-millis``) are epoch millis, or the datetimes decoding yields.

One deliberate difference from the .avsc: ``model_selector(name=...)`` has no default. The schema's
``"yolov4-tiny"`` is only what a reader assumes for a record written without the field; a producer names the
model it asks for (PipelineSettings.default_model when the caller named none).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

Event = dict[str, Any]
Millis = int | dt.datetime
# Enum symbols, as the .avsc lists them (the encoder refuses any other): Lane ONLINE | BATCH; ResultStatus
# OK | REJECTED | FAILED; ModelAction PUSHED | PROMOTED | CANARY | SHADOW | ROLLED_BACK | RETIRED | LOAD_FAILED |
# READY.
Lane = str
ResultStatus = str
ModelAction = str

_NO_ENTRIES: Mapping[str, Any] = MappingProxyType({})  # an immutable {} default for map fields


# ---- shared records ---------------------------------------------------------------------------------------
def object_ref(*, bucket: str, key: str, sha256: str | None = None, size: int | None = None,
               content_type: str | None = None) -> Event:
    return {"bucket": bucket, "key": key, "sha256": sha256, "size": size, "content_type": content_type}


def inline_image(*, data: bytes, sha256: str | None = None, content_type: str | None = None,
                 stored: Mapping[str, Any] | None = None) -> Event:
    return {"data": data, "sha256": sha256, "content_type": content_type, "stored": stored}


def model_selector(*, name: str, version: int | None = None) -> Event:
    return {"name": name, "version": version}


def detect_params(*, score_threshold: float | None = None, max_detections: int | None = None,
                  classes: Iterable[str] = ()) -> Event:
    return {"score_threshold": score_threshold, "max_detections": max_detections, "classes": list(classes)}


def request_context(*, request_id: str, tenant: str, lane: Lane = "BATCH", model: Mapping[str, Any],
                    params: Mapping[str, Any], deadline_ms: Millis | None = None, job_id: str | None = None,
                    submitted_at: Millis, source: Mapping[str, Any] | None = None) -> Event:
    return {"request_id": request_id, "tenant": tenant, "lane": lane, "model": model, "params": params,
            "deadline_ms": deadline_ms, "job_id": job_id, "submitted_at": submitted_at, "source": source}


def letterbox(*, scale: float, pad_x: float, pad_y: float, input_width: int, input_height: int) -> Event:
    return {"scale": scale, "pad_x": pad_x, "pad_y": pad_y, "input_width": input_width, "input_height": input_height}


def candidate(*, x1: float, y1: float, x2: float, y2: float, score: float, class_id: int) -> Event:
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "class_id": class_id}


def box(*, x1: float, y1: float, x2: float, y2: float) -> Event:
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}


def detection(*, class_id: int, class_name: str, score: float, box: Mapping[str, float],
              box_norm: Mapping[str, float]) -> Event:
    return {"class_id": class_id, "class_name": class_name, "score": score, "box": box, "box_norm": box_norm}


# ---- events ---------------------------------------------------------------------------------------------
def image_submitted(*, request_id: str, tenant: str, image: Mapping[str, Any], lane: Lane = "BATCH",
                    model: Mapping[str, Any], params: Mapping[str, Any], deadline_ms: Millis | None = None,
                    idempotency_key: str | None = None, job_id: str | None = None, submitted_at: Millis) -> Event:
    """A request (topic detect.<lane>.submitted or ingest.<tenant>); ``image`` is an object_ref or inline_image."""
    return {"request_id": request_id, "tenant": tenant, "image": image, "lane": lane, "model": model,
            "params": params, "deadline_ms": deadline_ms, "idempotency_key": idempotency_key, "job_id": job_id,
            "submitted_at": submitted_at}


def image_scanned(*, context: Mapping[str, Any], image: Mapping[str, Any], sha256: str, size: int, scanner: str,
                  timings_ms: Mapping[str, float] = _NO_ENTRIES) -> Event:
    return {"context": context, "image": image, "sha256": sha256, "size": size, "scanner": scanner,
            "timings_ms": dict(timings_ms)}


def image_preprocessed(*, context: Mapping[str, Any], tensor: bytes, shape: Iterable[int], dtype: str,
                       layout: str = "HWC", encoding: str = "raw", image_sha256: str, image_format: str,
                       original_width: int, original_height: int, exif_orientation: int = 1,
                       letterbox: Mapping[str, Any], timings_ms: Mapping[str, float] = _NO_ENTRIES) -> Event:
    return {"context": context, "tensor": tensor, "shape": list(shape), "dtype": dtype, "layout": layout,
            "encoding": encoding, "image_sha256": image_sha256, "image_format": image_format,
            "original_width": original_width, "original_height": original_height,
            "exif_orientation": exif_orientation, "letterbox": letterbox, "timings_ms": dict(timings_ms)}


def inference_output(*, context: Mapping[str, Any], candidates: Iterable[Mapping[str, Any]], model_name: str,
                     model_version: int, batch_id: str, batch_size: int, image_sha256: str, original_width: int,
                     original_height: int, exif_orientation: int = 1, letterbox: Mapping[str, Any],
                     timings_ms: Mapping[str, float] = _NO_ENTRIES) -> Event:
    return {"context": context, "candidates": list(candidates), "model_name": model_name,
            "model_version": model_version, "batch_id": batch_id, "batch_size": batch_size,
            "image_sha256": image_sha256, "original_width": original_width, "original_height": original_height,
            "exif_orientation": exif_orientation, "letterbox": letterbox, "timings_ms": dict(timings_ms)}


def detection_result(*, request_id: str, tenant: str, status: ResultStatus = "FAILED",
                     detections: Iterable[Mapping[str, Any]] = (), image_width: int | None = None,
                     image_height: int | None = None, image_sha256: str | None = None, model_name: str | None = None,
                     model_version: int | None = None, timings_ms: Mapping[str, float] = _NO_ENTRIES,
                     error_code: str | None = None, error_message: str | None = None, job_id: str | None = None,
                     lane: Lane = "BATCH", cache_hit: bool = False, submitted_at: Millis | None = None,
                     review: bool = False, completed_at: Millis) -> Event:
    """The terminal outcome of one request (topics detections, detections.shadow, the reply topics)."""
    return {"request_id": request_id, "tenant": tenant, "status": status, "detections": list(detections),
            "image_width": image_width, "image_height": image_height, "image_sha256": image_sha256,
            "model_name": model_name, "model_version": model_version, "timings_ms": dict(timings_ms),
            "error_code": error_code, "error_message": error_message, "job_id": job_id, "lane": lane,
            "cache_hit": cache_hit, "submitted_at": submitted_at, "review": review, "completed_at": completed_at}


def dead_letter(*, stage: str, topic: str, partition: int, offset: int, key: bytes | None = None, value: bytes,
                headers: Mapping[str, bytes] = _NO_ENTRIES, error_class: str, error_message: str, attempts: int,
                request_id: str | None = None, failed_at: Millis) -> Event:
    return {"stage": stage, "topic": topic, "partition": partition, "offset": offset, "key": key, "value": value,
            "headers": dict(headers), "error_class": error_class, "error_message": error_message,
            "attempts": attempts, "request_id": request_id, "failed_at": failed_at}


def model_event(*, model_name: str, version: int, action: ModelAction = "PUSHED", production_version: int | None = None,
                canary_version: int | None = None, canary_percent: float = 0.0, shadow_version: int | None = None,
                versions: Iterable[int] = (), previous_versions: Iterable[int] = (), guardrail: bool = True,
                sha256: str | None = None, actor: str, reason: str | None = None, at: Millis) -> Event:
    """A routing state (key: the model name) or a serving report (key: model/version/instance) on `models`."""
    return {"model_name": model_name, "version": version, "action": action, "production_version": production_version,
            "canary_version": canary_version, "canary_percent": canary_percent, "shadow_version": shadow_version,
            "versions": list(versions), "previous_versions": list(previous_versions), "guardrail": guardrail,
            "sha256": sha256, "actor": actor, "reason": reason, "at": at}


def job_event(*, job_id: str, tenant: str, status: str, total: int, ok: int, rejected: int, failed: int,
              created_at: Millis | None = None, completed_at: Millis) -> Event:
    return {"job_id": job_id, "tenant": tenant, "status": status, "total": total, "ok": ok, "rejected": rejected,
            "failed": failed, "created_at": created_at, "completed_at": completed_at}


def audit_event(*, event_id: str, tenant: str, subject: str, action: str, resource: str | None = None, outcome: str,
                status: int, request_id: str | None = None, detail: str | None = None, event_time: Millis) -> Event:
    return {"event_id": event_id, "tenant": tenant, "subject": subject, "action": action, "resource": resource,
            "outcome": outcome, "status": status, "request_id": request_id, "detail": detail,
            "event_time": event_time}


def abuse_event(*, tenant: str, request_id: str, image_sha256: str | None = None, classes: Iterable[str] = (),
                review_object: str | None = None, retention_days: int, cache_hit: bool = False,
                policy_revision: int = 0, flagged_at: Millis) -> Event:
    return {"tenant": tenant, "request_id": request_id, "image_sha256": image_sha256, "classes": list(classes),
            "review_object": review_object, "retention_days": retention_days, "cache_hit": cache_hit,
            "policy_revision": policy_revision, "flagged_at": flagged_at}


# Record name -> its constructor (every record of schemas/*.avsc; enums have none).
CONSTRUCTORS = {
    "ObjectRef": object_ref, "InlineImage": inline_image, "ModelSelector": model_selector,
    "DetectParams": detect_params, "RequestContext": request_context, "Letterbox": letterbox,
    "Candidate": candidate, "Box": box, "Detection": detection,
    "ImageSubmitted": image_submitted, "ImageScanned": image_scanned, "ImagePreprocessed": image_preprocessed,
    "InferenceOutput": inference_output, "DetectionResult": detection_result, "DeadLetter": dead_letter,
    "ModelEvent": model_event, "JobEvent": job_event, "AuditEvent": audit_event, "AbuseEvent": abuse_event,
}
