"""Every topic detectflow uses, defined once, and applied idempotently (`detectflow topics apply`)."""

from __future__ import annotations

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
    ``infra.settings.kafka_client(settings)``). Returns name -> action taken."""
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
