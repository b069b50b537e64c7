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
