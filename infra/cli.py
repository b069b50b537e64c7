"""The `detectflow` command line."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Sequence

from infra.settings import SettingsError, StackSettings
from infra.stack import manager
from infra.stack.base import StackError


def _stack(args: argparse.Namespace, settings: StackSettings) -> int:
    names = args.services or None
    if args.action == "up":
        t0 = time.monotonic()
        manager.up(settings, names)
        print(manager.format_status(manager.status(settings, names)))
        print(f"stack up in {time.monotonic() - t0:.1f}s (state: {settings.home})")
        return 0
    if args.action == "down":
        manager.down(settings, names)
        return 0
    if args.action == "status":
        rows = manager.status(settings, names)
        print(manager.format_status(rows))
        return 0 if all(r.healthy for r in rows) else 1
    if args.action == "logs":
        services = manager.load_services(settings, names)
        paths = [str(s.log_path) for s in services if s.log_path.exists()]
        if not paths:
            print("no logs yet", file=sys.stderr)
            return 1
        cmd = ["tail", f"-n{args.lines}", *(["-F"] if args.follow else []), *paths]
        return subprocess.call(cmd)
    raise AssertionError(args.action)


def _model(args: argparse.Namespace, settings: StackSettings) -> int:
    from model_store.convert import run_cli

    return run_cli(args)


def _topics(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.settings import StreamSettings
    from stream import topics

    stream = StreamSettings.from_env()
    specs = topics.all_topics(stream.topic_prefix, max_message_bytes=stream.max_message_bytes)
    if args.action == "list":
        for spec in specs:
            cfg = ", ".join(f"{k}={v}" for k, v in sorted(spec.config.items()))
            print(f"{spec.name:<42} {spec.partitions:>3}  {cfg}")
        return 0
    actions = topics.apply(stream.bootstrap, specs)
    for spec in specs:
        print(f"{spec.name:<42} {actions.get(spec.name, 'unchanged')}")
    return 0


def _run(args: argparse.Namespace, settings: StackSettings) -> int:
    import logging

    from infra.settings import StreamSettings
    from stream.runtime import run_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stream = StreamSettings.from_env()
    if args.role == "bridge":
        from stream.bridge import BridgeStage, CassandraClaims
        from stream.cassandra import connect

        stage = BridgeStage(CassandraClaims(connect(stream)), prefix=stream.topic_prefix)
        # Kafka-only output plus an LWT claim: transactions make each object's event commit once.
        run_stage(stage, stream, exactly_once=True)
        return 0
    raise AssertionError(args.role)


def _demo(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.demo import run_demo

    return run_demo(settings, bring_up=not args.no_stack)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detectflow", description="Image object detection on Kafka.")
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stack", help="install, start, stop and inspect the local stack")
    st.add_argument("action", choices=["up", "down", "status", "logs"])
    st.add_argument("services", nargs="*", help=f"subset of: {', '.join(manager.SERVICE_CLASSES)}")
    st.add_argument("-n", "--lines", type=int, default=50, help="logs: lines to show")
    st.add_argument("-f", "--follow", action="store_true", help="logs: keep following")
    st.set_defaults(func=_stack)

    md = sub.add_parser("model", help="the default model")
    md_sub = md.add_subparsers(dest="action", required=True)
    from model_store.convert import add_cli as add_convert_cli

    add_convert_cli(md_sub).set_defaults(func=_model)

    tp = sub.add_parser("topics", help="the topics detectflow uses")
    tp.add_argument("action", choices=["apply", "list"], help="apply: create/grow/configure idempotently")
    tp.set_defaults(func=_topics)

    rn = sub.add_parser("run", help="run a pipeline role until SIGTERM")
    rn.add_argument("role", choices=["bridge"])
    rn.set_defaults(func=_run)

    de = sub.add_parser("demo", help="bring the stack up and detect objects in the sample images")
    de.add_argument("--no-stack", action="store_true", help="skip bringing the stack up")
    de.set_defaults(func=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = StackSettings.from_env()
        return int(args.func(args, settings))
    except (StackError, SettingsError) as exc:
        print(f"detectflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
