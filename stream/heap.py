"""Give freed heap memory back to the operating system now and then.

glibc keeps what a process freed in its arenas for reuse; after a peak (a backlog that made batches large, a
burst of big images) a stage's resident memory stays at the peak's size for good, so RSS tracks the worst
moment, not the working set. ``malloc_trim(0)`` returns the free pages of every arena (the top of the heap
and, since glibc 2.8, free pages inside it). A stage calls it between batches at most every
``interval_s``. A trim costs what it frees: 2.8 ms returning ~45 MiB, 27 ms returning ~440 MiB, ~0.01 ms
with nothing to return (measured on this project's 2-core machine); `detectflow chaos --soak` shows the RSS
it keeps (docs/reliability.md). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable


def _libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """``maybe_trim()`` trims the heap when ``interval_s`` has passed since the last trim (0: never)."""

    def __init__(self, interval_s: float, *, trim: Callable[[int], int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._trim = trim if trim is not None else (_libc_trim() if interval_s > 0 else None)
        self._clock = clock
        self._last = clock()
        self.trims = 0

    def maybe_trim(self) -> bool:
        if self._trim is None or self.interval_s <= 0:
            return False
        now = self._clock()
        if now - self._last < self.interval_s:
            return False
        return self.trim()

    def trim(self) -> bool:
        """Trim now (a process with its own timer: the gateway's background task); False where it cannot."""
        if self._trim is None:
            return False
        self._last = self._clock()
        self._trim(0)
        self.trims += 1
        return True
