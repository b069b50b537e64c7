"""Serving follows the registry: the `models` topic folded into a routing table, in a background thread.

Every process that routes or serves (scan, inference, shadow, the monitor, the gateway) runs one
``ModelWatcher``. It reads the compacted `models` topic from the beginning with no consumer group
commits (every process needs the whole state, not a share of it), keeps the latest ``Routing`` per
model, and the latest READY/LOAD_FAILED report per (model, version, instance) (the
``RoutingTable`` of ``model_store.serving.routing``). ``start`` returns once
the topic has been read to its end (with a deadline), so a process never routes on a partial state.
Listeners are called on the watcher thread after each change.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from model_store.serving.routing import Report, Routing, RoutingTable
from stream.kafka import kafka_consumer
from stream.serde import AvroSerde, SerdeError

log = logging.getLogger(__name__)


Listener = Callable[[Routing], None]


class ModelWatcher:
    """Consumes `models` into a RoutingTable on a daemon thread."""

    def __init__(self, kafka: Mapping[str, Any], registry_url: str, prefix: str = "", table: RoutingTable | None = None,
                 *, poll_timeout_s: float = 0.5, registry_ca: Path | None = None):
        self.topic = f"{prefix}models"
        self.table = table or RoutingTable()
        self._kafka = dict(kafka)  # a connection (stream/kafka.py)
        self._registry_url = registry_url
        self._registry_ca = registry_ca  # the registry's HTTPS certificate is verified against it
        self._poll = poll_timeout_s
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: threading.Thread | None = None

    def add_listener(self, listener: Listener, *, current: bool = False) -> None:
        """``listener`` gets every routing change from now on (on the watcher thread); with ``current``, also each
        model's routing as it stands, here and now (a change in between may reach it twice)."""
        self._listeners.append(listener)
        if current:
            for model in self.table.models():
                routing = self.table.routing(model)
                if routing is not None:
                    listener(routing)

    def start(self, catch_up_s: float = 30.0) -> ModelWatcher:
        """Start the thread and wait (at most ``catch_up_s``) until the topic has been read to its end."""
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()
        if not self._caught_up.wait(catch_up_s):
            log.warning("models topic %s not read to its end within %.0fs; routing may lag", self.topic, catch_up_s)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:


        serde = AvroSerde.from_url(self._registry_url, self._registry_ca)
        consumer = kafka_consumer(self._kafka, f"models-watch-{uuid.uuid4().hex}", offset_reset="earliest")
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            end = self._end_offset(consumer)
            if end <= 0:
                self._caught_up.set()
            while not self._stop.is_set():
                msg = consumer.poll(self._poll)
                if msg is None:
                    if not self._caught_up.is_set():
                        end = self._end_offset(consumer)
                        if end <= 0 or self._position(consumer) >= end:
                            self._caught_up.set()
                    continue
                if msg.error():
                    log.warning("models topic: %s", msg.error())
                    continue
                try:
                    event = serde.decode(msg.value(), "ModelEvent")
                except SerdeError as exc:
                    log.error("models topic offset %s: undecodable event skipped: %s", msg.offset(), exc)
                    continue
                changed = self.table.apply(event)
                if changed is not None and self._caught_up.is_set():
                    self._notify(changed)
                if not self._caught_up.is_set() and msg.offset() + 1 >= end:
                    self._caught_up.set()
                    for model in self.table.models():
                        self._notify(model)
        except KafkaException as exc:
            log.error("model watcher stopped: %s", exc)
        finally:
            consumer.close()

    def _notify(self, model: str) -> None:
        routing = self.table.routing(model)
        if routing is None:
            return
        for listener in self._listeners:
            try:
                listener(routing)
            except Exception:  # a listener's bug must not stop routing updates for everyone else
                log.exception("model listener failed for %s", model)

    def _end_offset(self, consumer: Any) -> int:

        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=5.0)
        except KafkaException:
            return -1
        return int(high)

    @staticmethod
    def _position(consumer: Any) -> int:
        positions = consumer.position(consumer.assignment())
        return max((p.offset for p in positions), default=-1)


def wait_for_report(table: RoutingTable, model: str, version: int, *, since_ms: int, timeout_s: float,
                    poll_s: float = 0.2) -> Report | None:
    """The first READY/LOAD_FAILED report on (model, version) newer than ``since_ms``, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fresh = [r for r in table.reports(model, version) if r.at_ms >= since_ms]
        if fresh:
            return max(fresh, key=lambda r: (r.action == "LOAD_FAILED", r.at_ms))
        time.sleep(poll_s)
    return None
