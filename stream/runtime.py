"""The one loop every stage runs on.

poll a batch -> decode -> stage.process -> produce -> flush -> commit, in that
order, so nothing is committed before its outputs are durable (at-least-once;
sinks are idempotent by request id).  With ``exactly_once`` the outputs and the
input offsets go into one Kafka transaction instead (for stages that only read
and write Kafka), and read_committed consumers see each output once.

Failure paths (no single record can stop a stage):
- undecodable record -> DLQ at once (provenance headers) + REJECTED result;
- a malformed carried header, or a reply-to that is not a reply topic's existing partition
  -> DLQ + REJECTED INVALID_HEADER (the result goes to `detections` only);
- InvalidRecord from the stage -> DLQ + REJECTED result with the stage's code;
- TransientError -> bounded in-loop backoff, then the retry topic with an attempt count and a
  not-before time, for up to ``retry_budget_ms`` after the first failure (time, not attempts),
  then DLQ + FAILED RETRIES_EXHAUSTED;
- outputs that do not encode or are over the size limit -> DLQ + FAILED INVALID_OUTPUT (a
  record's outputs are encoded before any is produced: all or none);
- the schema registry away while decoding -> the partition waits (held, uncommitted);
- anything else is a bug: the loop stops without committing and the supervisor restarts it; the
  poison ledger (stream/poison.py) then processes the records that were in flight alone, and
  sets aside to the DLQ (FAILED POISON_RECORD) one that stopped the process three times.

Lanes: online partitions are served first; while they have a backlog the batch
partitions are paused, but never for longer than ``batch_max_wait_ms`` at a time: then the
batch lane gets a turn of ``batch_turn_ms`` (read alongside the online lane), so a steady
online load slows batch work down and never stops it.

On-demand inputs: a stage with nothing to do on a topic (the shadow without a shadow
version) says so (``on_demand_topics``); the runner then does not subscribe to it, and
reads it from the moment it is wanted again, never the backlog of the idle time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from config import StreamSettings
from schemas import events
from stream import headers as H
from stream import ingest
from stream import metrics as M
from stream.errors import DeliveryError, InvalidRecord, TransientError
from stream.heap import HeapTrimmer
from stream.kafka import kafka_connection, kafka_consumer, kafka_producer
from stream.poison import Offset, PoisonLedger
from stream.records import (
    Failure,
    Outcome,
    Output,
    Record,
    Stage,
    now_ms,
    request_fields,
    result_outputs,
    terminal_result,
)
from stream.serde import AvroSerde, DecodeError, RegistryUnavailable, SerdeError
from stream.topics import TENANT_REPLIES, dlq_topic, replies_topic, retry_topic, tenant_of_ingest
from stream.watchdog import LoopWatchdog

log = logging.getLogger(__name__)

RETRY_SUFFIX = ".retry"
# An output's encoded value may use this much of a topic's max.message.bytes (max_message_bytes + 64 KiB,
# `detectflow topics apply`): the rest is left to its key, headers and the record batch's framing.
OUTPUT_SLACK_BYTES = 32 * 1024
# How long a reply topic's partition count is trusted before it is asked again (partitions are only added).
REPLY_METADATA_TTL_S = 60.0
# A coordinator call (commit, transaction) may overrun its own timeout by this much before the watchdog ends the
# process: past it, it is librdkafka's send_offsets_to_transaction waiting on a stale coordinator (see commit).
CALL_GRACE_S = 10.0


class OutputTooLarge(SerdeError):
    """An encoded output is over the topic's size limit."""


def lane_of(topic: str) -> str:
    return "online" if ".online." in topic else "batch"


def origin_of(topic: str) -> str:
    return topic[: -len(RETRY_SUFFIX)] if topic.endswith(RETRY_SUFFIX) else topic


@dataclass
class _Held:
    due: float  # time.time() seconds
    msgs: list[Message]


@dataclass
class _Pending:
    """A polled message and what became of it."""

    msg: Message
    record: Record | None = None
    outputs: list[Output] = field(default_factory=list)
    done: bool = False
    # The headers the pipeline carries on (a tenant's bound by stream.ingest); None: the message's own.
    headers: dict[str, bytes] | None = None


class StageRunner:
    """Runs one stage until stopped. One consumer, one producer, one thread."""

    def __init__(self, stage: Stage, settings: StreamSettings, *, serde: AvroSerde | None = None,
                 group_id: str | None = None, exactly_once: bool = False, instance_id: str | None = None,
                 max_batch: int | None = None, queue_delay_ms: Mapping[str, int] | None = None,
                 exactly_once_lanes: frozenset[str] | None = None):
        self.stage = stage
        self.settings = settings
        self.max_batch = max(1, max_batch or settings.max_batch)
        # Micro-batching (Triton's dynamic batcher over topic partitions): after the first record,
        # keep polling until the batch is full or its oldest record has waited its lane's delay.
        # No delay by default: a stage takes what is already there and goes.
        self.queue_delay_ms = dict(queue_delay_ms or {})
        self.serde = serde or AvroSerde.from_url(settings.registry_url, settings.tls_ca_file)
        self.group_id = group_id or f"{settings.topic_prefix}detectflow.{stage.name}"
        self.exactly_once = exactly_once
        # With exactly_once, which lanes' records go through transactions. Others are delivered
        # at-least-once by a plain idempotent producer (no commit round trips on their path): the
        # online lane trades exactly-once on `detections` (consumers dedupe by request id; sinks are
        # idempotent) for latency, and a sync caller takes the first reply anyway.
        self.eos_lanes = frozenset() if not exactly_once else (exactly_once_lanes or frozenset({"online", "batch"}))
        self.heap = HeapTrimmer(settings.heap_trim_interval_s)  # RSS follows the working set, not its peak
        self._stop = threading.Event()
        self._paused_batch: set[tuple[str, int]] = set()
        self._paused_since = 0.0  # monotonic: when the batch lane was last paused (from not paused)
        self._batch_turn_until = 0.0  # monotonic: the batch lane's turn lasts until then
        # Retry records polled before their not-before time, held (uncommitted) while their
        # partition is paused; bounded by one fetch of that partition.
        self._held: dict[tuple[str, int], _Held] = {}
        self._subscription: list[str] | None = None  # None: not subscribed yet
        # On-demand input topics that are on, and since when (ms): see _follow_demand.
        self._wanted_since: dict[str, int] = {}
        # Checkpoints (commits) are batched: offsets of delivered batches wait here, and an exactly-once
        # lane's transaction stays open across batches, until the stage has caught up (nothing more is
        # fetched) or ``commit_interval_ms`` has passed: under a backlog one commit covers many batches.
        self._plain_offsets: dict[tuple[str, int], int] = {}
        self._txn_offsets: dict[tuple[str, int], int] = {}
        self._txn_open = False
        self._last_commit = time.monotonic()
        # Committed offsets of online partitions not consumed yet (for the lag check), asked once per assignment.
        self._committed_cache: dict[tuple[str, int], int] = {}
        self._last_lane_check = 0.0
        self._last_lag_export = 0.0
        self._online_seen = False
        self._delivery_errors: list[str] = []
        # Ends the process when the loop stops turning, or a call bounded by it overruns (started by run()).
        self.watchdog = LoopWatchdog(self.stage.name, settings.loop_stall_s)
        # Reply topics' partition counts (a reply-to must name one that exists): topic -> (count, asked at).
        self._reply_partitions: dict[str, tuple[int, float]] = {}
        ledger_name = f"{self.group_id}-{instance_id}" if instance_id else self.group_id
        self.poison = PoisonLedger(None if settings.state_dir is None else settings.state_dir / "poison",
                                   ledger_name, settings.poison_max_crashes)
        kafka = kafka_connection(settings)
        # Offsets are committed by the loop only after outputs are durable (auto-commit and auto-store off).
        self.consumer = kafka_consumer(kafka, self.group_id, offset_reset="earliest",
                                       max_record_bytes=settings.max_message_bytes, log_level=4, extra={
            "enable.auto.offset.store": False,
            "queued.max.messages.kbytes": settings.prefetch_kbytes,
            "max.poll.interval.ms": 300000,
            # An input topic whose metadata was not yet visible when the stage subscribed (created a
            # moment before, on a busy broker) is found within 10 s, not librdkafka's default 5 min.
            "topic.metadata.refresh.interval.ms": 10000,
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 2000,
            "error_cb": self._on_client_error,
        })
        producer_options: dict[str, Any] = {"linger_ms": 2, "compression": settings.compression,
                                            "max_record_bytes": settings.max_message_bytes, "log_level": 4}
        self.producer = kafka_producer(kafka, **producer_options,  # at-least-once outputs
                                       extra={"error_cb": self._on_client_error})
        self.txn_producer: Producer | None = None  # exactly-once outputs
        # Set when a client of the stage lost every broker connection (a Kafka restart): the transactional
        # producer's cached group coordinator is then stale, and librdkafka's send_offsets_to_transaction waits on
        # it past its own timeout (upstream issue 5456) until the cache entry expires, ~10 minutes. See
        # _txn_producer_ready.
        self._brokers_lost = False
        self._kafka, self._producer_options = kafka, producer_options
        self._transactional_id = f"{self.group_id}-{instance_id or uuid.uuid4().hex[:12]}"
        if self.eos_lanes:
            self.txn_producer = self._new_txn_producer()

    def _new_txn_producer(self) -> Producer:
        return kafka_producer(self._kafka, **self._producer_options, transactional_id=self._transactional_id,
                              extra={"error_cb": self._on_client_error})

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors (served by each client's poll). Any client of the stage that lost every
        broker connection means the transactional producer's did too (one cluster)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_lost = True

    # ---- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, max_batches: int | None = None, idle_stop_s: float | None = None) -> None:
        """Loop until stop() (SIGTERM): finish the in-flight batch, commit, leave the group."""
        watchdog = self.watchdog.start()
        batches = 0
        idle_since = time.monotonic()
        try:
            if self.txn_producer is not None:
                with watchdog.bounded("init_transactions", self._call_bound_s()):
                    self.txn_producer.init_transactions(self.settings.flush_timeout_s)
            while not self._stop.is_set():
                watchdog.beat()
                self._follow_demand()
                self.heap.maybe_trim()
                if self.run_once():
                    batches += 1
                    idle_since = time.monotonic()
                elif idle_stop_s is not None and time.monotonic() - idle_since > idle_stop_s:
                    break
                if max_batches is not None and batches >= max_batches:
                    break
        except BaseException:
            self._abandon_transaction()  # a batch may be half in it: its inputs are read again after the restart
            raise
        finally:
            try:
                self.close()  # still watched: a close that hangs ends the process too
            finally:
                watchdog.stop()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._paused_batch.clear()
        self._held.clear()
        on_demand = [tp for tp in partitions if origin_of(tp.topic) in self._wanted_since]
        if on_demand:
            self._skip_backlog(consumer, on_demand)
            consumer.assign(partitions)
            # Committed too: the lane scheduler (_online_lag) and the gateway read lag from the committed offset
            # of a partition not yet read, and would see the skipped backlog (the batch lane paused behind it).
            starts = [tp for tp in on_demand if tp.offset >= 0]
            if starts:
                with self.watchdog.bounded("the offset commit of an on-demand topic's start",
                                           self._call_bound_s()):
                    consumer.commit(offsets=starts, asynchronous=False)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every delivered batch is checkpointed before the partitions go: the next owner starts after them.
        # Held retry records were never committed, so the partition's next owner reads them again.
        if self.has_uncommitted():
            self.commit()
        self._committed_cache.clear()
        self._paused_batch.clear()
        self._held.clear()

    # ---- on-demand inputs ----------------------------------------------------------------------------
    def _follow_demand(self) -> None:
        """Subscribe to what the stage has work on now. A stage may define ``on_demand_topics() -> Mapping[str,
        bool]``: input topics it reads only while True (asked at every turn of the loop, so it must be cheap).
        While every input is off the consumer is unsubscribed: no group membership, no fetch, and the loop's
        poll still waits ``max_wait_ms`` per turn. A topic that turns on is read from that moment on, never the
        backlog left while it was off (``_skip_backlog``)."""
        demand = getattr(self.stage, "on_demand_topics", None)
        if demand is None and self._subscription is not None:
            return
        wanted = dict(demand()) if demand is not None else {}
        now = now_ms()
        for topic, on in wanted.items():
            if on:
                self._wanted_since.setdefault(topic, now)
            else:
                self._wanted_since.pop(topic, None)
        inputs = [t for t in self.stage.input_topics() if wanted.get(t, True)]
        # A stage may also take regex subscriptions (``input_patterns``, e.g. every tenant's ingest topic and
        # its retry topic): topics created later are picked up at the next metadata refresh.
        patterns = list(getattr(self.stage, "input_patterns", lambda: [])())
        topics = inputs + [retry_topic(t) for t in inputs] + patterns
        if topics == self._subscription:
            return
        if topics:
            self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        elif self._subscription:
            self.consumer.unsubscribe()  # the revocation is served by the next poll
        if self._subscription is not None or demand is not None:
            log.info("%s: reading %s", self.stage.name, ", ".join(topics) or "nothing (no work on any input)")
        self._subscription = topics

    def _skip_backlog(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition of an on-demand topic (or its retry topic) at its first record since the topic
        turned on, or at the group's committed offset if that is later (a rebalance while on). Offsets committed
        in an earlier period on are older than that: the records of the idle time between are never read."""
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=10)}
        # The end as of now (timestamp -1: the latest offset), asked first: a record written after it is read.
        # (OFFSET_END would be resolved later, by the fetcher, and skip what came in between.)
        ends = consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, -1) for tp in partitions],
                                          timeout=10)
        since = consumer.offsets_for_times(
            [TopicPartition(tp.topic, tp.partition, self._wanted_since[origin_of(tp.topic)]) for tp in partitions],
            timeout=10)
        for tp, end, first in zip(partitions, ends, since, strict=True):
            # offsets_for_times gives -1 where no record is that recent: start at the end.
            start = first.offset if first.offset >= 0 else end.offset
            tp.offset = max(start, committed[(tp.topic, tp.partition)]) if start >= 0 else OFFSET_END

    # ---- one batch -------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Poll and handle one batch. Returns False when nothing was polled."""
        released = self._release_due_retries()
        uncommitted = self.has_uncommitted()
        msgs = released + [m for m in self._poll_batch(self.max_batch - len(released),
                                                       block=not released and not uncommitted)
                           if not self._is_transport_error(m)]
        if not msgs:
            if uncommitted:
                self.commit()  # caught up: checkpoint what was delivered (and make a transaction's outputs visible)
            self._schedule_lanes(saw_online=False)
            return False
        t_admit = time.perf_counter()
        pending = self._admit(msgs)
        M.LOOP_SECONDS.labels(self.stage.name, "decode").observe(time.perf_counter() - t_admit)
        work = [p for p in pending if p.record is not None and not p.done]
        saw_online = any(p.record.lane == "online" for p in work if p.record)
        stage = self.stage.name
        for p in work:
            assert p.record is not None
            M.RECORDS_IN.labels(stage, p.record.lane).inc()
        if work:
            M.BATCH_SIZE.labels(stage).observe(len(work))
            self._process_guarded(work)
        handled = [p for p in pending if p.done]
        for p in handled:
            self._prepare(p)
        t_deliver = time.perf_counter()
        self._deliver_and_commit(handled)
        M.LOOP_SECONDS.labels(self.stage.name, "deliver").observe(time.perf_counter() - t_deliver)
        for p in handled:
            if p.record is not None:
                sub = request_fields(p.record.value).get("submitted_at")
                if sub:
                    M.RECORD_AGE_SECONDS.labels(stage, p.record.lane).observe(max(0.0, (now_ms() - sub) / 1000))
        self._schedule_lanes(saw_online=saw_online)
        self._export_lag()
        return True

    def _poll_batch(self, wanted: int, *, block: bool = True) -> list[Message]:
        """Up to ``wanted`` records: the first as soon as one arrives (or none after max_wait_ms), then
        whatever is already fetched, then more until full or the oldest record's queue delay is spent."""
        if wanted <= 0:
            return []
        first = self.consumer.poll(self.settings.max_wait_ms / 1000 if block else 0)
        if first is None:
            return []
        msgs = [first]
        if wanted > 1:
            msgs += self.consumer.consume(wanted - 1, 0)
        if len(msgs) < wanted and self.queue_delay_ms:
            stamps = [(m.timestamp()[1], lane_of(origin_of(m.topic()))) for m in msgs if m.error() is None]
            if stamps:
                delay = min(self.queue_delay_ms.get(lane, 0) for _, lane in stamps)
                oldest = min(ts for ts, _ in stamps if ts > 0) if any(ts > 0 for ts, _ in stamps) else now_ms()
                remaining = (oldest + delay - now_ms()) / 1000
                if remaining > 0:
                    msgs += self.consumer.consume(wanted - len(msgs), remaining)
        return msgs

    def _is_transport_error(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.code() == KafkaError._PARTITION_EOF:
            return True
        if err.fatal():
            raise KafkaException(err)
        log.warning("%s: consumer error: %s", self.stage.name, err)
        return True

    def _admit(self, msgs: list[Message]) -> list[_Pending]:
        """Decode; defer retry records that are not yet due; DLQ what cannot be decoded."""
        out: list[_Pending] = []
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            held = self._held.get(tp)
            if held is not None:
                held.msgs.append(msg)  # keeps the partition's order behind the held record
                continue
            hdrs = H.to_dict(msg.headers())
            not_before = H.integer(hdrs, H.NOT_BEFORE_MS)
            if msg.topic().endswith(RETRY_SUFFIX) and not_before is not None and not_before > now_ms():
                self._held[tp] = _Held(not_before / 1000, [msg])
                self.consumer.pause([TopicPartition(*tp)])
                continue
            p = _Pending(msg)
            # Provenance headers count only on a retry topic (written by pipeline principals alone); on an
            # input topic they are whatever its producer wrote.
            from_retry = msg.topic().endswith(RETRY_SUFFIX)
            origin = (H.text(hdrs, H.ORIGIN_TOPIC) if from_retry else None) or origin_of(msg.topic())
            tenant = tenant_of_ingest(self.settings.topic_prefix, origin)
            if tenant is not None:
                hdrs = p.headers = ingest.bind_headers(self.settings.topic_prefix, tenant, hdrs, from_retry=from_retry)
            lane = lane_of(origin)
            key = msg.key().decode("utf-8", errors="replace") if msg.key() is not None else None
            try:
                value = self._decode(msg.value())
            except DecodeError as exc:
                self._dead_letter(p, origin, lane, key, None, "DecodeError", str(exc), "INVALID_EVENT", "REJECTED",
                                  attempts=1, reason="undecodable")
                out.append(p)
                continue
            except RegistryUnavailable as exc:
                # The registry is away (and this schema not cached): the record and the rest of its partition wait,
                # uncommitted, as a retry record not yet due does; the stage goes on with other partitions.
                log.warning("%s: %s; %s[%d] waits", self.stage.name, exc, msg.topic(), msg.partition())
                self._held[tp] = _Held(time.time() + self.settings.backoff_max_ms / 1000, [msg])
                self.consumer.pause([TopicPartition(*tp)])
                continue
            bad = H.invalid_carried(hdrs) or self._reply_target_problem(hdrs)
            if bad:
                # Rejected, and its terminal result goes to `detections` only: never where a bad header points.
                p.headers = {k: v for k, v in hdrs.items() if k not in bad}
                self._dead_letter(p, origin, lane, key, value, "InvalidHeader",
                                  "; ".join(f"{name}: {why}" for name, why in bad.items()), "INVALID_HEADER",
                                  "REJECTED", attempts=1, reason="invalid_header")
                out.append(p)
                continue
            ts_type, ts = msg.timestamp()
            if ts_type and ts > 0 and not from_retry:
                M.HOP_SECONDS.labels(self.stage.name, lane).observe(max(0, now_ms() - ts) / 1000)
            attempt = (H.integer(hdrs, H.ATTEMPT) if from_retry else None) or 1
            p.record = Record(topic=origin, partition=msg.partition(), offset=msg.offset(), key=key, value=value,
                              headers=hdrs, lane=lane, attempt=attempt,
                              timestamp_ms=ts if ts_type else 0)
            out.append(p)
        return out

    def _reply_target_problem(self, hdrs: dict[str, bytes]) -> dict[str, str]:
        """A well-formed reply-to must name a reply topic (the gateways' or a tenant's) and one of its partitions:
        a stage writes there with its own rights, and a partition that does not exist would fail the delivery of
        the whole batch."""
        addr = H.reply_address(hdrs.get(H.REPLY_TO))
        if addr is None:
            return {}
        topic, partition = addr
        prefix = self.settings.topic_prefix
        if topic != replies_topic(prefix) and not topic.startswith(f"{prefix}{TENANT_REPLIES}"):
            return {H.REPLY_TO: f"{topic} is not a reply topic"}
        count = self._partition_count(topic, at_least=partition + 1)
        if count is not None and partition >= count:
            return {H.REPLY_TO: f"{topic} has no partition {partition}" if count else f"{topic} does not exist"}
        return {}

    def _partition_count(self, topic: str, *, at_least: int) -> int | None:
        """The topic's partition count from cached metadata, asked again when older than the TTL or (at most
        every few seconds) when a header names a partition beyond it. None: the broker did not answer (the
        delivery will tell)."""
        now = time.monotonic()
        cached = self._reply_partitions.get(topic)
        if cached is not None and (cached[0] >= at_least or now - cached[1] < 5.0) \
                and now - cached[1] < REPLY_METADATA_TTL_S:
            return cached[0]
        try:
            meta = self.producer.list_topics(topic, timeout=5)
        except KafkaException as exc:
            log.warning("%s: no metadata for %s: %s", self.stage.name, topic, exc)
            return cached[0] if cached is not None else None
        info = meta.topics.get(topic)
        count = 0 if info is None or info.error is not None else len(info.partitions)
        self._reply_partitions[topic] = (count, now)
        return count

    def _decode(self, data: bytes | None) -> dict[str, Any]:
        event = self.stage.input_event
        if event is None:
            try:
                value = json.loads(data or b"")
            except ValueError as exc:
                raise DecodeError(f"not JSON: {exc}") from exc
            if not isinstance(value, dict):
                raise DecodeError("JSON value is not an object")
            return value
        backoff = self.settings.backoff_initial_ms / 1000
        for attempt in range(self.settings.backoff_attempts + 1):
            try:
                return self.serde.decode(data, event)
            except RegistryUnavailable:
                if attempt == self.settings.backoff_attempts:
                    raise
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.backoff_max_ms / 1000)
        raise AssertionError("unreachable")

    def _release_due_retries(self) -> list[Message]:
        """Held retry records whose time has come, in order; their partitions fetch again."""
        now = time.time()
        released: list[Message] = []
        for tp in [tp for tp, held in self._held.items() if held.due <= now]:
            released += self._held.pop(tp).msgs
            self.consumer.resume([TopicPartition(*tp)])
        return released

    # ---- processing ---------------------------------------------------------------------------------
    def _call_stage(self, records: list[Record]) -> list[Outcome]:
        t0 = time.perf_counter()
        try:
            outcomes = self.stage.process(records)
        except TransientError as exc:
            outcomes = [Failure(exc) for _ in records]
        finally:
            M.PROCESS_SECONDS.labels(self.stage.name).observe(time.perf_counter() - t0)
        if len(outcomes) != len(records):
            raise RuntimeError(f"stage {self.stage.name} returned {len(outcomes)} outcomes for {len(records)} records")
        return outcomes

    @staticmethod
    def _offset(p: _Pending) -> Offset:
        return (p.msg.topic(), p.msg.partition(), p.msg.offset())

    def _process_guarded(self, work: list[_Pending]) -> None:
        """Process under the poison ledger (stream/poison.py): what is in flight is named on disk first, so a
        process that dies here is known at the next start. Records that were in flight at such a death go
        alone, one per call; one that has killed the process ``poison_max_crashes`` times is set aside."""
        ledger = self.poison
        clean = [p for p in work if not ledger.crashes(self._offset(p))]
        groups = [clean] if clean else []
        for p in work:
            crashes = ledger.crashes(self._offset(p))
            if not crashes:
                continue
            if crashes < ledger.max_crashes:
                groups.append([p])
                continue
            rec = p.record
            assert rec is not None
            self._dead_letter(p, rec.topic, rec.lane, rec.key, rec.value, "PoisonRecord",
                              f"processing this record stopped the {self.stage.name} process {crashes} times; "
                              "set aside without processing it again", "POISON_RECORD", "FAILED",
                              attempts=rec.attempt, reason="poison")
        for group in groups:
            offsets = [self._offset(p) for p in group]
            ledger.begin(offsets)
            self._process_with_backoff(group)
            ledger.end(offsets)

    def _process_with_backoff(self, work: list[_Pending]) -> None:
        todo = work
        delay = self.settings.backoff_initial_ms / 1000
        for attempt in range(1, self.settings.backoff_attempts + 1):
            outcomes = self._call_stage([p.record for p in todo if p.record is not None])
            transient: list[tuple[_Pending, TransientError]] = []
            for p, outcome in zip(todo, outcomes, strict=True):
                if isinstance(outcome, Failure) and isinstance(outcome.error, TransientError):
                    transient.append((p, outcome.error))
                else:
                    self._settle(p, outcome)
            if not transient:
                return
            todo = [p for p, _ in transient]
            if attempt == self.settings.backoff_attempts or self._stop.is_set():
                for p, err in transient:
                    self._retry_later(p, err)
                return
            M.RETRIES.labels(self.stage.name, "backoff").inc(len(todo))
            self._stop.wait(delay)
            delay = min(delay * 2, self.settings.backoff_max_ms / 1000)

    def _settle(self, p: _Pending, outcome: Outcome) -> None:
        rec = p.record
        assert rec is not None
        if isinstance(outcome, Failure):
            err = outcome.error
            if isinstance(err, InvalidRecord):
                self._dead_letter(p, rec.topic, rec.lane, rec.key, rec.value, "InvalidRecord", err.message, err.code,
                                  "REJECTED", attempts=rec.attempt, reason="invalid")
                return
            raise TypeError(f"unexpected failure type {type(err).__name__}") from err
        carried = {k: rec.headers[k] for k in H.PROPAGATED if k in rec.headers}
        trace = H.child_traceparent(H.text(dict(rec.headers), H.TRACEPARENT)).encode()
        p.outputs = [Output(o.topic, o.key, o.value, o.event, {**carried, **o.headers, H.TRACEPARENT: trace},
                            o.partition) for o in outcome]
        p.done = True
        M.RECORDS_OUT.labels(self.stage.name, rec.lane, "ok").inc()

    def _retry_later(self, p: _Pending, err: TransientError) -> None:
        """To the retry topic, due after a delay that doubles per attempt (capped); the DLQ once
        ``retry_budget_ms`` has passed since the record's first failure. The budget is time, not attempts:
        however often a record is tried while a dependency is down, it is failed only after that long."""
        rec = p.record
        assert rec is not None
        now = now_ms()
        first = (H.integer(dict(rec.headers), H.FIRST_FAILED_MS) if p.msg.topic().endswith(RETRY_SUFFIX)
                 else None) or now
        budget_end = first + self.settings.retry_budget_ms
        if now >= budget_end:
            self._dead_letter(p, rec.topic, rec.lane, rec.key, rec.value, "TransientError",
                              f"{err} (still failing {(now - first) / 1000:.0f} s after the first failure)",
                              "RETRIES_EXHAUSTED", "FAILED", attempts=rec.attempt, reason="retries_exhausted")
            return
        delay_ms = min(self.settings.retry_delay_ms * 2 ** min(rec.attempt - 1, 20), self.settings.retry_delay_max_ms)
        due = min(now + delay_ms, budget_end)  # the last try is at the budget's end, then the DLQ
        hdrs = dict(H.to_dict(p.msg.headers()))
        hdrs.update({H.ATTEMPT: str(rec.attempt + 1).encode(), H.NOT_BEFORE_MS: str(due).encode(),
                     H.FIRST_FAILED_MS: str(first).encode(),
                     H.ORIGIN_TOPIC: rec.topic.encode(), H.ERROR_CLASS: type(err).__name__.encode(),
                     H.ERROR_MESSAGE: str(err)[:500].encode()})
        p.outputs = [Output(retry_topic(rec.topic), rec.key or "", p.msg.value() or b"", None, hdrs)]
        p.done = True
        M.RETRIES.labels(self.stage.name, "topic").inc()
        M.RECORDS_OUT.labels(self.stage.name, rec.lane, "retried").inc()

    def _dead_letter(self, p: _Pending, origin: str, lane: str, key: str | None, value: dict[str, Any] | None,
                     error_class: str, message: str, code: str, status: str, *, attempts: int, reason: str) -> None:
        msg = p.msg
        original = H.to_dict(msg.headers())
        provenance = {H.DLQ_TOPIC: msg.topic().encode(), H.DLQ_PARTITION: str(msg.partition()).encode(),
                      H.DLQ_OFFSET: str(msg.offset()).encode(), H.ERROR_CLASS: error_class.encode(),
                      H.ERROR_MESSAGE: message[:500].encode(), H.ATTEMPT: str(attempts).encode()}
        letter = events.dead_letter(
            stage=self.stage.name, topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
            key=msg.key(), value=msg.value() or b"", headers=original, error_class=error_class,
            error_message=message[:2000], attempts=attempts,
            request_id=request_fields(value).get("request_id") or key, failed_at=now_ms())
        # The original headers (correlation id, traceparent) travel on, provenance on top.
        outputs = [Output(dlq_topic(origin), key or "", letter, "DeadLetter", {**original, **provenance})]
        if self.stage.emits_terminal_results:
            result = terminal_result(key=key, value=value, lane=lane, status=status, code=code, message=message)
            bound = p.headers if p.headers is not None else original
            carried = {k: bound[k] for k in H.PROPAGATED if k in bound}
            carried[H.TRACEPARENT] = H.child_traceparent(H.text(original, H.TRACEPARENT)).encode()
            outputs += result_outputs(self.settings.topic_prefix, result, carried)
        p.outputs = outputs
        p.done = True
        M.DLQ.labels(self.stage.name, reason).inc()
        M.RECORDS_OUT.labels(self.stage.name, lane, "rejected" if status == "REJECTED" else "failed").inc()

    # ---- delivery --------------------------------------------------------------------------------------
    def _prepare(self, p: _Pending) -> None:
        """Encode a handled record's outputs before any is produced, all or none. An output that does not fit
        its schema or its topic's size limit makes the record's outcome its DLQ letter and terminal result
        (FAILED INVALID_OUTPUT): one record can never stop the stage. A registry outage retries the record."""
        try:
            p.outputs = [self._encoded(o) for o in p.outputs]
            return
        except RegistryUnavailable as exc:
            if p.record is None:
                raise DeliveryError(f"cannot encode a dead letter: {exc}") from exc
            self._retry_later(p, TransientError(str(exc)))
        except SerdeError as exc:
            rec = p.record
            if rec is None or any(o.event == "DeadLetter" for o in p.outputs):
                raise  # a letter of our own making that does not encode is a bug
            log.warning("%s: %s (request %s): dead-lettered", self.stage.name, exc, rec.key)
            self._dead_letter(p, rec.topic, rec.lane, rec.key, rec.value, type(exc).__name__, str(exc),
                              "INVALID_OUTPUT", "FAILED", attempts=rec.attempt, reason="unencodable")
        p.outputs = [self._encoded(o) for o in p.outputs]

    def _encoded(self, out: Output) -> Output:
        value = out.value if isinstance(out.value, bytes) else self.serde.encode(out.topic, out.event or "", out.value)
        if len(value) > self.settings.max_message_bytes + OUTPUT_SLACK_BYTES and out.event != "DeadLetter":
            raise OutputTooLarge(f"{out.event or 'record'} for {out.topic} is {len(value)} bytes, over the "
                                 f"{self.settings.max_message_bytes}-byte limit")
        return dataclasses.replace(out, value=value)

    def _deliver_and_commit(self, handled: list[_Pending]) -> None:
        if not handled:
            return
        plain = [p for p in handled if self._lane_of_msg(p) not in self.eos_lanes]
        txn = [p for p in handled if self._lane_of_msg(p) in self.eos_lanes]
        if plain:  # first: these are the latency-sensitive ones
            self._deliver_plain(plain)
        if txn:
            self._deliver_transaction(txn)
        if time.monotonic() - self._last_commit >= self.settings.commit_interval_ms / 1000:
            self.commit()

    def _lane_of_msg(self, p: _Pending) -> str:
        return p.record.lane if p.record is not None else lane_of(origin_of(p.msg.topic()))

    @staticmethod
    def _merge_offsets(into: dict[tuple[str, int], int], handled: list[_Pending]) -> None:
        for p in handled:
            tp = (p.msg.topic(), p.msg.partition())
            into[tp] = max(into.get(tp, -1), p.msg.offset() + 1)

    @staticmethod
    def _partitions(offsets: Mapping[tuple[str, int], int]) -> list[TopicPartition]:
        return [TopicPartition(t, part, off) for (t, part), off in offsets.items()]

    def _deliver_plain(self, handled: list[_Pending]) -> None:
        """Outputs produced and flushed (durable downstream) before their inputs' offsets may be committed."""
        self._delivery_errors.clear()
        for p in handled:
            for out in p.outputs:
                self._produce(self.producer, out)
        remaining = self.producer.flush(self.settings.flush_timeout_s)
        if remaining or self._delivery_errors:
            raise DeliveryError(f"{remaining} undelivered, errors: {self._delivery_errors[:3]}")
        self._merge_offsets(self._plain_offsets, handled)

    def _deliver_transaction(self, handled: list[_Pending]) -> None:
        """Outputs into the open transaction; its input offsets go in with them when it commits (``commit``)."""
        if not self._txn_open:
            self._txn_producer_ready()
            assert self.txn_producer is not None
            self.txn_producer.begin_transaction()
            self._txn_open = True
        producer = self.txn_producer
        assert producer is not None
        for p in handled:
            for out in p.outputs:
                self._produce(producer, out)
        self._merge_offsets(self._txn_offsets, handled)

    def has_uncommitted(self) -> bool:
        return bool(self._plain_offsets) or self._txn_open

    def commit(self) -> None:
        """Checkpoint: commit the delivered batches' offsets, and the open transaction with its offsets.
        A failed transaction is aborted and the loop stops (the supervisor restarts it; the batches are read
        again from the last checkpoint, and their outputs, aborted, were never visible)."""
        self._last_commit = time.monotonic()
        timeout_s = self.settings.flush_timeout_s
        # Each call below waits on a coordinator; a bound the watchdog keeps ends the process if one overruns its
        # own timeout (a sync commit has none; send_offsets_to_transaction does not keep its own after a broker
        # restart): the next process reads the uncommitted records again, and a transaction left open is aborted
        # (at the broker's transaction timeout).
        bound_s = self._call_bound_s()
        if self._plain_offsets:
            offsets, self._plain_offsets = self._partitions(self._plain_offsets), {}
            with self.watchdog.bounded("the offset commit", bound_s):
                self.consumer.commit(offsets=offsets, asynchronous=False)
        if not self._txn_open:
            return
        producer = self.txn_producer
        assert producer is not None
        producer.poll(0)  # serves _on_client_error
        if self._brokers_lost:
            # Its offsets could only go through a call that would hang: the transaction is abandoned, and the
            # loop stops; the next process reads its inputs again (its outputs, aborted, were never visible).
            raise DeliveryError("every broker connection was lost while a transaction was open (a Kafka restart)")
        offsets, self._txn_offsets, self._txn_open = self._partitions(self._txn_offsets), {}, False
        try:
            with self.watchdog.bounded("send_offsets_to_transaction", bound_s):
                producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), timeout_s)
            with self.watchdog.bounded("commit_transaction", bound_s):
                producer.commit_transaction(timeout_s)
        except KafkaException as exc:
            with self.watchdog.bounded("abort_transaction", bound_s):
                producer.abort_transaction(timeout_s)
            raise DeliveryError(f"transaction failed: {exc}") from exc

    def _call_bound_s(self) -> float:
        """How long a coordinator call may take before the watchdog ends the process: its own timeout and a
        grace (a consumer's sync commit, which has no timeout, is deferred a session timeout at most)."""
        return self.settings.flush_timeout_s + CALL_GRACE_S

    def _txn_producer_ready(self) -> None:
        """Before a transaction begins: a transactional producer that lost every broker connection since its last
        one is replaced by a fresh one (same transactional id: it fences the old), whose coordinator caches are
        empty. With no transaction open nothing is at stake, so the stage goes on without a restart."""
        assert self.txn_producer is not None
        self.txn_producer.poll(0)  # serves _on_client_error
        if not self._brokers_lost:
            return
        log.info("%s: the transactional producer lost every broker connection: replacing it", self.stage.name)
        old, self.txn_producer = self.txn_producer, None
        try:
            with self.watchdog.bounded("the old transactional producer's flush", self._call_bound_s()):
                old.flush(self.settings.flush_timeout_s)
        except KafkaException as exc:  # nothing of ours is in it (no transaction open); its fate does not matter
            log.warning("%s: old transactional producer: %s", self.stage.name, exc)
        del old
        self._brokers_lost = False
        self.txn_producer = self._new_txn_producer()
        with self.watchdog.bounded("init_transactions", self._call_bound_s()):
            self.txn_producer.init_transactions(self.settings.flush_timeout_s)

    def _abandon_transaction(self) -> None:
        if not self._txn_open or self.txn_producer is None:
            return
        self._txn_open, self._txn_offsets = False, {}
        try:
            with self.watchdog.bounded("abort_transaction", self._call_bound_s()):
                self.txn_producer.abort_transaction(self.settings.flush_timeout_s)
        except KafkaException as exc:  # the broker drops it at the transaction timeout instead
            log.warning("%s: could not abort the open transaction: %s", self.stage.name, exc)

    def close(self) -> None:
        """Checkpoint what was delivered, then leave the group (at once: a rebalance need not wait for the
        session timeout)."""
        try:
            if self.has_uncommitted():
                self.commit()
        except (KafkaException, DeliveryError) as exc:  # not checkpointed: read again by the next owner
            log.warning("%s: last checkpoint failed at close: %s", self.stage.name, exc)
        finally:
            self.consumer.close()
            for producer in (self.producer, self.txn_producer):
                try:
                    if producer is not None:
                        producer.flush(self.settings.flush_timeout_s)
                except KafkaException as exc:  # a fenced producer (its transaction outlived the broker's
                    # timeout) raises here: what it held was aborted and is read again by the next owner; the
                    # error that stopped the loop, not this one, is what the process exits with
                    log.warning("%s: producer flush at close failed: %s", self.stage.name, exc)

    def _produce(self, producer: Producer, out: Output) -> None:
        value = out.value if isinstance(out.value, bytes) else self.serde.encode(out.topic, out.event or "", out.value)
        kwargs: dict[str, Any] = {}
        if out.partition is not None:
            kwargs["partition"] = out.partition
        while True:
            try:
                producer.produce(out.topic, value=value, key=out.key.encode() if out.key else None,
                                 headers=list(out.headers.items()), on_delivery=self._on_delivery, **kwargs)
                return
            except BufferError:
                producer.poll(0.1)  # local queue full: wait for deliveries (bounded by the queue size)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    # ---- lanes ---------------------------------------------------------------------------------------------
    def _schedule_lanes(self, *, saw_online: bool) -> None:
        """Pause batch partitions while the online lane has a backlog; resume when it is drained."""
        now = time.monotonic()
        if not saw_online and now - self._last_lane_check < self.settings.lane_check_interval_ms / 1000:
            return
        self._last_lane_check = now
        assignment = self.consumer.assignment()
        online_backlog = saw_online or self._online_lag(assignment) > 0
        batch = [tp for tp in assignment if lane_of(origin_of(tp.topic)) == "batch"
                 and (tp.topic, tp.partition) not in self._held]
        max_wait_s = self.settings.batch_max_wait_ms / 1000
        if online_backlog and self._paused_batch and max_wait_s > 0 and now - self._paused_since >= max_wait_s:
            # Paused long enough: the batch lane's turn, whatever the online backlog (no lane starves).
            self._resume_batch()
            self._batch_turn_until = now + self.settings.batch_turn_ms / 1000
            M.BATCH_TURNS.labels(self.stage.name).inc()
        elif online_backlog and now >= self._batch_turn_until:
            new = [tp for tp in batch if (tp.topic, tp.partition) not in self._paused_batch]
            if new:
                if not self._paused_batch:
                    self._paused_since = now
                self.consumer.pause(new)
                self._paused_batch.update((tp.topic, tp.partition) for tp in new)
        elif not online_backlog and self._paused_batch:
            self._resume_batch()
        M.PAUSED_BATCH.labels(self.stage.name).set(1 if self._paused_batch else 0)

    def _resume_batch(self) -> None:
        self.consumer.resume([TopicPartition(t, p) for t, p in self._paused_batch])
        self._paused_batch.clear()

    def _export_lag(self, every_s: float = 5.0) -> None:
        """Consumer lag of every assigned partition, from the client's cached watermarks (no broker call)."""
        now = time.monotonic()
        if now - self._last_lag_export < every_s:
            return
        self._last_lag_export = now
        assignment = self.consumer.assignment()
        for tp, pos in zip(assignment, self.consumer.position(assignment), strict=True):
            _lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
            if hi >= 0 and pos.offset >= 0:
                M.CONSUMER_LAG.labels(self.stage.name, tp.topic, str(tp.partition)).set(max(0, hi - pos.offset))

    def _online_lag(self, assignment: list[TopicPartition]) -> int:
        online = [tp for tp in assignment if lane_of(tp.topic) == "online" and not tp.topic.endswith(RETRY_SUFFIX)]
        if not online:
            return 0
        lag = 0
        for tp, pos in zip(online, self.consumer.position(online), strict=True):
            try:
                lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                if hi < 0:
                    lo, hi = self.consumer.get_watermark_offsets(tp, timeout=1.0)
                offset = pos.offset
                if offset == OFFSET_INVALID:  # nothing consumed from it yet: its committed offset, asked once
                    key = (tp.topic, tp.partition)
                    if key not in self._committed_cache:
                        self._committed_cache[key] = self.consumer.committed([tp], timeout=1.0)[0].offset
                    committed = self._committed_cache[key]
                    offset = committed if committed >= 0 else lo
            except KafkaException as exc:  # the broker away (a restart): this partition's lag is not known now.
                # The lag only orders the lanes; every stage crashed on it when Kafka restarted under load.
                log.debug("%s: lag of %s[%s] not known: %s", self.stage.name, tp.topic, tp.partition, exc)
                continue
            part_lag = max(0, hi - offset)
            M.CONSUMER_LAG.labels(self.stage.name, tp.topic, str(tp.partition)).set(part_lag)
            lag += part_lag
        return lag


def run_stage(stage: Stage, settings: StreamSettings, *, exactly_once: bool = False,
              ready: Callable[[], None] | None = None, max_batch: int | None = None,
              queue_delay_ms: Mapping[str, int] | None = None,
              exactly_once_lanes: frozenset[str] | None = None) -> None:
    """Entry point of a stage process: metrics endpoint, signal handling, then the loop."""
    port = M.serve(settings.metrics_port)
    log.info("%s: metrics on 127.0.0.1:%s", stage.name, port)
    runner = StageRunner(stage, settings, exactly_once=exactly_once, instance_id=settings.instance_id or None,
                         max_batch=max_batch, queue_delay_ms=queue_delay_ms, exactly_once_lanes=exactly_once_lanes)
    runner.install_signal_handlers()
    if ready is not None:
        ready()
    runner.run()
