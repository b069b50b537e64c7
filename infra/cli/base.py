"""What every command family of the `detectflow` CLI is built from: commands whose positional arguments carry help,
groups that list their commands in the order they were declared, and the stack settings every command reads first."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import click

from config import StackSettings

# -h as well as --help, and room for the longer help lines: every command's own (not only inherited from the
# group's context, so that a command's help option is the same however its context is made).
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


class HelpedArgument(click.Argument):
    """A positional argument with a help line (click's own have none), shown under "Arguments"."""

    def __init__(self, param_decls: list[str], help: str | None = None, **attrs: Any):
        super().__init__(param_decls, **attrs)
        self.help = help


class ParsedBy(click.ParamType):
    """A value read by ``parse`` (a function of the text that raises ValueError saying what is wrong): click's own
    wrapping of a function reports only the value, not why it was refused."""

    def __init__(self, name: str, parse: Callable[[str], Any]):
        self.name = name
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default given already parsed
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class HelpedCommand(click.Command):
    """A command whose help lists its positional arguments' help lines before its options."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(p.make_metavar(ctx), p.help) for p in self.get_params(ctx)
                if isinstance(p, HelpedArgument) and p.help]
        if rows:
            with formatter.section("Arguments"):
                formatter.write_dl(rows)
        super().format_options(ctx, formatter)


class DeclaredOrderGroup(click.Group):
    """A group that lists its commands in the order they were added (click sorts them by name), each with its whole
    help line (click cuts it to the terminal's width)."""

    command_class = HelpedCommand
    group_class = type  # click: sub-groups made with @group.group() are of this class too

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def argument(*param_decls: str, **attrs: Any) -> Callable[[Any], Any]:
    """``click.argument`` with ``help=``."""
    return click.argument(*param_decls, cls=HelpedArgument, **attrs)


def command(name: str, **attrs: Any) -> Callable[[Callable[..., Any]], HelpedCommand]:
    """A top-level command of the `detectflow` group."""
    return click.command(name, cls=HelpedCommand, **attrs)


def group(name: str, **attrs: Any) -> Callable[[Callable[..., Any]], DeclaredOrderGroup]:
    """A top-level group of sub-commands of the `detectflow` group."""
    return click.group(name, cls=DeclaredOrderGroup, **attrs)


def pass_stack_settings(callback: Callable[..., int]) -> Callable[..., int]:
    """Call ``callback(settings, **params)`` with the stack's settings, read when the command runs (after its
    arguments are parsed, so a usage error is reported first); a bad value stops it before any work (exit 2)."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> int:
        return callback(StackSettings.from_env(), *args, **kwargs)

    return run


def invoke(command: click.Command, argv: Sequence[str] | None, prog_name: str, **context: Any) -> int:
    """Run ``command`` with ``argv`` (default: the process's arguments) and return its exit code: what its callback
    returns, 0 after --help, 2 for a usage error (shown with the usage line), 130 on Ctrl-C. ``context`` goes to the
    click context (``obj=...``)."""
    try:
        return int(command.main(args=None if argv is None else list(argv), prog_name=prog_name,
                                standalone_mode=False, **context) or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # click's name for Ctrl-C
        return 130
