"""`detectflow detect|token|jobs`: detection as a client does it, through Kafka or the HTTP API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from config import GatewaySettings, StackSettings
from infra.cli.base import argument, command, group, pass_stack_settings

PATH = click.Path(path_type=Path)


@command("detect", help="detect objects in images through the Kafka pipeline (no HTTP)")
@argument("images", nargs=-1, required=True, type=PATH)
@click.option("--json", "as_json", is_flag=True, help="print the DetectionResults as JSON")
@click.option("--draw", type=PATH, metavar="DIR", default=None, help="write annotated copies into DIR")
@click.option("--lane", type=click.Choice(["online", "batch"]), default="online")
@click.option("--timeout", type=float, default=60.0, help="seconds to wait for the results")
@click.option("--tenant", default=None,
              help="produce to this tenant's ingest topic as its principal (batch lane; see `tenants create`)")
@click.option("--operator", is_flag=True,
              help="produce to detect.<lane>.submitted as the admin principal (operator tooling; tenant: "
                   "--tenant, default cli)")
@click.option("--score", type=float, default=None, help="score threshold (default: the pipeline's)")
@pass_stack_settings
def detect_command(settings: StackSettings, images: tuple[Path, ...], as_json: bool, draw: Path | None, lane: str,
                   timeout: float, tenant: str | None, operator: bool, score: float | None) -> int:
    from infra.detect_cmd import run_detect  # imported on use: --help stays fast

    if operator and tenant is None:
        tenant = "cli"
    if tenant is None:
        print("detectflow detect: --tenant NAME (as that tenant's principal: `detectflow tenants create NAME` "
              "first), or --operator (as the admin principal, for operator tooling)", file=sys.stderr)
        return 2
    return run_detect(list(images), as_json=as_json, draw_dir=draw, lane=lane, timeout_s=timeout, tenant=tenant,
                      score_threshold=score, as_tenant=not operator)


@command("token", help="mint a development JWT for a dev-mode gateway (DETECTFLOW_AUTH_DEV=true)")
@click.option("--tenant", required=True)
@click.option("--scope", multiple=True, type=click.Choice(["detect:write", "results:read", "admin"]),
              help="repeat for several (default: detect:write and results:read)")
@click.option("--subject", default=None, help="the sub claim (default dev:<tenant>)")
@click.option("--ttl", type=int, default=3600, help="seconds until it expires (at most DETECTFLOW_JWT_MAX_LIFETIME_S)")
@click.option("--alg", type=click.Choice(["RS256", "HS256"]), default="RS256")
@pass_stack_settings
def token_command(settings: StackSettings, tenant: str, scope: tuple[str, ...], subject: str | None, ttl: int,
                  alg: str) -> int:
    from gateway.auth import SCOPES  # imported on use: --help stays fast
    from gateway.devkeys import ensure_dev_keys, mint  # imported on use: --help stays fast

    gw = GatewaySettings.from_env()
    # Dev tokens are signed with keys made on this machine; only a dev-mode gateway trusts them.
    if not gw.auth_dev:
        print("detectflow token: development tokens need DETECTFLOW_AUTH_DEV=true (a gateway outside dev mode "
              "accepts only its identity provider's tokens; see docs/security.md)", file=sys.stderr)
        return 2
    if not 0 < ttl <= gw.max_token_lifetime_s:
        print(f"detectflow token: --ttl must be between 1 and {gw.max_token_lifetime_s} s "
              "(DETECTFLOW_JWT_MAX_LIFETIME_S)", file=sys.stderr)
        return 2
    try:
        print(mint(ensure_dev_keys(settings.secrets_dir), tenant=tenant, scopes=list(scope) or SCOPES[:2],
                   subject=subject, ttl_s=ttl, issuer=gw.issuer, audience=gw.audience, algorithm=alg,
                   tenant_claim=gw.tenant_claim))
    except ValueError as exc:
        print(f"detectflow token: {exc}", file=sys.stderr)
        return 2
    return 0


@group("jobs", help="bulk detection through the HTTP API (uploads + a job)")
def jobs() -> None:
    """The `jobs` sub-commands."""


@jobs.command("submit", help="upload images (files or directories) and submit them as one job")
@argument("paths", nargs=-1, required=True, type=PATH)
@click.option("--wait", is_flag=True, help="follow the job, then print its results")
@click.option("--json", "as_json", is_flag=True, help="with --wait: print the results as JSON")
@click.option("--url", default=None, help="gateway base URL (default: the local gateway)")
@click.option("--tenant", default="cli", help="tenant of the development token minted when no --token")
@click.option("--token", default=None, help="a bearer token (default: mint a development one)")
@click.option("--score", type=float, default=None, help="score threshold")
@click.option("--timeout", type=float, default=3600.0,
              help="seconds the whole command may take: uploads, the job's creation (each retried while the "
                   "gateway is overloaded or restarting) and with --wait the job itself")
@pass_stack_settings
def jobs_submit(settings: StackSettings, paths: tuple[Path, ...], wait: bool, as_json: bool, url: str | None,
                tenant: str, token: str | None, score: float | None, timeout: float) -> int:
    from infra.jobs_cmd import run_jobs  # imported on use: --help stays fast

    return run_jobs(settings, list(paths), wait=wait, as_json=as_json, url=url, tenant=tenant, token=token,
                    score=score, timeout_s=timeout)
