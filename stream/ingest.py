"""Tenant-bound ingestion: a record on `<prefix>ingest.<tenant>` is that tenant's, whatever it says.

Only the principal `tenant-<tenant>` may write that topic (a LITERAL ACL, infra/stack/kafka_access.py),
so the topic name is the authenticated tenant. The runtime binds each record read from an ingest topic
to it (``bind_headers``: a `reply-to` may name only the tenant's own reply topic, the runtime's
provenance headers are the runtime's); the stage that reads ingest topics (scan) then checks the value
(``check``): a `tenant` field naming anyone else closes the request REJECTED ``TENANT_MISMATCH``, the
result filed under the topic's tenant (never under the tenant it claimed); the recorder, which reads
`detections` and may write `audit` and `audit_log` (scan may not), audits it (``audit_event``).

Pure: names and dictionaries, no Kafka.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas import events
from stream import headers as H
from stream.records import Output, Record, now_ms, result_outputs, terminal_result
from stream.serde import epoch_ms
from stream.topics import ingest_topic, tenant_of_ingest, tenant_replies_topic

TENANT_MISMATCH = "TENANT_MISMATCH"
AUDIT_NAMESPACE = uuid.UUID("0b6f7c2e-4d0a-4a51-9a0e-5c3f1e2d7b44")
PRINCIPAL_PREFIX = "tenant-"
# Headers only the runtime writes (retry/DLQ provenance): a tenant's copies are dropped.
RUNTIME_HEADERS = (H.ATTEMPT, H.NOT_BEFORE_MS, H.ORIGIN_TOPIC)


def principal(tenant: str) -> str:
    """The Kafka SCRAM principal of a tenant (`detectflow tenants create`)."""
    return f"{PRINCIPAL_PREFIX}{tenant}"


def bind_headers(prefix: str, tenant: str, headers: Mapping[str, bytes], *, from_retry: bool) -> dict[str, bytes]:
    """The headers of a record written by ``tenant``'s principal, made safe to carry through the pipeline:
    a `reply-to` that is not `<prefix>replies.<tenant>:<partition>` is dropped (the stages would write the
    result wherever it pointed, with their own rights), and so are runtime headers on the tenant's own topic
    (a retry topic's are the runtime's: only pipeline principals write it)."""
    out = {k: v for k, v in headers.items() if from_retry or k not in RUNTIME_HEADERS}
    reply = H.text(out, H.REPLY_TO)
    if reply is not None:
        topic, _, part = reply.rpartition(":")
        if topic != tenant_replies_topic(prefix, tenant) or not part.isdigit():
            del out[H.REPLY_TO]
    return out


@dataclass(frozen=True)
class Verdict:
    """What the topic says of a record: its tenant (None: not an ingest record) and whether it agrees."""

    tenant: str | None
    claimed: str | None = None

    @property
    def mismatch(self) -> bool:
        return self.tenant is not None and self.claimed != self.tenant


def check(prefix: str, rec: Record) -> Verdict:
    """Compare the value's `tenant` with its topic's (one prefix test and one string compare per record)."""
    tenant = tenant_of_ingest(prefix, rec.topic)
    if tenant is None:
        return Verdict(None)
    return Verdict(tenant, rec.value.get("tenant"))


def stamped(value: Mapping[str, Any], tenant: str, lane: str) -> dict[str, Any]:
    """The submission as the pipeline carries it on: the topic's tenant and the topic's lane."""
    return {**value, "tenant": tenant, "lane": lane.upper()}


def mismatch_outputs(prefix: str, rec: Record, verdict: Verdict) -> list[Output]:
    """REJECTED TENANT_MISMATCH under the topic's tenant, to `detections` and to the tenant's own reply topic
    if it asked for a reply (the recorder audits it: ``audit_event``). The claimed tenant's job id is dropped."""
    assert verdict.tenant is not None
    value = {**stamped(rec.value, verdict.tenant, rec.lane), "job_id": None}
    result = terminal_result(key=rec.key, value=value, lane=rec.lane, status="REJECTED", code=TENANT_MISMATCH,
                             message=f"{rec.topic} takes tenant {verdict.tenant}'s submissions only; the record "
                                     f"names tenant {str(verdict.claimed)[:80]!r}")
    carried = {k: rec.headers[k] for k in H.PROPAGATED if k in rec.headers}
    return result_outputs(prefix, result, carried)


def audit_event(prefix: str, result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The AuditEvent of a TENANT_MISMATCH result (topic `audit`, key: the tenant whose principal wrote it),
    None for any other result. Its id derives from the request, so a redelivered result is the same event."""
    if result.get("error_code") != TENANT_MISMATCH:
        return None
    tenant, request_id = result["tenant"], result["request_id"]
    return events.audit_event(
        event_id=str(uuid.uuid5(AUDIT_NAMESPACE, f"{tenant}/{request_id}/{TENANT_MISMATCH}")), tenant=tenant,
        subject=principal(tenant), action="ingest", resource=ingest_topic(prefix, tenant), outcome="denied",
        status=403, request_id=request_id or None,
        detail=f"{TENANT_MISMATCH}: {result.get('error_message') or ''}"[:500],
        event_time=epoch_ms(result.get("completed_at")) or now_ms())
