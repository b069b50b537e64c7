"""`detectflow run all`: every role as its own process, restarted when it crashes, stopped together.

Each child is ``python -m infra.cli run <role>`` with its output in ``<home>/logs/pipeline-<role>.log``.
A child that exits while the supervisor is running is restarted after a backoff that doubles with
each quick crash (capped), so a crash loop does not spin. SIGTERM/SIGINT stop every child with
SIGTERM (each finishes its in-flight batch and commits), then SIGKILL after a deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


# glibc serves a request of 128 KiB or more with its own mmap, returned whole on free, until the first such
# free: then it raises that threshold to the freed size (up to 32 MiB) and serves image-sized buffers from the
# arenas, where their mixed sizes fragment the heap and the RSS creeps. A fixed threshold keeps them mmapped.
# Where it showed: scan held still in a 15-minute soak with it (114 -> 117 MiB, against 119 -> 137 without);
# the gateway holds request bodies, inference 2 MB tensors. It costs page faults on every large buffer (about
# +0.15 ms per 850 KB buffer on this 2-core machine): little beside a model run, but preprocess, whose RSS
# holds without it, would pay it on every decode for nothing. docs/reliability.md has the soaks.
ROLE_MALLOC_ENV: dict[str, dict[str, str]] = {
    role: {"MALLOC_MMAP_THRESHOLD_": "131072"} for role in ("scan", "inference", "gateway")
}


@dataclass
class Child:
    role: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff_s: float = 1.0
    next_start: float = 0.0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, roles: Sequence[str], log_dir: Path, *, env: Mapping[str, str] | None = None,
                 max_backoff_s: float = 30.0, stable_after_s: float = 60.0, metrics_base_port: int = 0,
                 argv: Callable[[str], list[str]] | None = None):
        self.children = {role: Child(role) for role in roles}
        self.log_dir = Path(log_dir)
        self.env = dict(os.environ if env is None else env)
        # glibc gives each thread that mallocs its own 64 MiB arena (8 x cores of them); librdkafka's, the
        # driver's and ORT's threads each touch one and the RSS creeps for minutes. Two arenas hold it still.
        self.env.setdefault("MALLOC_ARENA_MAX", "2")
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        self.metrics_base_port = metrics_base_port
        self._stop = threading.Event()
        self._lock = threading.Lock()  # check() and stop() never interleave: no child spawned after stop
        self.argv = argv or (lambda role: [sys.executable, "-m", "infra.cli", "run", role])

    def log_path(self, role: str) -> Path:
        return self.log_dir / f"pipeline-{role}.log"

    def _spawn(self, child: Child) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        for name, value in ROLE_MALLOC_ENV.get(child.role, {}).items():
            env.setdefault(name, value)  # the operator's own setting wins
        if self.metrics_base_port:
            env["DETECTFLOW_METRICS_PORT"] = str(self.metrics_base_port + list(self.children).index(child.role))
        with open(self.log_path(child.role), "ab") as out:
            child.proc = subprocess.Popen(self.argv(child.role), stdout=out,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
        child.started = time.monotonic()
        log.info("started %s (pid %s)", child.role, child.proc.pid)

    def start(self) -> None:
        for child in self.children.values():
            self._spawn(child)

    def pids(self) -> dict[str, int]:
        return {c.role: c.proc.pid for c in self.children.values() if c.proc is not None and c.proc.poll() is None}

    def check(self) -> None:
        """Restart children that exited (after their backoff)."""
        with self._lock:
            self._check()

    def _check(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.proc is not None:
                code = child.proc.poll()
                if code is None:
                    continue
                child.exits.append(code)
                ran = now - child.started
                child.backoff_s = 1.0 if ran > self.stable_after_s else min(child.backoff_s * 2, self.max_backoff_s)
                child.next_start = now + child.backoff_s
                child.proc = None
                log.warning("%s exited with %s after %.0fs; restarting in %.0fs (see %s)", child.role, code, ran,
                            child.backoff_s, self.log_path(child.role))
            if child.proc is None and now >= child.next_start and not self._stop.is_set():
                child.restarts += 1
                self._spawn(child)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        with self._lock:
            self._stop_children(timeout_s)

    def _stop_children(self, timeout_s: float) -> None:
        running = [c.proc for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %s did not stop in %.0fs: killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout=10)

    def start_monitor(self, poll_s: float = 0.5) -> threading.Thread:
        """Start the children and restart them from a background thread (for embedding: tests, benchmarks)."""
        self.start()

        def monitor() -> None:
            while not self._stop.wait(poll_s):
                self.check()

        thread = threading.Thread(target=monitor, name="supervisor", daemon=True)
        thread.start()
        return thread

    def run_forever(self, poll_s: float = 0.5) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(poll_s):
                self.check()
        finally:
            self.stop()
