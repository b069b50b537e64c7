"""`run all`'s supervisor with stand-in children: restart on crash with backoff, clean stop."""

from __future__ import annotations

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
