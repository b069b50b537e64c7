"""Admission gates of the gateway, each pure (no I/O of its own) and unit-tested:

- ``TokenBuckets``: the per-tenant rate, shared by every gateway instance by dividing it by the live
  instance count (``set_instances``; gateway/app.py keeps the count from heartbeats in Cassandra).
- ``DailyQuota``: images per tenant per UTC day, charged atomically (compare-and-set on one row).
- ``ByteBudget``: request bodies held in memory at once, reserved before a body is read.
- ``FairShares``: each tenant's share of the sync lane, so one tenant's burst cannot refuse another's calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.problems import Problem


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int        # seconds until the bucket is full again
    retry_after_s: int  # seconds until the call would be allowed (0 when allowed)

    def headers(self) -> dict[str, str]:
        """IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers)."""
        return {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                "RateLimit-Reset": str(self.reset_s)}


class TokenBuckets:
    """One bucket per tenant: ``burst`` tokens, refilled at ``rate`` per second, both divided by the number of
    live gateway instances (calls are spread over the instances, so together they admit the configured rate).
    Bounded in tenants."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_tenants: int = 100_000):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.configured_rate = rate
        self.configured_burst = burst
        self.instances = 1
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tenant -> (tokens, at)
        self._max = max_tenants

    def set_instances(self, n: int) -> None:
        """This instance's part of the rate: rate/n, burst/n (at least 1 token)."""
        self.instances = max(1, n)
        self.rate = self.configured_rate / self.instances
        self.burst = max(1, math.ceil(self.configured_burst / self.instances))

    def take(self, tenant: str, n: int = 1) -> RateDecision:
        now = self._clock()
        tokens, at = self._buckets.pop(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        cost = min(n, self.burst)  # a call bigger than the bucket may pass when the bucket is full
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[tenant] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        reset = math.ceil((self.burst - tokens) / self.rate)
        retry = 0 if allowed else max(1, math.ceil((cost - tokens) / self.rate))
        return RateDecision(allowed, self.burst, int(tokens), reset, retry)

    def check(self, tenant: str, n: int = 1) -> RateDecision:
        decision = self.take(tenant, n)
        if not decision.allowed:
            raise Problem("RATE_LIMITED", f"more than {self.configured_rate:g} requests per second for this tenant",
                          headers={"Retry-After": str(decision.retry_after_s), **decision.headers()})
        return decision


def utc_day(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC).strftime("%Y-%m-%d")


def seconds_to_midnight(now: float | None = None) -> int:
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC)
    midnight = (t + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - t).total_seconds()))


# (tenant, day, expected, new) -> (applied, the row's value now). expected None: the row must not exist yet.
CompareAndSet = Callable[[str, str, "int | None", int], Awaitable[tuple[bool, "int | None"]]]


class DailyQuota:
    """Images per tenant per UTC day, one row per (tenant, day) shared by every gateway instance.

    A charge is a compare-and-set of the row from the value this instance last saw to that value plus ``n``
    (a Cassandra lightweight transaction): two concurrent charges can never both apply on the same value, so
    the sum of admitted charges never passes the limit. A lost race answers with the row's current value, which
    becomes the next expectation (no extra read); after ``max_attempts`` lost races the call is refused as
    OVERLOADED (contention, retry soon). Charges of one tenant on one instance take turns (a local lock), so
    only charges from other instances can race. ``read_cache_s`` is how long the last value seen is used as
    the expectation before it is read afresh: a stale value costs one lost race, never a wrong admission.
    """

    def __init__(self, limit: int, read: Callable[[str, str], Awaitable[int | None]], cas: CompareAndSet, *,
                 clock: Callable[[], float] = time.time, read_cache_s: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic, max_tenants: int = 100_000,
                 max_attempts: int = 16, backoff_s: float = 0.005):
        self.limit = limit
        self._read = read
        self._cas = cas
        self._clock = clock
        self._monotonic = monotonic
        self._cache_s = read_cache_s
        self._known: OrderedDict[tuple[str, str], tuple[int | None, float]] = OrderedDict()  # -> (value, seen at)
        # Locks live while a charge holds or awaits them (no growth with tenants).
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        self._max = max_tenants
        self._attempts = max_attempts
        self._backoff_s = backoff_s

    def _remember(self, key: tuple[str, str], value: int | None) -> None:
        self._known.pop(key, None)
        self._known[key] = (value, self._monotonic())
        while len(self._known) > self._max:
            self._known.popitem(last=False)

    async def charge(self, tenant: str, n: int) -> int:
        """Count ``n`` images against today's quota; QUOTA_EXCEEDED if they do not fit. Returns images left."""
        now = self._clock()
        key = (tenant, utc_day(now))
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            known = self._known.get(key)
            fresh = known is None or self._monotonic() - known[1] >= self._cache_s
            expected = await self._read(*key) if fresh else known[0]  # type: ignore[index]
            for attempt in range(self._attempts):
                used = expected or 0
                if used + n > self.limit:
                    if not fresh:  # refuse only on a value just read or just answered by a lost race
                        expected, fresh = await self._read(*key), True
                        self._remember(key, expected)
                        continue
                    self._remember(key, expected)
                    raise Problem("QUOTA_EXCEEDED", f"the daily quota of {self.limit} images is used up "
                                  f"({used} used, {n} asked)", headers={"Retry-After": str(seconds_to_midnight(now))})
                applied, current = await self._cas(key[0], key[1], expected, used + n)
                if applied:
                    self._remember(key, used + n)
                    return self.limit - used - n
                expected, fresh = current, True
                if attempt:  # other instances charge the same tenant: spread the retries
                    await asyncio.sleep(random.uniform(0, self._backoff_s * attempt))  # noqa: S311
        raise Problem("OVERLOADED", f"the quota of this tenant is being charged by many calls at once "
                      f"({self._attempts} attempts)", headers={"Retry-After": "1"})


class ByteBudget:
    """Bytes of request bodies this instance holds at once. A call reserves its body's declared length (or its
    route's limit when the length is not declared) before reading it and releases it when it ends."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reserved = 0

    def reserve(self, n: int) -> bool:
        if n <= 0:
            return True
        if self.reserved + n > self.limit:
            return False
        self.reserved += n
        return True

    def release(self, n: int) -> None:
        if n > 0:
            self.reserved = max(0, self.reserved - n)


class FairShares:
    """Per-tenant shares of this instance's sync capacity (``capacity`` calls in flight at most).

    A tenant may hold ``share`` calls in flight: capacity divided among the tenants seen in the last
    ``window_s`` seconds plus one seat kept for a tenant not yet seen, never below ``floor``. So a tenant alone
    takes half the lane, and a burst can never fill the seats a quiet tenant needs. While the online lane lags
    (``lagging``), a tenant that submitted more than its fair part of the window's admissions is refused too,
    so the backlog drains, while the other tenants' calls are still admitted up to the hard cap.
    """

    def __init__(self, capacity: int, *, floor: int = 4, window_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, max_tenants: int = 100_000):
        self.capacity = capacity
        self.floor = floor
        self.window_s = window_s
        self._clock = clock
        self.inflight: dict[str, int] = {}
        self.total = 0
        self._seen: OrderedDict[str, float] = OrderedDict()  # tenant -> last admission or attempt
        self._admitted: deque[tuple[float, str]] = deque()   # (at, tenant), the window's admissions
        self._admitted_by: Counter[str] = Counter()
        self._max = max_tenants

    def _expire(self, now: float) -> None:
        while self._seen and next(iter(self._seen.values())) < now - self.window_s:
            self._seen.popitem(last=False)
        while self._admitted and self._admitted[0][0] < now - self.window_s:
            _, gone = self._admitted.popleft()
            self._admitted_by[gone] -= 1
            if self._admitted_by[gone] <= 0:
                del self._admitted_by[gone]
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def active(self) -> int:
        self._expire(self._clock())
        return len(self._seen)

    def share(self) -> int:
        return min(self.capacity, max(self.floor, self.capacity // (self.active() + 1)))

    def admit(self, tenant: str, *, lagging: bool = False) -> None:
        """Count one call of ``tenant`` in flight, or raise OVERLOADED (the instance is full) or
        FAIR_SHARE_EXCEEDED (this tenant holds its share). Pair with ``release``."""
        now = self._clock()
        self._seen.pop(tenant, None)
        self._seen[tenant] = now
        self._expire(now)
        if self.total >= self.capacity:
            raise Problem("OVERLOADED", f"{self.total} sync calls are in flight on this instance",
                          headers={"Retry-After": "1"})
        share = self.share()
        mine = self.inflight.get(tenant, 0)
        if mine >= share:
            raise Problem("FAIR_SHARE_EXCEEDED", f"this tenant has {mine} sync calls in flight, its share of "
                          f"this instance is {share}", headers={"Retry-After": "1"})
        if lagging:
            recent = self._admitted_by[tenant]
            fair = max(self.floor, math.ceil(len(self._admitted) / len(self._seen)))
            if recent > fair and len(self._seen) > 1:
                raise Problem("FAIR_SHARE_EXCEEDED", f"the online lane has a backlog and this tenant sent {recent} "
                              f"of the last {len(self._admitted)} sync calls (its part: {fair})",
                              headers={"Retry-After": "2"})
        self.inflight[tenant] = mine + 1
        self.total += 1
        self._admitted.append((now, tenant))
        self._admitted_by[tenant] += 1

    def release(self, tenant: str) -> None:
        mine = self.inflight.get(tenant, 0)
        if mine <= 1:
            self.inflight.pop(tenant, None)
        else:
            self.inflight[tenant] = mine - 1
        self.total = max(0, self.total - 1)
