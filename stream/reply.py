"""Request/reply over Kafka: a gateway instance awaits DetectionResults on its own reply partition.

Like faust's reply handling: a dict of futures keyed by correlation id, resolved
by one reply consumer.  Correlation ids are unique per request, and a reply
whose waiter has gone (deadline passed, cancelled) is dropped and counted: it is
never handed to another waiter.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from config import StreamSettings, kafka_client
from stream import headers as H
from stream import metrics as M
from stream.errors import StreamError
from stream.serde import AvroSerde, DecodeError

log = logging.getLogger(__name__)


class ReplyTimeout(StreamError):
    """No reply before the deadline."""


@dataclass
class _Waiter:
    future: concurrent.futures.Future[dict[str, Any]]
    deadline: float  # time.time() seconds


class ReplyRouter:
    """Consumes one reply partition and resolves the waiting futures by correlation id."""

    def __init__(self, settings: StreamSettings, serde: AvroSerde, topic: str, partition: int,
                 *, remember_expired: int = 10000):
        self.topic = topic
        self.partition = partition
        self._serde = serde
        self._waiters: dict[str, _Waiter] = {}
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember_expired
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.late = 0
        self.foreign = 0
        self._consumer = Consumer({
            **kafka_client(settings),
            # Assigned, not subscribed: no group coordination, offsets never committed.
            # Named after its principal, so a tenant's ACL can cover its own (kafka_access.tenant_bindings).
            "group.id": f"detectflow.replies.{settings.kafka_user}.{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "isolation.level": "read_committed",
            "max.partition.fetch.bytes": settings.max_message_bytes + 1024 * 1024,
            "log_level": 3,
        })

    @property
    def reply_to(self) -> str:
        return f"{self.topic}:{self.partition}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start reading at the current end of the partition: only replies to our own requests matter."""
        tp = TopicPartition(self.topic, self.partition)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _lo, hi = self._consumer.get_watermark_offsets(tp, timeout=max(0.1, deadline - time.monotonic()))
                break
            except KafkaException as exc:
                # A just-created topic has no leader for a moment: retry until the deadline.
                if time.monotonic() >= deadline:
                    raise StreamError(f"reply partition {self.reply_to} is not readable: {exc}") from exc
                time.sleep(0.2)
        self._consumer.assign([TopicPartition(self.topic, self.partition, hi)])
        self._thread = threading.Thread(target=self._run, name=f"reply-router-{self.partition}", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            for w in self._waiters.values():
                w.future.cancel()
            self._waiters.clear()

    # ---- waiting -----------------------------------------------------------------------------
    def expect(self, correlation_id: str, deadline: float) -> concurrent.futures.Future[dict[str, Any]]:
        """Register a waiter before the request is produced (so the reply cannot outrun it)."""
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._lock:
            if correlation_id in self._waiters:
                raise StreamError(f"correlation id {correlation_id} is already awaited")
            self._waiters[correlation_id] = _Waiter(fut, deadline)
        return fut

    def forget(self, correlation_id: str) -> None:
        """The waiter gave up: later replies for this id are counted as late and dropped."""
        with self._lock:
            w = self._waiters.pop(correlation_id, None)
            self._remember_expired(correlation_id)
        if w is not None:
            w.future.cancel()

    def wait_sync(self, correlation_id: str, deadline: float,
                  future: concurrent.futures.Future[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Block until the reply or the deadline. Pass the future ``expect`` returned: the reply may
        already have resolved it (and left the waiter table) before this call."""
        fut = future if future is not None else self._future(correlation_id)
        try:
            return fut.result(timeout=max(0.0, deadline - time.time()))
        except concurrent.futures.TimeoutError as exc:
            self.forget(correlation_id)
            raise ReplyTimeout(correlation_id) from exc

    async def wait(self, correlation_id: str, deadline: float,
                   future: concurrent.futures.Future[dict[str, Any]] | None = None) -> dict[str, Any]:
        fut = future if future is not None else self._future(correlation_id)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=max(0.0, deadline - time.time()))
        except (TimeoutError, asyncio.CancelledError) as exc:
            self.forget(correlation_id)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ReplyTimeout(correlation_id) from exc

    def _future(self, correlation_id: str) -> concurrent.futures.Future[dict[str, Any]]:
        with self._lock:
            waiter = self._waiters.get(correlation_id)
        if waiter is None:
            raise StreamError(f"correlation id {correlation_id} is not awaited (pass the future expect() returned)")
        return waiter.future

    def pending(self) -> int:
        with self._lock:
            return len(self._waiters)

    # ---- the consumer thread ---------------------------------------------------------------------
    def _remember_expired(self, correlation_id: str) -> None:
        self._expired[correlation_id] = None
        while len(self._expired) > self._remember:
            self._expired.popitem(last=False)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self._consumer.poll(0.05)
                if msg is None or msg.error():
                    continue
                self._route(msg.headers(), msg.value())
        finally:
            self._consumer.close()

    def _route(self, raw_headers: Any, value: bytes | None) -> None:
        hdrs = H.to_dict(raw_headers)
        corr = H.text(hdrs, H.CORRELATION_ID)
        if corr is None:
            self.foreign += 1
            return
        now = time.time()
        with self._lock:
            waiter = self._waiters.get(corr)
            if waiter is not None and now > waiter.deadline:
                del self._waiters[corr]
                self._remember_expired(corr)
                waiter.future.cancel()
                waiter = None
            elif waiter is not None:
                del self._waiters[corr]
            is_late = waiter is None and corr in self._expired
        if waiter is None:
            if is_late:
                self.late += 1
                M.LATE_REPLIES.inc()
            else:
                self.foreign += 1
            return
        try:
            waiter.future.set_result(self._serde.decode(value, "DetectionResult"))
        except DecodeError as exc:
            waiter.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # the waiter was cancelled concurrently
