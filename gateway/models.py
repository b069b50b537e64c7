"""The HTTP contract, once: every JSON body, response and parameter of the API as a pydantic model.

The handlers validate with these models (``parse``) and build their responses from them; gateway/openapi.py
generates the OpenAPI document from them and the route table (gateway/routes.py). A limit is declared once, on
the field: a fixed one as a Field constraint, one that comes from the settings as ``Within`` (checked against
the settings in the validation context, written into the document from the settings it is generated for).
Response models are closed (``extra="forbid"``: additionalProperties false), so a field a view adds without
declaring it fails; request models ignore unknown fields, as the handlers always did.

A validation error becomes the problem the API has always answered (gateway/problems.py): each model says
which code a field's error is (``CODES``) and which parameter name an INVALID_PARAMS names (``PARAMS``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    RootModel,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from gateway import problems
from infra.settings import REVIEW_RETENTION_DAYS, GatewaySettings
from stream.bridge import SUBMITTED_MARK

MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
OBJECT_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}/[A-Za-z0-9!_.*'()/-]{1,900}$")
DAY_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "bmp": "image/bmp",
               "tiff": "image/tiff"}
UPLOAD_CONTENT_TYPES = frozenset(MEDIA_TYPES.values())
FORMATS = ("json", "coco")

MAX_MODEL_VERSION = 1_000_000
MAX_CLASSES = 1000
MAX_UPLOAD_FILES = 1000
AUDIT_LIMIT_MAX = 1000
IDEMPOTENCY_KEY_MAX = 200

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Within:
    """A range taken from the settings: ``lo <= value <= hi`` (or the length, for a list), where either end is
    a number or a function of the GatewaySettings. Validation reads the settings from the context ``parse``
    passes; the document generator (gateway/openapi.py) writes the range for the settings it is given."""

    lo: float | Callable[[GatewaySettings], float] | None = None
    hi: float | Callable[[GatewaySettings], float] | None = None
    length: bool = False

    def bounds(self, settings: GatewaySettings) -> tuple[float | None, float | None]:
        return tuple(b(settings) if callable(b) else b for b in (self.lo, self.hi))  # type: ignore[return-value]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: Any, info: ValidationInfo) -> Any:
            settings = (info.context or {}).get("settings")
            if settings is None or value is None:
                return value
            lo, hi = self.bounds(settings)
            n = len(value) if self.length else value
            if (lo is not None and n < lo) or (hi is not None and n > hi):
                raise PydanticCustomError("too_long" if self.length and hi is not None and n > hi else "range",
                                          "must be within [{lo}, {hi}]", {"lo": _g(lo), "hi": _g(hi)})
            return value

        return core_schema.with_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        out = handler(schema)
        settings = getattr(handler.generate_json_schema, "settings", None)
        if settings is None:
            return out
        lo, hi = self.bounds(settings)
        keys = ("minItems", "maxItems") if self.length else ("minimum", "maximum")
        for key, bound in zip(keys, (lo, hi), strict=True):
            if bound is not None:
                out[key] = int(bound) if self.length else bound
        return out


def _g(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def _no_bool(value: Any) -> Any:
    """JSON true is not a number (pydantic's lax mode would read it as 1)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
ScoreThreshold = Annotated[Number, Within(lo=lambda s: s.pipeline.min_score, hi=1)]
MaxDetections = Annotated[Int, Within(lo=1, hi=lambda s: s.pipeline.max_detections_limit)]
ModelName = Annotated[str, Field(pattern=MODEL_RE.pattern, description="A model in the repository.")]
ModelVersion = Annotated[int, Field(ge=1, le=MAX_MODEL_VERSION, description="A model version; null: the newest."),
                         BeforeValidator(_no_bool)]
UploadId = Annotated[str, Field(pattern=UPLOAD_ID_RE.pattern, description="From POST /v1/uploads.")]
ObjectKey = Annotated[str, Field(pattern=OBJECT_KEY_RE.pattern, description=(
    "`<tenant>/<name>` in the uploads bucket; another tenant's key is not found."))]
Sha256 = Annotated[str, Field(pattern=SHA256_RE.pattern)]
Uuid = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time",
                                           "description": "UTC, RFC 3339 with milliseconds."})]
Format = Literal["json", "coco"]


# ---------------------------------------------------------------------------------------------- validation


class Contract(BaseModel):
    """A request body or a set of parameters: unknown fields ignored, errors mapped to problem codes."""

    model_config = ConfigDict(extra="ignore")

    # Problem code of an error by the dotted field path ("files.content_type"); "x.*" matches anything under x.
    CODES: ClassVar[dict[str, str]] = {}
    DEFAULT_CODE: ClassVar[str] = "INVALID_REQUEST"
    # The `param` an INVALID_PARAMS names, by dotted field path; else the path itself ("files[0].content_length").
    PARAMS: ClassVar[dict[str, str]] = {}


def parse(model: type[M], data: Any, settings: GatewaySettings | None, **context: Any) -> M:
    """``data`` validated by ``model`` with the settings' limits (none without settings), or the Problem the API
    answers for it."""
    try:
        return model.model_validate(data, context={"settings": settings, **context})
    except ValidationError as exc:
        raise problem_of(model, exc) from exc


def problem_of(model: type[BaseModel], exc: ValidationError) -> problems.Problem:
    """The first error of ``exc`` as the problem the route has always answered with."""
    err = exc.errors(include_url=False)[0]
    loc = [p for p in err["loc"] if p != "function-after"]
    names = [str(p) for p in loc if isinstance(p, str)]
    rendered = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc))
    codes: dict[str, str] = getattr(model, "CODES", {})
    code = err["type"] if err["type"] in problems.CODES else _code_of(codes, names,
                                                                       getattr(model, "DEFAULT_CODE",
                                                                               "INVALID_REQUEST"))
    detail = f"{rendered} {err['msg']}" if rendered and err["type"] not in problems.CODES else err["msg"]
    if code == "INVALID_PARAMS":
        param = getattr(model, "PARAMS", {}).get(".".join(names), rendered or None)
        return problems.Problem(code, f"{param} {err['msg']}" if param else detail, param=param)
    return problems.Problem(code, detail)


def _code_of(codes: Mapping[str, str], names: list[str], default: str) -> str:
    if ".".join(names) in codes:
        return codes[".".join(names)]
    for i in range(len(names) - 1, 0, -1):
        if ".".join(names[:i]) + ".*" in codes:
            return codes[".".join(names[:i]) + ".*"]
    return default


def _context(info: ValidationInfo, key: str) -> Any:
    return (info.context or {}).get(key)


# ---------------------------------------------------------------------------------------------- requests


def _split_classes(value: Any) -> Any:
    """The query's form of the list: one comma-separated string."""
    return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value


class DetectParams(Contract):
    """Detection parameters; null or absent fields take the defaults (DETECTFLOW_SCORE_THRESHOLD,
    DETECTFLOW_MAX_DETECTIONS, every class, DETECTFLOW_DEFAULT_MODEL)."""

    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"

    score_threshold: ScoreThreshold | None = Field(None, description="Lowest score kept.")
    max_detections: MaxDetections | None = Field(None, description="Most detections returned.")
    classes: Annotated[list[str] | None, BeforeValidator(_split_classes), WithJsonSchema({"anyOf": [
        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_CLASSES}, {"type": "string"}, {"type": "null"}],
    })] = Field(None, description=("Class names to keep (a list, or one comma-separated string); names the model "
                                   "does not know are refused."))
    model: ModelName | None = None
    model_version: ModelVersion | None = None

    @field_validator("classes", mode="after")
    @classmethod
    def _known_classes(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if len(value) > MAX_CLASSES:
            raise PydanticCustomError("too_long", "must be a list of at most {n} class names", {"n": MAX_CLASSES})
        names = _context(info, "class_names")
        unknown = sorted({c for c in value if names is not None and c not in names})
        if unknown:
            raise PydanticCustomError("unknown_class", "unknown classes for this model: {u}", {"u": unknown[:5]})
        return value


# A class list's error names the parameter, not the item (as the query's comma-separated form has no items).
DetectParams.PARAMS = {name: name for name in DetectParams.model_fields}


class ModelSelector(Contract):
    """Overrides params.model / params.model_version."""

    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"
    PARAMS: ClassVar[dict[str, str]] = {"name": "model", "version": "model_version"}

    name: ModelName | None = None
    version: ModelVersion | None = None


class ImageRef(Contract):
    """An image already in the uploads bucket: `upload_id` (wins when both are given) or `key`."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"anyOf": [
        {"required": ["upload_id"]}, {"required": ["key"], "not": {"required": ["upload_id"]}}]})

    upload_id: UploadId | None = None
    key: ObjectKey | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_reference(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise PydanticCustomError("not_a_reference", "an image reference is an object with upload_id or key")
        if "upload_id" in data:
            if not isinstance(data["upload_id"], str):
                raise PydanticCustomError("not_an_upload_id", "upload_id is not an upload id")
            return {"upload_id": data["upload_id"]}  # it wins: the key is not looked at
        if not isinstance(data.get("key"), str):
            raise PydanticCustomError("not_a_reference", "key must be an object key '<tenant>/<name>' in the "
                                                         "uploads bucket")
        return {"key": data["key"]}

    @field_validator("key", mode="after")
    @classmethod
    def _no_dot_dot(cls, value: str | None) -> str | None:
        if value is not None and ".." in value.split("/"):
            raise PydanticCustomError("dot_dot", "must not name a '..' segment")
        return value

    def object_key(self, tenant: str) -> str:
        """The uploads-bucket key this names; a key outside the tenant's prefix is not found (not the caller's)."""
        if self.upload_id is not None:
            return f"{tenant}/uploads/{self.upload_id}"
        assert self.key is not None
        if not self.key.startswith(tenant + "/"):
            raise problems.Problem("NOT_FOUND", "no such object")
        return self.key


class ParamsAndModel(Contract):
    """A JSON call's detection params and model selector (a detect call by reference, a job)."""

    CODES: ClassVar[dict[str, str]] = {"params.*": "INVALID_PARAMS", "model.*": "INVALID_PARAMS"}
    PARAMS: ClassVar[dict[str, str]] = {f"params.{n}": n for n in DetectParams.model_fields} | {
        "model.name": "model", "model.version": "model_version"}

    params: DetectParams | None = None
    model: ModelSelector | None = None

    def merged_params(self) -> dict[str, Any]:
        """The params with the model selector's name and version over them (as the query's are read)."""
        out = {} if self.params is None else self.params.model_dump(exclude_none=True)
        if self.model is not None and self.model.name is not None:
            out["model"] = self.model.name
        if self.model is not None and self.model.version is not None:
            out["model_version"] = self.model.version
        return out


class DetectJsonRequest(ParamsAndModel):
    """A detect call naming an uploaded object instead of sending the bytes."""

    image: ImageRef


class DetectMultipartRequest(BaseModel):
    """A detect call as a multipart form (read by the gateway's streaming reader, gateway/inputs.py)."""

    image: bytes = Field(description="JPEG, PNG, WebP, BMP or TIFF bytes (sniffed, not trusted).",
                         json_schema_extra={"format": "binary"})
    params: DetectParams | None = Field(None, description="A JSON object; its fields override the query's.")


class UploadFile(Contract):
    CODES: ClassVar[dict[str, str]] = {"content_type": "UNSUPPORTED_MEDIA_TYPE", "content_length": "INVALID_PARAMS"}

    content_type: Literal[tuple(sorted(UPLOAD_CONTENT_TYPES))]  # type: ignore[valid-type]
    content_length: Annotated[Int, Within(lo=1, hi=lambda s: s.pipeline.image_max_bytes)] = Field(
        description="Exact size of the upload in bytes.")


class UploadRequest(Contract):
    CODES: ClassVar[dict[str, str]] = {"files.content_type": "UNSUPPORTED_MEDIA_TYPE",
                                       "files.content_length": "INVALID_PARAMS"}

    files: list[UploadFile] = Field(min_length=1, max_length=MAX_UPLOAD_FILES)


class JobRequest(ParamsAndModel):
    """Up to DETECTFLOW_JOB_MAX_ITEMS uploaded images, one set of params."""

    CODES: ClassVar[dict[str, str]] = ParamsAndModel.CODES

    items: Annotated[list[ImageRef], Within(hi=lambda s: s.job_max_items, length=True)] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _not_too_many(cls, data: Any, info: ValidationInfo) -> Any:
        """Too many items is its own code (422), decided before any item is looked at."""
        settings = _context(info, "settings")
        items = data.get("items") if isinstance(data, Mapping) else None
        if settings is not None and isinstance(items, list) and len(items) > settings.job_max_items:
            raise PydanticCustomError("TOO_MANY_ITEMS", "a job has at most {m} items, not {n}",
                                      {"m": settings.job_max_items, "n": len(items)})
        return data


ClassName = Annotated[str, Field(min_length=1, max_length=100, description="A class name.")]


class TenantPolicyRequest(Contract):
    """The tenant's content policy (replaces the current one)."""

    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"
    PARAMS: ClassVar[dict[str, str]] = {"hidden_classes": "hidden_classes", "review_classes": "review_classes",
                                        "review_retention_days": "review_retention_days"}

    hidden_classes: list[ClassName] = Field([], max_length=1000, description="Classes never returned for this tenant.",
                                            json_schema_extra={"uniqueItems": True})
    review_classes: list[ClassName] = Field([], max_length=1000, json_schema_extra={"uniqueItems": True},
                                            description="Classes whose presence flags the image for review.")
    review_retention_days: Literal[REVIEW_RETENTION_DAYS] | None = Field(  # type: ignore[valid-type]
        None, description="Days a flagged image's review copy is kept; null: the deployment's default.")

    @field_validator("hidden_classes", "review_classes", mode="after")
    @classmethod
    def _known(cls, value: list[str], info: ValidationInfo) -> list[str]:
        names = _context(info, "class_names")
        unknown = sorted(set(value) - set(names)) if names is not None else []
        if unknown:
            raise PydanticCustomError("unknown_class", "unknown classes: {u}", {"u": ", ".join(unknown[:5])})
        return sorted(set(value))


# ---------------------------------------------------------------------------------------------- parameters


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
    limit: Annotated[int, Field(ge=1, le=AUDIT_LIMIT_MAX), BeforeValidator(_no_bool)] = Field(
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


# ---------------------------------------------------------------------------------------------- responses


class Reply(BaseModel):
    """A response body: closed, every field always sent (null when unknown)."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    def dump(self) -> Any:
        return self.model_dump(mode="json", by_alias=True)


class Box(Reply):
    """Pixels of the oriented image, x1, y1 top left to x2, y2 bottom right."""

    x1: float
    y1: float
    x2: float
    y2: float


class BoxNormalized(Box):
    """The box divided by the image's width and height."""


class Detection(Reply):
    class_id: int = Field(ge=0, description="Class index in the model's class list.")
    class_name: str = Field(description="Class name.")
    score: float = Field(ge=0, le=1, description="Confidence.")
    box: Box
    box_normalized: BoxNormalized


class ImageInfo(Reply):
    id: Sha256 | None = Field(description="sha256 of the image bytes (the image id).")
    width: int | None = Field(description="Width of the oriented image in pixels.")
    height: int | None = Field(description="Height of the oriented image in pixels.")


class ModelInfo(Reply):
    name: str | None = Field(description="Model name.")
    version: int | None = Field(description="Model version.")


class ResultError(Reply):
    code: str | None = Field(description="Stable error code (e.g. VIRUS_DETECTED).")
    message: str | None = Field(description="Human-readable detail.")


class DetectionResult(Reply):
    """The outcome of one request."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True,
                              json_schema_extra={"if": {"properties": {"status": {"const": "OK"}}},
                                                 "then": {"properties": {"error": {"type": "null"}}},
                                                 "else": {"properties": {"error": {"type": "object"}}}})

    request_id: Uuid = Field(description="The request this result answers.")
    status: Literal["OK", "REJECTED", "FAILED"] = Field(description=(
        "OK: detections are valid. REJECTED: the input was refused. FAILED: processing failed after retries."))
    image: ImageInfo
    model: ModelInfo
    detections: list[Detection] = Field(description="Highest score first.")
    timings_ms: dict[str, float] = Field(description="Milliseconds per pipeline stage.")
    cache_hit: bool = Field(description="Answered from the result cache without running the model.")
    review: bool = Field(False, description="The tenant's content policy flagged the image for review.")
    job_id: Uuid | None = Field(description="The batch job of the request, if any.")
    error: ResultError | None = Field(description="Why the request was REJECTED or FAILED; null when OK.")
    completed_at: Timestamp | None


def _pending_schema(schema: dict[str, Any]) -> None:
    schema["required"] = [r for r in schema["required"] if r != "error"]  # sent only with status FAILED
    schema.update({"if": {"properties": {"status": {"const": "FAILED"}}}, "then": {"required": ["error"]},
                   "else": {"not": {"required": ["error"]}}})


class SubmitFailed(Reply):
    code: Literal["SUBMIT_FAILED"]
    message: str


class Pending(Reply):
    """A request without a result yet."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True,
                              json_schema_extra=_pending_schema)

    request_id: Uuid
    status: Literal["PENDING", "FAILED"] = Field("PENDING", description=(
        "PENDING: still in the pipeline, poll again. FAILED: the gateway could not submit it (error.code "
        "SUBMIT_FAILED)."))
    submitted_at: Timestamp | None
    job_id: Uuid | None = None
    error: SubmitFailed | None = Field(None, exclude_if=lambda v: v is None)


class CocoResult(Reply):
    """One detection in the COCO results format (what pycocotools' loadRes reads)."""

    image_id: Uuid = Field(description="The request id.")
    category_id: int = Field(ge=0, description="Class index.")
    category_name: str = Field(description="Class name.")
    bbox: list[float] = Field(min_length=4, max_length=4, description="[x, y, width, height] in pixels.")
    area: float = Field(description="width * height in pixels.")
    score: float = Field(ge=0, le=1)


class CocoResults(RootModel[list[CocoResult]]):
    """A result as COCO detections (`format=coco`)."""

    def dump(self) -> Any:
        return self.model_dump(mode="json")


class UploadSlot(Reply):
    upload_id: Annotated[str, Field(pattern=UPLOAD_ID_RE.pattern)]
    method: Literal["PUT"] = "PUT"
    url: str = Field(description="Pre-signed S3 URL; it binds the size, the type and the headers below.",
                     json_schema_extra={"format": "uri"})
    headers: dict[str, str] = Field(description="Send exactly these headers with the PUT.",
                                    json_schema_extra={"required": ["Content-Type", "Content-Length",
                                                                    f"x-amz-meta-{SUBMITTED_MARK}"]})
    expires_at: Timestamp


class UploadResponse(Reply):
    uploads: list[UploadSlot] = Field(description="In request order.")


UriRef = Annotated[str, WithJsonSchema({"type": "string", "format": "uri-reference"})]


class JobLinks(Reply):
    self: UriRef
    results: UriRef

    @classmethod
    def of(cls, job_id: str) -> JobLinks:
        return cls(self=f"/v1/jobs/{job_id}", results=f"/v1/jobs/{job_id}/results")


class JobCreated(Reply):
    job_id: Uuid
    status: Literal["RUNNING"] = "RUNNING"
    total: Annotated[int, Within(lo=1, hi=lambda s: s.job_max_items)] = Field(description="Items in the job.")
    request_ids: list[Uuid] = Field(description="One per item, in item order.")
    links: JobLinks


class JobCounts(Reply):
    OK: int = Field(ge=0)
    REJECTED: int = Field(ge=0)
    FAILED: int = Field(ge=0)


class JobStatus(Reply):
    job_id: Uuid
    status: Literal["RUNNING", "COMPLETED"]
    total: int = Field(ge=0, description="Items in the job.")
    done: int = Field(ge=0, description="Items with a result.")
    pending: int = Field(ge=0, description="Items without a result yet.")
    progress: float = Field(ge=0, le=1, description="done / total.")
    counts: JobCounts
    model: str | None = Field(description="Model name.")
    created_at: Timestamp | None
    completed_at: Timestamp | None
    links: JobLinks


class JobResultsPage(Reply):
    """One page of a job's results. The handler streams the page out item by item (each item built from
    DetectionResult or CocoResults); this model is the shape it writes."""

    job_id: Uuid
    items: Annotated[list[DetectionResult | CocoResults], Within(hi=lambda s: s.page_size_max, length=True)] = Field(
        description="DetectionResults, or with format=coco one COCO list per result, in request-id order.")
    next_page_token: str | None = Field(description=(
        "Pass as page_token for the next page; null on the last page. A page may end before page_size items when "
        "its size in bytes reaches the gateway's bound."))


class DeleteResult(Reply):
    image_id: Sha256
    deleted_at: Timestamp
    requests_deleted: int = Field(ge=0, description="Results removed.")
    objects_deleted: int = Field(ge=0, description="Stored objects removed.")


class AuditEvent(Reply):
    event_time: Timestamp
    subject: str | None = Field(description="The token's subject.")
    action: str | None = Field(description="e.g. detect, jobs.create, images.delete.")
    resource: str | None = Field(description="The id the call named.")
    outcome: Literal["success", "denied", "rejected", "error"] | None
    status: int | None = Field(description="HTTP status.")
    request_id: str | None = Field(description="The request made, if any.")
    detail: str | None = Field(description="The problem code, if any.")


class AuditPage(Reply):
    tenant: str
    day: str = Field(description="The UTC day, YYYY-MM-DD.")
    events: list[AuditEvent] = Field(max_length=AUDIT_LIMIT_MAX, description="Newest first.")


class TenantErasure(Reply):
    tenant: str
    erased_at: Timestamp
    rows_deleted: dict[str, Annotated[int, Field(ge=0)]] = Field(description="Rows (partitions) deleted per table.")
    objects_deleted: dict[str, Annotated[int, Field(ge=0)]] = Field(description="Objects removed per bucket.")


class TenantPolicy(Reply):
    tenant: str
    hidden_classes: list[str]
    review_classes: list[str]
    review_retention_days: int | None
    revision: int = Field(ge=0, description="Changes so far (0: never set).")
    updated_by: str | None = Field(description="Who made the last change.")
    updated_at: Timestamp | None
    applies_within_s: float = Field(description="A change applies everywhere within this time.")


class Live(Reply):
    status: Literal["live"] = "live"


class Ready(Reply):
    status: Literal["ready"] = "ready"
    checks: dict[str, Literal["ok"]]


def _problem_schema(schema: dict[str, Any]) -> None:
    table = "\n".join(f"| `{code}` | {status} | {title} |" for code, (status, title) in problems.CODES.items())
    schema["description"] = ("An RFC 9457 problem (`application/problem+json`). Clients switch on `code`; the stable "
                             "codes are:\n\n| code | status | meaning |\n|---|---|---|\n" + table)
    schema["properties"]["code"]["enum"] = list(problems.CODES)
    schema["required"] = ["type", "title", "status", "code", "instance"]


class Problem(Reply):
    """The body of every error (gateway/problems.py writes it)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_problem_schema)

    type: str = Field(description=f"`{problems.PROBLEM_TYPE_BASE}` + the code in lower case with dashes.",
                      json_schema_extra={"format": "uri"})
    title: str = Field(description="Short summary of the code (may be reworded; switch on `code`).")
    status: int = Field(ge=400, le=599, description="The HTTP status.")
    code: str = Field(description="Stable error code.")
    detail: str | None = Field(None, description="What went wrong with this request (absent when there is nothing "
                                                 "to add).")
    instance: str = Field(description="The request path.")
    param: str | None = Field(None, description="INVALID_PARAMS: the parameter at fault.")
    image_code: str | None = Field(None, description=(
        "IMAGE_REJECTED: why the image was refused (e.g. UNSUPPORTED_FORMAT, IMAGE_TOO_LARGE, TRUNCATED_IMAGE, "
        "VIRUS_DETECTED)."))
    failure_code: str | None = Field(None, description="PIPELINE_FAILED: the pipeline's error code.")
    reason: str | None = Field(None, description=(
        "INVALID_TOKEN: why the token was refused (expired, not_yet_valid, issued_in_future, lifetime_too_long, "
        "wrong_issuer, wrong_audience, algorithm_not_accepted, unknown_key, bad_signature, missing_claim, "
        "invalid_tenant, malformed, rejected)."))
    request_id: Uuid | None = Field(None, description="IMAGE_REJECTED / PIPELINE_FAILED: the request that ended so.")
    checks: dict[str, str] | None = Field(None, description=(
        "UNAVAILABLE from /readyz: `ok` or `unavailable: <reason>` per backing service."))
