"""The parameters of every route: query, path and header models, one field per parameter (gateway/openapi.py
documents each field as a parameter `in` the model's place)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BeforeValidator, ConfigDict, Field

from config import GatewaySettings
from gateway.contract.rules import (
    AUDIT_LIMIT_MAX,
    DAY_RE,
    ID_RE,
    IDEMPOTENCY_KEY_MAX,
    Contract,
    Format,
    Int,
    MaxDetections,
    ModelName,
    ModelVersion,
    ScoreThreshold,
    Sha256,
    Within,
    no_bool,
)


class Query(Contract):
    """Query parameters (each field one parameter; the generator documents them `in: query`)."""

    IN: ClassVar[str] = "query"
    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"


class Path(Contract):
    """Path parameters: a malformed id names no resource (404, never 400)."""

    IN: ClassVar[str] = "path"
    DEFAULT_CODE: ClassVar[str] = "NOT_FOUND"


class Headers(Contract):
    IN: ClassVar[str] = "header"
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


_JSON_IGNORED = " Ignored when the body is application/json (send `params` there)."


class DetectQuery(Query):
    """The detection params of a raw or multipart detect call (validated with DetectParams' rules)."""

    score_threshold: ScoreThreshold | None = Field(None, description="Lowest score kept." + _JSON_IGNORED)
    max_detections: MaxDetections | None = Field(None, description="Most detections returned." + _JSON_IGNORED)
    classes: str | None = Field(None, description="Comma-separated class names to keep (default: all)."
                                + _JSON_IGNORED)
    model: ModelName | None = Field(None, description="Model name (default DETECTFLOW_DEFAULT_MODEL)."
                                    + _JSON_IGNORED)
    model_version: ModelVersion | None = Field(None, description="Model version (default: the newest)."
                                               + _JSON_IGNORED)


class FormatQuery(Query):
    format: Format = Field("json", description="json: DetectionResult objects; coco: COCO detections lists.")


class SyncQuery(FormatQuery):
    timeout_ms: Annotated[Int, Within(lo=1, hi=lambda s: int(s.sync_timeout_max_s * 1000))] | None = Field(
        None, description="How long to wait for the result before answering 202 (default DETECTFLOW_SYNC_TIMEOUT_S).")

    def timeout_s(self, settings: GatewaySettings) -> float:
        return settings.sync_timeout_s if self.timeout_ms is None else self.timeout_ms / 1000


class ResultsQuery(FormatQuery):
    page_size: Annotated[Int, Within(lo=1, hi=lambda s: s.page_size_max)] | None = Field(
        None, description="Results per page (default DETECTFLOW_PAGE_SIZE_DEFAULT).")
    page_token: str | None = Field(None, description="next_page_token of the previous page; empty or absent: the "
                                                     "first page.")


class AuditQuery(Query):
    day: str | None = Field(None, pattern=DAY_RE.pattern, description="UTC day, YYYY-MM-DD (default: today).")
    limit: Annotated[int, Field(ge=1, le=AUDIT_LIMIT_MAX), BeforeValidator(no_bool)] = Field(
        100, description="Most events returned.")


class RequestPath(Path):
    id: str = Field(pattern=ID_RE.pattern, description="A request id.")


class JobPath(Path):
    id: str = Field(pattern=ID_RE.pattern, description="A job id.")


class ImagePath(Path):
    id: Sha256 = Field(description="The sha256 (hex) of the image bytes.")


class TenantPath(Path):
    tenant: str = Field(description="The caller's own tenant (another tenant is 404).")


class TraceHeaders(Headers):
    traceparent: str | None = Field(None, description="W3C trace context; the pipeline continues this trace (a "
                                                      "malformed value starts a new one).")


class IdempotencyHeaders(Headers):
    DEFAULT_CODE: ClassVar[str] = "INVALID_REQUEST"

    idempotency_key: str | None = Field(None, alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX,
                                        description="A retry with the same key and the same request gets the same "
                                                    "resource for 24 hours; the same key with another request is "
                                                    "refused (422 IDEMPOTENCY_KEY_REUSED).")


class DetectHeaders(IdempotencyHeaders, TraceHeaders):
    pass
