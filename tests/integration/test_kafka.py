"""Kafka: idempotent produce, group consumption with manual commits, large records."""

from __future__ import annotations

import hashlib
import secrets
import time

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from stream_kit import kafka_admin

from config import StackSettings

PARTITIONS = 3


def _create_topic(stack: StackSettings, prefix: str) -> str:
    topic = f"it-{prefix}-{secrets.token_hex(6)}"
    admin = AdminClient({**kafka_admin(stack)})
    futures = admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)],
                                  request_timeout=15)
    futures[topic].result(timeout=15)
    return topic


def _producer(stack: StackSettings) -> Producer:
    return Producer({
        **kafka_admin(stack),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        # Raised together with the broker's message.max.bytes (see infra/stack/kafka.py).
        "message.max.bytes": stack.kafka_max_message_bytes,
    })


def _consumer(stack: StackSettings, group: str) -> Consumer:
    return Consumer({
        **kafka_admin(stack),
        "group.id": group,
        "auto.offset.reset": "earliest",
        # Offsets are committed by hand once the batch is checked, as the pipeline does.
        "enable.auto.commit": False,
        "fetch.max.bytes": stack.kafka_max_message_bytes * 2,
    })


def _produce_all(producer: Producer, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages still in flight after 30 s"
    assert not errors, errors


def _consume(consumer: Consumer, want: int, timeout_s: float = 60.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=want - len(got), timeout=1.0):
            assert msg.error() is None, msg.error()
            got.append(msg)
    return got


def _wait_assigned_expecting_nothing(consumer: Consumer, timeout_s: float = 30.0) -> list[TopicPartition]:
    """Poll until the group hands out partitions; any record returned meanwhile is a failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        assert msg is None, f"unexpected record: partition {msg.partition()} offset {msg.offset()}"
        if consumer.assignment():
            return consumer.assignment()
    raise AssertionError("consumer got no partitions within the deadline")


def test_group_consumes_everything_once(stack: StackSettings) -> None:
    topic = _create_topic(stack, "group")
    records = [(f"k{i}".encode(), f"value-{i}".encode()) for i in range(300)]
    _produce_all(_producer(stack), topic, records)

    group = f"it-group-{secrets.token_hex(6)}"
    first = _consumer(stack, group)
    try:
        first.subscribe([topic])
        got = _consume(first, len(records))
        assert sorted((m.key(), m.value()) for m in got) == sorted(records)
        first.commit(asynchronous=False)
    finally:
        first.close()

    second = _consumer(stack, group)
    try:
        second.subscribe([topic])
        assigned = _wait_assigned_expecting_nothing(second)
        for tp in second.committed(assigned, timeout=10):
            _low, high = second.get_watermark_offsets(tp, timeout=10)
            # An empty partition has nothing to commit (offset stays "invalid", < 0).
            assert tp.offset == high or (high == 0 and tp.offset < 0), \
                f"partition {tp.partition}: committed {tp.offset}, end {high}"
        assert _consume(second, 1, timeout_s=3.0) == []
    finally:
        second.close()


def test_five_mib_record_round_trips(stack: StackSettings) -> None:
    topic = _create_topic(stack, "large")
    body = secrets.token_bytes(5 * 1024 * 1024)
    _produce_all(_producer(stack), topic, [(b"large", body)])

    consumer = _consumer(stack, f"it-large-{secrets.token_hex(6)}")
    try:
        consumer.subscribe([topic])
        (msg,) = _consume(consumer, 1)
        value = msg.value()
        assert value is not None and len(value) == len(body)
        assert hashlib.sha256(value).digest() == hashlib.sha256(body).digest()
    finally:
        consumer.close()
