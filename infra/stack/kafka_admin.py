"""Idempotent topic creation used while bringing the stack up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import NewTopic

from infra.stack.base import StackError
from stream.kafka import kafka_admin


def ensure_topic(kafka: Mapping[str, Any], topic: str, *, partitions: int, config: dict[str, str] | None = None,
                 timeout_s: float = 15.0) -> bool:
    """Create ``topic`` unless it exists (``kafka``: an admin connection). Returns True if it was created."""
    admin = kafka_admin(kafka)
    existing = admin.list_topics(timeout=timeout_s).topics
    if topic in existing:
        return False
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                                            config=config or {})], request_timeout=timeout_s)
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" in str(exc):
            return False
        raise StackError(f"cannot create topic {topic}: {exc}") from exc
    return True
