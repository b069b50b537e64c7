"""`detectflow config show`: the effective configuration."""

from __future__ import annotations

from config import StackSettings
from infra.cli.base import group, pass_stack_settings


@group("config", help="the effective configuration")
def config() -> None:
    """The `config` sub-commands."""


@config.command("show", help="print every setting: its variable, its value (secrets masked) and where it came from")
@pass_stack_settings
def config_show(settings: StackSettings) -> int:
    from config.show import render  # imported on use: --help stays fast

    print(render())
    return 0
