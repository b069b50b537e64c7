"""The `detectflow` command line."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from config import SettingsError, StackSettings
from config.show import render
from infra.stack import manager
from infra.stack.base import StackError


def _certs(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.stack.pki import Pki, rotate

    leaves = rotate(Pki(settings.tls_dir), new_ca=args.ca)
    print(f"re-issued {len(leaves)} certificates ({', '.join(leaves)})" + (" under a new CA" if args.ca else ""))
    print("services read them at start: `detectflow stack down && detectflow stack up` (no data is touched)")
    return 0


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


def _model_quantize(args: argparse.Namespace, settings: StackSettings) -> int:
    from model_store.quantize import run_cli

    return run_cli(args)


def _topics(args: argparse.Namespace, settings: StackSettings) -> int:
    from config import StreamSettings
    from stream import topics

    stream = StreamSettings.from_env()
    specs = topics.all_topics(stream.topic_prefix, max_message_bytes=stream.max_message_bytes,
                              raw_retention_hours=stream.raw_retention_hours)
    if args.action == "list":
        for spec in specs:
            cfg = ", ".join(f"{k}={v}" for k, v in sorted(spec.config.items()))
            print(f"{spec.name:<42} {spec.partitions:>3}  {cfg}")
        return 0
    from config import kafka_client
    from infra.stack.kafka_access import provision

    actions = provision(kafka_client(stream), stream.topic_prefix, specs)
    for spec in specs:
        print(f"{spec.name:<42} {actions.get(spec.name, 'unchanged')}")
    return 0


def _run(args: argparse.Namespace, settings: StackSettings) -> int:
    import logging

    from config import PipelineSettings
    from infra.roles import run_role

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {args.role}: %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "cassandra"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    pipeline = PipelineSettings.from_env()
    if args.role == "all":
        from config import kafka_client
        from infra.roles import SERVICES
        from infra.stack.kafka_access import provision
        from infra.supervisor import Supervisor
        from stream import topics

        # The local deployment: its topics and ACLs first, as `detectflow topics apply` makes them (the broker
        # creates no topic by itself, and each role may only use what its ACLs name).
        stream = pipeline.stream
        provision(kafka_client(stream, "admin"), stream.topic_prefix,
                  topics.all_topics(stream.topic_prefix, max_message_bytes=stream.max_message_bytes,
                                    raw_retention_hours=stream.raw_retention_hours))
        sup = Supervisor(SERVICES, settings.log_dir, metrics_base_port=pipeline.stream.metrics_port)
        print(f"pipeline roles starting: {', '.join(SERVICES)}; logs in {settings.log_dir}/pipeline-<role>.log; "
              "Ctrl-C stops them", flush=True)
        sup.run_forever()
        return 0
    run_role(args.role, pipeline)
    return 0


def _detect(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.detect_cmd import run_detect

    if args.operator and args.tenant is None:
        args.tenant = "cli"
    if args.tenant is None:
        print("detectflow detect: --tenant NAME (as that tenant's principal: `detectflow tenants create NAME` "
              "first), or --operator (as the admin principal, for operator tooling)", file=sys.stderr)
        return 2
    return run_detect(args.images, as_json=args.json, draw_dir=args.draw, lane=args.lane, timeout_s=args.timeout,
                      tenant=args.tenant, score_threshold=args.score, as_tenant=not args.operator)


def _token(args: argparse.Namespace, settings: StackSettings) -> int:
    from config import GatewaySettings
    from gateway.auth import SCOPES
    from gateway.devkeys import ensure_dev_keys, mint

    gw = GatewaySettings.from_env()
    # Dev tokens are signed with keys made on this machine; only a dev-mode gateway trusts them.
    if not gw.auth_dev:
        print("detectflow token: development tokens need DETECTFLOW_AUTH_DEV=true (a gateway outside dev mode "
              "accepts only its identity provider's tokens; see docs/security.md)", file=sys.stderr)
        return 2
    if not 0 < args.ttl <= gw.max_token_lifetime_s:
        print(f"detectflow token: --ttl must be between 1 and {gw.max_token_lifetime_s} s "
              "(DETECTFLOW_JWT_MAX_LIFETIME_S)", file=sys.stderr)
        return 2
    try:
        print(mint(ensure_dev_keys(settings.secrets_dir), tenant=args.tenant, scopes=args.scope or SCOPES[:2],
                   subject=args.subject, ttl_s=args.ttl, issuer=gw.issuer, audience=gw.audience,
                   algorithm=args.alg, tenant_claim=gw.tenant_claim))
    except ValueError as exc:
        print(f"detectflow token: {exc}", file=sys.stderr)
        return 2
    return 0


def _jobs(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.jobs_cmd import run_jobs

    return run_jobs(args, settings)


def _dlq(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.dlq_cmd import run_dlq

    return run_dlq(args)


def _tenants(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.tenants_cmd import run_tenants

    return run_tenants(args, settings)


def _models(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.models_cmd import run_models

    return run_models(args, settings)


def _eval(args: argparse.Namespace, settings: StackSettings) -> int:
    from model_store.evaluate import run_cli

    return run_cli(args)


def _bench(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.bench import run_bench

    if args.int8 and args.target not in ("pipeline", "sync"):
        print(f"detectflow bench {args.target}: --int8 applies to the pipeline and sync benches only", file=sys.stderr)
        return 2
    if args.target == "clamd":
        from infra.bench_clamd import run_bench_clamd

        return run_bench_clamd(settings, images=args.images)
    if args.target == "tensor":
        from infra.bench_tensor import run_bench_tensor

        return run_bench_tensor(settings)
    if args.target == "hop":
        from infra.bench_hop import run_bench_hop

        return run_bench_hop(settings)
    if args.target == "cassandra":
        from infra.bench_cassandra import run_bench_cassandra

        return run_bench_cassandra(settings)
    if args.target == "tls":
        from infra.bench_tls import run_bench_tls

        return run_bench_tls(settings)
    if args.target == "sync":
        from infra.bench_sync import parse_levels, run_bench_sync

        return run_bench_sync(settings, levels=parse_levels(args.levels), requests=args.requests,
                              baseline_repeats=args.baseline_repeats, int8=args.int8)

    return run_bench(settings, n_batch=args.images, n_online=args.online, baseline_repeats=args.baseline_repeats,
                     int8=args.int8)


def _chaos(args: argparse.Namespace, settings: StackSettings) -> int:
    from infra.chaos import run_cli

    return run_cli(args, settings)


def _config(args: argparse.Namespace, settings: StackSettings) -> int:
    print(render(), end="")
    return 0


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
    from model_store.quantize import add_cli as add_quantize_cli

    add_quantize_cli(md_sub).set_defaults(func=_model_quantize)

    tp = sub.add_parser("topics", help="the topics detectflow uses")
    tp.add_argument("action", choices=["apply", "list"], help="apply: create/grow/configure idempotently")
    tp.set_defaults(func=_topics)

    ct = sub.add_parser("certs", help="the project CA and the services' TLS certificates")
    ct.add_argument("action", choices=("rotate",))
    ct.add_argument("--ca", action="store_true", help="make a new CA first (clients must get the new ca.crt)")
    ct.set_defaults(func=_certs)

    rn = sub.add_parser("run", help="run a pipeline role or the gateway until SIGTERM")
    from infra.roles import SERVICES

    rn.add_argument("role", choices=[*SERVICES, "all"], help="one role, or all of them, each in its own process")
    rn.set_defaults(func=_run)

    dt = sub.add_parser("detect", help="detect objects in images through the Kafka pipeline (no HTTP)")
    dt.add_argument("images", nargs="+", type=Path)
    dt.add_argument("--json", action="store_true", help="print the DetectionResults as JSON")
    dt.add_argument("--draw", type=Path, metavar="DIR", help="write annotated copies into DIR")
    dt.add_argument("--lane", choices=["online", "batch"], default="online")
    dt.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the results")
    dt.add_argument("--tenant", default=None,
                    help="produce to this tenant's ingest topic as its principal (batch lane; see `tenants create`)")
    dt.add_argument("--operator", action="store_true",
                    help="produce to detect.<lane>.submitted as the admin principal (operator tooling; tenant: "
                         "--tenant, default cli)")
    dt.add_argument("--score", type=float, default=None, help="score threshold (default: the pipeline's)")
    dt.set_defaults(func=_detect)

    tk = sub.add_parser("token", help="mint a development JWT for a dev-mode gateway (DETECTFLOW_AUTH_DEV=true)")
    tk.add_argument("--tenant", required=True)
    tk.add_argument("--scope", action="append", choices=["detect:write", "results:read", "admin"],
                    help="repeat for several (default: detect:write and results:read)")
    tk.add_argument("--subject", default=None, help="the sub claim (default dev:<tenant>)")
    tk.add_argument("--ttl", type=int, default=3600,
                    help="seconds until it expires (at most DETECTFLOW_JWT_MAX_LIFETIME_S)")
    tk.add_argument("--alg", choices=["RS256", "HS256"], default="RS256")
    tk.set_defaults(func=_token)

    from infra.jobs_cmd import add_cli as add_jobs_cli

    add_jobs_cli(sub).set_defaults(func=_jobs)

    from infra.dlq_cmd import add_cli as add_dlq_cli

    add_dlq_cli(sub).set_defaults(func=_dlq)

    from infra.tenants_cmd import add_cli as add_tenants_cli

    add_tenants_cli(sub).set_defaults(func=_tenants)

    from infra.models_cmd import add_cli as add_models_cli

    add_models_cli(sub).set_defaults(func=_models)

    from model_store.evaluate import add_cli as add_eval_cli

    add_eval_cli(sub).set_defaults(func=_eval)

    from infra.bench import add_cli as add_bench_cli

    add_bench_cli(sub).set_defaults(func=_bench)

    from infra.chaos import add_cli as add_chaos_cli

    add_chaos_cli(sub).set_defaults(func=_chaos)

    cf = sub.add_parser("config", help="the effective configuration: every setting, its variable and source")
    cf.add_argument("action", choices=("show",))
    cf.set_defaults(func=_config)

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
