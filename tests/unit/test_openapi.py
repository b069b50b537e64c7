"""The OpenAPI document: valid 3.1, every route documented, codes and ranges taken from the code, and what
the views really return validates against the schemas that describe it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from config import GatewaySettings
from gateway.app import create_app
from gateway.auth import SCOPES
from gateway.openapi import document
from gateway.problems import CODES, Problem
from gateway.routes import ROUTES
from gateway.state import DOCUMENT
from gateway.views import coco_view, pending_view, result_view

jsonschema = pytest.importorskip("jsonschema")

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@pytest.fixture(scope="module")
def settings() -> GatewaySettings:
    return GatewaySettings.from_env({})


def spec(settings: GatewaySettings) -> dict[str, Any]:
    return document(settings, ROUTES)


@pytest.fixture(scope="module")
def doc(settings: GatewaySettings) -> dict[str, Any]:
    return spec(settings)


def _param(doc: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    [param] = [p for p in doc["paths"][path][method]["parameters"] if p["name"] == name]
    return param


def _validator(doc: dict[str, Any], name: str) -> Any:
    """A 2020-12 validator of one component schema, resolving $refs against the whole document."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": doc["components"],
              "$ref": f"#/components/schemas/{name}"}
    cls = jsonschema.Draft202012Validator
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _errors(doc: dict[str, Any], name: str, instance: Any) -> list[str]:
    return [e.message for e in _validator(doc, name).iter_errors(instance)]


def test_document_is_valid_openapi_31(doc: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "detectflow"
    assert doc["info"]["version"] == "0.1.0"
    assert json.loads(json.dumps(doc)) == doc  # the handler serves it with json.dumps


def test_every_route_is_documented_with_its_methods(settings: GatewaySettings, doc: dict[str, Any]) -> None:
    app = create_app(settings)  # registers routes only; services start with the app
    assert app[DOCUMENT] == doc  # the document the app serves is the one generated here
    routes: dict[str, set[str]] = {}
    for route in app.router.routes():
        # aiohttp adds HEAD to every GET route; HTTP defines it by GET, so it is not documented.
        if route.method != "HEAD":
            routes.setdefault(route.resource.canonical, set()).add(route.method.lower())
    documented = {path: {m for m in item if m in HTTP_METHODS} for path, item in doc["paths"].items()}
    assert documented == routes


def test_operations_are_described_and_secured(doc: dict[str, Any]) -> None:
    ops = [(path, op) for path, item in doc["paths"].items() for op in item.values()]
    ids = [op["operationId"] for _p, op in ops]
    assert len(ids) == len(set(ids))
    public = {"/openapi.json", "/livez", "/readyz", "/metrics"}
    for path, op in ops:
        assert op["summary"] and op["description"] and op["tags"], path
        if path in public:
            assert op["security"] == [], path
        else:
            [requirement] = op["security"]
            assert set(requirement["bearerAuth"]) <= set(SCOPES), path
            assert {"401", "403", "429", "500"} <= set(op["responses"]), path


def test_problem_codes_are_the_code_table(doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    assert problem["properties"]["code"]["enum"] == list(CODES)
    for code in CODES:
        assert f"`{code}`" in problem["description"]
    # Each problem response narrows the codes to those of its status.
    for name, response in doc["components"]["responses"].items():
        narrowed = response["content"]["application/problem+json"]["schema"]["allOf"][1]["properties"]
        status = narrowed["status"]["const"]
        assert narrowed["code"]["enum"] == [c for c, (s, _t) in CODES.items() if s == status], name


def test_ranges_follow_the_settings() -> None:
    s = GatewaySettings.from_env({"DETECTFLOW_JOB_MAX_ITEMS": "7", "DETECTFLOW_SYNC_TIMEOUT_MAX_S": "5"})
    doc = spec(s)
    assert _param(doc, "/v1/detect", "post", "timeout_ms")["schema"]["maximum"] == 5000
    assert _param(doc, "/v1/detect", "post", "score_threshold")["schema"]["minimum"] == s.pipeline.min_score
    assert _param(doc, "/v1/detect", "post", "max_detections")["schema"]["maximum"] == s.pipeline.max_detections_limit
    assert _param(doc, "/v1/jobs/{id}/results", "get", "page_size")["schema"]["maximum"] == s.page_size_max
    assert doc["components"]["schemas"]["JobRequest"]["properties"]["items"]["maxItems"] == 7


def _stored_result(status: str = "OK", **over: Any) -> dict[str, Any]:
    """A DetectionResult as the recorder stores it (JSON, completed_at in epoch millis)."""
    box = {"x1": 10.123, "y1": 20.5, "x2": 110.0, "y2": 220.25}
    norm = {"x1": 0.0158, "y1": 0.0427, "x2": 0.1719, "y2": 0.4589}
    r = {"request_id": str(uuid.uuid4()), "tenant": "acme", "status": status,
         "detections": [{"class_id": 0, "class_name": "person", "score": 0.912345678, "box": box, "box_norm": norm}]
         if status == "OK" else [],
         "image_width": 640, "image_height": 480, "image_sha256": "ab" * 32, "model_name": "yolov4-tiny",
         "model_version": 1, "timings_ms": {"scan": 1.5, "inference": 40.25}, "error_code": None,
         "error_message": None, "job_id": None, "lane": "ONLINE", "cache_hit": False,
         "completed_at": 1_700_000_000_123}
    return {**r, **over}


@pytest.mark.parametrize("result", [
    _stored_result(),
    _stored_result(job_id=str(uuid.uuid4()), cache_hit=True),
    _stored_result("REJECTED", error_code="UNSUPPORTED_FORMAT", error_message="not an image", image_width=None,
                   image_height=None, model_version=None),
    _stored_result("FAILED", error_code=None, error_message=None, image_sha256=None, model_name=None, timings_ms={}),
], ids=["ok", "ok-job", "rejected", "failed-bare"])
def test_result_views_conform(doc: dict[str, Any], result: dict[str, Any]) -> None:
    assert _errors(doc, "DetectionResult", result_view(result).dump()) == []
    assert _errors(doc, "CocoResults", coco_view(result).dump()) == []


def test_a_result_with_an_error_must_not_be_ok(doc: dict[str, Any]) -> None:
    view = result_view(_stored_result()).dump()
    assert _errors(doc, "DetectionResult", {**view, "error": {"code": "X", "message": "y"}})
    assert _errors(doc, "DetectionResult", {**view, "status": "FAILED"})  # FAILED carries an error object
    assert _errors(doc, "DetectionResult", {**view, "surprise": 1})  # response schemas are closed


def test_pending_views_conform(doc: dict[str, Any]) -> None:
    rid = str(uuid.uuid4())
    assert _errors(doc, "Pending", pending_view(rid, 1_700_000_000_000).dump()) == []
    assert _errors(doc, "Pending", pending_view(rid, None, str(uuid.uuid4())).dump()) == []
    failed = {**pending_view(rid, 1_700_000_000_000).dump(), "status": "FAILED",
              "error": {"code": "SUBMIT_FAILED", "message": "the request was never submitted"}}
    assert _errors(doc, "Pending", failed) == []  # the shape handlers.get_request builds
    assert _errors(doc, "Pending", {**failed, "status": "PENDING"})
    # A pending body is never mistaken for a result (the 200 of getRequest is a oneOf).
    assert _errors(doc, "DetectionResult", failed)


@pytest.mark.parametrize("code", list(CODES))
def test_problem_bodies_conform(doc: dict[str, Any], code: str) -> None:
    extra = {"INVALID_PARAMS": {"param": "score_threshold"},
             "IMAGE_REJECTED": {"image_code": "TRUNCATED_IMAGE", "request_id": str(uuid.uuid4())},
             "PIPELINE_FAILED": {"failure_code": "MODEL_NOT_FOUND", "request_id": str(uuid.uuid4())},
             "UNAVAILABLE": {"checks": {"kafka": "ok", "minio": "unavailable: TimeoutError"}}}.get(code, {})
    body = Problem(code, "some detail", **extra).body("/v1/detect")
    assert _errors(doc, "Problem", body) == []
    assert _errors(doc, "Problem", Problem(code).body("/v1/detect")) == []  # no detail
