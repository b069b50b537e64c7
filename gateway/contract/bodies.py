"""The API's JSON request bodies (validated by gateway/contract/rules.py ``parse``; unknown fields ignored, as
the handlers always did). Image uploads are read by the streaming readers of gateway/inputs.py;
``DetectMultipartRequest`` is their documented shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from config import REVIEW_RETENTION_DAYS
from gateway import problems
from gateway.contract.rules import (
    MAX_CLASSES,
    MAX_UPLOAD_FILES,
    UPLOAD_CONTENT_TYPES,
    Contract,
    Int,
    MaxDetections,
    ModelName,
    ModelVersion,
    ObjectKey,
    ScoreThreshold,
    UploadId,
    Within,
    from_context,
)


def _split_classes(value: Any) -> Any:
    """The query's form of the list: one comma-separated string."""
    return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value


class DetectParams(Contract):
    """Detection parameters; null or absent fields take the defaults (DETECTFLOW_SCORE_THRESHOLD,
    DETECTFLOW_MAX_DETECTIONS, every class, DETECTFLOW_DEFAULT_MODEL)."""

    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"

    score_threshold: ScoreThreshold | None = Field(None, description="Lowest score kept.")
    max_detections: MaxDetections | None = Field(None, description="Most detections returned.")
    classes: Annotated[list[str] | None, BeforeValidator(_split_classes), WithJsonSchema({"anyOf": [
        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_CLASSES}, {"type": "string"}, {"type": "null"}],
    })] = Field(None, description=("Class names to keep (a list, or one comma-separated string); names the model "
                                   "does not know are refused."))
    model: ModelName | None = None
    model_version: ModelVersion | None = None

    @field_validator("classes", mode="after")
    @classmethod
    def _known_classes(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if len(value) > MAX_CLASSES:
            raise PydanticCustomError("too_long", "must be a list of at most {n} class names", {"n": MAX_CLASSES})
        names = from_context(info, "class_names")
        unknown = sorted({c for c in value if names is not None and c not in names})
        if unknown:
            raise PydanticCustomError("unknown_class", "unknown classes for this model: {u}", {"u": unknown[:5]})
        return value


# A class list's error names the parameter, not the item (as the query's comma-separated form has no items).
DetectParams.PARAMS = {name: name for name in DetectParams.model_fields}


class ModelSelector(Contract):
    """Overrides params.model / params.model_version."""

    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"
    PARAMS: ClassVar[dict[str, str]] = {"name": "model", "version": "model_version"}

    name: ModelName | None = None
    version: ModelVersion | None = None


class ImageRef(Contract):
    """An image already in the uploads bucket: `upload_id` (wins when both are given) or `key`."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"anyOf": [
        {"required": ["upload_id"]}, {"required": ["key"], "not": {"required": ["upload_id"]}}]})

    upload_id: UploadId | None = None
    key: ObjectKey | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_reference(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise PydanticCustomError("not_a_reference", "an image reference is an object with upload_id or key")
        if "upload_id" in data:
            if not isinstance(data["upload_id"], str):
                raise PydanticCustomError("not_an_upload_id", "upload_id is not an upload id")
            return {"upload_id": data["upload_id"]}  # it wins: the key is not looked at
        if not isinstance(data.get("key"), str):
            raise PydanticCustomError("not_a_reference", "key must be an object key '<tenant>/<name>' in the "
                                                         "uploads bucket")
        return {"key": data["key"]}

    @field_validator("key", mode="after")
    @classmethod
    def _no_dot_dot(cls, value: str | None) -> str | None:
        if value is not None and ".." in value.split("/"):
            raise PydanticCustomError("dot_dot", "must not name a '..' segment")
        return value

    def object_key(self, tenant: str) -> str:
        """The uploads-bucket key this names; a key outside the tenant's prefix is not found (not the caller's)."""
        if self.upload_id is not None:
            return f"{tenant}/uploads/{self.upload_id}"
        assert self.key is not None
        if not self.key.startswith(tenant + "/"):
            raise problems.Problem("NOT_FOUND", "no such object")
        return self.key


class ParamsAndModel(Contract):
    """A JSON call's detection params and model selector (a detect call by reference, a job)."""

    CODES: ClassVar[dict[str, str]] = {"params.*": "INVALID_PARAMS", "model.*": "INVALID_PARAMS"}
    PARAMS: ClassVar[dict[str, str]] = {f"params.{n}": n for n in DetectParams.model_fields} | {
        "model.name": "model", "model.version": "model_version"}

    params: DetectParams | None = None
    model: ModelSelector | None = None

    def merged_params(self) -> dict[str, Any]:
        """The params with the model selector's name and version over them (as the query's are read)."""
        out = {} if self.params is None else self.params.model_dump(exclude_none=True)
        if self.model is not None and self.model.name is not None:
            out["model"] = self.model.name
        if self.model is not None and self.model.version is not None:
            out["model_version"] = self.model.version
        return out


class DetectJsonRequest(ParamsAndModel):
    """A detect call naming an uploaded object instead of sending the bytes."""

    image: ImageRef


class DetectMultipartRequest(BaseModel):
    """A detect call as a multipart form (read by the gateway's streaming reader, gateway/inputs.py)."""

    image: bytes = Field(description="JPEG, PNG, WebP, BMP or TIFF bytes (sniffed, not trusted).",
                         json_schema_extra={"format": "binary"})
    params: DetectParams | None = Field(None, description="A JSON object; its fields override the query's.")


class UploadFile(Contract):
    CODES: ClassVar[dict[str, str]] = {"content_type": "UNSUPPORTED_MEDIA_TYPE", "content_length": "INVALID_PARAMS"}

    content_type: Literal[tuple(sorted(UPLOAD_CONTENT_TYPES))]  # type: ignore[valid-type]
    content_length: Annotated[Int, Within(lo=1, hi=lambda s: s.pipeline.image_max_bytes)] = Field(
        description="Exact size of the upload in bytes.")


class UploadRequest(Contract):
    CODES: ClassVar[dict[str, str]] = {"files.content_type": "UNSUPPORTED_MEDIA_TYPE",
                                       "files.content_length": "INVALID_PARAMS"}

    files: list[UploadFile] = Field(min_length=1, max_length=MAX_UPLOAD_FILES)


class JobRequest(ParamsAndModel):
    """Up to DETECTFLOW_JOB_MAX_ITEMS uploaded images, one set of params."""

    CODES: ClassVar[dict[str, str]] = ParamsAndModel.CODES

    items: Annotated[list[ImageRef], Within(hi=lambda s: s.job_max_items, length=True)] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _not_too_many(cls, data: Any, info: ValidationInfo) -> Any:
        """Too many items is its own code (422), decided before any item is looked at."""
        settings = from_context(info, "settings")
        items = data.get("items") if isinstance(data, Mapping) else None
        if settings is not None and isinstance(items, list) and len(items) > settings.job_max_items:
            raise PydanticCustomError("TOO_MANY_ITEMS", "a job has at most {m} items, not {n}",
                                      {"m": settings.job_max_items, "n": len(items)})
        return data


ClassName = Annotated[str, Field(min_length=1, max_length=100, description="A class name.")]


class TenantPolicyRequest(Contract):
    """The tenant's content policy (replaces the current one)."""

    DEFAULT_CODE: ClassVar[str] = "INVALID_PARAMS"
    PARAMS: ClassVar[dict[str, str]] = {"hidden_classes": "hidden_classes", "review_classes": "review_classes",
                                        "review_retention_days": "review_retention_days"}

    hidden_classes: list[ClassName] = Field([], max_length=1000, description="Classes never returned for this tenant.",
                                            json_schema_extra={"uniqueItems": True})
    review_classes: list[ClassName] = Field([], max_length=1000, json_schema_extra={"uniqueItems": True},
                                            description="Classes whose presence flags the image for review.")
    review_retention_days: Literal[REVIEW_RETENTION_DAYS] | None = Field(  # type: ignore[valid-type]
        None, description="Days a flagged image's review copy is kept; null: the deployment's default.")

    @field_validator("hidden_classes", "review_classes", mode="after")
    @classmethod
    def _known(cls, value: list[str], info: ValidationInfo) -> list[str]:
        names = from_context(info, "class_names")
        unknown = sorted(set(value) - set(names)) if names is not None else []
        if unknown:
            raise PydanticCustomError("unknown_class", "unknown classes: {u}", {"u": ", ".join(unknown[:5])})
        return sorted(set(value))
