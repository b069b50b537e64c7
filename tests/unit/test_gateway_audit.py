"""The gateway's audit log: events written after the reply, batched per audit_log partition."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.audit import AuditLog


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def produce(self, topic: str, key: str, event: str, value: dict[str, Any]) -> None:
        self.sent.append(value)


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    async def audit_many(self, events: Sequence[Mapping[str, Any]], day: str) -> None:
        self.calls.append((day, [e["tenant"] for e in events]))


def test_events_of_an_interval_go_as_one_write_per_partition_and_drain_writes_the_rest() -> None:
    bus, store = FakeBus(), FakeStore()

    async def scenario() -> None:
        log = AuditLog(bus, store, "audit", flush_s=0.05)  # type: ignore[arg-type]
        for tenant in ("a", "a", "b", "a"):
            log.record(tenant=tenant, subject="s", action="detect", status=200)
        assert store.calls == []  # nothing on the caller's path
        await asyncio.sleep(0.2)
        assert sorted(tenants for _, tenants in store.calls) == [["a", "a", "a"], ["b"]]
        log.record(tenant="c", subject="s", action="detect", status=403)
        await log.drain()  # a clean shutdown loses nothing
        assert store.calls[-1][1] == ["c"] and len(bus.sent) == 5

    asyncio.run(scenario())


def test_a_full_backlog_drops_the_event_and_counts_it() -> None:
    bus, store = FakeBus(), FakeStore()

    async def scenario() -> None:
        log = AuditLog(bus, store, "audit", max_pending=2, flush_s=0.05)  # type: ignore[arg-type]
        for _ in range(3):
            log.record(tenant="a", subject="s", action="detect", status=200)
        await log.drain()

    asyncio.run(scenario())
    assert sum(len(t) for _, t in store.calls) == 2 and len(bus.sent) == 2
