"""The daily quota's leases on the real `quota_daily` table: two gateway instances (two DailyQuota objects, each
on its own Cassandra session) charging one tenant's row at once never admit past the limit, and once their
unused leases are given back the tenant gets exactly its quota."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from config import PipelineSettings, StackSettings
from gateway.limits import DailyQuota, utc_day
from gateway.problems import Problem

LIMIT = 150
CALLS = 200


@pytest.fixture(scope="module")
def sessions(stack: StackSettings) -> Iterator[list[Any]]:
    from stream.cassandra import connect

    opened = [connect(PipelineSettings.from_env().stream, "gateway") for _ in range(2)]
    yield opened
    for session in opened:
        session.cluster.shutdown()


def test_200_concurrent_sync_charges_through_two_instances_admit_exactly_the_quota(sessions: list[Any]) -> None:
    from gateway.store import GatewayStore

    tenant = f"lease-{uuid.uuid4().hex[:10]}"

    async def scenario() -> tuple[int, int, int, int, int]:
        stores = [GatewayStore(s, result_ttl_s=60, idempotency_ttl_s=60, audit_ttl_s=60) for s in sessions]
        one, two = (DailyQuota(LIMIT, st.quota_used, st.quota_compare_and_set, lease_max=50) for st in stores)

        async def call(q: DailyQuota) -> bool:
            try:
                await q.charge(tenant, 1, lease=True)
                return True
            except Problem as exc:
                assert exc.code == "QUOTA_EXCEEDED", exc.detail
                return False

        outcomes = await asyncio.gather(*(call(q) for _ in range(CALLS // 2) for q in (one, two)))
        admitted = sum(outcomes)
        row = await stores[0].quota_used(tenant, utc_day())
        held = sum(lease.left for q in (one, two) for lease in q.leases.values())
        given = await one.release_all() + await two.release_all()  # as at each instance's shutdown
        after = await stores[1].quota_used(tenant, utc_day())
        more = 0
        while await call(two):
            more += 1
        final = await stores[0].quota_used(tenant, utc_day())
        assert given == held
        return admitted, row or 0, after or 0, admitted + more, final or 0

    admitted, row, after, total, final = asyncio.run(scenario())
    assert admitted <= LIMIT and row == LIMIT  # every image leased, none past the limit
    assert after == admitted                   # the unused leases came back to the row
    assert total == LIMIT and final == LIMIT   # and were then admitted: exactly the quota, in all
