"""Errors as RFC 9457 problem details (application/problem+json) with stable codes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

PROBLEM_TYPE_BASE = "https://detectflow.dev/problems/"
CONTENT_TYPE = "application/problem+json"

# Stable codes -> (HTTP status, title). Clients switch on `code`; titles may be reworded.
# Every 429 and 503 carries Retry-After (integer seconds): the project's clients wait that long and retry.
DEFAULT_RETRY_AFTER_S = 1

CODES: dict[str, tuple[int, str]] = {
    "INVALID_REQUEST": (400, "The request is malformed"),
    "INVALID_PARAMS": (400, "A parameter is out of range or of the wrong type"),
    "JSON_TOO_DEEP": (400, "The JSON body nests deeper than the gateway accepts"),
    "UNAUTHENTICATED": (401, "A bearer token is required"),
    "INVALID_TOKEN": (401, "The bearer token is not valid"),
    "INSUFFICIENT_SCOPE": (403, "The token lacks the scope this call needs"),
    "NOT_FOUND": (404, "No such resource"),
    "METHOD_NOT_ALLOWED": (405, "Method not allowed on this resource"),
    "BODY_TOO_LARGE": (413, "The request body is too large"),
    "UNSUPPORTED_MEDIA_TYPE": (415, "The body is not a supported image or request type"),
    "IDEMPOTENCY_KEY_REUSED": (422, "The Idempotency-Key was used with a different request"),
    "IMAGE_REJECTED": (422, "The image was rejected"),
    "UPLOAD_MISMATCH": (422, "The uploaded object is not the upload that was signed"),
    "TOO_MANY_ITEMS": (422, "Too many items in one job"),
    "RATE_LIMITED": (429, "Too many requests"),
    "QUOTA_EXCEEDED": (429, "The daily quota is used up"),
    "FAIR_SHARE_EXCEEDED": (429, "This tenant holds its share of the sync capacity; retry later"),
    "INTERNAL": (500, "Internal error"),
    "PIPELINE_FAILED": (502, "The detection pipeline failed this request"),
    "OVERLOADED": (503, "The service is overloaded; retry later"),
    "UNAVAILABLE": (503, "A backing service is unavailable; retry later"),
}


class Problem(Exception):
    """Raised by handlers; the middleware turns it into a problem+json response."""

    def __init__(self, code: str, detail: str = "", *, headers: Mapping[str, str] | None = None,
                 status: int | None = None, **extra: Any):
        if code not in CODES:
            raise ValueError(f"unknown problem code {code}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.status = status or CODES[code][0]
        self.title = CODES[code][1]
        self.detail = detail
        self.headers = dict(headers or {})
        if self.status in (429, 503):
            self.headers.setdefault("Retry-After", str(DEFAULT_RETRY_AFTER_S))
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + self.code.lower().replace("_", "-"), "title": self.title,
                               "status": self.status, "code": self.code}
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        doc.update({k: v for k, v in self.extra.items() if v is not None})
        return doc

    def response(self, instance: str | None = None) -> web.Response:
        return web.Response(status=self.status, body=json.dumps(self.body(instance)).encode(),
                            content_type=CONTENT_TYPE, headers=self.headers)
