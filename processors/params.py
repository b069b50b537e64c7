"""A request's detection params with the defaults applied, and the hash the result cache keys on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config import PipelineSettings
from stream.errors import InvalidRecord


@dataclass(frozen=True)
class EffectiveParams:
    score_threshold: float
    max_detections: int
    classes: tuple[str, ...]   # sorted; empty = every class
    nms_iou: float

    def digest(self) -> str:
        """Stable across processes and versions of this code: the cache key's params part."""
        canonical = json.dumps({"score_threshold": round(self.score_threshold, 6),
                                "max_detections": self.max_detections, "classes": list(self.classes),
                                "nms_iou": round(self.nms_iou, 6)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def effective_params(params: Mapping[str, Any] | None, settings: PipelineSettings,
                     class_names: tuple[str, ...] | None = None) -> EffectiveParams:
    """Defaults applied and every value checked: a bad value is REJECTED INVALID_PARAMS."""
    params = params or {}
    score = params.get("score_threshold")
    score = settings.default_score_threshold if score is None else float(score)
    if not settings.min_score <= score <= 1.0:
        raise InvalidRecord("INVALID_PARAMS", f"score_threshold must be in [{settings.min_score}, 1], got {score}")
    max_det = params.get("max_detections")
    max_det = settings.default_max_detections if max_det is None else int(max_det)
    if not 1 <= max_det <= settings.max_detections_limit:
        raise InvalidRecord("INVALID_PARAMS",
                            f"max_detections must be in [1, {settings.max_detections_limit}], got {max_det}")
    classes = tuple(sorted({str(c) for c in params.get("classes") or []}))
    if class_names is not None:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise InvalidRecord("INVALID_PARAMS", f"unknown classes for this model: {unknown[:5]}")
    return EffectiveParams(score, max_det, classes, settings.nms_iou)


@dataclass(frozen=True)
class CacheKey:
    tenant: str
    image_sha256: str
    model_name: str
    model_version: int
    params_hash: str
