"""The daily quota's leases: the sync path charges the shared row in blocks and spends them locally (no services;
a fake row with the store's compare-and-set semantics)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from gateway.limits import DailyQuota, utc_day
from gateway.problems import Problem


class Row:
    """The quota table as the store's compare-and-set sees it; ``grants`` is every change written, in order."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], int] = {}
        self.reads = 0
        self.grants: list[int] = []

    async def read(self, t: str, d: str) -> int | None:
        self.reads += 1
        await asyncio.sleep(0)
        return self.rows.get((t, d))

    async def cas(self, t: str, d: str, expected: int | None, new: int) -> tuple[bool, int | None]:
        await asyncio.sleep(0)  # concurrent charges interleave, as awaiting the store does
        current = self.rows.get((t, d))
        if current != expected:
            return False, current
        self.rows[(t, d)] = new
        self.grants.append(new - (current or 0))
        return True, new

    def value(self, tenant: str = "a") -> int:
        return self.rows.get((tenant, utc_day()), 0)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def quota(row: Row, limit: int, clock: Clock | None = None, **kw: Any) -> DailyQuota:
    return DailyQuota(limit, row.read, row.cas, monotonic=clock or Clock(), backoff_s=0.0, **kw)


def test_sync_charges_take_one_transaction_per_lease() -> None:
    row = Row()
    q = quota(row, 1_000_000, lease_max=50)

    async def calls() -> list[int]:
        return [await q.charge("a", 1, lease=True) for _ in range(120)]

    left = asyncio.run(calls())
    assert row.grants == [50, 50, 50]  # 120 calls, three compare-and-sets
    assert row.value() == 150 and q.leases[("a", utc_day())].left == 30
    assert left[0] == 1_000_000 - 50 + 49 and left[-1] == 1_000_000 - 120


def test_lease_block_one_is_a_transaction_per_call() -> None:
    row = Row()
    q = quota(row, 1000, lease_max=1)
    for _ in range(5):
        asyncio.run(q.charge("a", 1, lease=True))
    assert row.grants == [1] * 5 and row.value() == 5


def test_leases_shrink_near_the_limit_and_the_limit_holds() -> None:
    row = Row()
    q = quota(row, 40, lease_max=50)

    async def calls() -> list[object]:
        return [await _outcome(q.charge("a", 1, lease=True)) for _ in range(45)]

    outcomes = asyncio.run(calls())
    assert outcomes[:40] == list(range(39, -1, -1))  # every image admitted, exactly as many as the quota
    assert all(isinstance(o, Problem) and o.code == "QUOTA_EXCEEDED" for o in outcomes[40:])
    # ceil(remaining / 8): 40 -> 5, 35 -> 5, 30 -> 4, ... down to exactly what a call needs
    assert row.grants == [5, 5, 4, 4, 3, 3, 2, 2, 2, 2] + [1] * 8
    assert row.value() == 40


def test_a_call_needing_more_than_the_lease_leases_at_least_what_it_needs() -> None:
    row = Row()
    q = quota(row, 1000, lease_max=10)
    asyncio.run(q.charge("a", 1, lease=True))   # leases 10, 9 left
    asyncio.run(q.charge("a", 25, lease=True))  # 16 more needed: leases 16 (more than the block)
    assert row.grants == [10, 16] and q.leases[("a", utc_day())].left == 0 and row.value() == 26


def test_two_instances_charging_at_once_never_pass_the_limit_and_idle_leases_come_back() -> None:
    """200 concurrent 1-image calls through two instances under a quota of 150: at most 150 admitted, none of
    them past the row; once the instances give their leases back, the rest is admitted up to exactly 150."""
    row = Row()
    clock = Clock()
    one, two = (quota(row, 150, clock, lease_max=50, lease_idle_s=10.0, read_cache_s=0.0) for _ in range(2))

    async def burst() -> list[object]:
        return await asyncio.gather(*(_outcome(q.charge("a", 1, lease=True)) for _ in range(100)
                                      for q in (one, two)))

    outcomes = asyncio.run(burst())
    admitted = sum(isinstance(o, int) for o in outcomes)
    assert all(isinstance(o, int) or (isinstance(o, Problem) and o.code == "QUOTA_EXCEEDED") for o in outcomes)
    held = sum(lease.left for q in (one, two) for lease in q.leases.values())
    assert sum(row.grants) == row.value() == admitted + held <= 150
    assert admitted >= 150 - 2 * 50  # what the instances hold unspent is at most a lease each
    clock.t += 10.0
    given = asyncio.run(one.release_idle()) + asyncio.run(two.release_all())
    assert given == held and row.value() == admitted

    async def rest() -> int:
        n = 0
        while True:
            try:
                await one.charge("a", 1, lease=True)
            except Problem as exc:
                assert exc.code == "QUOTA_EXCEEDED"
                return n
            n += 1

    assert admitted + asyncio.run(rest()) == 150 and row.value() == 150


def test_an_idle_lease_is_given_back_a_busy_one_kept() -> None:
    row = Row()
    clock = Clock()
    q = quota(row, 1000, clock, lease_max=50, lease_idle_s=10.0)
    asyncio.run(q.charge("a", 1, lease=True))
    asyncio.run(q.charge("b", 1, lease=True))
    clock.t += 6
    asyncio.run(q.charge("b", 1, lease=True))  # b took from its lease 6 s later
    clock.t += 5
    assert asyncio.run(q.release_idle()) == 49  # a's, idle 11 s; b's idle 5 s
    assert row.value("a") == 1 and row.value("b") == 50 and list(q.leases) == [("b", utc_day())]
    assert asyncio.run(q.release_all()) == 48
    assert row.value("b") == 2 and not q.leases


def test_giving_back_after_a_lost_race_uses_the_value_that_won() -> None:
    row = Row()
    q = quota(row, 1000, lease_max=50, read_cache_s=60.0)
    asyncio.run(q.charge("a", 1, lease=True))
    row.rows[("a", utc_day())] += 30  # another instance leased 30 meanwhile
    assert asyncio.run(q.release_all()) == 49
    assert row.value() == 31


def test_a_past_days_lease_is_dropped_not_given_back() -> None:
    row = Row()
    day = {"t": dt.datetime(2026, 3, 1, 23, 59, 59, tzinfo=dt.UTC).timestamp()}
    q = DailyQuota(1000, row.read, row.cas, clock=lambda: day["t"], lease_idle_s=0.0)
    asyncio.run(q.charge("a", 1, lease=True))
    day["t"] += 2  # past midnight
    assert asyncio.run(q.release_idle()) == 0
    assert row.rows == {("a", "2026-03-01"): 50} and not q.leases


def test_a_refusal_is_decided_on_a_fresh_value_never_on_the_cached_one() -> None:
    row = Row()
    clock = Clock()
    q = quota(row, 20, clock, lease_max=1, read_cache_s=60.0)
    asyncio.run(q.charge("a", 1, lease=True))
    reads = row.reads
    row.rows[("a", utc_day())] = 20  # other instances took the rest: the cached value (1) does not know
    with pytest.raises(Problem) as info:
        asyncio.run(q.charge("a", 1, lease=True))
    assert info.value.code == "QUOTA_EXCEEDED" and info.value.status == 429  # on the lost race's answer (20)
    assert row.reads == reads
    row.rows[("a", utc_day())] = 15  # they gave leases back: the cached value (20) refuses nothing
    assert asyncio.run(q.charge("a", 1, lease=True)) == 4
    assert row.reads == reads + 1 and row.value() == 16


def test_a_job_charges_exactly_its_items_and_holds_no_lease() -> None:
    row = Row()
    q = quota(row, 10_000, lease_max=50)
    assert asyncio.run(q.charge("a", 3)) == 9997
    assert row.grants == [3] and not q.leases
    asyncio.run(q.charge("a", 1, lease=True))  # a sync call beside it leases from the same row
    assert asyncio.run(q.charge("a", 10_000 - 53)) == 0  # the job takes the rest of the row exactly
    with pytest.raises(Problem):
        asyncio.run(q.charge("a", 1))
    assert asyncio.run(q.charge("a", 1, lease=True)) == 48  # the lease it holds still admits sync calls


async def _outcome(charge: object) -> object:
    try:
        return await charge  # type: ignore[misc]
    except Problem as exc:
        return exc


def test_lease_settings_are_read_and_checked() -> None:
    from config import GatewaySettings, SettingsError

    default = GatewaySettings.from_env({})
    assert (default.quota_lease_max, default.quota_lease_idle_s) == (50, 10.0)
    set_ = GatewaySettings.from_env({"DETECTFLOW_QUOTA_LEASE_MAX": "1", "DETECTFLOW_QUOTA_LEASE_IDLE_S": "2.5"})
    assert (set_.quota_lease_max, set_.quota_lease_idle_s) == (1, 2.5)
    for bad in ({"DETECTFLOW_QUOTA_LEASE_MAX": "0"}, {"DETECTFLOW_QUOTA_LEASE_IDLE_S": "0"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            GatewaySettings.from_env(bad)
