"""Process figures through psutil (infra/procstats.py): live processes, their children, and gone ones."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from infra import procstats

GONE = 2**22 + 12345  # above pid_max: never a process


def test_a_live_process_has_rss_cpu_and_a_command_line() -> None:
    assert (procstats.rss_bytes(os.getpid()) or 0) > 1 << 20
    sum(i * i for i in range(200_000))  # some CPU of our own
    assert procstats.cpu_seconds(os.getpid()) > 0
    assert procstats.peak_rss_mib(os.getpid()) >= procstats.rss_bytes(os.getpid()) / (1 << 20) * 0.5
    assert "pytest" in (procstats.command_line(os.getpid()) or "")
    assert procstats.alive(os.getpid())


def test_a_tree_counts_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        own = procstats.rss_bytes(os.getpid()) or 0
        child_rss = procstats.rss_bytes(child.pid) or 0
        assert child_rss > 0
        assert procstats.tree_rss_bytes(os.getpid()) >= own + child_rss * 0.5
        assert procstats.alive(child.pid)
    finally:
        child.communicate(b"", timeout=30)
    assert not procstats.alive(child.pid)  # reaped: gone


def test_a_gone_process_reads_as_nothing() -> None:
    assert procstats.rss_bytes(GONE) is None
    assert procstats.tree_rss_bytes(GONE) == 0
    assert procstats.cpu_seconds(GONE) == 0.0
    assert math.isnan(procstats.peak_rss_mib(GONE))
    assert procstats.command_line(GONE) is None
    assert not procstats.alive(GONE)


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        assert not procstats.alive(child.pid)
        assert procstats.command_line(child.pid) is None
    finally:
        child.wait(timeout=30)
