"""Every JSON route answers through the app (middlewares, auth, the route table) with a body that validates
against the response schema the generated document gives for that status; refusals keep their codes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from config import GatewaySettings
from gateway.app import body_budget_middleware, problems_middleware
from gateway.auth import Principal
from gateway.limits import ByteBudget, FairShares, RateDecision
from gateway.openapi import document
from gateway.routes import ROUTES
from gateway.state import BODIES, DOCUMENT, GATEWAY, SETTINGS, Health

jsonschema = pytest.importorskip("jsonschema")

TENANT = "acme"
SHA = "ab" * 32
RID = str(uuid.uuid4())
JOB = str(uuid.uuid4())
PENDING, FAILED = str(uuid.uuid4()), str(uuid.uuid4())
STORED = {"request_id": RID, "tenant": TENANT, "status": "OK", "image_sha256": SHA, "image_width": 64,
          "image_height": 48, "model_name": "yolov4-tiny", "model_version": 1, "timings_ms": {"inference": 3.5},
          "detections": [{"class_id": 0, "class_name": "person", "score": 0.9,
                          "box": {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
                          "box_norm": {"x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}}],
          "error_code": None, "error_message": None, "job_id": None, "cache_hit": False,
          "completed_at": 1_700_000_000_000, "submitted_at": 1_699_999_999_000}


class Store:
    def __init__(self) -> None:
        self.policy: dict[str, Any] | None = None

    async def get_request(self, tenant: str, rid: str) -> Any:
        if rid == RID:
            return SimpleNamespace(result=STORED, status="OK", submitted_at=1, job_id=None, image_sha256=SHA,
                                   completed_at=2, source=f"uploads/{TENANT}/{SHA}")
        if rid in (PENDING, FAILED):
            return SimpleNamespace(result=None, status="FAILED" if rid == FAILED else "PENDING",
                                   submitted_at=1_700_000_000_000, job_id=None, image_sha256=None, completed_at=None)
        return None

    async def deleted_at_many(self, tenant: str, shas: Any) -> dict[str, int]:
        return {}

    async def get_policy(self, tenant: str) -> dict[str, Any] | None:
        return self.policy

    async def put_policy(self, tenant: str, **kw: Any) -> int:
        self.policy = {**{k: kw[k] for k in ("hidden_classes", "review_classes", "review_retention_days")},
                       "revision": 1, "updated_by": kw["subject"], "updated_at": kw["at_ms"]}
        return 1

    async def audit_events(self, tenant: str, day: str, limit: int) -> list[dict[str, Any]]:
        return [{"event_time": 1_700_000_000_000, "subject": "s", "action": "detect", "resource": None,
                 "outcome": "success", "status": 200, "request_id": RID, "detail": None}][:limit]

    async def get_job(self, tenant: str, job_id: str) -> Any:
        if job_id != JOB:
            return None
        return SimpleNamespace(counts=None, status="RUNNING", total=3, model_name="yolov4-tiny",
                               created_at=1_700_000_000_000, completed_at=None, published=True)

    async def job_status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
        return {"OK": 1, "FAILED": 1}

    async def image_request_ids(self, tenant: str, sha: str) -> list[str]:
        return [RID] if sha == SHA else []

    async def tombstone(self, *a: Any) -> None:
        pass

    async def delete_request(self, *a: Any) -> None:
        pass

    async def delete_image_rows(self, *a: Any) -> None:
        pass

    async def erase_tenant(self, tenant: str, subject: str, now: int) -> dict[str, int]:
        return {"requests": 2, "audit_log": 0}


class Objects:
    bucket = "uploads"

    def presigned_put(self, key: str, ctype: str, length: int) -> tuple[str, dict[str, str], int]:
        return (f"https://minio.test/uploads/{key}", {"Content-Type": ctype, "Content-Length": str(length),
                                                       "x-amz-meta-detectflow-submitted": "true"}, 1_700_000_900)

    async def exists(self, key: str) -> bool:
        return True

    async def remove(self, key: str) -> None:
        pass

    async def erase_prefix(self, prefix: str, buckets: Any) -> dict[str, int]:
        return dict.fromkeys(buckets, 1)


class Auth:
    async def authenticate(self, header: str | None) -> Principal:
        return Principal(tenant=TENANT, subject="s", scopes=frozenset({"admin"}))


class Buckets:
    rate = 1000.0

    def take(self, tenant: str, n: int = 1) -> RateDecision:
        return RateDecision(True, 100, 99, 0, 0)


@pytest.fixture(scope="module")
def settings() -> GatewaySettings:
    return GatewaySettings.from_env({})


@pytest.fixture(scope="module")
def doc(settings: GatewaySettings) -> dict[str, Any]:
    return document(settings, ROUTES)


def call(settings: GatewaySettings, method: str, path: str, **kw: Any) -> tuple[int, str, Any]:
    health = Health()
    health.record({"kafka": "ok", "minio": "ok", "cassandra": "ok"})
    gw = SimpleNamespace(settings=settings, auth=Auth(), store=Store(), objects=Objects(), buckets=Buckets(),
                         audit=SimpleNamespace(record=lambda **kw: None), catalog=None, health=health,
                         shares=FairShares(settings.max_inflight, floor=settings.sync_share_floor))
    app = web.Application(middlewares=[problems_middleware, body_budget_middleware])
    app[SETTINGS], app[GATEWAY], app[BODIES] = settings, gw, ByteBudget(settings.max_inflight_body_bytes)
    app[DOCUMENT] = document(settings, ROUTES)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)

    async def main(calls: Callable[[TestClient], Awaitable[Any]]) -> Any:
        async with TestClient(TestServer(app)) as client:
            return await calls(client)

    async def one(client: TestClient) -> tuple[int, str, Any]:
        headers = {"Authorization": "Bearer x", **kw.pop("headers", {})}
        resp = await client.request(method, path, headers=headers, **kw)
        return resp.status, resp.content_type, await resp.json(content_type=None)

    return asyncio.run(main(one))


def conforms(doc: dict[str, Any], method: str, route: str, status: int, body: Any) -> list[str]:
    response = doc["paths"][route][method.lower()]["responses"][str(status)]
    if "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    [content] = response["content"].values()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": doc["components"],
              **content["schema"]}
    cls = jsonschema.Draft202012Validator
    return [e.message for e in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(body)]


CALLS = [
    ("GET", f"/v1/requests/{RID}", "/v1/requests/{id}", {}, 200),
    ("GET", f"/v1/requests/{RID}?format=coco", "/v1/requests/{id}", {}, 200),
    ("GET", f"/v1/requests/{PENDING}", "/v1/requests/{id}", {}, 200),
    ("GET", f"/v1/requests/{FAILED}", "/v1/requests/{id}", {}, 200),
    ("GET", "/v1/requests/nothing", "/v1/requests/{id}", {}, 404),
    ("GET", "/v1/requests/a.b", "/v1/requests/{id}", {}, 404),
    ("GET", f"/v1/requests/{RID}?format=xml", "/v1/requests/{id}", {}, 400),
    ("POST", "/v1/uploads", "/v1/uploads",
     {"json": {"files": [{"content_type": "image/png", "content_length": 5}]}}, 201),
    ("POST", "/v1/uploads", "/v1/uploads", {"json": {"files": [{"content_type": "text/x", "content_length": 5}]}},
     415),
    ("POST", "/v1/uploads", "/v1/uploads", {"json": {"files": []}}, 400),
    ("GET", f"/v1/jobs/{JOB}", "/v1/jobs/{id}", {}, 200),
    ("GET", "/v1/jobs/x.y", "/v1/jobs/{id}", {}, 404),
    ("POST", "/v1/jobs", "/v1/jobs", {"json": {"items": [{"key": "other/x.jpg"}]}}, 404),
    ("POST", "/v1/jobs", "/v1/jobs", {"json": {"items": []}}, 400),
    ("POST", "/v1/jobs", "/v1/jobs", {"json": {"items": [{"key": "acme/x"}]},
                                      "headers": {"Idempotency-Key": "k" * 201}}, 400),
    ("DELETE", f"/v1/images/{SHA}", "/v1/images/{id}", {}, 200),
    ("DELETE", "/v1/images/nothex", "/v1/images/{id}", {}, 404),
    ("DELETE", f"/v1/tenants/{TENANT}/data", "/v1/tenants/{tenant}/data", {}, 200),
    ("DELETE", "/v1/tenants/other/data", "/v1/tenants/{tenant}/data", {}, 404),
    ("GET", f"/v1/tenants/{TENANT}/policy", "/v1/tenants/{tenant}/policy", {}, 200),
    ("PUT", f"/v1/tenants/{TENANT}/policy", "/v1/tenants/{tenant}/policy",
     {"json": {"hidden_classes": ["b", "a", "b"], "review_retention_days": 30}}, 200),
    ("PUT", f"/v1/tenants/{TENANT}/policy", "/v1/tenants/{tenant}/policy", {"json": {"review_retention_days": 8}},
     400),
    ("GET", "/v1/audit?limit=5", "/v1/audit", {}, 200),
    ("GET", "/v1/audit?day=yesterday", "/v1/audit", {}, 400),
    ("GET", "/livez", "/livez", {}, 200),
    ("GET", "/readyz", "/readyz", {}, 200),
]


@pytest.mark.parametrize(("method", "path", "route", "kw", "status"), CALLS,
                         ids=[f"{c[0]} {c[1]} {c[4]}" for c in CALLS])
def test_answers_conform_to_the_document(settings: GatewaySettings, doc: dict[str, Any], method: str, path: str,
                                         route: str, kw: dict[str, Any], status: int) -> None:
    got, ctype, body = call(settings, method, path, **kw)
    assert got == status, body
    assert ctype == ("application/json" if status < 400 else "application/problem+json")
    assert conforms(doc, method, route, status, body) == []


def test_bodies_carry_what_the_handlers_know(settings: GatewaySettings) -> None:
    _s, _c, failed = call(settings, "GET", f"/v1/requests/{FAILED}")
    assert (failed["status"], failed["error"]["code"]) == ("FAILED", "SUBMIT_FAILED")
    _s, _c, pending = call(settings, "GET", f"/v1/requests/{PENDING}")
    assert pending["status"] == "PENDING" and "error" not in pending
    _s, _c, policy = call(settings, "PUT", f"/v1/tenants/{TENANT}/policy",
                          json={"hidden_classes": ["b", "a", "b"], "review_retention_days": 30})
    assert (policy["hidden_classes"], policy["review_retention_days"], policy["revision"]) == (["a", "b"], 30, 1)
    _s, _c, job = call(settings, "GET", f"/v1/jobs/{JOB}")
    assert (job["done"], job["pending"], job["counts"]) == (2, 1, {"OK": 1, "REJECTED": 0, "FAILED": 1})
    _s, _c, uploads = call(settings, "POST", "/v1/uploads",
                           json={"files": [{"content_type": "image/png", "content_length": 5}]})
    assert uploads["uploads"][0]["headers"]["Content-Length"] == "5"
    _s, _c, bad = call(settings, "POST", "/v1/uploads",
                       json={"files": [{"content_type": "image/png", "content_length": 0}]})
    assert (bad["code"], bad["param"]) == ("INVALID_PARAMS", "files[0].content_length")
