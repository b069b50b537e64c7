"""`detectflow config show`: the effective configuration, every field with its variable and where it came from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from config.base import Settings, mask_secret
from config.gateway import GatewaySettings
from config.stack import StackSettings


def _shown(value: Any) -> str:
    """A value as its variable would be written (secrets masked); ``-`` for none."""
    value = mask_secret(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, Path | str):
        return str(value) if str(value) else '""'
    return repr(value) if isinstance(value, float) else str(value)


def sections(env: Mapping[str, str] | None = None) -> list[tuple[str, Settings]]:
    """Each settings class with its effective instance for ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    stack = StackSettings.from_env(env)
    gateway = GatewaySettings.from_env(env)
    pipeline = gateway.pipeline
    return [("StackSettings", stack), ("Versions", stack.versions), ("StreamSettings", pipeline.stream),
            ("PipelineSettings", pipeline), ("LifecycleSettings", pipeline.lifecycle),
            ("GatewaySettings", gateway)]


def render(env: Mapping[str, str] | None = None) -> str:
    """The effective configuration: per class, one line per field with its variable, value and source
    (``env``: set by its variable; ``default``: the declared or derived default). Secrets are masked."""
    env = os.environ if env is None else env
    lines: list[str] = []
    for title, settings in sections(env):
        cls = type(settings)
        given = cls.env_values(env)
        rows = [(name, var, _shown(getattr(settings, name)), "env" if name in given else "default")
                for name, var in cls.env_fields().items()]
        name_w = max(len(r[0]) for r in rows)
        var_w = max(len(r[1]) for r in rows)
        lines.append(f"[{title}] {(cls.__doc__ or '').strip().splitlines()[0]}")
        lines.extend(f"  {n:<{name_w}}  {v:<{var_w}}  {src:<7}  {value}" for n, v, value, src in rows)
        lines.append("")
    return "\n".join(lines)
