"""`detectflow chaos`: a chaos drill that proves no request is lost or answered twice, and a soak mode.

The drill's pure parts (the fault schedule, reconciliation, figures, summary) are infra/chaos_drill.py; the drill
on the real stack is infra/chaos_run.py; docs/reliability.md says what it proves and how to run it.
"""

from __future__ import annotations

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
        raise ValueError(f"not a duration: {raw!r} (e.g. 180s, 3m, 1h)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def run_cli(stack: Any, *, duration: float | None = None, seed: int | None = None, soak: bool = False,
            rate: float | None = None, load_factor: float = 0.7, job_images: int | None = None,
            faults: tuple[str, ...] = ()) -> int:
    """`detectflow chaos`: the drill (or with ``soak`` the soak); exit 0 when it passed, 1 when not, 2 when it could
    not run."""
    # The drill's runtime (Kafka, aiohttp, the supervisor) loads only when it runs: keeps `detectflow --help` fast.
    from infra.chaos_drill import parse_fault
    from infra.chaos_run import LIFECYCLE_ROLES, ROLES, ChaosOptions, run_drill, run_soak

    try:
        if faults and soak:
            raise ValueError("--fault is for the drill, not --soak")
        for fault in faults:
            parse_fault(fault, [*ROLES, *LIFECYCLE_ROLES])
    except ValueError as exc:
        print(f"detectflow chaos: {exc}", file=sys.stderr)
        return 2

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: paused services are continued, processes stopped

    previous = signal.signal(signal.SIGTERM, interrupted)
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    try:
        if soak:
            return run_soak(stack, duration_s=duration or 1800.0, seed=seed, rate=rate, load_factor=load_factor)
        duration = duration or 180.0
        short = duration <= SHORT_FORM_MAX_S
        jobs = job_images if job_images is not None else (60 if short else 1000)
        summary = run_drill(stack, ChaosOptions(duration_s=duration, seed=seed, job_images=jobs,
                                                chosen_faults=tuple(faults)))
    except ChaosError as exc:
        print(f"detectflow chaos: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if summary.passed else 1
