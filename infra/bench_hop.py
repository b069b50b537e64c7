"""`detectflow bench hop`: what one stage-to-stage hop costs on the broker, as the runtime loop does it.

For each record size: produce one record and flush (acks=all, idempotent, as stage outputs), poll it
from a consumer group (the next stage), then commit its offset synchronously (the loop's commit after
every batch). Prints the median of each step and the broker's group-coordinator linger, which the
commit waits on. Random bytes, so compression cannot make large records look cheap.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from config import StackSettings, StreamSettings
from stream.kafka import kafka_admin, kafka_connection, kafka_consumer, kafka_producer

SIZES = (1_000, 512 * 1024)


def broker_setting(admin: AdminClient, name: str) -> str:
    resource = ConfigResource(ConfigResource.Type.BROKER, "1")
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    entry = configs.get(name)
    return entry.value if entry is not None else "?"


def run_bench_hop(stack: StackSettings, *, rounds: int = 50, warmup: int = 5) -> int:
    kafka = kafka_connection(StreamSettings.from_env(), "admin")  # SASL_SSL, as every client of the stack
    admin = kafka_admin(kafka)
    topic = f"bench-hop-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
    producer = kafka_producer(kafka, linger_ms=2, compression="lz4", extra={"message.max.bytes": 2 * 1024 * 1024})
    consumer = kafka_consumer(kafka, topic, offset_reset="earliest")
    consumer.subscribe([topic])
    linger = broker_setting(admin, "group.coordinator.append.linger.ms")
    print(f"detectflow bench hop: {rounds} rounds per size; broker group.coordinator.append.linger.ms = {linger}")
    print(f"{'record':>10} {'produce+flush ms':>17} {'poll ms':>8} {'sync commit ms':>15}")
    try:
        for size in SIZES:
            steps: dict[str, list[float]] = {"produce": [], "poll": [], "commit": []}
            for i in range(rounds + warmup):
                t0 = time.perf_counter()
                producer.produce(topic, os.urandom(size))
                if producer.flush(30):
                    raise RuntimeError("produce not acknowledged within 30 s")
                t1 = time.perf_counter()
                deadline = t1 + 30
                msg = None
                while msg is None or msg.error() is not None:
                    if time.perf_counter() > deadline:
                        raise RuntimeError("record not consumed within 30 s")
                    msg = consumer.poll(1.0)
                t2 = time.perf_counter()
                consumer.commit(message=msg, asynchronous=False)
                t3 = time.perf_counter()
                if i >= warmup:
                    steps["produce"].append((t1 - t0) * 1000)
                    steps["poll"].append((t2 - t1) * 1000)
                    steps["commit"].append((t3 - t2) * 1000)
            med = {k: statistics.median(v) for k, v in steps.items()}
            print(f"{size:>8} B {med['produce']:>17.2f} {med['poll']:>8.2f} {med['commit']:>15.2f}")
    finally:
        consumer.close()
        admin.delete_topics([topic])
    return 0
