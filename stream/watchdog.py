"""A stage loop that stops turning ends its process, so that the supervisor (or the orchestrator) restarts it.

The supervisor restarts a role whose process exits, not one that hangs. In the 30-minute chaos drill,
inference's loop stopped turning right after Kafka's restart: librdkafka left the group when
``max.poll.interval.ms`` (300 s) passed without a poll, and the process exited only 10 minutes later, when its
next transaction commit was fenced. A loop that has not turned for ``limit_s`` (the same 300 s by default: past
it the consumer is out of its group and serves nobody) dumps every thread's stack to the log, naming the call
that blocked, and exits with status 70; its uncommitted records are read again by the next process.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

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

    def beat(self) -> None:
        self._last = self._clock()

    def stalled_for(self) -> float:
        return self._clock() - self._last

    def check(self) -> bool:
        """Exit the process if the loop has stalled; True when it did (or would have, with a stand-in exit)."""
        stalled = self.stalled_for()
        if stalled < self.limit_s:
            return False
        log.error("%s: the loop has not turned for %.0f s (limit %.0f s): exiting so that it is restarted; "
                  "every thread's stack follows", self.name, stalled, self.limit_s)
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
        every = min(5.0, self.limit_s / 10)
        while not self._stop.wait(every):
            if self.check():
                return
