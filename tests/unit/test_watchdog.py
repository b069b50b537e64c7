"""stream/watchdog.py: a stage loop that stops turning ends its process (to be restarted)."""

from __future__ import annotations

import subprocess
import sys

from stream.watchdog import STALLED_EXIT_STATUS, LoopWatchdog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_exit_while_the_loop_beats_and_exit_70_once_it_stalls_past_the_limit() -> None:
    exits: list[int] = []
    clock = Clock()
    dog = LoopWatchdog("scan", 300.0, exit_process=exits.append, clock=clock)
    for _ in range(10):
        clock.now += 299.0
        assert not dog.check()
        dog.beat()
    clock.now += 300.5
    assert dog.check() and exits == [STALLED_EXIT_STATUS]


def _hung_process(body: str) -> subprocess.CompletedProcess[str]:
    """A process whose watchdog starts (lines 1-3) and whose ``body`` (from line 4) never returns."""
    code = "import logging, time\nfrom stream.watchdog import LoopWatchdog\nlogging.basicConfig()\n" + body
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == STALLED_EXIT_STATUS
    return proc


def test_a_hung_loop_ends_its_process_with_every_threads_stack() -> None:
    proc = _hung_process("LoopWatchdog('inference', 0.5).start()\n"
                         "time.sleep(60)  # the loop's call that never returns\n")
    assert "the loop has not turned" in proc.stderr
    assert 'File "<string>", line 5' in proc.stderr  # the blocked call's frame (the sleep)


def test_a_limit_of_zero_starts_no_thread() -> None:
    dog = LoopWatchdog("scan", 0.0, exit_process=lambda status: None).start()
    assert dog._thread is None


def test_a_bounded_call_that_overruns_exits_before_the_loops_limit_and_one_that_returns_does_not() -> None:
    exits: list[int] = []
    clock = Clock()
    dog = LoopWatchdog("bridge", 300.0, exit_process=exits.append, clock=clock)
    with dog.bounded("commit_transaction", 60.0):
        clock.now += 59.0
        assert not dog.check()
    clock.now += 30.0  # the call returned: its bound no longer applies, the loop's does
    assert not dog.check() and exits == []
    dog.beat()
    with dog.bounded("send_offsets_to_transaction", 60.0):
        clock.now += 60.0
        assert dog.check() and exits == [STALLED_EXIT_STATUS]


def test_a_call_blocked_past_its_bound_ends_its_process_naming_the_call() -> None:
    proc = _hung_process("dog = LoopWatchdog('bridge', 300.0).start()\n"
                         "with dog.bounded('send_offsets_to_transaction', 0.5):\n"
                         "    time.sleep(60)  # a client call that does not keep its own timeout\n")
    assert "bridge: send_offsets_to_transaction has not returned within 0.5 s" in proc.stderr
    assert 'File "<string>", line 6' in proc.stderr
