"""`detectflow stack|topics|certs|run|demo`: the local deployment (its services, topics, certificates and roles)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import click

from config import PipelineSettings, StackSettings, StreamSettings
from infra.cli.base import argument, command, pass_stack_settings
from infra.roles import SERVICES, run_role
from infra.stack import manager


@command("stack", help="install, start, stop and inspect the local stack")
@argument("action", type=click.Choice(["up", "down", "status", "logs"]))
@argument("services", nargs=-1, help=f"subset of: {', '.join(manager.SERVICE_CLASSES)}")
@click.option("-n", "--lines", type=int, default=50, help="logs: lines to show")
@click.option("-f", "--follow", is_flag=True, help="logs: keep following")
@pass_stack_settings
def stack_command(settings: StackSettings, action: str, services: tuple[str, ...], lines: int, follow: bool) -> int:
    names = list(services) or None
    if action == "up":
        t0 = time.monotonic()
        manager.up(settings, names)
        print(manager.format_status(manager.status(settings, names)))
        print(f"stack up in {time.monotonic() - t0:.1f}s (state: {settings.home})")
        return 0
    if action == "down":
        manager.down(settings, names)
        return 0
    if action == "status":
        rows = manager.status(settings, names)
        print(manager.format_status(rows))
        return 0 if all(r.healthy for r in rows) else 1
    if action == "logs":
        found = manager.load_services(settings, names)
        paths = [str(s.log_path) for s in found if s.log_path.exists()]
        if not paths:
            print("no logs yet", file=sys.stderr)
            return 1
        cmd = ["tail", f"-n{lines}", *(["-F"] if follow else []), *paths]
        return subprocess.call(cmd)
    raise AssertionError(action)


@command("topics", help="the topics detectflow uses")
@argument("action", type=click.Choice(["apply", "list"]), help="apply: create/grow/configure idempotently")
@pass_stack_settings
def topics_command(settings: StackSettings, action: str) -> int:
    from stream import topics  # imported on use: --help stays fast

    stream = StreamSettings.from_env()
    specs = topics.all_topics(stream.topic_prefix, max_message_bytes=stream.max_message_bytes,
                              raw_retention_hours=stream.raw_retention_hours)
    if action == "list":
        for spec in specs:
            cfg = ", ".join(f"{k}={v}" for k, v in sorted(spec.config.items()))
            print(f"{spec.name:<42} {spec.partitions:>3}  {cfg}")
        return 0
    from infra.stack.kafka_access import provision  # imported on use: --help stays fast
    from stream.kafka import kafka_connection  # imported on use: --help stays fast

    actions = provision(kafka_connection(stream), stream.topic_prefix, specs)
    for spec in specs:
        print(f"{spec.name:<42} {actions.get(spec.name, 'unchanged')}")
    return 0


@command("certs", help="the project CA and the services' TLS certificates")
@argument("action", type=click.Choice(["rotate"]))
@click.option("--ca", is_flag=True, help="make a new CA first (clients must get the new ca.crt)")
@pass_stack_settings
def certs_command(settings: StackSettings, action: str, ca: bool) -> int:
    from infra.stack.pki import Pki, rotate  # imported on use: --help stays fast

    leaves = rotate(Pki(settings.tls_dir), new_ca=ca)
    print(f"re-issued {len(leaves)} certificates ({', '.join(leaves)})" + (" under a new CA" if ca else ""))
    print("services read them at start: `detectflow stack down && detectflow stack up` (no data is touched)")
    return 0


@command("run", help="run a pipeline role or the gateway until SIGTERM")
@argument("role", type=click.Choice([*SERVICES, "all"]),
          help="one role, or all of them, each in its own process")
@pass_stack_settings
def run_command(settings: StackSettings, role: str) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {role}: %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "cassandra"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    pipeline = PipelineSettings.from_env()
    if role == "all":
        from infra.stack.kafka_access import provision  # imported on use: --help stays fast
        from infra.supervisor import Supervisor  # imported on use: --help stays fast
        from stream import topics  # imported on use: --help stays fast
        from stream.kafka import kafka_connection  # imported on use: --help stays fast

        # The local deployment: its topics and ACLs first, as `detectflow topics apply` makes them (the broker
        # creates no topic by itself, and each role may only use what its ACLs name).
        stream = pipeline.stream
        provision(kafka_connection(stream, "admin"), stream.topic_prefix,
                  topics.all_topics(stream.topic_prefix, max_message_bytes=stream.max_message_bytes,
                                    raw_retention_hours=stream.raw_retention_hours))
        sup = Supervisor(SERVICES, settings.log_dir, metrics_base_port=pipeline.stream.metrics_port)
        print(f"pipeline roles starting: {', '.join(SERVICES)}; logs in {settings.log_dir}/pipeline-<role>.log; "
              "Ctrl-C stops them", flush=True)
        sup.run_forever()
        return 0
    run_role(role, pipeline)
    return 0


@command("demo", help="bring the stack up and detect objects in the sample images")
@click.option("--no-stack", is_flag=True, help="skip bringing the stack up")
@pass_stack_settings
def demo_command(settings: StackSettings, no_stack: bool) -> int:
    from infra.demo import run_demo  # imported on use: --help stays fast

    return run_demo(settings, bring_up=not no_stack)
