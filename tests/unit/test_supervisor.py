"""`run all`'s supervisor with stand-in children: restart on crash with backoff, clean stop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from infra.supervisor import Supervisor

CHILDREN = {
    "steady": "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)",
    "crashy": "import sys; print('boom', flush=True); sys.exit(3)",
    "stubborn": "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
}


def _poll(condition, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_crashed_children_are_restarted_with_backoff_and_all_stop(tmp_path: Path) -> None:
    sup = Supervisor(list(CHILDREN), tmp_path, argv=lambda role: [sys.executable, "-c", CHILDREN[role]],
                     max_backoff_s=0.4)
    sup.start_monitor(poll_s=0.05)
    try:
        assert _poll(lambda: sup.children["crashy"].restarts >= 3), "a crashing child is restarted"
        crashy = sup.children["crashy"]
        assert set(crashy.exits[:3]) == {3}
        assert crashy.backoff_s <= 0.4
        steady_pid = sup.pids()["steady"]
        assert sup.children["steady"].restarts == 0
    finally:
        t0 = time.monotonic()
        sup.stop(timeout_s=2.0)
    assert time.monotonic() - t0 < 10
    assert sup.pids() == {}, "SIGTERM stops the well-behaved, SIGKILL the stubborn after the deadline"
    assert steady_pid > 0
    assert "boom" in (tmp_path / "pipeline-crashy.log").read_text()


def test_scan_and_the_gateway_get_a_fixed_mmap_threshold_and_an_operator_setting_wins(tmp_path: Path) -> None:
    show = "import os; print('threshold', os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ['MALLOC_ARENA_MAX'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    logs = {}
    for name, extra in (("default", {}), ("operator", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        sup = Supervisor(["scan", "preprocess"], tmp_path / name, env={**env, **extra},
                         argv=lambda role: [sys.executable, "-c", show])
        sup.start()
        assert _poll(lambda s=sup: all(c.proc is not None and c.proc.poll() is not None for c in s.children.values()))
        logs[name] = {role: (tmp_path / name / f"pipeline-{role}.log").read_text().strip() for role in sup.children}
    assert logs["default"] == {"scan": "threshold 131072 2", "preprocess": "threshold None 2"}
    assert logs["operator"] == {"scan": "threshold 65536 2", "preprocess": "threshold 65536 2"}
