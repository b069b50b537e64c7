"""The contract's rules: the patterns and limits of the API, ``Within`` (a range taken from the settings), and
``parse``, which validates a body or a set of parameters with a contract model and turns its first error into
the problem the route has always answered (gateway/problems.py).

Each model says which code a field's error is (``CODES``, by dotted field path) and which parameter an
INVALID_PARAMS names (``PARAMS``). A limit is declared once, on the field: a fixed one as a Field constraint,
one that comes from the settings as ``Within`` (checked against the settings in the validation context,
written into the document from the settings the document is generated for).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError, core_schema

from config import GatewaySettings
from gateway import problems
from schemas.names import MODEL_NAME_MAX, MODEL_NAME_PATTERN, MODEL_NAME_RULE, valid_model_name

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


def no_bool(value: Any) -> Any:
    """JSON true is not a number (pydantic's lax mode would read it as 1)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(no_bool)]
Number = Annotated[float, BeforeValidator(no_bool), Field(allow_inf_nan=False)]
ScoreThreshold = Annotated[Number, Within(lo=lambda s: s.pipeline.min_score, hi=1)]
MaxDetections = Annotated[Int, Within(lo=1, hi=lambda s: s.pipeline.max_detections_limit)]


def model_name(value: str) -> str:
    """schemas/names.py's rule, the one every model name is checked by."""
    if not valid_model_name(value):
        raise PydanticCustomError("model_name", "must be a model name: {rule}", {"rule": MODEL_NAME_RULE})
    return value


ModelName = Annotated[str, AfterValidator(model_name), WithJsonSchema({
    "type": "string", "pattern": MODEL_NAME_PATTERN, "maxLength": MODEL_NAME_MAX,
    "description": f"A model in the repository; {MODEL_NAME_RULE}."})]
ModelVersion = Annotated[int, Field(ge=1, le=MAX_MODEL_VERSION, description="A model version; null: the newest."),
                         BeforeValidator(no_bool)]
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


def from_context(info: ValidationInfo, key: str) -> Any:
    return (info.context or {}).get(key)
