"""The gateway's OpenAPI 3.1 document, served at GET /openapi.json.

Ranges come from the settings, patterns from gateway/inputs.py and error codes from gateway/problems.py,
so the document states exactly what the handlers enforce and cannot drift from them. Response schemas
are closed (``additionalProperties: false``): a field the views add without documenting it fails the
response-conformance checks. Request schemas stay open because the handlers ignore unknown fields.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from config import REVIEW_RETENTION_DAYS, GatewaySettings
from gateway.auth import SCOPES
from gateway.inputs import (
    FORMATS,
    ID_RE,
    MEDIA_TYPES,
    OBJECT_KEY_RE,
    SHA256_RE,
    UPLOAD_CONTENT_TYPES,
    UPLOAD_ID_RE,
)
from gateway.problems import CODES, PROBLEM_TYPE_BASE
from gateway.problems import CONTENT_TYPE as PROBLEM_CONTENT_TYPE
from schemas.names import MODEL_NAME_MAX, MODEL_NAME_PATTERN
from stream.bridge import SUBMITTED_MARK

Schema = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
MAX_MODEL_VERSION = 1_000_000   # inputs.parse_params
MAX_CLASSES = 1000              # inputs.parse_params
MAX_UPLOAD_FILES = 1000         # handlers.create_uploads
AUDIT_LIMIT_MAX = 1000          # handlers.audit_events
IDEMPOTENCY_KEY_MAX = 200       # handlers.detect
RAW_IMAGE_TYPES = (*MEDIA_TYPES.values(), "application/octet-stream")


def _version() -> str:
    try:
        return importlib.metadata.version("detectflow")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def _ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(schema: Schema) -> Schema:
    """JSON Schema 2020-12 nullability: the type list gains "null"."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*types, "null"]}


def _obj(properties: dict[str, Schema], required: list[str] | None = None, *, closed: bool = True,
         description: str | None = None) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if closed:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


def _str(description: str, **kw: Any) -> Schema:
    return {"type": "string", "description": description, **kw}


def _int(description: str, **kw: Any) -> Schema:
    return {"type": "integer", "description": description, **kw}


TIMESTAMP = {"type": "string", "format": "date-time", "description": "UTC, RFC 3339 with milliseconds."}
UUID = {"type": "string", "format": "uuid"}


# ---------------------------------------------------------------------------------------------- schemas


def _problem_schema() -> Schema:
    table = "\n".join(f"| `{code}` | {status} | {title} |" for code, (status, title) in CODES.items())
    return _obj({
        "type": _str(f"`{PROBLEM_TYPE_BASE}` + the code in lower case with dashes.", format="uri"),
        "title": _str("Short summary of the code (may be reworded; switch on `code`)."),
        "status": _int("The HTTP status.", minimum=400, maximum=599),
        "code": {"type": "string", "enum": list(CODES), "description": "Stable error code."},
        "detail": _str("What went wrong with this request (absent when there is nothing to add)."),
        "instance": _str("The request path."),
        "param": _str("INVALID_PARAMS: the parameter at fault."),
        "image_code": _str("IMAGE_REJECTED: why the image was refused (e.g. UNSUPPORTED_FORMAT, IMAGE_TOO_LARGE, "
                           "TRUNCATED_IMAGE, VIRUS_DETECTED)."),
        "failure_code": _str("PIPELINE_FAILED: the pipeline's error code."),
        "reason": _str("INVALID_TOKEN: why the token was refused (expired, not_yet_valid, issued_in_future, "
                       "lifetime_too_long, wrong_issuer, wrong_audience, algorithm_not_accepted, unknown_key, "
                       "bad_signature, missing_claim, invalid_tenant, malformed, rejected)."),
        "request_id": {**UUID, "description": "IMAGE_REJECTED / PIPELINE_FAILED: the request that ended so."},
        "checks": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "UNAVAILABLE from /readyz: `ok` or `unavailable: <reason>` per backing service."},
    }, ["type", "title", "status", "code", "instance"], description=(
        "An RFC 9457 problem (`application/problem+json`). Clients switch on `code`; the stable codes are:\n\n"
        "| code | status | meaning |\n|---|---|---|\n" + table))


def _box(description: str) -> Schema:
    return _obj({k: {"type": "number"} for k in ("x1", "y1", "x2", "y2")}, ["x1", "y1", "x2", "y2"],
                description=description)


def _detection_schemas() -> dict[str, Schema]:
    sha = {"type": "string", "pattern": SHA256_RE.pattern}
    error = _nullable(_obj({"code": _nullable(_str("Stable error code (e.g. VIRUS_DETECTED).")),
                            "message": _nullable(_str("Human-readable detail."))}, ["code", "message"]))
    result = _obj({
        "request_id": {**UUID, "description": "The request this result answers."},
        "status": {"type": "string", "enum": ["OK", "REJECTED", "FAILED"],
                   "description": "OK: detections are valid. REJECTED: the input was refused. FAILED: processing "
                                  "failed after retries."},
        "image": _obj({"id": {**_nullable(sha), "description": "sha256 of the image bytes (the image id)."},
                       "width": _nullable(_int("Width of the oriented image in pixels.")),
                       "height": _nullable(_int("Height of the oriented image in pixels."))},
                      ["id", "width", "height"]),
        "model": _obj({"name": _nullable(_str("Model name.")), "version": _nullable(_int("Model version."))},
                      ["name", "version"]),
        "detections": {"type": "array", "items": _ref("Detection"), "description": "Highest score first."},
        "timings_ms": {"type": "object", "additionalProperties": {"type": "number"},
                       "description": "Milliseconds per pipeline stage."},
        "cache_hit": {"type": "boolean", "description": "Answered from the result cache without running the model."},
        "review": {"type": "boolean", "description": "The tenant's content policy flagged the image for review."},
        "job_id": {**_nullable(UUID), "description": "The batch job of the request, if any."},
        "error": {**error, "description": "Why the request was REJECTED or FAILED; null when OK."},
        "completed_at": _nullable(TIMESTAMP),
    }, ["request_id", "status", "image", "model", "detections", "timings_ms", "cache_hit", "job_id", "error",
        "completed_at"], description="The outcome of one request.")
    result["if"] = {"properties": {"status": {"const": "OK"}}}
    result["then"] = {"properties": {"error": {"type": "null"}}}
    result["else"] = {"properties": {"error": {"type": "object"}}}
    pending = _obj({
        "request_id": UUID,
        "status": {"type": "string", "enum": ["PENDING", "FAILED"],
                   "description": "PENDING: still in the pipeline, poll again. FAILED: the gateway could not submit "
                                  "it (error.code SUBMIT_FAILED)."},
        "submitted_at": _nullable(TIMESTAMP),
        "job_id": _nullable(UUID),
        "error": _obj({"code": {"type": "string", "const": "SUBMIT_FAILED"}, "message": {"type": "string"}},
                      ["code", "message"]),
    }, ["request_id", "status", "submitted_at", "job_id"], description="A request without a result yet.")
    pending["if"] = {"properties": {"status": {"const": "FAILED"}}}
    pending["then"] = {"required": ["error"]}
    pending["else"] = {"not": {"required": ["error"]}}
    coco = _obj({
        "image_id": {**UUID, "description": "The request id."},
        "category_id": _int("Class index.", minimum=0),
        "category_name": _str("Class name."),
        "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                 "description": "[x, y, width, height] in pixels."},
        "area": {"type": "number", "description": "width * height in pixels."},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    }, ["image_id", "category_id", "category_name", "bbox", "area", "score"],
        description="One detection in the COCO results format (what pycocotools' loadRes reads).")
    return {
        "Box": _box("Pixels of the oriented image, x1, y1 top left to x2, y2 bottom right."),
        "BoxNormalized": _box("The box divided by the image's width and height."),
        "Detection": _obj({
            "class_id": _int("Class index in the model's class list.", minimum=0),
            "class_name": _str("Class name."),
            "score": {"type": "number", "minimum": 0, "maximum": 1, "description": "Confidence."},
            "box": _ref("Box"),
            "box_normalized": _ref("BoxNormalized"),
        }, ["class_id", "class_name", "score", "box", "box_normalized"]),
        "DetectionResult": result,
        "Pending": pending,
        "CocoResult": coco,
        "CocoResults": {"type": "array", "items": _ref("CocoResult"),
                        "description": "A result as COCO detections (`format=coco`)."},
    }


def _request_schemas(settings: GatewaySettings) -> dict[str, Schema]:
    p = settings.pipeline
    model_name = {"type": "string", "pattern": MODEL_NAME_PATTERN, "maxLength": MODEL_NAME_MAX,
                  "description": "A model in the repository."}
    model_version = _nullable(_int("A model version; null: the newest.", minimum=1, maximum=MAX_MODEL_VERSION))
    upload_id = {"type": "string", "pattern": UPLOAD_ID_RE.pattern, "description": "From POST /v1/uploads."}
    key = {"type": "string", "pattern": OBJECT_KEY_RE.pattern, "not": {"pattern": r"(^|/)\.\.(/|$)"},
           "description": "`<tenant>/<name>` in the uploads bucket; another tenant's key is not found."}
    return {
        "DetectParams": {
            "type": "object",
            "description": "Detection parameters; null or absent fields take the defaults (score threshold "
                           f"{p.default_score_threshold:g}, at most {p.default_max_detections} detections, every "
                           f"class, model {p.default_model}).",
            "properties": {
                "score_threshold": _nullable({"type": "number", "minimum": p.min_score, "maximum": 1}),
                "max_detections": _nullable(_int("Most detections returned.", minimum=1,
                                                 maximum=p.max_detections_limit)),
                "classes": {"anyOf": [{"type": "array", "items": {"type": "string"}, "maxItems": MAX_CLASSES},
                                      {"type": "string"}, {"type": "null"}],
                            "description": "Class names to keep (a list, or one comma-separated string); names the "
                                           "model does not know are refused."},
                "model": model_name,
                "model_version": model_version,
            },
        },
        "ModelSelector": {"type": "object", "properties": {"name": model_name, "version": model_version},
                          "description": "Overrides params.model / params.model_version."},
        "ImageRef": {
            "type": "object",
            "description": "An image already in the uploads bucket: `upload_id` (wins when both are given) or `key`.",
            "anyOf": [{"required": ["upload_id"], "properties": {"upload_id": upload_id}},
                      {"required": ["key"], "properties": {"key": key}, "not": {"required": ["upload_id"]}}],
        },
        "DetectJsonRequest": {
            "type": "object", "required": ["image"],
            "properties": {"image": _ref("ImageRef"),
                           "params": {"anyOf": [_ref("DetectParams"), {"type": "null"}]},
                           "model": {"anyOf": [_ref("ModelSelector"), {"type": "null"}]}},
        },
        "DetectMultipartRequest": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary",
                                     "description": "JPEG, PNG, WebP, BMP or TIFF bytes (sniffed, not trusted)."},
                           "params": {**_ref("DetectParams"),
                                      "description": "A JSON object; its fields override the query's."}},
        },
        "UploadRequest": {
            "type": "object", "required": ["files"],
            "properties": {"files": {
                "type": "array", "minItems": 1, "maxItems": MAX_UPLOAD_FILES,
                "items": {"type": "object", "required": ["content_type", "content_length"], "properties": {
                    "content_type": {"type": "string", "enum": sorted(UPLOAD_CONTENT_TYPES)},
                    "content_length": _int("Exact size of the upload in bytes.", minimum=1,
                                           maximum=p.image_max_bytes)}}}},
        },
        "JobRequest": {
            "type": "object", "required": ["items"],
            "properties": {"items": {"type": "array", "items": _ref("ImageRef"), "minItems": 1,
                                     "maxItems": settings.job_max_items},
                           "params": {"anyOf": [_ref("DetectParams"), {"type": "null"}]},
                           "model": {"anyOf": [_ref("ModelSelector"), {"type": "null"}]}},
        },
    }


def _resource_schemas(settings: GatewaySettings) -> dict[str, Schema]:
    links = _obj({"self": {"type": "string", "format": "uri-reference"},
                  "results": {"type": "string", "format": "uri-reference"}}, ["self", "results"])
    result_item = {"oneOf": [_ref("DetectionResult"), _ref("CocoResults")]}
    return {
        "UploadResponse": _obj({"uploads": {"type": "array", "items": _obj({
            "upload_id": {"type": "string", "pattern": UPLOAD_ID_RE.pattern},
            "method": {"type": "string", "const": "PUT"},
            "url": _str("Pre-signed S3 URL; it binds the size, the type and the headers below.", format="uri"),
            "headers": {"type": "object", "additionalProperties": {"type": "string"},
                        "required": ["Content-Type", "Content-Length", f"x-amz-meta-{SUBMITTED_MARK}"],
                        "description": "Send exactly these headers with the PUT."},
            "expires_at": TIMESTAMP,
        }, ["upload_id", "method", "url", "headers", "expires_at"])}}, ["uploads"]),
        "JobCreated": _obj({
            "job_id": UUID, "status": {"type": "string", "const": "RUNNING"},
            "total": _int("Items in the job.", minimum=1, maximum=settings.job_max_items),
            "request_ids": {"type": "array", "items": UUID, "description": "One per item, in item order."},
            "links": links,
        }, ["job_id", "status", "total", "request_ids", "links"]),
        "JobStatus": _obj({
            "job_id": UUID, "status": {"type": "string", "enum": ["RUNNING", "COMPLETED"]},
            "total": _int("Items in the job.", minimum=0), "done": _int("Items with a result.", minimum=0),
            "pending": _int("Items without a result yet.", minimum=0),
            "progress": {"type": "number", "minimum": 0, "maximum": 1, "description": "done / total."},
            "counts": _obj({s: {"type": "integer", "minimum": 0} for s in ("OK", "REJECTED", "FAILED")},
                           ["OK", "REJECTED", "FAILED"]),
            "model": _nullable(_str("Model name.")), "created_at": _nullable(TIMESTAMP),
            "completed_at": _nullable(TIMESTAMP), "links": links,
        }, ["job_id", "status", "total", "done", "pending", "progress", "counts", "model", "created_at",
            "completed_at", "links"]),
        "JobResultsPage": _obj({
            "job_id": UUID,
            "items": {"type": "array", "items": result_item, "maxItems": settings.page_size_max,
                      "description": "DetectionResults, or with format=coco one COCO list per result, in request-id "
                                     "order."},
            "next_page_token": _nullable(_str("Pass as page_token for the next page; null on the last page. A page "
                                              "may end before page_size items when its size in bytes reaches the "
                                              "gateway's bound.")),
        }, ["job_id", "items", "next_page_token"]),
        "DeleteResult": _obj({
            "image_id": {"type": "string", "pattern": SHA256_RE.pattern}, "deleted_at": TIMESTAMP,
            "requests_deleted": _int("Results removed.", minimum=0),
            "objects_deleted": _int("Stored objects removed.", minimum=0),
        }, ["image_id", "deleted_at", "requests_deleted", "objects_deleted"]),
        "AuditEvent": _obj({
            "event_time": TIMESTAMP, "subject": _nullable(_str("The token's subject.")),
            "action": _nullable(_str("e.g. detect, jobs.create, images.delete.")),
            "resource": _nullable(_str("The id the call named.")),
            "outcome": _nullable({"type": "string", "enum": ["success", "denied", "rejected", "error"]}),
            "status": _nullable(_int("HTTP status.")), "request_id": _nullable(_str("The request made, if any.")),
            "detail": _nullable(_str("The problem code, if any.")),
        }, ["event_time", "subject", "action", "resource", "outcome", "status", "request_id", "detail"]),
        "AuditPage": _obj({"tenant": {"type": "string"}, "day": _str("The UTC day, YYYY-MM-DD."),
                           "events": {"type": "array", "items": _ref("AuditEvent"), "maxItems": AUDIT_LIMIT_MAX,
                                      "description": "Newest first."}}, ["tenant", "day", "events"]),
        "TenantErasure": _obj({
            "tenant": {"type": "string"}, "erased_at": TIMESTAMP,
            "rows_deleted": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                             "description": "Rows (partitions) deleted per table."},
            "objects_deleted": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                                "description": "Objects removed per bucket."},
        }, ["tenant", "erased_at", "rows_deleted", "objects_deleted"]),
        "TenantPolicyRequest": _obj({
            "hidden_classes": {"type": "array", "items": _str("A class name."), "maxItems": 1000, "uniqueItems": True,
                               "description": "Classes never returned for this tenant."},
            "review_classes": {"type": "array", "items": _str("A class name."), "maxItems": 1000, "uniqueItems": True,
                               "description": "Classes whose presence flags the image for review."},
            "review_retention_days": {**_nullable({"type": "integer", "enum": list(REVIEW_RETENTION_DAYS)}),
                                      "description": "Days a flagged image's review copy is kept; null: the "
                                                     "deployment's default."},
        }, [], description="The tenant's content policy (replaces the current one)."),
        "TenantPolicy": _obj({
            "tenant": {"type": "string"},
            "hidden_classes": {"type": "array", "items": {"type": "string"}},
            "review_classes": {"type": "array", "items": {"type": "string"}},
            "review_retention_days": _nullable({"type": "integer"}),
            "revision": _int("Changes so far (0: never set).", minimum=0),
            "updated_by": _nullable(_str("Who made the last change.")),
            "updated_at": _nullable(TIMESTAMP),
            "applies_within_s": {"type": "number", "description": "A change applies everywhere within this time."},
        }, ["tenant", "hidden_classes", "review_classes", "review_retention_days", "revision", "updated_by",
            "updated_at", "applies_within_s"]),
        "Live": _obj({"status": {"type": "string", "const": "live"}}, ["status"]),
        "Ready": _obj({"status": {"type": "string", "const": "ready"},
                       "checks": {"type": "object", "additionalProperties": {"type": "string", "const": "ok"}}},
                      ["status", "checks"]),
    }


# ---------------------------------------------------------------------------------------------- headers


_HEADERS: dict[str, tuple[str, Schema]] = {
    "RateLimit-Limit": ("Calls the tenant's bucket holds (burst).", {"type": "integer", "minimum": 1}),
    "RateLimit-Remaining": ("Calls left in the bucket now.", {"type": "integer", "minimum": 0}),
    "RateLimit-Reset": ("Seconds until the bucket is full again.", {"type": "integer", "minimum": 0}),
    "Retry-After": ("Seconds to wait before retrying.", {"type": "integer", "minimum": 1}),
    "Location": ("Where to poll the resource.", {"type": "string", "format": "uri-reference"}),
    "X-Request-Id": ("The request id.", UUID),
    "WWW-Authenticate": ("RFC 6750 bearer challenge.", {"type": "string"}),
}


def _headers(*names: str, optional: tuple[str, ...] = ()) -> dict[str, Schema]:
    """Header objects; ``names`` are sent on every such response, ``optional`` ones only sometimes."""
    return {n: {"description": _HEADERS[n][0], "required": n not in optional, "schema": _HEADERS[n][1]}
            for n in (*names, *optional)}


RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


# ---------------------------------------------------------------------------------------------- responses


# Problem responses by status: (component name, description, headers).
_PROBLEM_RESPONSES: dict[int, tuple[str, str, dict[str, Schema]]] = {
    400: ("BadRequest", "The request or a parameter is malformed or out of range, or a JSON body nests deeper "
                        "than the gateway accepts (JSON_TOO_DEEP, checked before parsing).", {}),
    401: ("Unauthenticated", "No valid bearer token.", _headers("WWW-Authenticate")),
    403: ("Forbidden", "The token lacks the scope this call needs.", _headers("WWW-Authenticate")),
    404: ("NotFound", "No such resource for this tenant.", {}),
    413: ("PayloadTooLarge", "The body is over the route's size limit (an image for /v1/detect, JSON elsewhere): "
                             "refused on its declared Content-Length before it is read, or as soon as a body "
                             "without one passes the limit.", {}),
    415: ("UnsupportedMediaType", "The body is not a supported image or request type.", {}),
    422: ("Unprocessable", "The image was rejected, the job has too many items, or the Idempotency-Key was used "
                           "with another request.", _headers(optional=("X-Request-Id",))),
    429: ("TooManyRequests", "The tenant's rate limit (RateLimit-* headers sent), its daily quota (Retry-After: "
                             "seconds until the UTC day ends) or its share of the sync capacity (FAIR_SHARE_EXCEEDED) "
                             "is used up.",
          _headers("Retry-After", optional=RATE_HEADERS)),
    500: ("InternalError", "A bug; the gateway log has the details.", {}),
    502: ("BadGateway", "The pipeline failed this request.", _headers(optional=("X-Request-Id",))),
    503: ("ServiceUnavailable", "Overloaded (sync calls in flight, online backlog, request bodies held, quota "
                                "contention) or a backing service is unavailable; retry after Retry-After.",
          _headers("Retry-After")),
}


def _problem_content(status: int, extra: Schema | None = None) -> dict[str, Any]:
    codes = [code for code, (s, _title) in CODES.items() if s == status]
    narrowed: Schema = {"properties": {"status": {"const": status}, "code": {"enum": codes}}}
    if extra:
        narrowed = {**narrowed, **extra}
    return {PROBLEM_CONTENT_TYPE: {"schema": {"allOf": [_ref("Problem"), narrowed]}}}


def _problem_responses() -> dict[str, Schema]:
    out = {name: {"description": desc, "headers": headers, "content": _problem_content(status)}
           for status, (name, desc, headers) in _PROBLEM_RESPONSES.items()}
    for response in out.values():
        if not response["headers"]:
            del response["headers"]
    out["NotReady"] = {"description": "A backing service does not answer.", "headers": _headers("Retry-After"),
                       "content": _problem_content(503, {"required": ["checks"]})}
    return out


def _json_response(description: str, schema: Schema, headers: dict[str, Schema] | None = None,
                   links: dict[str, Schema] | None = None) -> Schema:
    out: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    if links:
        out["links"] = links
    return out


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(s): _ref(_PROBLEM_RESPONSES[s][0], "responses") for s in (*statuses, 500)}


# ---------------------------------------------------------------------------------------------- parameters


def _parameters(settings: GatewaySettings) -> dict[str, Schema]:
    p = settings.pipeline
    timeout_max = int(settings.sync_timeout_max_s * 1000)

    def query(name: str, schema: Schema, description: str) -> Schema:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    def path(schema: Schema, description: str) -> Schema:
        return {"name": "id", "in": "path", "required": True, "schema": schema, "description": description}

    ignored_for_json = " Ignored when the body is application/json (send `params` there)."
    return {
        "ScoreThreshold": query("score_threshold", {"type": "number", "minimum": p.min_score, "maximum": 1},
                                f"Lowest score kept (default {p.default_score_threshold:g})." + ignored_for_json),
        "MaxDetections": query("max_detections", {"type": "integer", "minimum": 1, "maximum": p.max_detections_limit},
                               f"Most detections returned (default {p.default_max_detections})." + ignored_for_json),
        "Classes": query("classes", {"type": "string"},
                         "Comma-separated class names to keep (default: all)." + ignored_for_json),
        "Model": query("model", {"type": "string", "pattern": MODEL_NAME_PATTERN, "maxLength": MODEL_NAME_MAX},
                       f"Model name (default {p.default_model})." + ignored_for_json),
        "ModelVersion": query("model_version", {"type": "integer", "minimum": 1, "maximum": MAX_MODEL_VERSION},
                              "Model version (default: the newest)." + ignored_for_json),
        "TimeoutMs": query("timeout_ms", {"type": "integer", "minimum": 1, "maximum": timeout_max,
                                          "default": int(settings.sync_timeout_s * 1000)},
                           "How long to wait for the result before answering 202."),
        "Format": query("format", {"type": "string", "enum": list(FORMATS), "default": "json"},
                        "json: DetectionResult objects; coco: COCO detections lists."),
        "PageSize": query("page_size", {"type": "integer", "minimum": 1, "maximum": settings.page_size_max,
                                        "default": settings.page_size_default}, "Results per page."),
        "PageToken": query("page_token", {"type": "string"},
                           "next_page_token of the previous page; empty or absent: the first page."),
        "AuditDay": query("day", {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                          "UTC day, YYYY-MM-DD (default: today)."),
        "AuditLimit": query("limit", {"type": "integer", "minimum": 1, "maximum": AUDIT_LIMIT_MAX, "default": 100},
                            "Most events returned."),
        "Traceparent": {"name": "traceparent", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "W3C trace context; the pipeline continues this trace (a malformed value "
                                       "starts a new one)."},
        "RequestId": path({"type": "string", "pattern": ID_RE.pattern}, "A request id."),
        "JobId": path({"type": "string", "pattern": ID_RE.pattern}, "A job id."),
        "ImageId": path({"type": "string", "pattern": SHA256_RE.pattern}, "The sha256 (hex) of the image bytes."),
        "Tenant": {"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"},
                   "description": "The caller's own tenant (another tenant is 404)."},
    }


def _idempotency_key(bounded: bool) -> Schema:
    schema: Schema = {"type": "string"}
    if bounded:
        schema.update(minLength=1, maxLength=IDEMPOTENCY_KEY_MAX)
    return {"name": "Idempotency-Key", "in": "header", "required": False, "schema": schema,
            "description": "A retry with the same key and the same request gets the same resource for 24 hours; "
                           "the same key with another request is refused (422 IDEMPOTENCY_KEY_REUSED)."}


# ---------------------------------------------------------------------------------------------- paths


def _op(op_id: str, tag: str, summary: str, description: str, responses: dict[str, Schema], *,
        scope: str | None, parameters: list[Schema] | None = None, body: Schema | None = None) -> Schema:
    out: Schema = {"operationId": op_id, "tags": [tag], "summary": summary, "description": description}
    # OpenAPI 3.1 lets a non-OAuth scheme list the roles it needs; the token's `scope` claim must hold it.
    out["security"] = [{"bearerAuth": [scope]}] if scope else []
    if parameters:
        out["parameters"] = parameters
    if body:
        out["requestBody"] = body
    out["responses"] = responses
    return out


def _link(name: str, operation_id: str, pointer: str) -> dict[str, Schema]:
    """An OpenAPI link: the next call's path `id` from this response's body (fuzzers follow these)."""
    return {name: {"operationId": operation_id, "parameters": {"id": f"$response.body#/{pointer}"}}}


def _json_body(schema: Schema) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _detect_op(settings: GatewaySettings) -> Schema:
    raw = {t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_IMAGE_TYPES}
    body = {"required": True, "content": {
        **raw,
        "multipart/form-data": {"schema": _ref("DetectMultipartRequest"),
                                "encoding": {"params": {"contentType": "application/json"}}},
        "application/json": {"schema": _ref("DetectJsonRequest")},
    }}
    params = [_ref(n, "parameters") for n in ("ScoreThreshold", "MaxDetections", "Classes", "Model", "ModelVersion",
                                              "TimeoutMs", "Format", "Traceparent")]
    params.append(_idempotency_key(bounded=True))
    ok = {"oneOf": [_ref("DetectionResult"), _ref("CocoResults")]}
    return _op("detect", "detection", "Detect objects in one image", (
        "Submits one image to the online lane and waits for its result (up to `timeout_ms`). The image comes as "
        "the raw body (any `image/*` type or application/octet-stream; the format is sniffed from the bytes), as "
        "the `image` part of a multipart form (with an optional JSON `params` part that overrides the query), or "
        "as a JSON reference to an uploaded object. Answers 200 with the result, or 202 with a Location to poll "
        "when the deadline passes first. A rejected image is a 422 problem (`image_code` says why), a failure in "
        "the pipeline a 502 problem. Counts one image against the daily quota. Refused fast, before the body is "
        f"read: 503 OVERLOADED when {settings.max_inflight} sync calls are in flight on the instance or the online "
        f"backlog is over {settings.max_online_lag_hard} records; 429 FAIR_SHARE_EXCEEDED when this tenant holds "
        "its share of the instance's sync calls (capacity / (active tenants + 1), at least "
        f"{settings.sync_share_floor}) or, while the backlog is over {settings.max_online_lag}, sent more than its "
        "part of the recent calls. Other tenants are admitted meanwhile."),
        {"200": _json_response("The result (status OK).", ok, _headers("X-Request-Id", *RATE_HEADERS),
                               {**_link("GetRequest", "getRequest", "request_id"),
                                **_link("DeleteImage", "deleteImage", "image/id")}),
         "202": _json_response("The deadline passed first: poll Location.", _ref("Pending"),
                               _headers("Location", "Retry-After", "X-Request-Id", *RATE_HEADERS),
                               _link("GetRequest", "getRequest", "request_id")),
         **_errors(400, 401, 403, 404, 413, 415, 422, 429, 502, 503)},
        scope="detect:write", parameters=params, body=body)


def _paths(settings: GatewaySettings) -> dict[str, Schema]:
    rate = _headers(*RATE_HEADERS)
    job_links = {**_link("GetJob", "getJob", "job_id"), **_link("ListJobResults", "listJobResults", "job_id"),
                 **_link("GetFirstRequest", "getRequest", "request_ids/0")}
    return {
        "/v1/detect": {"post": _detect_op(settings)},
        "/v1/requests/{id}": {"get": _op(
            "getRequest", "detection", "Get a request's result",
            "The result of a detect call or job item; a request still in the pipeline answers 200 with a Pending "
            "body (status PENDING, with Retry-After). Results of a deleted image are not found.",
            {"200": _json_response("The result, or Pending.",
                                   {"oneOf": [_ref("DetectionResult"), _ref("CocoResults"), _ref("Pending")]},
                                   _headers(*RATE_HEADERS, optional=("Retry-After",))),
             **_errors(400, 401, 403, 404, 429, 503)},
            scope="results:read", parameters=[_ref("RequestId", "parameters"), _ref("Format", "parameters")])},
        "/v1/uploads": {"post": _op(
            "createUploads", "uploads", "Get pre-signed upload URLs",
            f"One pre-signed PUT URL per file, valid {settings.upload_url_ttl_s} s. The URL binds the content "
            "type and length: upload exactly those bytes with exactly the returned headers, then name the "
            "`upload_id` in a detect call or a job.",
            {"201": _json_response("The upload URLs, in request order.", _ref("UploadResponse"), rate),
             **_errors(400, 401, 403, 413, 415, 429, 503)},
            scope="detect:write", body=_json_body(_ref("UploadRequest")))},
        "/v1/jobs": {"post": _op(
            "createJob", "jobs", "Create a batch job",
            f"Submits up to {settings.job_max_items} uploaded images to the batch lane with one set of params. "
            "Counts every item against the daily quota. The items' objects are not checked here: a missing one "
            "ends as a FAILED or REJECTED result.",
            {"202": _json_response("The job was accepted.", _ref("JobCreated"), _headers("Location", *RATE_HEADERS),
                                   job_links),
             **_errors(400, 401, 403, 404, 413, 422, 429, 503)},
            scope="detect:write", parameters=[_idempotency_key(bounded=False)],
            body=_json_body(_ref("JobRequest")))},
        "/v1/jobs/{id}": {"get": _op(
            "getJob", "jobs", "Get a job's progress", "Counts of the job's results by status.",
            {"200": _json_response("The job.", _ref("JobStatus"), rate), **_errors(401, 403, 404, 429, 503)},
            scope="results:read", parameters=[_ref("JobId", "parameters")])},
        "/v1/jobs/{id}/results": {"get": _op(
            "listJobResults", "jobs", "Page through a job's results",
            "Results in request-id order; pages never overlap. Items without a result yet are not listed. A page "
            f"holds at most page_size items and stops before its body passes {settings.page_max_bytes} bytes "
            "(at least one item): follow next_page_token for the rest.",
            {"200": _json_response("One page.", _ref("JobResultsPage"), rate),
             **_errors(400, 401, 403, 404, 429, 503)},
            scope="results:read", parameters=[_ref(n, "parameters") for n in ("JobId", "Format", "PageSize",
                                                                              "PageToken")])},
        "/v1/images/{id}": {"delete": _op(
            "deleteImage", "images", "Delete an image and its results",
            "Removes the image object (and the uploads it came from), every result and cache entry of it, and "
            "records a tombstone so a result still in flight is never served.",
            {"200": _json_response("What was deleted.", _ref("DeleteResult"), rate),
             **_errors(401, 403, 404, 429, 503)},
            scope="detect:write", parameters=[_ref("ImageId", "parameters")])},
        "/v1/tenants/{tenant}/data": {"delete": _op(
            "eraseTenant", "tenants", "Erase everything of the tenant",
            "Removes every object under the tenant's prefix in every bucket and every row of the tenant in every "
            "tenant-keyed table; work still in flight is never stored. The audit log keeps the erasure.",
            {"200": _json_response("What was erased.", _ref("TenantErasure"), rate),
             **_errors(401, 403, 404, 429, 503)},
            scope="admin", parameters=[_ref("Tenant", "parameters")])},
        "/v1/tenants/{tenant}/policy": {
            "get": _op("getTenantPolicy", "tenants", "Read the tenant's content policy",
                       "Hidden classes, review classes and the review copies' retention.",
                       {"200": _json_response("The policy.", _ref("TenantPolicy"), rate),
                        **_errors(401, 403, 404, 429, 503)},
                       scope="admin", parameters=[_ref("Tenant", "parameters")]),
            "put": _op("putTenantPolicy", "tenants", "Replace the tenant's content policy",
                       f"Applies to every result made or served from the cache after at most "
                       f"{settings.pipeline.policy_cache_s:g} s (the stages' policy cache). Audited.",
                       {"200": _json_response("The new policy.", _ref("TenantPolicy"), rate),
                        **_errors(400, 401, 403, 404, 413, 429, 503)},
                       scope="admin", parameters=[_ref("Tenant", "parameters")],
                       body=_json_body(_ref("TenantPolicyRequest")))},
        "/v1/audit": {"get": _op(
            "listAuditEvents", "audit", "Read the tenant's audit log",
            "One event per authenticated call of the tenant, newest first, for one UTC day.",
            {"200": _json_response("The events.", _ref("AuditPage"), rate), **_errors(400, 401, 403, 429, 503)},
            scope="admin", parameters=[_ref("AuditDay", "parameters"), _ref("AuditLimit", "parameters")])},
        "/openapi.json": {"get": _op(
            "getOpenApi", "operations", "This document", "The OpenAPI 3.1 document of this gateway.",
            {"200": _json_response("The document.", {"type": "object"}), **_errors()}, scope=None)},
        "/livez": {"get": _op(
            "livez", "operations", "Liveness", "Answers while the process serves HTTP.",
            {"200": _json_response("Live.", _ref("Live")), **_errors()}, scope=None)},
        "/readyz": {"get": _op(
            "readyz", "operations", "Readiness",
            "Ready when the last background probe (every 2 s) found Kafka, MinIO and Cassandra each answering "
            "within 2 s. Answered from memory, never behind a backing service or an overload gate.",
            {"200": _json_response("Ready.", _ref("Ready")), "503": _ref("NotReady", "responses"), **_errors()},
            scope=None)},
        "/metrics": {"get": _op(
            "metrics", "operations", "Prometheus metrics", "The gateway's metrics in the Prometheus text format.",
            {"200": {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
             **_errors()}, scope=None)},
    }


# ---------------------------------------------------------------------------------------------- document


def spec(settings: GatewaySettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a gateway running with ``settings``."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "detectflow",
            "version": _version(),
            "description": (
                "Object detection over HTTP. Calls need a bearer JWT (RS256, from the configured OpenID provider or "
                "signed by a key of the configured JWKS; HS256 only in development mode) carrying the tenant and "
                "the scopes "
                f"({', '.join(SCOPES)}; admin implies the others). Errors are RFC 9457 problems with a stable "
                "`code` (see the Problem schema); an unsupported method answers 405 METHOD_NOT_ALLOWED with Allow. "
                f"Each tenant may make {settings.rate_per_s:g} calls per second (bursts of {settings.rate_burst}) "
                f"per gateway instance and submit {settings.daily_quota} images per UTC day. Bodies are limited to "
                f"{settings.max_body_bytes} bytes, images to {settings.pipeline.image_max_bytes} bytes, "
                f"{settings.pipeline.image_max_pixels} pixels and {settings.pipeline.image_max_side} pixels a side."),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "tags": [{"name": "detection", "description": "Synchronous detection and results."},
                 {"name": "uploads", "description": "Pre-signed uploads for large images and jobs."},
                 {"name": "jobs", "description": "Batch jobs."},
                 {"name": "images", "description": "Image deletion."},
                 {"name": "tenants", "description": "Tenant erasure and content policy (admin)."},
                 {"name": "audit", "description": "The tenant's audit log."},
                 {"name": "operations", "description": "Health, metrics and this document."}],
        "paths": _paths(settings),
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "An RS256 JWT access token with `iss`, `aud`, `sub`, `iat` and `exp` (lifetime at most "
                               f"{settings.max_token_lifetime_s} s), the tenant claim `{settings.tenant_claim}` and "
                               "`scope`; refusals are 401 INVALID_TOKEN with a `reason`."}},
            "schemas": {"Problem": _problem_schema(), **_detection_schemas(), **_request_schemas(settings),
                        **_resource_schemas(settings)},
            "parameters": _parameters(settings),
            "responses": _problem_responses(),
        },
    }
