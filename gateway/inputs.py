"""Validation at the edge: detection params, image bodies (sniffed by magic bytes), object references."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from config import GatewaySettings
from gateway.contract import bodies, rules
from gateway.contract.rules import ID_RE, MEDIA_TYPES
from gateway.problems import Problem
from imaging.headers import read_header, sniff_format
from imaging.limits import UNSUPPORTED_FORMAT, ImageLimits, ImageRejected
from schemas import events
from schemas.names import MODEL_NAME_RULE, valid_model_name


@dataclass(frozen=True)
class DetectParams:
    model: str  # the request's, else PipelineSettings.default_model (parse_params)
    score_threshold: float | None = None
    max_detections: int | None = None
    classes: tuple[str, ...] = ()
    version: int | None = None

    def event_params(self) -> dict[str, Any]:
        return events.detect_params(score_threshold=self.score_threshold, max_detections=self.max_detections,
                                    classes=self.classes)

    def canonical(self) -> str:
        return json.dumps({**self.event_params(), "model": self.model, "version": self.version}, sort_keys=True)


@dataclass(frozen=True)
class ImageInput:
    """Either bytes that came with the request, or a reference to an object in the uploads bucket."""

    params: DetectParams
    data: bytes | None = None
    media_type: str | None = None
    key: str | None = None
    size: int | None = None

    @property
    def sha256(self) -> str | None:
        return None if self.data is None else hashlib.sha256(self.data).hexdigest()


def parse_params(raw: Mapping[str, Any], settings: GatewaySettings,
                 class_names: tuple[str, ...] | None) -> DetectParams:
    """Detection params from a JSON object or query string (classes comma-separated there), by the contract's
    DetectParams (gateway/contract/bodies.py)."""
    wire = rules.parse(bodies.DetectParams, raw, settings, class_names=class_names)
    out: dict[str, Any] = {"score_threshold": wire.score_threshold, "max_detections": wire.max_detections,
                           "version": wire.model_version}
    if wire.classes is not None:
        out["classes"] = tuple(sorted(set(wire.classes)))
    model = wire.model if wire.model is not None else settings.pipeline.default_model
    if not valid_model_name(model):  # the default model is checked when the app is built; this is a backstop
        raise Problem("INVALID_PARAMS", f"model must be a model name: {MODEL_NAME_RULE}", param="model")
    out["model"] = model
    return DetectParams(**out)


def body_params(body: bodies.ParamsAndModel, settings: GatewaySettings,
                class_names: tuple[str, ...] | None) -> DetectParams:
    """The params of a validated JSON call: ``{"params": {...}, "model": {"name", "version"}}`` (both optional)."""
    return parse_params(body.merged_params(), settings, class_names)


def parse_body_params(raw: Any, settings: GatewaySettings, class_names: tuple[str, ...] | None) -> DetectParams:
    """The params of an unvalidated JSON call, validated by the contract's ParamsAndModel first."""
    return body_params(rules.parse(bodies.ParamsAndModel, raw, settings, class_names=class_names), settings,
                       class_names)


def sniff_image(data: bytes, settings: GatewaySettings) -> str:
    """The media type by magic bytes (the declared Content-Type is not trusted); header limits checked."""
    p = settings.pipeline
    if not data:
        raise Problem("INVALID_REQUEST", "the request has no image bytes")
    try:
        fmt = sniff_format(data)
        read_header(data, ImageLimits(p.image_max_bytes, p.image_max_pixels, p.image_max_side,
                                      p.image_max_decoded_bytes))
    except ImageRejected as exc:
        if exc.code == UNSUPPORTED_FORMAT:
            raise Problem("UNSUPPORTED_MEDIA_TYPE", f"{exc.message}; send JPEG, PNG, WebP, BMP or TIFF") from exc
        raise Problem("IMAGE_REJECTED", exc.message, image_code=exc.code) from exc
    return MEDIA_TYPES[fmt]


def object_key(tenant: str, ref: Any) -> str:
    """The uploads-bucket key an image reference names: {"upload_id": ...} or {"key": "<tenant>/..."}.
    A key outside the tenant's prefix is reported as not found (it is not the caller's to name)."""
    return rules.parse(bodies.ImageRef, ref, None).object_key(tenant)


# Strings are dropped before brackets are counted (a string may hold brackets); then only brackets are kept.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether a JSON text nests arrays/objects deeper than ``max_depth``, decided before it is parsed (the
    parser recurses once per level). Each pass strips one level of innermost pairs, in C: at most ``max_depth``
    passes over the brackets alone. Unbalanced brackets are left for the parser to refuse."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            return False  # no pair left to strip: not JSON, the parser says so
        brackets = shorter
    return bool(brackets) and _INNERMOST.search(brackets) is not None


def parse_json(raw: bytes, max_depth: int) -> Any:
    """A JSON document from bytes: JSON_TOO_DEEP past ``max_depth`` levels, INVALID_REQUEST if not JSON."""
    if json_too_deep(raw, max_depth):
        raise Problem("JSON_TOO_DEEP", f"the JSON nests deeper than {max_depth} levels")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError as exc:  # not reached past the pre-scan; kept as the parser's own guard
        raise Problem("JSON_TOO_DEEP", f"the JSON nests deeper than {max_depth} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem("INVALID_REQUEST", "the body is not valid JSON") from exc


def _too_large(limit: int) -> Problem:
    return Problem("BODY_TOO_LARGE", f"the limit is {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, never more than ``limit`` bytes read: BODY_TOO_LARGE as soon as the declared length,
    or the bytes received so far, pass it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def read_json(request: web.Request, settings: GatewaySettings) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Problem("UNSUPPORTED_MEDIA_TYPE", "send the body as application/json")
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        raise Problem("INVALID_REQUEST", "a JSON body is UTF-8")
    body = parse_json(await read_body(request, settings.max_json_bytes), settings.max_json_depth)
    if not isinstance(body, dict):
        raise Problem("INVALID_REQUEST", "the body must be a JSON object")
    return body


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    """One multipart part, at most ``limit`` bytes read (a part has no length of its own to check first)."""
    data = bytearray()
    while True:
        chunk = await part.read_chunk()
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise _too_large(limit)


async def read_image_input(request: web.Request, settings: GatewaySettings,
                           class_names: tuple[str, ...] | None) -> ImageInput:
    """A detect call's image and params from a raw body, a multipart form or a JSON reference."""
    ctype = request.content_type
    if ctype == "application/json":
        body = await read_json(request, settings)
        if "image" not in body:
            raise Problem("INVALID_REQUEST", "a JSON detect call names its image: {\"image\": {\"upload_id\": ...}}")
        call = rules.parse(bodies.DetectJsonRequest, body, settings, class_names=class_names)
        return ImageInput(key=call.image.object_key(request["principal"].tenant),
                          params=body_params(call, settings, class_names))
    query: dict[str, Any] = dict(request.query)
    if ctype == "multipart/form-data":
        data = b""
        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            raise _too_large(settings.max_body_bytes)
        left = settings.max_body_bytes  # the parts together, bounded while they are read
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "image":
                    data = await _read_part(part, left)
                    left -= len(data)
                elif part.name == "params":
                    raw = await _read_part(part, min(left, settings.max_json_bytes))
                    left -= len(raw)
                    extra = parse_json(raw, settings.max_json_depth)
                    if not isinstance(extra, dict):
                        raise Problem("INVALID_REQUEST", "the params part must be a JSON object")
                    query.update(extra)
        except (ValueError, AssertionError, LookupError, HttpProcessingError) as exc:
            raise Problem("INVALID_REQUEST", f"malformed multipart body ({type(exc).__name__})") from exc
        if not data:
            raise Problem("INVALID_REQUEST", "the multipart body has no 'image' part")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await read_body(request, settings.max_body_bytes)
    else:
        raise Problem("UNSUPPORTED_MEDIA_TYPE",
                      f"send the image as image/*, multipart/form-data or a JSON reference, not {ctype or 'no type'}")
    media_type = sniff_image(data, settings)
    return ImageInput(data=data, media_type=media_type, size=len(data),
                      params=parse_params(query, settings, class_names))


def page_token(request_id: str) -> str:
    return base64.urlsafe_b64encode(request_id.encode()).decode().rstrip("=")


def parse_page_token(token: str) -> str:
    try:
        rid = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise Problem("INVALID_PARAMS", "page_token is not a token this service issued", param="page_token") from exc
    if not ID_RE.fullmatch(rid):
        raise Problem("INVALID_PARAMS", "page_token is not a token this service issued", param="page_token")
    return rid
