"""The `detectflow` command line, on click: one module per command family (infra/cli/stack.py, models.py,
clients.py, operator.py, drills.py, configuration.py), each declaring its commands, arguments and help.

A command imports the module that does its work when it runs, so `detectflow --help` (and a typo's usage error)
loads none of the pipeline's dependencies. Exit codes: what the command returns (0 done, 1 failed or refused),
2 for a usage error or a bad setting, 130 on Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from config import SettingsError
from infra.cli import clients, configuration, drills, models, operator, stack
from infra.cli.base import DeclaredOrderGroup, invoke
from infra.stack.base import StackError


@click.group("detectflow", cls=DeclaredOrderGroup, help="Image object detection on Kafka.")
def cli() -> None:
    """The `detectflow` command group."""


for _command in (stack.stack_command, models.model, stack.topics_command, stack.certs_command, stack.run_command,
                 clients.detect_command, clients.token_command, clients.jobs, operator.dlq, operator.tenants,
                 models.models, models.eval_command, drills.bench_command, drills.chaos_command, stack.demo_command,
                 configuration.config):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `detectflow` with ``argv`` (default: the process's arguments) and return its exit code."""
    try:
        return invoke(cli, argv, prog_name="detectflow")
    except (StackError, SettingsError) as exc:
        print(f"detectflow: {exc}", file=sys.stderr)
        return 2
