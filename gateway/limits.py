"""Admission gates of the gateway, each pure (no I/O of its own) and unit-tested:

- ``TokenBuckets``: the per-tenant rate, shared by every gateway instance by dividing it by the live
  instance count (``set_instances``; gateway/app.py keeps the count from heartbeats in Cassandra).
- ``DailyQuota``: images per tenant per UTC day, charged atomically (compare-and-set on one row), the sync
  path in leases spent locally.
- ``ByteBudget``: request bodies held in memory at once, reserved before a body is read.
- ``FairShares``: each tenant's share of the sync lane, so one tenant's burst cannot refuse another's calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import random
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.problems import Problem
from stream.cassandra import utc_day

log = logging.getLogger(__name__)


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


def seconds_to_midnight(now: float | None = None) -> int:
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC)
    midnight = (t + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - t).total_seconds()))


# (tenant, day, expected, new) -> (applied, the row's value now). expected None: the row must not exist yet.
CompareAndSet = Callable[[str, str, "int | None", int], Awaitable[tuple[bool, "int | None"]]]


@dataclass
class QuotaLease:
    """Images of one (tenant, day) this instance has charged to the shared row and not yet spent."""

    left: int
    spent_at: float  # monotonic: when a charge last took from it


class DailyQuota:
    """Images per tenant per UTC day, one row per (tenant, day) shared by every gateway instance.

    The row only changes by compare-and-set from the value this instance last saw (a Cassandra lightweight
    transaction): two concurrent changes can never both apply on the same value, so the sum of what the row
    grants never passes the limit. A lost race answers with the row's current value, which becomes the next
    expectation (no extra read); after ``max_attempts`` lost races the call is refused as OVERLOADED
    (contention, retry soon). Changes of one tenant's row on one instance take turns (a local lock), so only
    other instances can race. ``read_cache_s`` is how long the last value seen is used as the expectation before
    it is read afresh: a stale value costs one lost race, never a wrong admission, and a refusal is only ever
    decided on a value just read or just answered by a lost race.

    A charge with ``lease`` (the sync path) spends from this instance's lease of the row and, when that holds
    too few, charges the row a new block of ``min(remaining, max(needed, block))`` images, where ``block`` is
    ``min(lease_max, ceil(remaining / 8))``: one transaction per block instead of one per call, and near the
    limit a lease is exactly what the call needs. A lease not taken from for ``lease_idle_s`` is given back
    (``release_idle``, run by a background task; ``release_all`` at shutdown) so that other instances can charge
    it; a crashed instance's unused lease (at most ``lease_max`` images per tenant) is lost for that day.
    A charge without ``lease`` (a job) charges the row exactly ``n``.
    """

    def __init__(self, limit: int, read: Callable[[str, str], Awaitable[int | None]], cas: CompareAndSet, *,
                 clock: Callable[[], float] = time.time, read_cache_s: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic, max_tenants: int = 100_000,
                 max_attempts: int = 16, backoff_s: float = 0.005, lease_max: int = 50, lease_idle_s: float = 10.0):
        if lease_max < 1:
            raise ValueError("lease_max must be >= 1")
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
        self.lease_max = lease_max
        self.lease_idle_s = lease_idle_s
        # One per tenant that charged in the last lease_idle_s (the idle ones are given back).
        self.leases: dict[tuple[str, str], QuotaLease] = {}

    def _remember(self, key: tuple[str, str], value: int | None) -> None:
        self._known.pop(key, None)
        self._known[key] = (value, self._monotonic())
        while len(self._known) > self._max:
            self._known.popitem(last=False)

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _block(self, remaining: int, needed: int) -> int:
        """The images to lease: what the call needs, at least a block that shrinks as the quota runs out."""
        return min(remaining, max(needed, min(self.lease_max, math.ceil(remaining / 8))))

    async def charge(self, tenant: str, n: int, *, lease: bool = False) -> int:
        """Count ``n`` images against today's quota; QUOTA_EXCEEDED if they do not fit. Returns the images left
        as this instance knows them (other instances' leases count as used)."""
        now = self._clock()
        key = (tenant, utc_day(now))
        async with self._lock(key):
            held = self.leases.get(key) if lease else None
            have = held.left if held is not None else 0
            if have < n:
                needed = n - have
                grant = (lambda used: self._block(self.limit - used, needed)) if lease else (lambda used: n)
                used, added = await self._add(key, needed, grant, now)
                if not lease:
                    return self.limit - used - added
                held = self.leases.setdefault(key, QuotaLease(0, 0.0))
                held.left += added
            assert held is not None
            held.left -= n
            held.spent_at = self._monotonic()
            row = self._known.get(key, (None, 0.0))[0] or 0
            return self.limit - row + held.left

    async def _add(self, key: tuple[str, str], needed: int, grant: Callable[[int], int],
                   now: float) -> tuple[int, int]:
        """Raise the row from ``used`` by ``grant(used)`` (at least ``needed``) by compare-and-set: (used, added)."""
        known = self._known.get(key)
        fresh = known is None or self._monotonic() - known[1] >= self._cache_s
        expected = await self._read(*key) if fresh else known[0]  # type: ignore[index]
        for attempt in range(self._attempts):
            used = expected or 0
            if used + needed > self.limit:
                if not fresh:  # refuse only on a value just read or just answered by a lost race
                    expected, fresh = await self._read(*key), True
                    self._remember(key, expected)
                    continue
                self._remember(key, expected)
                raise Problem("QUOTA_EXCEEDED", f"the daily quota of {self.limit} images is used up "
                              f"({used} used, {needed} asked)",
                              headers={"Retry-After": str(seconds_to_midnight(now))})
            added = grant(used)
            applied, current = await self._cas(key[0], key[1], expected, used + added)
            if applied:
                self._remember(key, used + added)
                return used, added
            expected, fresh = current, True
            if attempt:  # other instances charge the same tenant: spread the retries
                await asyncio.sleep(random.uniform(0, self._backoff_s * attempt))  # noqa: S311
        raise Problem("OVERLOADED", f"the quota of this tenant is being charged by many calls at once "
                      f"({self._attempts} attempts)", headers={"Retry-After": "1"})

    async def release_idle(self) -> int:
        """Give back the leases not taken from for ``lease_idle_s``, drop those of past days (their quota is
        gone anyway). Returns the images given back."""
        today = utc_day(self._clock())
        given = 0
        for key in list(self.leases):
            if key[1] != today:
                self.leases.pop(key, None)
            else:
                given += await self._give_back(key, idle_only=True)
        return given

    async def release_all(self) -> int:
        """Give back every lease (at shutdown). Returns the images given back."""
        given = 0
        for key in list(self.leases):
            given += await self._give_back(key, idle_only=False)
        return given

    async def _give_back(self, key: tuple[str, str], *, idle_only: bool) -> int:
        async with self._lock(key):  # a charge spending from the lease meanwhile has finished
            held = self.leases.get(key)
            if held is None or (idle_only and self._monotonic() - held.spent_at < self.lease_idle_s):
                return 0
            del self.leases[key]
            if held.left == 0:
                return 0
            try:
                known = self._known.get(key)
                expected = await self._read(*key) if known is None else known[0]
                for _ in range(self._attempts):
                    if expected is None:  # no row (the tenant's data erased): nothing to give back
                        return 0
                    new = max(0, expected - held.left)
                    applied, expected = await self._cas(key[0], key[1], expected, new)
                    if applied:
                        self._remember(key, new)
                        return held.left
            except Problem as exc:
                log.warning("quota lease of %d images not given back (lost for the day): %s", held.left, exc)
                return 0
            log.warning("quota lease of %d images not given back after %d attempts (lost for the day)",
                        held.left, self._attempts)
            return 0


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
    ``window_s`` seconds plus one seat kept for a tenant not yet seen, never below ``floor``. Past its share a
    tenant is still admitted while that leaves ``floor`` free seats for every other tenant seen and for one not
    yet seen (work-conserving: a tenant alone may use all but ``floor`` seats), so a burst can never fill the
    seats a quiet tenant needs, and as the burst's calls end, their seats go to the tenants under their share.
    While the online lane lags
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
        reserve = self.floor * len(self._seen)  # the other tenants seen (``tenant`` is one of them) + a newcomer
        if mine >= share and self.capacity - self.total - 1 < reserve:
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
