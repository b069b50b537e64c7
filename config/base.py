"""What every settings class shares: one declaration per field, read from the environment only by ``from_env``.

A field is declared once, with its type, bounds, default, doc and (through ``setting``) its variable:
``DETECTFLOW_<FIELD>`` unless it names another. Constructing a class directly takes its defaults and the
keyword arguments, never the environment; ``X.from_env(env)`` reads the given mapping (default
``os.environ``), and a malformed value is refused there with a SettingsError naming the variable and what
is wanted (docs/architecture.md, "Configuration").
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Mapping, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "DETECTFLOW_"


class SettingsError(ValueError):
    """A setting is malformed, or a credentials file it names cannot be read."""


def setting(default: Any = ..., *, doc: str, env: str | None = None, empty_unsets: bool = False,
            **bounds: Any) -> Any:
    """One field: its default, doc, variable (``DETECTFLOW_<env>``, default the field's name upper-cased),
    and bounds (ge, gt, le, min_length, ...). ``empty_unsets``: an empty variable counts as unset."""
    extra: dict[str, Any] = {}
    if env is not None:
        extra["env"] = ENV_PREFIX + env
    if empty_unsets:
        extra["empty_unsets"] = True
    return Field(default, description=doc, json_schema_extra=extra or None, **bounds)


def _path(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("is empty; unset it for the default")
        return Path(value.strip()).expanduser()
    return value.expanduser() if isinstance(value, Path) else value


def _hosts(value: Any) -> Any:
    if isinstance(value, str):
        hosts = tuple(h.strip() for h in value.split(","))
        if not all(hosts):
            raise ValueError("must be a comma-separated list of host names")
        return hosts
    return value


# A path (``~`` expanded; an empty value refused), and a comma-separated list of hosts.
EnvPath = Annotated[Path, BeforeValidator(_path)]
OptionalPath = Annotated[Path | None, BeforeValidator(_path)]
Hosts = Annotated[tuple[str, ...], BeforeValidator(_hosts)]
Port = Annotated[int, Field(ge=1, le=65535)]

# The mapping ``from_env`` reads while it builds one instance; unset, a class reads nothing but its arguments.
_READING: ContextVar[Mapping[str, str] | None] = ContextVar("detectflow_settings_env", default=None)


class _MappingSource(PydanticBaseSettingsSource):
    """The variables of one mapping (``from_env``'s), by each field's variable name."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raw = self.settings_cls.env_values(self._env).get(field_name)  # type: ignore[attr-defined]
        return raw, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.settings_cls.env_values(self._env))  # type: ignore[attr-defined]


def mask_secret(value: Any) -> Any:
    """``value`` as it may be shown: a SecretStr masked, a URL's password replaced by ``***``."""
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return value


class Settings(BaseSettings):
    """The base of every settings class: frozen, strict about unknown names, infinities and NaN."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Never os.environ, a .env file or a secrets directory on their own: only from_env's mapping.
        env = _READING.get()
        return (init_settings,) if env is None else (init_settings, _MappingSource(settings_cls, env))

    # ---- the variables ----------------------------------------------------------------------------------------

    @classmethod
    def env_fields(cls) -> dict[str, str]:
        """Field name -> its variable, for every field set from the environment (nested settings have theirs)."""
        out = {}
        for name, info in cls.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, Settings):
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            out[name] = str(extra.get("env") or ENV_PREFIX + name.upper())
        return out

    @classmethod
    def env_values(cls, env: Mapping[str, str]) -> dict[str, str]:
        """Field name -> raw value, for the fields whose variable ``env`` sets."""
        out = {}
        for name, var in cls.env_fields().items():
            raw = env.get(var)
            if raw is None:
                continue
            extra = cls.model_fields[name].json_schema_extra
            if isinstance(extra, dict) and extra.get("empty_unsets") and not raw.strip():
                continue
            out[name] = raw
        return out

    @classmethod
    def default_of(cls, name: str) -> Any:
        """The declared default of field ``name`` (a class's field is not a class attribute)."""
        return cls.model_fields[name].get_default(call_default_factory=True)

    # ---- building -------------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """The settings ``env`` (default: os.environ) gives: its variables over the defaults, derived
        defaults (e.g. addresses from StackSettings) for the rest. Malformed values raise SettingsError."""
        env = os.environ if env is None else env
        given = cls.env_values(env)
        base = {k: v for k, v in cls._env_base(env).items() if k not in given}
        token = _READING.set(env)
        try:
            first = cls(**base)
        except ValidationError as exc:
            raise SettingsError(cls._explain(exc, given)) from exc
        finally:
            _READING.reset(token)
        derived = {k: v for k, v in first._env_defaults(env).items() if k not in given}
        return first.replace(**derived) if derived else first

    @classmethod
    def _env_base(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """Values ``from_env`` passes before reading the variables: nested settings, required fields."""
        return {}

    def _env_defaults(self, env: Mapping[str, str]) -> dict[str, Any]:
        """Defaults derived from other settings, for the fields ``env`` leaves unset; checks across fields."""
        return {}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a new instance (the instance itself is immutable)."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        values = {name: getattr(self, name) for name in type(self).model_fields} | changes
        try:
            return type(self)(**values)
        except ValidationError as exc:
            raise SettingsError(type(self)._explain(exc, {})) from exc

    @classmethod
    def _explain(cls, exc: ValidationError, given: Mapping[str, str]) -> str:
        variables = cls.env_fields()
        lines = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            name = str(err["loc"][0]) if err["loc"] else ""
            if name in given:
                lines.append(f"{variables[name]}={mask_secret(given[name])!r}: {msg}")
            elif name in variables:
                lines.append(f"{cls.__name__}.{name} ({variables[name]}): {msg}")
            else:
                lines.append(f"{cls.__name__}{'.' + name if name else ''}: {msg}")
        return "; ".join(lines)

    def __repr_args__(self) -> Any:
        # A URL with a password (a registry, an identity provider) never shows it in a repr or a log line.
        for name, value in super().__repr_args__():
            yield name, mask_secret(value)
