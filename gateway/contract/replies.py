"""The API's response bodies. Closed (additionalProperties false) and every field always sent, null when
unknown: a field a handler or a view adds without declaring it here fails, in the tests and in production."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, WithJsonSchema

from gateway import problems
from gateway.contract.rules import AUDIT_LIMIT_MAX, UPLOAD_ID_RE, Sha256, Timestamp, Uuid, Within
from stream.bridge import SUBMITTED_MARK


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
