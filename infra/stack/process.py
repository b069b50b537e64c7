"""Detached service processes: start, identify by pid file, stop with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from infra import procstats


class ProcessError(RuntimeError):
    """A service process could not be started or stopped."""


@dataclass(frozen=True)
class PidFile:
    """A pid file plus a marker that must appear in the process's command line.

    The marker (the state directory) keeps a recycled pid of an unrelated
    process from being mistaken for our service.
    """

    path: Path
    marker: str

    def read(self) -> int | None:
        try:
            pid = int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_ours(pid, self.marker) else None

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _is_ours(pid: int, marker: str) -> bool:
    cmdline = procstats.command_line(pid)
    return cmdline is not None and marker in cmdline


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, detached from our terminal, logging to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            return subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProcessError(f"cannot execute {argv[0]}: {exc}") from exc


def alive(pid: int) -> bool:
    return procstats.alive(pid)


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is a child of ours that has exited (else it stays a zombie, and looks
    alive). Only that pid: reaping any child would steal the exit status of processes someone else waits for (a
    supervisor's roles in the same process then all seem to exit with 0)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its parent reaps it
        pass


def terminate(pid: int, *, timeout_s: float, reap: Callable[[], None] | None = None) -> bool:
    """SIGTERM the process group, wait up to ``timeout_s``, then SIGKILL. True if it had to kill."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reap is not None:
            reap()
        if not alive(pid):
            return False
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    kill_deadline = time.monotonic() + 10
    while time.monotonic() < kill_deadline:
        if reap is not None:
            reap()
        if not alive(pid):
            break
        time.sleep(0.1)
    return True


def resident_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and all its descendants, in bytes."""
    return procstats.tree_rss_bytes(pid)


def tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            return b"\n".join(fh.read().splitlines()[-lines:]).decode(errors="replace")
    except FileNotFoundError:
        return "(no log yet)"
