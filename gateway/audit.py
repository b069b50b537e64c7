"""The audit log: one event per authenticated call, to the `audit` topic and the audit_log table.

Events are written after the call's reply, in the background: every ``flush_s`` (or as soon as
``batch_max`` are waiting) the waiting events go out together, to Kafka one record each, to Cassandra one
UNLOGGED BATCH per audit_log partition (tenant, UTC day) — a busy tenant's calls of one interval cost one
statement, not one each. At most ``max_pending`` events wait or are being written; past that an event is
counted (detectflow_audit_failures_total{sink="overflow"}) and logged without its content, as one that
cannot be written is. ``drain`` (the gateway's clean shutdown) writes everything still waiting; a crash
loses what was waiting (at most ``flush_s`` of events) and what was in flight, as the per-event tasks
before it did.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from gateway import metrics as GM
from gateway.bus import Bus
from gateway.limits import utc_day
from gateway.problems import Problem
from gateway.store import GatewayStore
from schemas import events
from stream.records import now_ms

log = logging.getLogger(__name__)


def outcome_of(status: int) -> str:
    if status < 400:
        return "success"
    if status in (401, 403, 429):
        return "denied"
    if status < 500:
        return "rejected"
    return "error"


class AuditLog:
    def __init__(self, bus: Bus, store: GatewayStore, topic: str, *, max_pending: int = 1000,
                 flush_s: float = 0.1, batch_max: int = 64):
        self.bus = bus
        self.store = store
        self.topic = topic
        self._max = max_pending
        self._flush_s = flush_s
        self._batch_max = batch_max
        self._waiting: list[dict[str, Any]] = []
        self._writing = 0  # events handed to a write that has not finished
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def record(self, *, tenant: str, subject: str, action: str, status: int, resource: str | None = None,
               request_id: str | None = None, detail: str | None = None) -> dict[str, Any]:
        event = events.audit_event(event_id=str(uuid.uuid4()), tenant=tenant, subject=subject, action=action,
                                   resource=resource, outcome=outcome_of(status), status=status,
                                   request_id=request_id, detail=detail, event_time=now_ms())
        if len(self._waiting) + self._writing >= self._max:
            GM.AUDIT_FAILURES.labels("overflow").inc()
            log.error("audit backlog full: event %s for tenant %s not written", event["event_id"], tenant)
            return event
        self._waiting.append(event)
        if self._flusher is None or self._flusher.done():
            self._wake = asyncio.Event()
            self._flusher = asyncio.create_task(self._run())
        if len(self._waiting) >= self._batch_max and self._wake is not None:
            self._wake.set()
        return event

    async def _run(self) -> None:
        """Flush every ``flush_s``, or at once when a batch is full; ends when nothing is waiting."""
        assert self._wake is not None
        while self._waiting:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            self._flush()

    def _flush(self) -> None:
        events, self._waiting = self._waiting, []
        if not events:
            return
        self._writing += len(events)
        task = asyncio.create_task(self._write(events))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, events: Sequence[Mapping[str, Any]]) -> None:
        by_partition: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for e in events:
            by_partition.setdefault((e["tenant"], utc_day(e["event_time"] / 1000)), []).append(e)
        try:
            results = await asyncio.gather(
                *(self.bus.produce(self.topic, e["tenant"], "AuditEvent", dict(e)) for e in events),
                *(self.store.audit_many(group, day) for (_, day), group in by_partition.items()),
                return_exceptions=True)
        finally:
            self._writing -= len(events)
        sizes = [1] * len(events) + [len(g) for g in by_partition.values()]
        sinks = ["kafka"] * len(events) + ["cassandra"] * len(by_partition)
        for sink, size, res in zip(sinks, sizes, results, strict=True):
            if isinstance(res, (Problem, OSError)):
                GM.AUDIT_FAILURES.labels(sink).inc(size)
                log.error("%d audit event(s) not written to %s: %s", size, sink, res)
            elif isinstance(res, BaseException):
                raise res

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Write every waiting event now and wait (up to ``timeout_s``) for the writes in flight."""
        self._flush()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout_s)
