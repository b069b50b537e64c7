"""Every topic detectflow uses, defined once, and applied idempotently (`detectflow topics apply`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

LANES = ("online", "batch")
STAGE_INPUTS = ("submitted", "scanned", "preprocessed", "inferred")
DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
# The raw-data retention default (StreamSettings.raw_retention_hours): lane, retry and DLQ topics hold
# image bytes or tensors, so they keep records only this long (docs/security.md, Deletion and retention).
RAW_RETENTION_HOURS = 6.0


class TopicError(RuntimeError):
    """Topics could not be created or altered."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


def lane_topic(prefix: str, lane: str, step: str) -> str:
    return f"{prefix}detect.{lane}.{step}"


def retry_topic(topic: str) -> str:
    return f"{topic}.retry"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def detections_topic(prefix: str = "") -> str:
    return f"{prefix}detections"


def replies_topic(prefix: str = "") -> str:
    return f"{prefix}detect.replies"


def abuse_topic(prefix: str = "") -> str:
    return f"{prefix}abuse"


# ---- tenant-bound ingestion (docs/events.md, "Producing into Kafka as a tenant") ----------------------
# A tenant name: the gateway's rule (gateway/auth.py TENANT_RE; tests/unit/test_tenant_ingest.py keeps them
# equal). No '.', so `ingest.<tenant>` never reaches into another name's suffix (`.retry`, `.dlq`).
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
INGEST = "ingest."
TENANT_REPLIES = "replies."
# `ingest.retry` would read as the retry topic of `ingest` (the runtime trusts a retry topic's headers), and
# `ingest.dlq` as a dead-letter topic: these tenant names get no Kafka ingestion.
RESERVED_INGEST_NAMES = ("retry", "dlq")


def valid_tenant(name: str) -> bool:
    return bool(TENANT_RE.fullmatch(name))


def ingest_tenant(name: str) -> str:
    """``name`` if it may have an ingest topic; ValueError otherwise."""
    if not valid_tenant(name):
        raise ValueError(f"invalid tenant name {name!r}: letters, digits, '_' and '-', at most 63, starting with a "
                         "letter or digit")
    if name in RESERVED_INGEST_NAMES:
        raise ValueError(f"tenant name {name!r} is reserved for Kafka ingestion (a topic suffix)")
    return name


def ingest_topic(prefix: str, tenant: str) -> str:
    """The one topic ``tenant``'s principal may write submissions to; its tenant is its name."""
    return f"{prefix}{INGEST}{ingest_tenant(tenant)}"


def tenant_replies_topic(prefix: str, tenant: str) -> str:
    """Where a tenant's request/reply client awaits results (the only `reply-to` its submissions may name)."""
    return f"{prefix}{TENANT_REPLIES}{ingest_tenant(tenant)}"


def ingest_pattern(prefix: str) -> str:
    """Every tenant's ingest topic and its retry topic, as a librdkafka subscription regex (not the DLQ)."""
    return f"^{re.escape(prefix)}ingest\\.[A-Za-z0-9][A-Za-z0-9_-]*(\\.retry)?$"


def tenant_of_ingest(prefix: str, topic: str) -> str | None:
    """The tenant an ingest topic (or its retry topic) belongs to; None for any other topic."""
    head = f"{prefix}{INGEST}"
    if not topic.startswith(head):
        return None
    name = topic[len(head):]
    name = name[: -len(".retry")] if name.endswith(".retry") else name
    return name if valid_tenant(name) and name not in RESERVED_INGEST_NAMES else None


def tenant_topics(prefix: str, tenant: str, *, max_message_bytes: int = 16 * 1024 * 1024,
                  raw_retention_hours: float = RAW_RETENTION_HOURS) -> list[TopicSpec]:
    """A tenant's own topics: its ingest topic, scan's retry and dead-letter topics of it, its reply topic."""
    raw = {"max.message.bytes": str(max_message_bytes + 64 * 1024), "compression.type": "producer",
           "retention.ms": str(int(raw_retention_hours * HOUR_MS))}
    ingest = ingest_topic(prefix, tenant)
    return [TopicSpec(ingest, 3, raw, f"submissions of tenant {tenant} (ImageSubmitted; batch lane)"),
            TopicSpec(retry_topic(ingest), 1, raw, "scan's delayed retries of them"),
            TopicSpec(dlq_topic(ingest), 1, raw, "dead letters of them"),
            TopicSpec(tenant_replies_topic(prefix, tenant), 1, {"retention.ms": str(HOUR_MS)},
                      f"correlated replies to tenant {tenant}'s request/reply clients")]


def all_topics(prefix: str = "", *, max_message_bytes: int = 16 * 1024 * 1024,
               raw_retention_hours: float = RAW_RETENTION_HOURS) -> list[TopicSpec]:
    big = {"max.message.bytes": str(max_message_bytes + 64 * 1024), "compression.type": "producer"}
    raw = {**big, "retention.ms": str(int(raw_retention_hours * HOUR_MS))}
    specs: list[TopicSpec] = []
    for lane in LANES:
        partitions = 3 if lane == "online" else 6
        for step in STAGE_INPUTS:
            name = lane_topic(prefix, lane, step)
            specs.append(TopicSpec(name, partitions, raw, f"{lane} lane input of the stage after '{step}'"))
            specs.append(TopicSpec(retry_topic(name), 3, raw, "delayed retries of transient failures"))
            specs.append(TopicSpec(dlq_topic(name), 1, raw, "dead letters with provenance"))
    specs += [
        TopicSpec(f"{prefix}minio.events", 3, {"retention.ms": str(2 * DAY_MS)}, "MinIO bucket notifications (JSON)"),
        TopicSpec(retry_topic(f"{prefix}minio.events"), 1, {"retention.ms": str(2 * DAY_MS)},
                  "bridge retries (Cassandra unavailable)"),
        TopicSpec(dlq_topic(f"{prefix}minio.events"), 1, {**big, "retention.ms": str(14 * DAY_MS)},
                  "notifications the bridge could not turn into submissions"),
        TopicSpec(detections_topic(prefix), 6, {"retention.ms": str(7 * DAY_MS)},
                  "every DetectionResult, for downstream consumers"),
        TopicSpec(retry_topic(detections_topic(prefix)), 1, {"retention.ms": str(2 * DAY_MS)},
                  "recorder retries (Cassandra unavailable)"),
        TopicSpec(dlq_topic(detections_topic(prefix)), 1, {"retention.ms": str(14 * DAY_MS)},
                  "results the recorder could not read"),
        TopicSpec(f"{prefix}detections.shadow", 3, {"retention.ms": str(2 * DAY_MS)}, "shadow-model results"),
        TopicSpec(retry_topic(f"{prefix}detections.shadow"), 1, {"retention.ms": str(2 * DAY_MS)},
                  "monitor retries (Cassandra unavailable)"),
        TopicSpec(dlq_topic(f"{prefix}detections.shadow"), 1, {"retention.ms": str(14 * DAY_MS)},
                  "shadow results the monitor could not read"),
        # One partition per gateway instance; replies are only useful for seconds.
        TopicSpec(replies_topic(prefix), 16, {"retention.ms": str(3600 * 1000)}, "correlated sync replies"),
        TopicSpec(f"{prefix}models", 1, {"cleanup.policy": "compact"}, "model registry changes, by model name"),
        TopicSpec(f"{prefix}jobs.events", 3, {"retention.ms": str(7 * DAY_MS)}, "job progress and completion"),
        TopicSpec(f"{prefix}audit", 3, {"retention.ms": str(90 * DAY_MS)}, "audit events"),
        TopicSpec(abuse_topic(prefix), 3, {"retention.ms": str(30 * DAY_MS)},
                  "images a tenant's content policy flagged for review (AbuseEvent)"),
    ]
    return specs


def apply(kafka: Mapping[str, Any], specs: list[TopicSpec], *, timeout_s: float = 30.0) -> dict[str, str]:
    """Create missing topics, grow partition counts, set configs (``kafka``: an admin connection, e.g.
    ``config.kafka_client(settings)``). Returns name -> action taken."""
    admin = AdminClient({**kafka, "log_level": 3})
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise TopicError(f"cannot list topics at {kafka.get('bootstrap.servers')}: {exc}") from exc
    actions: dict[str, str] = {}
    new = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=s.config)
           for s in specs if s.name not in existing]
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                fut.result(timeout=timeout_s)
                actions[name] = "created"
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise TopicError(f"cannot create {name}: {exc}") from exc
                actions[name] = "exists"
    grow = [NewPartitions(s.name, s.partitions) for s in specs
            if s.name in existing and len(existing[s.name].partitions) < s.partitions]
    if grow:
        for name, fut in admin.create_partitions(grow, request_timeout=timeout_s).items():
            fut.result(timeout=timeout_s)
            actions[name] = "partitions increased"
    alter = [ConfigResource(ConfigResource.Type.TOPIC, s.name, incremental_configs=[
                 ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in s.config.items()])
             for s in specs if s.name in existing and s.config]
    for res in alter:
        # Incremental: only the keys we define are set; others keep what operators chose.
        try:
            admin.incremental_alter_configs([res], request_timeout=timeout_s)[res].result(timeout=timeout_s)
        except KafkaException as exc:
            raise TopicError(f"cannot configure {res.name}: {exc}") from exc
        actions.setdefault(res.name, "configured")
    return actions


def delete(kafka: Mapping[str, Any], names: list[str], *, timeout_s: float = 30.0) -> None:
    """Delete topics (missing ones are fine): what a benchmark or test run leaves behind."""
    admin = AdminClient({**kafka, "log_level": 3})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    doomed = [n for n in names if n in existing]
    if not doomed:
        return
    for name, fut in admin.delete_topics(doomed, request_timeout=timeout_s).items():
        try:
            fut.result(timeout=timeout_s)
        except KafkaException as exc:
            if "UNKNOWN_TOPIC" not in str(exc):
                raise TopicError(f"cannot delete {name}: {exc}") from exc
