"""The gateway's OpenAPI 3.1 document, generated from the route table (gateway/routes.py) and the contract's
models (gateway/contract/), served at GET /openapi.json.

Nothing here restates a field, a limit or a pattern: schemas are the models' JSON Schemas (request bodies as
validated, responses as serialized; response models are closed), parameters are the fields of the routes'
parameter models, ranges that come from the settings are written for the settings the document is built for,
and error codes come from gateway/problems.py.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from config import GatewaySettings
from gateway.auth import SCOPES
from gateway.contract import replies
from gateway.problems import CODES
from gateway.problems import CONTENT_TYPE as PROBLEM_CONTENT_TYPE
from gateway.routes import Answer, Route

Schema = dict[str, Any]
OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"


def _version() -> str:
    try:
        return importlib.metadata.version("detectflow")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def _ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


# ---------------------------------------------------------------------------------------------- headers


_UUID = {"type": "string", "format": "uuid"}
RESPONSE_HEADERS: dict[str, tuple[str, Schema]] = {
    "RateLimit-Limit": ("Calls the tenant's bucket holds (burst).", {"type": "integer", "minimum": 1}),
    "RateLimit-Remaining": ("Calls left in the bucket now.", {"type": "integer", "minimum": 0}),
    "RateLimit-Reset": ("Seconds until the bucket is full again.", {"type": "integer", "minimum": 0}),
    "Retry-After": ("Seconds to wait before retrying.", {"type": "integer", "minimum": 1}),
    "Location": ("Where to poll the resource.", {"type": "string", "format": "uri-reference"}),
    "X-Request-Id": ("The request id.", _UUID),
    "WWW-Authenticate": ("RFC 6750 bearer challenge.", {"type": "string"}),
}
RATE = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


def _headers(names: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict[str, Schema]:
    """Header objects; ``names`` are sent on every such response, ``optional`` ones only sometimes."""
    return {n: {"description": RESPONSE_HEADERS[n][0], "required": n not in optional,
                "schema": RESPONSE_HEADERS[n][1]} for n in (*names, *optional)}


# ---------------------------------------------------------------------------------------------- problems


# Problem responses by status: (component name, description, headers always sent, headers sometimes sent).
PROBLEM_RESPONSES: dict[int, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    400: ("BadRequest", "The request or a parameter is malformed or out of range, or a JSON body nests deeper "
                        "than the gateway accepts (JSON_TOO_DEEP, checked before parsing).", (), ()),
    401: ("Unauthenticated", "No valid bearer token.", ("WWW-Authenticate",), ()),
    403: ("Forbidden", "The token lacks the scope this call needs.", ("WWW-Authenticate",), ()),
    404: ("NotFound", "No such resource for this tenant.", (), ()),
    413: ("PayloadTooLarge", "The body is over the route's size limit (an image for /v1/detect, JSON elsewhere): "
                             "refused on its declared Content-Length before it is read, or as soon as a body "
                             "without one passes the limit.", (), ()),
    415: ("UnsupportedMediaType", "The body is not a supported image or request type.", (), ()),
    422: ("Unprocessable", "The image was rejected, the job has too many items, or the Idempotency-Key was used "
                           "with another request.", (), ("X-Request-Id",)),
    429: ("TooManyRequests", "The tenant's rate limit (RateLimit-* headers sent), its daily quota (Retry-After: "
                             "seconds until the UTC day ends) or its share of the sync capacity (FAIR_SHARE_EXCEEDED) "
                             "is used up.", ("Retry-After",), RATE),
    500: ("InternalError", "A bug; the gateway log has the details.", (), ()),
    502: ("BadGateway", "The pipeline failed this request.", (), ("X-Request-Id",)),
    503: ("ServiceUnavailable", "Overloaded (sync calls in flight, online backlog, request bodies held, quota "
                                "contention) or a backing service is unavailable; retry after Retry-After.",
          ("Retry-After",), ()),
}


def _problem_content(status: int, extra: Schema | None = None) -> Schema:
    codes = [code for code, (s, _title) in CODES.items() if s == status]
    narrowed: Schema = {"properties": {"status": {"const": status}, "code": {"enum": codes}}, **(extra or {})}
    return {PROBLEM_CONTENT_TYPE: {"schema": {"allOf": [_ref("Problem"), narrowed]}}}


def _problem_responses() -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for status, (name, description, always, sometimes) in PROBLEM_RESPONSES.items():
        out[name] = {"description": description, "content": _problem_content(status)}
        if always or sometimes:
            out[name]["headers"] = _headers(always, sometimes)
    out["NotReady"] = {"description": "A backing service does not answer.", "headers": _headers(("Retry-After",)),
                       "content": _problem_content(503, {"required": ["checks"]})}
    return out


# ---------------------------------------------------------------------------------------------- schemas


def _generator(settings: GatewaySettings) -> type[GenerateJsonSchema]:
    """A schema generator that writes the settings' ranges (gateway/contract/rules.py Within reads them from it)."""
    return type("ContractSchema", (GenerateJsonSchema,), {"settings": settings})


def _body_models(route: Route) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    out: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in route.body.values() if m]
    for answer in route.answers.values():
        bodies = answer.body if isinstance(answer.body, tuple) else (answer.body,) if answer.body else ()
        out += [(m, "serialization") for m in bodies]
    return out


def _schemas(settings: GatewaySettings, routes: tuple[Route, ...]) -> tuple[dict[Any, Schema], dict[str, Schema]]:
    """Every body model's schema: (the reference per (model, mode), the components)."""
    models = [(replies.Problem, "serialization")] + [m for r in routes for m in _body_models(r)]
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template=REF,  # type: ignore[arg-type]
                                    schema_generator=_generator(settings))
    return refs, defs.get("$defs", {})


def _body_ref(refs: dict[Any, Schema], models: Any, mode: JsonSchemaMode) -> Schema:
    if isinstance(models, tuple):
        return {"oneOf": [refs[(m, mode)] for m in models]}
    return refs[(models, mode)]


# ---------------------------------------------------------------------------------------------- parameters


def _parameters(settings: GatewaySettings, route: Route) -> list[Schema]:
    out = []
    for model in route.params:
        schema = model.model_json_schema(mode="validation", schema_generator=_generator(settings))
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            prop = dict(prop)
            description = prop.pop("description", None)
            prop.pop("title", None)
            if "anyOf" in prop:  # an optional parameter is absent, never null
                [prop_schema] = [s for s in prop.pop("anyOf") if s.get("type") != "null"]
                prop = {**prop_schema, **prop}
            if prop.get("default") is None:
                prop.pop("default", None)
            param: Schema = {"name": name, "in": model.IN, "required": model.IN == "path" or name in required,
                             "schema": prop}
            if description:
                param["description"] = description
            out.append(param)
    return out


# ---------------------------------------------------------------------------------------------- paths


def _answer(answer: Answer, refs: dict[Any, Schema]) -> Schema:
    schema = answer.schema if answer.body is None else _body_ref(refs, answer.body, "serialization")
    out: Schema = {"description": answer.description, "content": {answer.media_type: {"schema": schema}}}
    headers = _headers(answer.headers, answer.optional_headers)
    if headers:
        out["headers"] = headers
    if answer.links:
        out["links"] = {name: {"operationId": op, "parameters": {"id": f"$response.body#/{pointer}"}}
                        for name, (op, pointer) in answer.links.items()}
    return out


def _operation(settings: GatewaySettings, route: Route, refs: dict[Any, Schema]) -> Schema:
    op: Schema = {"operationId": route.operation_id, "tags": [route.tag], "summary": route.summary,
                  "description": route.description.format(s=settings),
                  # OpenAPI 3.1 lets a non-OAuth scheme list the roles it needs; the token's `scope` must hold it.
                  "security": [{"bearerAuth": [route.scope]}] if route.scope else []}
    params = _parameters(settings, route)
    if params:
        op["parameters"] = params
    if route.body:
        content: Schema = {}
        for media_type, model in route.body.items():
            content[media_type] = {"schema": {"type": "string", "format": "binary"} if model is None
                                   else _body_ref(refs, model, "validation")}
            if media_type in route.body_encoding:
                content[media_type]["encoding"] = route.body_encoding[media_type]
        op["requestBody"] = {"required": True, "content": content}
    responses: Schema = {str(status): _answer(a, refs) for status, a in route.answers.items()}
    for status in (*route.errors, 500):
        name = route.problem_responses.get(status, PROBLEM_RESPONSES[status][0])
        responses[str(status)] = _ref(name, "responses")
    op["responses"] = responses
    return op


# ---------------------------------------------------------------------------------------------- document


def document(settings: GatewaySettings, routes: tuple[Route, ...]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` for a gateway running with ``settings``."""
    refs, schemas = _schemas(settings, routes)
    paths: dict[str, Schema] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(settings, route, refs)
    p = settings.pipeline
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "detectflow",
            "version": _version(),
            "description": (
                "Object detection over HTTP. Calls need a bearer JWT (RS256, from the configured OpenID provider or "
                "signed by a key of the configured JWKS; HS256 only in development mode) carrying the tenant and "
                f"the scopes ({', '.join(SCOPES)}; admin implies the others). Errors are RFC 9457 problems with a "
                "stable `code` (see the Problem schema); an unsupported method answers 405 METHOD_NOT_ALLOWED with "
                f"Allow. Each tenant may make {settings.rate_per_s:g} calls per second (bursts of "
                f"{settings.rate_burst}) per gateway instance and submit {settings.daily_quota} images per UTC day. "
                f"Bodies are limited to {settings.max_body_bytes} bytes, images to {p.image_max_bytes} bytes, "
                f"{p.image_max_pixels} pixels and {p.image_max_side} pixels a side. Detection defaults: score "
                f"threshold {p.default_score_threshold:g}, at most {p.default_max_detections} detections, every "
                f"class, model {p.default_model}."),
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
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "An RS256 JWT access token with `iss`, `aud`, `sub`, `iat` and `exp` (lifetime at most "
                               f"{settings.max_token_lifetime_s} s), the tenant claim `{settings.tenant_claim}` and "
                               "`scope`; refusals are 401 INVALID_TOKEN with a `reason`."}},
            "schemas": schemas,
            "responses": _problem_responses(),
        },
    }
