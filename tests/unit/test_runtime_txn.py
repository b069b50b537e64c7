"""stream/runtime.py: a transactional producer that lost every broker connection (a Kafka restart) is never asked
to send offsets again (librdkafka would wait on its stale group coordinator for ~10 minutes): replaced while no
transaction is open, the loop stopped when one is."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from config import StreamSettings
from stream.runtime import DeliveryError, StageRunner
from stream.watchdog import LoopWatchdog


class FakeProducer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []
        self.pending_errors: list[KafkaError] = []
        self.error_cb: Any = None

    def poll(self, _timeout: float) -> int:
        self.calls.append("poll")
        while self.pending_errors:  # what librdkafka queued is served by poll, on the caller's thread
            self.error_cb(self.pending_errors.pop(0))
        return 0

    def flush(self, _timeout: float) -> int:
        self.calls.append("flush")
        return 0

    def init_transactions(self, _timeout: float) -> None:
        self.calls.append("init_transactions")

    def begin_transaction(self) -> None:
        self.calls.append("begin_transaction")

    def send_offsets_to_transaction(self, *_args: Any) -> None:
        self.calls.append("send_offsets_to_transaction")

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append("commit_transaction")

    def abort_transaction(self, _timeout: float) -> None:
        self.calls.append("abort_transaction")


class FakeConsumer:
    def consumer_group_metadata(self) -> object:
        return object()


def _runner() -> tuple[StageRunner, list[FakeProducer]]:
    made: list[FakeProducer] = []
    runner = object.__new__(StageRunner)

    class Stage:
        name = "inference"

    def new_producer() -> FakeProducer:
        producer = FakeProducer(f"producer-{len(made)}")
        producer.error_cb = runner._on_client_error
        made.append(producer)
        return producer

    runner.stage = Stage()  # type: ignore[assignment]
    runner.settings = StreamSettings()
    runner.watchdog = LoopWatchdog("inference", 0.0)  # not started
    runner.consumer = FakeConsumer()  # type: ignore[assignment]
    runner._new_txn_producer = new_producer  # type: ignore[method-assign]
    runner._brokers_lost = False
    runner._plain_offsets, runner._txn_offsets, runner._txn_open = {}, {}, False
    runner.txn_producer = new_producer()  # type: ignore[assignment]
    return runner, made


def _all_brokers_down() -> KafkaError:
    return KafkaError(KafkaError._ALL_BROKERS_DOWN)


def test_a_producer_that_lost_every_broker_is_replaced_before_the_next_transaction_begins() -> None:
    runner, made = _runner()
    made[0].pending_errors.append(_all_brokers_down())
    runner._deliver_transaction([])
    assert len(made) == 2 and runner.txn_producer is made[1]
    assert made[0].calls == ["poll", "flush"]  # nothing begun on the old one
    assert made[1].calls == ["init_transactions", "begin_transaction"]
    assert runner._txn_open and not runner._brokers_lost
    runner._txn_offsets = {("t", 0): 5}
    runner.commit()
    assert made[1].calls[-2:] == ["send_offsets_to_transaction", "commit_transaction"]


def test_other_producer_errors_keep_the_producer() -> None:
    runner, made = _runner()
    made[0].pending_errors.append(KafkaError(KafkaError._TRANSPORT))
    runner._deliver_transaction([])
    assert len(made) == 1 and made[0].calls == ["poll", "begin_transaction"]


def test_an_open_transaction_on_a_producer_that_lost_every_broker_stops_the_loop_without_sending_offsets() -> None:
    runner, made = _runner()
    runner._deliver_transaction([])
    runner._txn_offsets = {("t", 0): 5}
    made[0].pending_errors.append(_all_brokers_down())  # Kafka restarted while the transaction was open
    with pytest.raises(DeliveryError, match="every broker connection was lost"):
        runner.commit()
    assert "send_offsets_to_transaction" not in made[0].calls
    runner._abandon_transaction()  # what run() does with the error: the inputs are read again after the restart
    assert made[0].calls[-1] == "abort_transaction" and not runner._txn_open


def test_the_consumer_losing_every_broker_marks_the_transactional_producer_for_replacement() -> None:
    runner, made = _runner()
    runner._on_client_error(_all_brokers_down())  # served by the stage consumer's poll
    runner._deliver_transaction([])
    assert len(made) == 2 and made[1].calls == ["init_transactions", "begin_transaction"]
