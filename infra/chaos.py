"""`detectflow chaos`: a chaos drill that proves no request is lost or answered twice, and a soak mode.

The drill's pure parts (the fault schedule, reconciliation, figures, summary) are infra/chaos_drill.py; the drill
on the real stack is infra/chaos_run.py; docs/reliability.md says what it proves and how to run it.
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import sys
from typing import Any

from infra.chaos_drill import SHORT_FORM_MAX_S, ChaosError

# ---------------------------------------------------------------------------------------------- CLI


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h)?$")


def parse_duration(raw: str) -> float:
    """'180', '180s', '3m', '1h' -> seconds."""
    m = _DURATION.match(raw.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {raw!r} (e.g. 180s, 3m, 1h)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def add_cli(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("chaos", help="chaos drill on the local stack: faults under load, then reconcile every "
                                     "request (or --soak: steady load, memory growth)")
    p.add_argument("--duration", type=parse_duration, default=None,
                   help="load time (default 180s; --soak: 30m); up to 300s is the short form")
    p.add_argument("--seed", type=int, default=None, help="the fault schedule's and load's random seed")
    p.add_argument("--soak", action="store_true", help="no faults: ~70%% of capacity, RSS growth and errors")
    p.add_argument("--rate", type=float, default=None,
                   help="--soak: sync calls per second (default: --load-factor x a capacity measured first)")
    p.add_argument("--load-factor", type=float, default=0.7,
                   help="--soak: the load as a share of the measured capacity (default 0.7; 4 for an overload run)")
    p.add_argument("--job-images", type=int, default=None,
                   help="images in the batch job (default 1000 in the long form, 60 in the short)")
    return p


def run_cli(args: argparse.Namespace, stack: Any) -> int:
    # The drill's runtime (Kafka, aiohttp, the supervisor) loads only when it runs: keeps `detectflow --help` fast.
    from infra.chaos_run import ChaosOptions, run_drill, run_soak

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: paused services are continued, processes stopped

    previous = signal.signal(signal.SIGTERM, interrupted)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    try:
        if args.soak:
            return run_soak(stack, duration_s=args.duration or 1800.0, seed=seed, rate=args.rate,
                            load_factor=args.load_factor)
        duration = args.duration or 180.0
        short = duration <= SHORT_FORM_MAX_S
        jobs = args.job_images if args.job_images is not None else (60 if short else 1000)
        summary = run_drill(stack, ChaosOptions(duration_s=duration, seed=seed, job_images=jobs))
    except ChaosError as exc:
        print(f"detectflow chaos: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if summary.passed else 1
