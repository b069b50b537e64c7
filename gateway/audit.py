"""The audit log: one event per authenticated call, to the `audit` topic and the audit_log table.

Writes are asynchronous and bounded (at most ``max_pending`` in flight); an event that cannot be
written is counted (detectflow_audit_failures_total) and logged without its content.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from gateway import metrics as GM
from gateway.bus import Bus
from gateway.limits import utc_day
from gateway.problems import Problem
from gateway.store import GatewayStore
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
    def __init__(self, bus: Bus, store: GatewayStore, topic: str, *, max_pending: int = 1000):
        self.bus = bus
        self.store = store
        self.topic = topic
        self._pending: set[asyncio.Task[None]] = set()
        self._max = max_pending

    def record(self, *, tenant: str, subject: str, action: str, status: int, resource: str | None = None,
               request_id: str | None = None, detail: str | None = None) -> dict[str, Any]:
        event = {"event_id": str(uuid.uuid4()), "tenant": tenant, "subject": subject, "action": action,
                 "resource": resource, "outcome": outcome_of(status), "status": status, "request_id": request_id,
                 "detail": detail, "event_time": now_ms()}
        if len(self._pending) >= self._max:
            GM.AUDIT_FAILURES.labels("overflow").inc()
            log.error("audit backlog full: event %s for tenant %s not written", event["event_id"], tenant)
            return event
        task = asyncio.create_task(self._write(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return event

    async def _write(self, event: Mapping[str, Any]) -> None:
        results = await asyncio.gather(
            self.bus.produce(self.topic, event["tenant"], "AuditEvent", dict(event)),
            self.store.audit(event, utc_day(event["event_time"] / 1000)), return_exceptions=True)
        for sink, res in zip(("kafka", "cassandra"), results, strict=True):
            if isinstance(res, (Problem, OSError)):
                GM.AUDIT_FAILURES.labels(sink).inc()
                log.error("audit event %s not written to %s: %s", event["event_id"], sink, res)
            elif isinstance(res, BaseException):
                raise res

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)
