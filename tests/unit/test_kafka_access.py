"""Kafka ACLs declared from the topology (infra/stack/kafka_access.py)."""

from __future__ import annotations

from infra.stack.kafka_access import ROLES, bindings, global_bindings
from stream import topics as T

PREFIX = "p1."


def _rights(principal: str, op: str) -> set[str]:
    return {g.name for g in bindings(PREFIX) if g.principal == principal and g.resource == "topic"
            and op in g.operations}


def test_every_role_has_grants_and_topics_are_only_granted_literally() -> None:
    grants = [*bindings(PREFIX), *global_bindings()]
    assert set(ROLES) <= {g.principal for g in grants}
    assert not [g for g in grants if g.resource == "topic" and g.prefixed]
    declared = {s.name for s in T.all_topics(PREFIX)}
    assert {g.name for g in bindings(PREFIX) if g.resource == "topic"} <= declared  # no grant on a phantom topic


def test_each_stage_reads_its_inputs_and_writes_its_outputs_only() -> None:
    online = T.lane_topic
    submitted = [online(PREFIX, "online", "submitted"), online(PREFIX, "batch", "submitted")]
    assert _rights("scan", "read") - {f"{PREFIX}models"} == {*submitted, *map(T.retry_topic, submitted)}
    writes = _rights("scan", "write")
    assert online(PREFIX, "online", "scanned") in writes and T.detections_topic(PREFIX) in writes
    assert not {f"{PREFIX}models", f"{PREFIX}audit", online(PREFIX, "online", "preprocessed")} & writes
    assert not _rights("client", "write")  # a submitting system is a tenant now (tests/unit/test_tenant_ingest.py)
    # Only the registry CLI, the monitor (rollback) and inference (READY reports) write `models`.
    assert {p for p in ROLES if f"{PREFIX}models" in _rights(p, "write")} == {"registry", "monitor", "inference"}
    # `audit`: the registry CLI, the monitor (a rollback is audited), the gateway, and the recorder
    # (TENANT_MISMATCH refusals, which scan may not audit).
    assert {p for p in ROLES if f"{PREFIX}audit" in _rights(p, "write")} == {"registry", "monitor", "gateway",
                                                                              "recorder"}
    assert _rights("recorder", "read") == {T.detections_topic(PREFIX), T.retry_topic(T.detections_topic(PREFIX))}
    assert {f"{PREFIX}audit", f"{PREFIX}jobs.events"} <= _rights("recorder", "write")
    assert f"{PREFIX}models" not in _rights("recorder", "write")
