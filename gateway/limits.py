"""Per-tenant rate limit (token bucket, per gateway instance) and daily quota (shared, in Cassandra)."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import OrderedDict
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
    """One bucket per tenant: ``burst`` tokens, refilled at ``rate`` per second. Bounded in tenants."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_tenants: int = 100_000):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tenant -> (tokens, at)
        self._max = max_tenants

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
            raise Problem("RATE_LIMITED", f"more than {self.rate:g} requests per second for this tenant",
                          headers={"Retry-After": str(decision.retry_after_s), **decision.headers()})
        return decision


def utc_day(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC).strftime("%Y-%m-%d")


def seconds_to_midnight(now: float | None = None) -> int:
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC)
    midnight = (t + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - t).total_seconds()))


class DailyQuota:
    """Images per tenant per UTC day. ``read``/``add`` reach the shared counter (Cassandra).

    The counter is read at most once per ``read_cache_s`` per tenant and instance: in between, this instance's
    estimate is the last value read plus what it added since. A refusal is always decided on a fresh read, so
    a stale estimate can only admit more, never refuse wrongly: past the limit by at most what the other
    gateway instances admitted for the tenant within ``read_cache_s`` (one instance alone: exact, as before,
    up to the race of concurrent charges the read-then-add always had). 0 reads every time.
    """

    def __init__(self, limit: int, read: Callable[[str, str], Awaitable[int]],
                 add: Callable[[str, str, int], Awaitable[None]], *, clock: Callable[[], float] = time.time,
                 read_cache_s: float = 1.0, monotonic: Callable[[], float] = time.monotonic,
                 max_tenants: int = 100_000):
        self.limit = limit
        self._read = read
        self._add = add
        self._clock = clock
        self._monotonic = monotonic
        self._cache_s = read_cache_s
        self._known: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()  # -> (estimate, read at)
        self._max = max_tenants

    async def _used(self, tenant: str, day: str, n: int) -> int:
        known = self._known.get((tenant, day))
        if known is not None and self._monotonic() - known[1] < self._cache_s and known[0] + n <= self.limit:
            return known[0]
        used = await self._read(tenant, day)
        self._known.pop((tenant, day), None)
        self._known[(tenant, day)] = (used, self._monotonic())
        while len(self._known) > self._max:
            self._known.popitem(last=False)
        return used

    async def charge(self, tenant: str, n: int) -> int:
        """Count ``n`` images against today's quota; QUOTA_EXCEEDED if they do not fit. Returns images left."""
        now = self._clock()
        day = utc_day(now)
        used = await self._used(tenant, day, n)
        if used + n > self.limit:
            raise Problem("QUOTA_EXCEEDED", f"the daily quota of {self.limit} images is used up "
                          f"({used} used, {n} asked)", headers={"Retry-After": str(seconds_to_midnight(now))})
        await self._add(tenant, day, n)
        known = self._known.get((tenant, day))
        if known is not None:
            self._known[(tenant, day)] = (known[0] + n, known[1])
        return self.limit - used - n
