"""The gateway's Kafka side: an idempotent producer whose deliveries are awaitable, the reply router of
this instance's reply partition, and a monitor of the online lane's backlog (for backpressure)."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from config import GatewaySettings
from gateway import metrics as GM
from gateway.problems import Problem
from stream.kafka import kafka_admin, kafka_connection, kafka_consumer, kafka_producer
from stream.reply import ReplyRouter
from stream.serde import AvroSerde, SerdeError
from stream.topics import STAGE_INPUTS, lane_topic, replies_topic

log = logging.getLogger(__name__)

# Which stage's consumer group reads each step's topic.
STEP_GROUPS = {"submitted": "scan", "scanned": "preprocess", "preprocessed": "inference", "inferred": "postprocess"}


class Bus:
    def __init__(self, settings: GatewaySettings, serde: AvroSerde | None = None):
        stream = settings.pipeline.stream
        self.settings = settings
        self.prefix = stream.topic_prefix
        self.serde = serde or AvroSerde.from_url(stream.registry_url, stream.tls_ca_file)
        kafka = kafka_connection(stream)
        self.producer = kafka_producer(kafka, linger_ms=1, compression=stream.compression,
                                       max_record_bytes=stream.max_message_bytes,
                                       extra={"message.timeout.ms": 15000, "queue.buffering.max.messages": 200_000})
        self.admin = kafka_admin(kafka)
        # The online backlog is read with one idle consumer per stage group (never subscribed: it only asks for
        # that group's committed offsets and the watermarks), as the stages measure theirs. The admin API's
        # offset calls crashed the process (a librdkafka assertion) when a Kafka restart came mid-request.
        self._lag_consumers = {group: kafka_consumer(kafka, f"{self.prefix}detectflow.{group}")
                               for group in STEP_GROUPS.values()}
        partition = settings.reply_partition if settings.reply_partition >= 0 else random.randrange(16)  # noqa: S311
        self.router = ReplyRouter(stream, self.serde, replies_topic(self.prefix), partition)
        self.online_lag = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="gateway-producer", daemon=True)
        self._lag_task: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._poller.start()
        await loop.run_in_executor(None, self.router.start)
        # Look the schema ids up now, not in the first request.
        for lane in ("online", "batch"):
            await loop.run_in_executor(None, self.serde.schema_id, lane_topic(self.prefix, lane, "submitted"),
                                       "ImageSubmitted")
        await loop.run_in_executor(None, self.serde.schema_id, f"{self.prefix}audit", "AuditEvent")
        self._lag_task = asyncio.create_task(self._lag_loop(), name="online-lag")

    async def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            try:
                await self._lag_task
            except asyncio.CancelledError:
                pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.producer.flush, 10)
        for consumer in self._lag_consumers.values():
            await loop.run_in_executor(None, consumer.close)
        self._stop.set()
        await loop.run_in_executor(None, self._poller.join, 5)
        await loop.run_in_executor(None, self.router.close)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    # ---- producing -----------------------------------------------------------------------------------
    def produce(self, topic: str, key: str, event: str, value: dict[str, Any],
                headers: Mapping[str, bytes] | None = None) -> asyncio.Future[None]:
        """Encode and produce; the future resolves when the broker acknowledged it (acks=all)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def delivered(err: Any, _msg: Any) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(Problem("UNAVAILABLE", f"Kafka did not take the event ({err.str()})"))
            loop.call_soon_threadsafe(settle)

        try:
            data = self.serde.encode(topic, event, value)
            self.producer.produce(topic, key=key.encode(), value=data, headers=list((headers or {}).items()),
                                  on_delivery=delivered)
        except BufferError as exc:
            fut.set_exception(Problem("OVERLOADED", "the gateway's producer queue is full",
                                      headers={"Retry-After": "1"}))
            fut.exception()  # mark retrieved: the caller may have gone
            log.debug("producer queue full: %s", exc)
        except (KafkaException, SerdeError) as exc:
            fut.set_exception(Problem("UNAVAILABLE", f"cannot publish the event ({type(exc).__name__})"))
        return fut

    async def delivered(self, futures: list[asyncio.Future[None]], timeout_s: float) -> None:
        """Wait for every delivery, at most ``timeout_s``; the first failure is raised."""
        if not futures:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=timeout_s)
        except TimeoutError as exc:
            raise Problem("UNAVAILABLE", "Kafka did not acknowledge the events in time") from exc

    # ---- health and backpressure -----------------------------------------------------------------------
    def ping(self, timeout_s: float = 2.0) -> None:
        try:  # one topic's metadata: the whole cluster's grows with every deployment sharing the broker
            self.admin.list_topics(replies_topic(self.prefix), timeout=timeout_s)
        except KafkaException as exc:
            raise Problem("UNAVAILABLE", "Kafka does not answer") from exc

    def measure_online_lag(self, timeout_s: float = 2.0) -> int:
        """Records waiting in the online lane: per stage topic, end offset minus the stage group's committed one."""
        total = 0
        for step in STAGE_INPUTS:
            topic = lane_topic(self.prefix, "online", step)
            consumer = self._lag_consumers[STEP_GROUPS[step]]
            meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            parts = [TopicPartition(topic, p) for p in meta.partitions]
            for tp in consumer.committed(parts, timeout=timeout_s):
                if tp.offset >= 0:  # a group that never committed has no backlog we can name
                    _low, end = consumer.get_watermark_offsets(tp, timeout=timeout_s)
                    total += max(0, end - tp.offset)
        return total

    async def _lag_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.lag_check_interval_s
        while True:
            t0 = time.monotonic()
            try:
                self.online_lag = await loop.run_in_executor(None, self.measure_online_lag)
                GM.ONLINE_LAG.set(self.online_lag)
            except (KafkaException, Problem) as exc:
                log.warning("online lag not measured: %s", exc)
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - t0)))
