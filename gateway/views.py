"""How results look over HTTP: a stored DetectionResult as the API's DetectionResult, or COCO-style results, or
a Pending body (the models of gateway/contract/replies.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from gateway.contract.replies import (
    Box,
    BoxNormalized,
    CocoResult,
    CocoResults,
    Detection,
    DetectionResult,
    ImageInfo,
    ModelInfo,
    Pending,
    ResultError,
)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _box(b: Mapping[str, Any], digits: int) -> dict[str, float]:
    return {k: round(float(b[k]), digits) for k in ("x1", "y1", "x2", "y2")}


def result_view(r: Mapping[str, Any]) -> DetectionResult:
    """A DetectionResult (as the pipeline publishes it) in the API's shape."""
    completed = r.get("completed_at")
    if isinstance(completed, dt.datetime):
        completed = int(completed.timestamp() * 1000)
    error = (ResultError(code=r.get("error_code"), message=r.get("error_message"))
             if r.get("status") != "OK" else None)
    return DetectionResult(
        request_id=r["request_id"],
        status=r["status"],
        image=ImageInfo(id=r.get("image_sha256"), width=r.get("image_width"), height=r.get("image_height")),
        model=ModelInfo(name=r.get("model_name"), version=r.get("model_version")),
        detections=[Detection(
            class_id=d["class_id"], class_name=d["class_name"], score=round(float(d["score"]), 5),
            box=Box(**_box(d["box"], 2)), box_normalized=BoxNormalized(**_box(d["box_norm"], 6)),
        ) for d in r.get("detections") or []],
        timings_ms={k: round(float(v), 3) for k, v in (r.get("timings_ms") or {}).items()},
        cache_hit=bool(r.get("cache_hit")),
        review=bool(r.get("review")),
        job_id=r.get("job_id"),
        error=error,
        completed_at=iso(completed),
    )


def coco_view(r: Mapping[str, Any]) -> CocoResults:
    """COCO results format (what pycocotools' loadRes reads): bbox is [x, y, width, height] in pixels."""
    out = []
    for d in r.get("detections") or []:
        b = d["box"]
        w, h = float(b["x2"]) - float(b["x1"]), float(b["y2"]) - float(b["y1"])
        out.append(CocoResult(image_id=r["request_id"], category_id=d["class_id"], category_name=d["class_name"],
                              bbox=[round(float(b["x1"]), 2), round(float(b["y1"]), 2), round(w, 2), round(h, 2)],
                              area=round(w * h, 2), score=round(float(d["score"]), 5)))
    return CocoResults(out)


def pending_view(request_id: str, submitted_at: int | None, job_id: str | None = None) -> Pending:
    return Pending(request_id=request_id, submitted_at=iso(submitted_at), job_id=job_id)
