"""A stage loop that stops turning ends its process, so that the supervisor (or the orchestrator) restarts it.

The supervisor restarts a role whose process exits, not one that hangs. In the 30-minute chaos drill,
inference's loop stopped turning right after Kafka's restart: librdkafka left the group when
``max.poll.interval.ms`` (300 s) passed without a poll, and the process exited only 10 minutes later, when its
next transaction commit was fenced. A loop that has not turned for ``limit_s`` (the same 300 s by default: past
it the consumer is out of its group and serves nobody) dumps every thread's stack to the log, naming the call
that blocked, and exits with status 70; its uncommitted records are read again by the next process.

The next short drill named the call: ``send_offsets_to_transaction``, given 30 s, blocked for minutes after
Kafka's restart (librdkafka's coordinator requests do not check their own timeout: upstream issue 5456, open in
2.16). A call that must return within a bound runs inside ``bounded(what, seconds)``: past the bound the process
exits the same way, without waiting out the loop's limit.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

STALLED_EXIT_STATUS = 70  # EX_SOFTWARE


class LoopWatchdog:
    """``beat()`` at every turn of the loop; a thread exits the process when no beat came for ``limit_s``."""

    def __init__(self, name: str, limit_s: float, *, exit_process: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.limit_s = limit_s
        self._exit = exit_process
        self._clock = clock
        self._last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: tuple[str, float, float] | None = None  # (what, limit, deadline) of the bounded call running

    def beat(self) -> None:
        self._last = self._clock()

    @contextmanager
    def bounded(self, what: str, limit_s: float) -> Iterator[None]:
        """The block must end within ``limit_s``, or the process exits (stack dump, status 70) once the watchdog
        runs. For a client call whose own timeout cannot be trusted; one at a time (the loop's thread)."""
        self._call = (what, limit_s, self._clock() + limit_s)
        try:
            yield
        finally:
            self._call = None

    def stalled_for(self) -> float:
        return self._clock() - self._last

    def check(self) -> bool:
        """Exit the process if the loop has stalled or a bounded call overran; True when it did (or would have,
        with a stand-in exit)."""
        stalled, call = self.stalled_for(), self._call
        if call is not None and self._clock() >= call[2]:
            log.error("%s: %s has not returned within %g s: exiting so that it is restarted; every thread's "
                      "stack follows", self.name, call[0], call[1])
        elif stalled >= self.limit_s:
            log.error("%s: the loop has not turned for %.0f s (limit %.0f s): exiting so that it is restarted; "
                      "every thread's stack follows", self.name, stalled, self.limit_s)
        else:
            return False
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self._exit(STALLED_EXIT_STATUS)
        return True

    def start(self) -> LoopWatchdog:
        if self.limit_s > 0:
            self.beat()
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        every = min(1.0, self.limit_s / 10)  # a bounded call's overrun is seen within a second
        while not self._stop.wait(every):
            if self.check():
                return
