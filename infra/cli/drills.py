"""`detectflow bench|chaos`: benchmarks that print figures, and the chaos drill and soak on the local stack."""

from __future__ import annotations

import sys

import click

from config import StackSettings
from infra.cli.base import ParsedBy, argument, command, pass_stack_settings

BENCH_TARGETS = ["pipeline", "sync", "hop", "tls", "cassandra", "clamd", "tensor"]


def parse_duration(raw: str) -> float:
    """A duration ('180', '180s', '3m', '1h') in seconds, as infra.chaos reads it."""
    from infra.chaos import parse_duration  # imported on use: --help stays fast

    return parse_duration(raw)


@command("bench", help="benchmarks that print figures and ratios against a same-run baseline")
@argument("target", type=click.Choice(BENCH_TARGETS),
          help="hop: one stage-to-stage hop on the broker (produce+flush, poll, sync commit); "
               "tls: the same hop over SASL_SSL against plaintext, on a throwaway broker")
@click.option("--images", type=int, default=112, help="batch-lane requests")
@click.option("--online", type=int, default=40, help="online-lane requests, one at a time")
@click.option("--baseline-repeats", type=int, default=4, help="passes of the baseline over the images")
@click.option("--levels", default="1,4,16", help="sync: concurrency levels, comma-separated")
@click.option("--requests", type=int, default=40, help="sync: requests per level (at least 4 per caller)")
@click.option("--int8", is_flag=True,
              help="pipeline, sync: serve and measure the static INT8 version of the default model (made as "
                   "`detectflow model quantize` makes it, pushed through the release gate as model "
                   "<default>-int8 and promoted); the baseline, model cost and plain server load it too")
@pass_stack_settings
def bench_command(settings: StackSettings, target: str, images: int, online: int, baseline_repeats: int, levels: str,
                  requests: int, int8: bool) -> int:
    if int8 and target not in ("pipeline", "sync"):
        print(f"detectflow bench {target}: --int8 applies to the pipeline and sync benches only", file=sys.stderr)
        return 2
    if target == "clamd":
        from infra.bench_clamd import run_bench_clamd  # imported on use: --help stays fast

        return run_bench_clamd(settings, images=images)
    if target == "tensor":
        from infra.bench_tensor import run_bench_tensor  # imported on use: --help stays fast

        return run_bench_tensor(settings)
    if target == "hop":
        from infra.bench_hop import run_bench_hop  # imported on use: --help stays fast

        return run_bench_hop(settings)
    if target == "cassandra":
        from infra.bench_cassandra import run_bench_cassandra  # imported on use: --help stays fast

        return run_bench_cassandra(settings)
    if target == "tls":
        from infra.bench_tls import run_bench_tls  # imported on use: --help stays fast

        return run_bench_tls(settings)
    if target == "sync":
        from infra.bench_sync import parse_levels, run_bench_sync  # imported on use: --help stays fast

        try:
            parsed = parse_levels(levels)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--levels'") from exc
        return run_bench_sync(settings, levels=parsed, requests=requests, baseline_repeats=baseline_repeats,
                              int8=int8)
    from infra.bench import run_bench  # imported on use: --help stays fast

    return run_bench(settings, n_batch=images, n_online=online, baseline_repeats=baseline_repeats, int8=int8)


@command("chaos", help="chaos drill on the local stack: faults under load, then reconcile every request (or --soak: "
                       "steady load, memory growth)")
@click.option("--duration", type=ParsedBy("duration", parse_duration), default=None,
              help="load time (default 180s; --soak: 30m); up to 300s is the short form")
@click.option("--seed", type=int, default=None, help="the fault schedule's and load's random seed")
@click.option("--soak", is_flag=True, help="no faults: ~70% of capacity, RSS growth and errors")
@click.option("--rate", type=float, default=None,
              help="--soak: sync calls per second (default: --load-factor x a capacity measured first)")
@click.option("--load-factor", type=float, default=0.7,
              help="--soak: the load as a share of the measured capacity (default 0.7; 4 for an overload run)")
@click.option("--job-images", type=int, default=None,
              help="images in the batch job (default 1000 in the long form, 60 in the short)")
@click.option("--fault", "faults", multiple=True, metavar="KIND:TARGET",
              help="instead of the planned schedule, these faults in this order (repeatable): kill:<role>, "
                   "restart:<service>, pause:<cassandra|clamd>[:<seconds>], "
                   "down:<service>[:<seconds>] (stopped, default 600)")
@pass_stack_settings
def chaos_command(settings: StackSettings, duration: float | None, seed: int | None, soak: bool, rate: float | None,
                  load_factor: float, job_images: int | None, faults: tuple[str, ...]) -> int:
    from infra.chaos import run_cli  # imported on use: --help stays fast

    return run_cli(settings, duration=duration, seed=seed, soak=soak, rate=rate, load_factor=load_factor,
                   job_images=job_images, faults=faults)
