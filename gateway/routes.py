"""The route table: one row per operation of the API. gateway/app.py registers the handlers from it and
gateway/openapi.py generates the document from it and the contract (gateway/contract/), so a route
cannot be served undocumented, nor documented unserved.

Descriptions may name settings as ``{s.<field>}``: the document is written for the settings it is built with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway import handlers as h
from gateway.contract import bodies, params, replies, rules

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RATE = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
RAW_IMAGE_TYPES = (*rules.MEDIA_TYPES.values(), "application/octet-stream")


@dataclass(frozen=True)
class Answer:
    """One success response: its body's model (a list of models: one of them; None: no JSON body), the
    headers always sent, those sent only sometimes, and the links a client (or a fuzzer) may follow."""

    description: str
    body: type[BaseModel] | tuple[type[BaseModel], ...] | None
    headers: tuple[str, ...] = RATE
    optional_headers: tuple[str, ...] = ()
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (operationId, body pointer)
    media_type: str = "application/json"
    schema: dict[str, Any] | None = None  # instead of a model (the document itself, the metrics text)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    tag: str
    summary: str
    description: str
    scope: str | None  # None: public (no token)
    answers: dict[int, Answer]
    errors: tuple[int, ...] = ()  # problem+json statuses besides 500 (always possible)
    params: tuple[type[params.Query] | type[params.Path] | type[params.Headers], ...] = ()
    body: dict[str, type[BaseModel] | None] = field(default_factory=dict)  # media type -> model (None: bytes)
    body_encoding: dict[str, Any] = field(default_factory=dict)
    problem_responses: dict[int, str] = field(default_factory=dict)  # status -> a named problem response


AUTH_ERRORS = (401, 403, 429, 503)
_JOB_LINKS = {"GetJob": ("getJob", "job_id"), "ListJobResults": ("listJobResults", "job_id"),
              "GetFirstRequest": ("getRequest", "request_ids/0")}

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/detect", h.detect, "detect", "detection", "Detect objects in one image", (
        "Submits one image to the online lane and waits for its result (up to `timeout_ms`). The image comes as "
        "the raw body (any `image/*` type or application/octet-stream; the format is sniffed from the bytes), as "
        "the `image` part of a multipart form (with an optional JSON `params` part that overrides the query), or "
        "as a JSON reference to an uploaded object. Answers 200 with the result, or 202 with a Location to poll "
        "when the deadline passes first. A rejected image is a 422 problem (`image_code` says why), a failure in "
        "the pipeline a 502 problem. Counts one image against the daily quota. Refused fast, before the body is "
        "read: 503 OVERLOADED when {s.max_inflight} sync calls are in flight on the instance or the online "
        "backlog is over {s.max_online_lag_hard} records; 429 FAIR_SHARE_EXCEEDED when this tenant holds "
        "its share of the instance's sync calls (capacity / (active tenants + 1), at least "
        "{s.sync_share_floor}) or, while the backlog is over {s.max_online_lag}, sent more than its "
        "part of the recent calls. Other tenants are admitted meanwhile."),
        "detect:write",
        {200: Answer("The result (status OK).", (replies.DetectionResult, replies.CocoResults), ("X-Request-Id", *RATE),
                     links={"GetRequest": ("getRequest", "request_id"), "DeleteImage": ("deleteImage", "image/id")}),
         202: Answer("The deadline passed first: poll Location.", replies.Pending,
                     ("Location", "Retry-After", "X-Request-Id", *RATE), links={"GetRequest": ("getRequest",
                                                                                             "request_id")})},
        errors=(400, 404, 413, 415, 422, 502, *AUTH_ERRORS),
        params=(params.DetectQuery, params.SyncQuery, params.DetectHeaders),
        body={**dict.fromkeys(RAW_IMAGE_TYPES), "multipart/form-data": bodies.DetectMultipartRequest,
              "application/json": bodies.DetectJsonRequest},
        body_encoding={"multipart/form-data": {"params": {"contentType": "application/json"}}}),
    Route("GET", "/v1/requests/{id}", h.get_request, "getRequest", "detection", "Get a request's result",
          "The result of a detect call or job item; a request still in the pipeline answers 200 with a Pending "
          "body (status PENDING, with Retry-After). Results of a deleted image are not found.", "results:read",
          {200: Answer("The result, or Pending.", (replies.DetectionResult, replies.CocoResults, replies.Pending),
                       optional_headers=("Retry-After",))},
          errors=(400, 404, *AUTH_ERRORS), params=(params.RequestPath, params.FormatQuery)),
    Route("POST", "/v1/uploads", h.create_uploads, "createUploads", "uploads", "Get pre-signed upload URLs",
          "One pre-signed PUT URL per file, valid {s.upload_url_ttl_s} s. The URL binds the content type and "
          "length: upload exactly those bytes with exactly the returned headers, then name the `upload_id` in a "
          "detect call or a job.", "detect:write",
          {201: Answer("The upload URLs, in request order.", replies.UploadResponse)},
          errors=(400, 413, 415, *AUTH_ERRORS), body={"application/json": bodies.UploadRequest}),
    Route("POST", "/v1/jobs", h.create_job, "createJob", "jobs", "Create a batch job",
          "Submits up to {s.job_max_items} uploaded images to the batch lane with one set of params. Counts every "
          "item against the daily quota. The items' objects are not checked here: a missing one ends as a FAILED "
          "or REJECTED result.", "detect:write",
          {202: Answer("The job was accepted.", replies.JobCreated, ("Location", *RATE), links=_JOB_LINKS)},
          errors=(400, 404, 413, 422, *AUTH_ERRORS), params=(params.IdempotencyHeaders,),
          body={"application/json": bodies.JobRequest}),
    Route("GET", "/v1/jobs/{id}", h.get_job, "getJob", "jobs", "Get a job's progress",
          "Counts of the job's results by status.", "results:read", {200: Answer("The job.", replies.JobStatus)},
          errors=(404, *AUTH_ERRORS), params=(params.JobPath,)),
    Route("GET", "/v1/jobs/{id}/results", h.job_results, "listJobResults", "jobs", "Page through a job's results",
          "Results in request-id order; pages never overlap. Items without a result yet are not listed. A page "
          "holds at most page_size items and stops before its body passes {s.page_max_bytes} bytes (at least one "
          "item): follow next_page_token for the rest.", "results:read",
          {200: Answer("One page.", replies.JobResultsPage)},
          errors=(400, 404, *AUTH_ERRORS), params=(params.JobPath, params.ResultsQuery)),
    Route("DELETE", "/v1/images/{id}", h.delete_image, "deleteImage", "images", "Delete an image and its results",
          "Removes the image object (and the uploads it came from), every result and cache entry of it, and "
          "records a tombstone so a result still in flight is never served.", "detect:write",
          {200: Answer("What was deleted.", replies.DeleteResult)}, errors=(404, *AUTH_ERRORS),
          params=(params.ImagePath,)),
    Route("DELETE", "/v1/tenants/{tenant}/data", h.erase_tenant, "eraseTenant", "tenants",
          "Erase everything of the tenant",
          "Removes every object under the tenant's prefix in every bucket and every row of the tenant in every "
          "tenant-keyed table; work still in flight is never stored. The audit log keeps the erasure.", "admin",
          {200: Answer("What was erased.", replies.TenantErasure)}, errors=(404, *AUTH_ERRORS),
          params=(params.TenantPath,)),
    Route("GET", "/v1/tenants/{tenant}/policy", h.get_policy, "getTenantPolicy", "tenants",
          "Read the tenant's content policy", "Hidden classes, review classes and the review copies' retention.",
          "admin", {200: Answer("The policy.", replies.TenantPolicy)}, errors=(404, *AUTH_ERRORS),
          params=(params.TenantPath,)),
    Route("PUT", "/v1/tenants/{tenant}/policy", h.put_policy, "putTenantPolicy", "tenants",
          "Replace the tenant's content policy",
          "Applies to every result made or served from the cache after at most {s.pipeline.policy_cache_s:g} s "
          "(the stages' policy cache). Audited.", "admin", {200: Answer("The new policy.", replies.TenantPolicy)},
          errors=(400, 404, 413, *AUTH_ERRORS), params=(params.TenantPath,),
          body={"application/json": bodies.TenantPolicyRequest}),
    Route("GET", "/v1/audit", h.audit_events, "listAuditEvents", "audit", "Read the tenant's audit log",
          "One event per authenticated call of the tenant, newest first, for one UTC day.", "admin",
          {200: Answer("The events.", replies.AuditPage)}, errors=(400, *AUTH_ERRORS), params=(params.AuditQuery,)),
    Route("GET", "/openapi.json", h.openapi, "getOpenApi", "operations", "This document",
          "The OpenAPI 3.1 document of this gateway.", None,
          {200: Answer("The document.", None, (), schema={"type": "object"})}),
    Route("GET", "/livez", h.livez, "livez", "operations", "Liveness", "Answers while the process serves HTTP.",
          None, {200: Answer("Live.", replies.Live, ())}),
    Route("GET", "/readyz", h.readyz, "readyz", "operations", "Readiness",
          "Ready when the last background probe (every 2 s) found Kafka, MinIO and Cassandra each answering "
          "within 2 s. Answered from memory, never behind a backing service or an overload gate.", None,
          {200: Answer("Ready.", replies.Ready, ())}, errors=(503,), problem_responses={503: "NotReady"}),
    Route("GET", "/metrics", h.metrics, "metrics", "operations", "Prometheus metrics",
          "The gateway's metrics in the Prometheus text format.", None,
          {200: Answer("The metrics.", None, (), media_type="text/plain", schema={"type": "string"})}),
)
