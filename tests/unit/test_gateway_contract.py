"""The HTTP contract (gateway/contract/): validation errors are the problems the routes have always answered,
limits from the settings hold in validation and in the document alike, the route table, the app and the
served document agree, and the gateway's modules import each other without a cycle."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from config import GatewaySettings
from gateway import handlers as h
from gateway.app import create_app
from gateway.contract import bodies, params, rules
from gateway.openapi import document
from gateway.problems import Problem
from gateway.routes import ROUTES
from gateway.state import DOCUMENT, SETTINGS

GATEWAY_DIR = Path(__file__).resolve().parents[2] / "gateway"


@pytest.fixture(scope="module")
def settings() -> GatewaySettings:
    return GatewaySettings.from_env({"DETECTFLOW_JOB_MAX_ITEMS": "3"})


def refused(model: type[rules.M], data: Any, settings: GatewaySettings | None, **context: Any) -> Problem:
    with pytest.raises(Problem) as info:
        rules.parse(model, data, settings, **context)
    return info.value


UPLOAD = {"content_type": "image/jpeg", "content_length": 10}


@pytest.mark.parametrize(("body", "code", "param"), [
    ({}, "INVALID_REQUEST", None),
    ({"files": []}, "INVALID_REQUEST", None),
    ({"files": "x"}, "INVALID_REQUEST", None),
    ({"files": [UPLOAD] * 1001}, "INVALID_REQUEST", None),
    ({"files": ["x"]}, "INVALID_REQUEST", None),
    ({"files": [{**UPLOAD, "content_type": "text/plain"}]}, "UNSUPPORTED_MEDIA_TYPE", None),
    ({"files": [{"content_length": 10}]}, "UNSUPPORTED_MEDIA_TYPE", None),
    ({"files": [UPLOAD, {**UPLOAD, "content_length": 0}]}, "INVALID_PARAMS", "files[1].content_length"),
    ({"files": [{**UPLOAD, "content_length": True}]}, "INVALID_PARAMS", "files[0].content_length"),
    ({"files": [{**UPLOAD, "content_length": 20 * 1024 * 1024 + 1}]}, "INVALID_PARAMS", "files[0].content_length"),
])
def test_upload_requests_are_refused_with_the_codes_they_always_had(settings: GatewaySettings, body: Any,
                                                                    code: str, param: str | None) -> None:
    problem = refused(bodies.UploadRequest, body, settings)
    assert (problem.code, problem.extra.get("param")) == (code, param)


def test_an_upload_request_within_the_limits_passes(settings: GatewaySettings) -> None:
    body = rules.parse(bodies.UploadRequest, {"files": [UPLOAD, {**UPLOAD, "content_type": "image/png"}], "x": 1},
                     settings)
    assert [(f.content_type, f.content_length) for f in body.files] == [("image/jpeg", 10), ("image/png", 10)]


REF = {"upload_id": "0" * 32}


@pytest.mark.parametrize(("body", "code", "param"), [
    ({}, "INVALID_REQUEST", None),
    ({"items": []}, "INVALID_REQUEST", None),
    ({"items": "x"}, "INVALID_REQUEST", None),
    ({"items": [REF] * 4}, "TOO_MANY_ITEMS", None),  # DETECTFLOW_JOB_MAX_ITEMS=3
    ({"items": ["t1/x"]}, "INVALID_REQUEST", None),
    ({"items": [{"upload_id": None}]}, "INVALID_REQUEST", None),
    ({"items": [{"key": "t1/../t2/x"}]}, "INVALID_REQUEST", None),
    ({"items": [REF], "params": "x"}, "INVALID_REQUEST", None),
    ({"items": [REF], "params": {"score_threshold": 2}}, "INVALID_PARAMS", "score_threshold"),
    ({"items": [REF], "params": {"classes": ["cat"]}}, "INVALID_PARAMS", "classes"),
    ({"items": [REF], "params": {"classes": [1]}}, "INVALID_PARAMS", "classes"),
    ({"items": [REF], "params": {"classes": ["person"] * 1001}}, "INVALID_PARAMS", "classes"),
    ({"items": [REF], "model": {"name": "YoloV5"}}, "INVALID_PARAMS", "model"),
    ({"items": [REF], "model": {"version": 0}}, "INVALID_PARAMS", "model_version"),
])
def test_job_requests_are_refused_with_the_codes_they_always_had(settings: GatewaySettings, body: Any, code: str,
                                                                 param: str | None) -> None:
    problem = refused(bodies.JobRequest, body, settings, class_names=("person",))
    assert (problem.code, problem.extra.get("param")) == (code, param)


def test_a_job_request_names_keys_in_the_callers_prefix_only(settings: GatewaySettings) -> None:
    body = rules.parse(bodies.JobRequest, {"items": [REF, {"key": "t1/a.jpg"}, {"key": "t2/a.jpg"}],
                                      "params": {"score_threshold": 0.5}, "model": {"name": "m", "version": 2}},
                     settings)
    assert [i.object_key("t1") for i in body.items[:2]] == [f"t1/uploads/{'0' * 32}", "t1/a.jpg"]
    with pytest.raises(Problem) as info:
        body.items[2].object_key("t1")
    assert info.value.code == "NOT_FOUND"
    assert body.merged_params() == {"score_threshold": 0.5, "model": "m", "model_version": 2}


@pytest.mark.parametrize(("body", "param"), [
    ({"hidden_classes": "person"}, "hidden_classes"),
    ({"review_classes": [""]}, "review_classes"),
    ({"review_classes": ["cat"]}, "review_classes"),  # not a class of the model
    ({"review_retention_days": 8}, "review_retention_days"),
    ({"review_retention_days": "x"}, "review_retention_days"),
])
def test_policy_requests_are_refused_naming_the_field(settings: GatewaySettings, body: Any, param: str) -> None:
    problem = refused(bodies.TenantPolicyRequest, body, settings, class_names=("person", "bus"))
    assert (problem.code, problem.extra.get("param")) == ("INVALID_PARAMS", param)


def test_a_policy_request_is_deduplicated_and_sorted(settings: GatewaySettings) -> None:
    body = rules.parse(bodies.TenantPolicyRequest, {"hidden_classes": ["bus", "person", "bus"],
                                               "review_retention_days": 30}, settings, class_names=("person", "bus"))
    assert body.model_dump() == {"hidden_classes": ["bus", "person"], "review_classes": [],
                                 "review_retention_days": 30}


@pytest.mark.parametrize(("model", "query", "param"), [
    (params.AuditQuery, {"day": "2026-1-1"}, "day"),
    (params.AuditQuery, {"limit": "0"}, "limit"),
    (params.AuditQuery, {"limit": "1001"}, "limit"),
    (params.SyncQuery, {"timeout_ms": "60001"}, "timeout_ms"),
    (params.SyncQuery, {"timeout_ms": "1.5"}, "timeout_ms"),
    (params.SyncQuery, {"format": "xml"}, "format"),
    (params.ResultsQuery, {"page_size": "1001"}, "page_size"),
    (params.ResultsQuery, {"page_size": "0"}, "page_size"),
])
def test_query_parameters_are_refused_naming_the_parameter(settings: GatewaySettings, model: Any, query: Any,
                                                           param: str) -> None:
    problem = refused(model, query, settings)
    assert (problem.code, problem.extra.get("param")) == ("INVALID_PARAMS", param)


def test_query_parameters_take_their_defaults(settings: GatewaySettings) -> None:
    assert rules.parse(params.AuditQuery, {}, settings).limit == 100
    sync = rules.parse(params.SyncQuery, {"timeout_ms": "2500"}, settings)
    assert (sync.format, sync.timeout_s(settings)) == ("json", 2.5)
    assert rules.parse(params.SyncQuery, {}, settings).timeout_s(settings) == settings.sync_timeout_s


@pytest.mark.parametrize("key", ["", "k" * 201])
def test_an_idempotency_key_out_of_bounds_is_an_invalid_request(key: str) -> None:
    assert refused(params.IdempotencyHeaders, {"Idempotency-Key": key}, None).code == "INVALID_REQUEST"
    assert rules.parse(params.IdempotencyHeaders, {"Idempotency-Key": "k" * 200}, None).idempotency_key == "k" * 200


@pytest.mark.parametrize(("model", "value"), [(params.RequestPath, "a/b"), (params.JobPath, "-x"),
                                              (params.ImagePath, "ab")])
def test_a_malformed_id_names_no_resource(model: Any, value: str) -> None:
    assert refused(model, {"id": value}, None).code == "NOT_FOUND"


def test_limits_from_the_settings_are_the_same_in_validation_and_in_the_document() -> None:
    s = GatewaySettings.from_env({"DETECTFLOW_JOB_MAX_ITEMS": "7", "DETECTFLOW_IMAGE_MAX_BYTES": "1000"})
    doc = document(s, ROUTES)
    schemas = doc["components"]["schemas"]
    assert schemas["JobRequest"]["properties"]["items"]["maxItems"] == 7
    assert schemas["UploadFile"]["properties"]["content_length"]["maximum"] == 1000
    [page_size] = [p for p in doc["paths"]["/v1/jobs/{id}/results"]["get"]["parameters"] if p["name"] == "page_size"]
    assert page_size["schema"]["maximum"] == s.page_size_max
    assert len(rules.parse(bodies.JobRequest, {"items": [REF] * 7}, s).items) == 7
    assert refused(bodies.JobRequest, {"items": [REF] * 8}, s).code == "TOO_MANY_ITEMS"
    assert rules.parse(params.ResultsQuery, {"page_size": str(s.page_size_max)}, s).page_size == s.page_size_max
    assert refused(params.ResultsQuery, {"page_size": str(s.page_size_max + 1)}, s).code == "INVALID_PARAMS"
    assert refused(bodies.UploadRequest, {"files": [{**UPLOAD, "content_length": 1001}]}, s).code == "INVALID_PARAMS"


def test_every_route_of_the_table_is_served_and_documented(settings: GatewaySettings) -> None:
    app = create_app(settings)  # registers routes only; services start with the app
    served = {(r.method, r.resource.canonical): r.handler for r in app.router.routes() if r.method != "HEAD"}
    assert served == {(r.method, r.path): r.handler for r in ROUTES}
    documented = {(method.upper(), path): op["operationId"] for path, item in app[DOCUMENT]["paths"].items()
                  for method, op in item.items()}
    assert documented == {(r.method, r.path): r.operation_id for r in ROUTES}
    for route in ROUTES:  # every operation documents its parameters, body and answers from the route's models
        op = app[DOCUMENT]["paths"][route.path][route.method.lower()]
        names = {p["name"] for p in op.get("parameters", [])}
        for model in route.params:
            assert {f.alias or n for n, f in model.model_fields.items()} <= names, route.path
        assert set(op.get("requestBody", {}).get("content", {})) == set(route.body), route.path
        assert {str(s) for s in (*route.answers, *route.errors, 500)} == set(op["responses"]), route.path


def test_the_served_document_is_the_generated_one(settings: GatewaySettings) -> None:
    app = web.Application()
    app[SETTINGS] = settings
    app[DOCUMENT] = document(settings, ROUTES)
    app.router.add_get("/openapi.json", h.openapi)

    async def main() -> Any:
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/openapi.json")
            return resp.status, resp.content_type, await resp.read()

    status, ctype, body = asyncio.run(main())
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == document(settings, ROUTES)


def _gateway_imports() -> dict[str, set[str]]:
    """Each gateway module's imports of other gateway modules ("contract.rules"), at any depth of its body."""
    graph: dict[str, set[str]] = {}
    for path in GATEWAY_DIR.rglob("*.py"):
        parts = path.relative_to(GATEWAY_DIR).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gateway":
                package = node.module.removeprefix("gateway").lstrip(".")
                for alias in node.names:  # `from gateway.contract import rules` imports a module, or a name
                    module = f"{package}.{alias.name}".lstrip(".")
                    deps.add(module if (GATEWAY_DIR / f"{module.replace('.', '/')}.py").exists() else package)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("gateway.") for a in node.names if a.name.startswith("gateway.")}
        graph[name] = deps - {name, ""}
    return graph


def test_the_gateway_modules_import_each_other_without_a_cycle() -> None:
    graph = _gateway_imports()
    assert {"app", "handlers", "contract.rules", "contract.replies", "state"} <= set(graph)
    assert "app" not in graph["handlers"] and "app" not in graph["state"]
    assert "contract.rules" in graph["handlers"] and "state" in graph["handlers"]
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, " -> ".join((*stack, module))
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*stack, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_the_catalog_is_typed() -> None:
    from typing import get_type_hints

    from gateway.state import Gateway
    from model_store.serving.catalog import ModelCatalog

    assert get_type_hints(Gateway)["catalog"] == ModelCatalog | None
