"""stream/heap.py: freed heap memory goes back to the OS between batches, at most every interval."""

from __future__ import annotations

from stream.heap import HeapTrimmer, _libc_trim


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_once_per_interval() -> None:
    calls: list[int] = []
    clock = Clock()
    heap = HeapTrimmer(30.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    assert not heap.maybe_trim()  # the interval counts from the start
    clock.now += 29.9
    assert not heap.maybe_trim()
    clock.now += 0.2
    assert heap.maybe_trim() and calls == [0]
    assert not heap.maybe_trim()
    clock.now += 30.0
    assert heap.maybe_trim() and heap.trims == 2


def test_an_interval_of_zero_never_trims() -> None:
    calls: list[int] = []
    clock = Clock()
    heap = HeapTrimmer(0.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    clock.now += 1e6
    assert not heap.maybe_trim() and calls == []


def test_glibc_gives_freed_memory_back() -> None:
    trim = _libc_trim()
    assert trim is not None  # this project runs on glibc (Linux)
    chunks = [bytearray(100_000) for _ in range(2000)]  # ~200 MB below the mmap threshold, most of it freed
    keep = chunks[::100]
    del chunks

    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    before = rss_mib()
    trim(0)
    assert rss_mib() < before - 50, (before, rss_mib())
    assert len(keep) == 20


def test_trim_now_restarts_the_interval() -> None:
    calls: list[int] = []
    clock = Clock()
    heap = HeapTrimmer(30.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    clock.now += 5.0
    assert heap.trim() and calls == [0]  # the gateway's own timer: no interval check
    clock.now += 29.0
    assert not heap.maybe_trim()  # counted from the forced trim
    clock.now += 1.0
    assert heap.maybe_trim() and heap.trims == 2
