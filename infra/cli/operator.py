"""`detectflow dlq|tenants`: an operator's Kafka tooling (dead letters, tenants' credentials and topics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from config import StackSettings
from infra.cli.base import argument, group, pass_stack_settings


@group("dlq", help="list, show and redrive the dead letters on the *.dlq topics")
def dlq() -> None:
    """The `dlq` sub-commands."""


def _letter_filters(callback: Callable[..., Any]) -> Callable[..., Any]:
    callback = click.option("--since", default=None, metavar="DURATION_OR_ISO",
                            help="only letters written since then: 90s, 30m, 2h, 7d, or an ISO 8601 time")(callback)
    return click.option("--topic", default=None,
                        help="one DLQ topic (or the topic whose DLQ it is); default: all")(callback)


@dlq.command("list", help="one line per letter")
@_letter_filters
@pass_stack_settings
def dlq_list(settings: StackSettings, topic: str | None, since: str | None) -> int:
    from infra.dlq_cmd import run_dlq  # imported on use: --help stays fast

    return run_dlq("list", topic=topic, since=since)


@dlq.command("redrive", help="produce the letters' original records back onto their topics, each once")
@_letter_filters
@click.option("--dry-run", is_flag=True, help="print what would be redriven; produce nothing")
@pass_stack_settings
def dlq_redrive(settings: StackSettings, topic: str | None, since: str | None, dry_run: bool) -> int:
    from infra.dlq_cmd import run_dlq  # imported on use: --help stays fast

    return run_dlq("redrive", topic=topic, since=since, dry_run=dry_run)


@dlq.command("show", help="one letter in full (headers, error, value size; never the image bytes)")
@argument("letter", help="<dlq topic>:<partition>:<offset>, as `dlq list` prints it")
@pass_stack_settings
def dlq_show(settings: StackSettings, letter: str) -> int:
    from infra.dlq_cmd import run_dlq  # imported on use: --help stays fast

    return run_dlq("show", letter=letter)


@group("tenants", help="Kafka credentials of tenants producing into Kafka (their ingest topics)")
def tenants() -> None:
    """The `tenants` sub-commands."""


@tenants.command("create", help="issue the tenant's SCRAM credential, create its ingest topic and ACLs")
@argument("name")
@click.option("--show-secret", is_flag=True, help="also print the password")
@click.option("--rotate", is_flag=True, help="issue a new password (the old one stops working)")
@pass_stack_settings
def tenants_create(settings: StackSettings, name: str, show_secret: bool, rotate: bool) -> int:
    from infra.tenants_cmd import run_tenants  # imported on use: --help stays fast

    return run_tenants(settings, "create", name, show_secret=show_secret, rotate=rotate)


@tenants.command("revoke", help="remove the tenant's SCRAM credential and ACLs")
@argument("name")
@click.option("--delete-topic", is_flag=True, help="also delete its ingest and reply topics")
@pass_stack_settings
def tenants_revoke(settings: StackSettings, name: str, delete_topic: bool) -> int:
    from infra.tenants_cmd import run_tenants  # imported on use: --help stays fast

    return run_tenants(settings, "revoke", name, delete_topic=delete_topic)
