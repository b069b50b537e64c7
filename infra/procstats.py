"""What a process costs, read through psutil: resident memory, CPU time, its descendants.

The stack's `status` (infra/stack/process.py), the benches (CPU-ms per image of every process) and the soak
(RSS growth) all read their figures here. A process that is gone reads as None or 0, never as an error: these
figures are sampled while roles are killed and restarted.
"""

from __future__ import annotations

from pathlib import Path

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid``; None when it is gone (or not ours to read)."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except _GONE:
        return None


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (a service's wrapper script and its JVM); 0 when gone."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except _GONE:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except _GONE:  # exited between the listing and the read
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far; 0 when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except _GONE:
        return 0.0
    return float(times.user + times.system)


def peak_rss_mib(pid: int) -> float:
    """The high-water mark of ``pid``'s resident memory in MiB; NaN when it is gone.

    Read from /proc/<pid>/status (VmHWM): psutil has no peak RSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def command_line(pid: int) -> str | None:
    """The command line of a live (not zombie) process, its arguments joined by spaces; None otherwise."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return " ".join(process.cmdline())
    except _GONE:
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: it exists
        return True
