"""A configurable stage and helpers for exercising the stream runtime against real Kafka."""

from __future__ import annotations

import os
import secrets
import signal
import time
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from config import StackSettings, StreamSettings, kafka_client
from stream import topics as T
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Output, Record, now_ms, result_outputs
from stream.serde import AvroSerde


def stream_settings(stack: StackSettings, prefix: str, **overrides: Any) -> StreamSettings:
    """The environment's settings (the suite's keyspace, the stack's ports, CA and credentials) on ``prefix``,
    with short batches and delays."""

    base = {"topic_prefix": prefix, "max_batch": 32, "max_wait_ms": 20, "backoff_initial_ms": 50,
            "retry_delay_ms": 300}
    return StreamSettings.from_env().replace(**{**base, **overrides})


_PREFIXES: list[str] = []


def kafka_admin(stack: StackSettings) -> dict[str, Any]:
    """The operator's Kafka connection (the `admin` principal: the tests act as the operator)."""
    return kafka_client(stream_settings(stack, ""), "admin")


def new_prefix() -> str:
    prefix = f"it{secrets.token_hex(4)}."
    _PREFIXES.append(prefix)
    return prefix


def delete_test_topics(stack: StackSettings) -> None:
    """Delete every topic and consumer group made under this session's prefixes (an idle topic still costs
    the broker; a group's offsets would stay for the broker's offsets retention)."""
    if _PREFIXES:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        from infra.stack.kafka_access import bindings, delete_acls

        admin = AdminClient({**kafka_admin(stack)})
        try:
            for prefix in _PREFIXES:
                delete_acls(kafka_admin(stack), bindings(prefix))
            existing = admin.list_topics(timeout=10).topics
            T.delete(kafka_admin(stack), [t for t in existing if t.startswith(tuple(_PREFIXES))])
            listed = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
            groups = [g.group_id for g in listed.valid if g.group_id.startswith(tuple(_PREFIXES))]
            for group, future in (admin.delete_consumer_groups(groups, request_timeout=10).items() if groups else ()):
                try:
                    future.result(timeout=15)
                except KafkaException as exc:  # a group still closing: its offsets expire with the retention
                    print(f"could not delete consumer group {group}: {exc}")
        except (KafkaException, T.TopicError) as exc:  # cleanup only: never fail the session for it
            print(f"could not delete test topics: {exc}")
        _PREFIXES.clear()


def make_topics(stack: StackSettings, prefix: str) -> None:
    wanted = {T.lane_topic(prefix, lane, "submitted") for lane in T.LANES}
    wanted |= {T.retry_topic(t) for t in list(wanted)} | {T.dlq_topic(t) for t in list(wanted)}
    wanted |= {T.detections_topic(prefix), T.replies_topic(prefix)}
    specs = [s for s in T.all_topics(prefix) if s.name in wanted]
    assert len(specs) == len(wanted)
    T.apply(kafka_admin(stack), specs)
    for topic in sorted(wanted):
        read_all(stack, topic, until=0, timeout_s=0)  # start the readers before anything is produced


def submission(request_id: str, *, tenant: str = "t1", lane: str = "BATCH") -> dict[str, Any]:
    return {"request_id": request_id, "tenant": tenant, "image": {"data": b"\xff\xd8\xff"}, "lane": lane,
            "model": {"name": "yolov4-tiny", "version": None}, "params": {}, "submitted_at": now_ms()}


def produce(stack: StackSettings, serde: AvroSerde, topic: str, records: Iterable[dict[str, Any]],
            headers: dict[str, bytes] | None = None) -> None:
    p = Producer({**kafka_admin(stack), "enable.idempotence": True, "linger.ms": 5})
    for rec in records:
        p.produce(topic, key=rec["request_id"].encode(), value=serde.encode(topic, "ImageSubmitted", rec),
                  headers=list((headers or {}).items()))
        p.poll(0)
    assert p.flush(30) == 0


class _Reader:
    """One long-lived read_committed consumer per topic, assigned from the beginning.

    A fresh consumer per check can take tens of seconds to see a just-created topic's
    first records; a reader created up front sees them within a fetch.
    """

    def __init__(self, kafka: dict[str, Any], topic: str):
        self.consumer = Consumer({**kafka, "group.id": f"it-read-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed"})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.msgs: list[Any] = []

    def read(self, until: int, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while len(self.msgs) < until and time.monotonic() < deadline:
            self.msgs += [m for m in self.consumer.consume(500, 0.1) if m.error() is None]
        return list(self.msgs)


_READERS: dict[tuple[str, str], _Reader] = {}


def read_all(stack: StackSettings, topic: str, *, until: int, timeout_s: float = 60.0) -> list[Any]:
    """Everything on ``topic`` so far (read_committed), waiting until ``until`` messages or the deadline."""
    key = (stack.kafka_bootstrap, topic)
    if key not in _READERS:
        _READERS[key] = _Reader(kafka_admin(stack), topic)
    return _READERS[key].read(until, timeout_s)


def close_readers() -> None:
    for reader in _READERS.values():
        reader.consumer.close()
    _READERS.clear()


class EchoStage:
    """Turns each ImageSubmitted into an OK DetectionResult; can be told to misbehave."""

    name = "echo"
    input_event = "ImageSubmitted"
    emits_terminal_results = True

    def __init__(self, prefix: str, *, transient_calls: int = 0, delay_s: float = 0.0, crash_on: str = "",
                 unencodable: frozenset[str] = frozenset(), oversized: frozenset[str] = frozenset()):
        self.prefix = prefix
        self.transient_calls = transient_calls
        self.delay_s = delay_s
        self.calls = 0
        self.crash_on = crash_on          # this request id kills the process (as the kernel kills an OOM)
        self.unencodable = unencodable    # these request ids get a result that does not fit its schema
        self.oversized = oversized        # these request ids get an output over the topic's size limit

    def input_topics(self) -> list[str]:
        return [T.lane_topic(self.prefix, lane, "submitted") for lane in T.LANES]

    def process(self, batch: list[Record]) -> list[Outcome]:
        self.calls += 1
        if self.transient_calls > 0:
            self.transient_calls -= 1
            raise TransientError("dependency unavailable (simulated)")
        outcomes: list[Outcome] = []
        for rec in batch:
            if self.delay_s:
                time.sleep(self.delay_s)
            if rec.value["tenant"] == "invalid":
                outcomes.append(Failure(InvalidRecord("INVALID_TENANT", "tenant 'invalid' is refused")))
                continue
            rid = rec.value["request_id"]
            if rid == self.crash_on:
                os.kill(os.getpid(), signal.SIGKILL)
            result = {"request_id": rid, "tenant": rec.value["tenant"], "status": "OK",
                      "detections": [], "timings_ms": {"echo": 0.0}, "lane": rec.value["lane"],
                      "job_id": rec.value.get("job_id"), "completed_at": now_ms()}
            if rid in self.unencodable:
                result["status"] = "NOT_A_STATUS"
            outs = result_outputs(self.prefix, result, dict(rec.headers))
            if rid in self.oversized:
                outs.append(Output(T.detections_topic(self.prefix), rid, b"\0" * (17 * 1024 * 1024), None))
            outcomes.append(outs)
        return outcomes
