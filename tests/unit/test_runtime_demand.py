"""On-demand inputs of the stream runtime (StageRunner._follow_demand, _skip_backlog) with a fake consumer,
and the shadow and monitor stages' demand, from the routing table."""

from __future__ import annotations

from typing import Any

from confluent_kafka import OFFSET_END, OFFSET_INVALID, TopicPartition

from config import PipelineSettings, StreamSettings
from model_store.serving.routing import Routing, RoutingTable
from processors.monitor import MonitorStage
from processors.shadow import ShadowStage
from stream.runtime import StageRunner
from stream.topics import lane_topic
from stream.watchdog import LoopWatchdog


class FakeConsumer:
    """Records subscriptions; answers committed offsets and offsets_for_times from tables."""

    def __init__(self, committed: dict[tuple[str, int], int] | None = None,
                 first_since: dict[tuple[str, int], int] | None = None, ends: dict[tuple[str, int], int] | None = None):
        self.calls: list[tuple[str, Any]] = []
        self._committed = committed or {}
        self._first_since = first_since or {}
        self._ends = ends or {}
        self.assigned: list[TopicPartition] = []

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.calls.append(("subscribe", list(topics)))

    def unsubscribe(self) -> None:
        self.calls.append(("unsubscribe", None))

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self._committed.get((tp.topic, tp.partition), OFFSET_INVALID))
                for tp in partitions]

    def offsets_for_times(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        self.calls.append(("offsets_for_times", [(tp.topic, tp.partition, tp.offset) for tp in partitions]))
        table = self._ends if partitions and partitions[0].offset == -1 else self._first_since  # -1: the latest
        return [TopicPartition(tp.topic, tp.partition, table.get((tp.topic, tp.partition), -1)) for tp in partitions]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.calls.append(("commit", [(tp.topic, tp.partition, tp.offset) for tp in offsets]))


class DemandStage:
    name = "demand"
    input_event = None
    emits_terminal_results = False

    def __init__(self) -> None:
        self.on = {"p.a": False, "p.b": False}

    def input_topics(self) -> list[str]:
        return ["p.always", "p.a", "p.b"]

    def on_demand_topics(self) -> dict[str, bool]:
        return dict(self.on)

    def process(self, batch: list[Any]) -> list[Any]:
        return [[] for _ in batch]


def _runner(stage: Any, consumer: FakeConsumer) -> StageRunner:
    """A StageRunner around a fake consumer (no Kafka client is made)."""
    runner = object.__new__(StageRunner)
    runner.stage = stage
    runner.consumer = consumer  # type: ignore[assignment]
    runner._subscription = None
    runner._wanted_since = {}
    runner._paused_batch = set()
    runner._held = {}
    runner.settings = StreamSettings()
    runner.watchdog = LoopWatchdog(stage.name, 0.0)  # not started
    return runner


def _subscriptions(consumer: FakeConsumer) -> list[tuple[str, Any]]:
    return [c for c in consumer.calls if c[0] in ("subscribe", "unsubscribe")]


def test_topics_are_subscribed_only_while_wanted_and_unchanged_demand_costs_no_call() -> None:
    stage, consumer = DemandStage(), FakeConsumer()
    runner = _runner(stage, consumer)
    runner._follow_demand()
    runner._follow_demand()
    assert _subscriptions(consumer) == [("subscribe", ["p.always", "p.always.retry"])]
    stage.on["p.a"] = True
    runner._follow_demand()
    assert _subscriptions(consumer)[-1] == ("subscribe", ["p.always", "p.a", "p.always.retry", "p.a.retry"])
    assert set(runner._wanted_since) == {"p.a"}
    stage.on["p.a"] = False
    runner._follow_demand()
    assert _subscriptions(consumer)[-1] == ("subscribe", ["p.always", "p.always.retry"])
    assert runner._wanted_since == {}


def test_a_stage_with_nothing_wanted_is_never_subscribed_then_unsubscribed_when_idle_again() -> None:
    stage, consumer = DemandStage(), FakeConsumer()
    stage.input_topics = lambda: ["p.a", "p.b"]  # type: ignore[method-assign]
    runner = _runner(stage, consumer)
    runner._follow_demand()
    assert _subscriptions(consumer) == []  # no group membership, no fetch
    stage.on["p.b"] = True
    runner._follow_demand()
    assert _subscriptions(consumer) == [("subscribe", ["p.b", "p.b.retry"])]
    stage.on["p.b"] = False
    runner._follow_demand()
    runner._follow_demand()
    assert _subscriptions(consumer)[1:] == [("unsubscribe", None)]


def test_a_stage_without_demand_subscribes_once_to_everything() -> None:
    consumer = FakeConsumer()
    plain = type("Plain", (), {"name": "plain", "input_topics": lambda self: ["p.x"],
                               "input_patterns": lambda self: ["^p\\.ingest\\..*$"]})()
    runner = _runner(plain, consumer)
    runner._follow_demand()
    runner._follow_demand()
    assert _subscriptions(consumer) == [("subscribe", ["p.x", "p.x.retry", "^p\\.ingest\\..*$"])]


def test_an_on_demand_partition_starts_at_its_first_record_since_it_was_wanted_never_the_idle_backlog() -> None:
    # p.a/0: committed in an earlier active period (offset 10), records since activation from 50: start at 50.
    # p.a/1: a rebalance while active (committed 70 > 60): the committed offset.
    # p.a/2: nothing since activation: the end as of the assignment (80), not one resolved later by the fetcher.
    # p.a.retry/0: never committed: the first record since.  p.a.retry/1: no answer at all: the end.
    # p.always/0 is not on demand: left to the committed offset.
    consumer = FakeConsumer(committed={("p.a", 0): 10, ("p.a", 1): 70},
                            first_since={("p.a", 0): 50, ("p.a", 1): 60, ("p.a.retry", 0): 3},
                            ends={("p.a", 0): 90, ("p.a", 1): 90, ("p.a", 2): 80, ("p.a.retry", 0): 9})
    runner = _runner(DemandStage(), consumer)
    runner._wanted_since = {"p.a": 1_000}
    parts = [TopicPartition("p.a", 0), TopicPartition("p.a", 1), TopicPartition("p.a", 2),
             TopicPartition("p.a.retry", 0), TopicPartition("p.a.retry", 1), TopicPartition("p.always", 0)]
    runner._on_assign(consumer, parts)  # type: ignore[arg-type]
    assert [(tp.topic, tp.partition, tp.offset) for tp in consumer.assigned] == [
        ("p.a", 0, 50), ("p.a", 1, 70), ("p.a", 2, 80), ("p.a.retry", 0, 3), ("p.a.retry", 1, OFFSET_END),
        ("p.always", 0, OFFSET_INVALID)]
    # The starts are committed (lag is read from committed offsets before a partition is read); the end is not.
    assert [c[1] for c in consumer.calls if c[0] == "commit"] == [
        [("p.a", 0, 50), ("p.a", 1, 70), ("p.a", 2, 80), ("p.a.retry", 0, 3)]]
    asked = [c[1] for c in consumer.calls if c[0] == "offsets_for_times"]
    assert [{ts for *_, ts in a} for a in asked] == [{-1}, {1_000}]  # the end first, then the time it was wanted


def test_an_assignment_without_on_demand_topics_is_left_alone() -> None:
    consumer = FakeConsumer()
    runner = _runner(DemandStage(), consumer)
    runner._on_assign(consumer, [TopicPartition("p.always", 0)])  # type: ignore[arg-type]
    assert consumer.assigned == [] and consumer.calls == []


# ---- the lifecycle stages' demand ---------------------------------------------------------------------------
def _settings() -> PipelineSettings:
    s = PipelineSettings.from_env({})
    return s.replace(stream=s.stream.replace(topic_prefix="u."))


def _table(*routings: Routing) -> RoutingTable:
    table = RoutingTable()
    for r in routings:
        table._routing[r.model] = r
    return table


def test_shadow_reads_the_tensors_only_while_a_model_has_a_shadow() -> None:
    table = _table(Routing("m", production=1, versions=(1, 2)))
    catalog = type("Catalog", (), {"table": table})()
    stage = ShadowStage(catalog, _settings(), pool=object())  # type: ignore[arg-type]
    tensors = ["u.detect.online.preprocessed", "u.detect.batch.preprocessed"]
    assert stage.on_demand_topics() == dict.fromkeys(tensors, False)
    table._routing["m"] = Routing("m", production=1, canary=2, canary_percent=10, versions=(1, 2))
    assert stage.on_demand_topics() == dict.fromkeys(tensors, False)  # a canary is inference's business
    table._routing["n"] = Routing("n", production=1, shadow=2, versions=(1, 2))
    assert stage.on_demand_topics() == dict.fromkeys(tensors, True)


def test_monitor_reads_detections_only_with_a_canary_or_a_shadow_and_shadow_results_only_with_a_shadow() -> None:
    table = _table(Routing("m", production=1, versions=(1, 2)))
    stage = MonitorStage(table, registry=None, settings=_settings())
    assert stage.input_topics() == ["u.detections", "u.detections.shadow"]
    idle = {"u.detections": False, "u.detections.shadow": False}
    assert stage.on_demand_topics() == idle  # nothing to watch: no group, no fetch
    table._routing["m"] = Routing("m", production=1, canary=2, canary_percent=10, versions=(1, 2))
    assert stage.on_demand_topics() == {"u.detections": True, "u.detections.shadow": False}  # guardrails
    table._routing["m"] = Routing("m", production=1, canary=2, canary_percent=10, guardrail=False, versions=(1, 2))
    assert stage.on_demand_topics() == {"u.detections": True, "u.detections.shadow": False}  # A/B figures
    table._routing["m"] = Routing("m", production=1, shadow=2, versions=(1, 2))
    assert stage.on_demand_topics() == {"u.detections": True, "u.detections.shadow": True}  # agreement
    table._routing["m"] = Routing("m", production=2, previous=(1,), versions=(1, 2))
    assert stage.on_demand_topics() == idle


def test_an_idle_monitor_is_never_subscribed() -> None:
    consumer = FakeConsumer()
    table = _table(Routing("m", production=1, versions=(1, 2)))
    runner = _runner(MonitorStage(table, registry=None, settings=_settings()), consumer)
    runner._follow_demand()
    assert _subscriptions(consumer) == []
    table._routing["m"] = Routing("m", production=1, canary=2, canary_percent=10, versions=(1, 2))
    runner._follow_demand()
    assert _subscriptions(consumer) == [("subscribe", ["u.detections", "u.detections.retry"])]
    assert set(runner._wanted_since) == {"u.detections"}


# ---- lanes: online first, the batch lane never starved (StageRunner._schedule_lanes) -----------------------

class LaneConsumer:
    def __init__(self, partitions: list[TopicPartition]):
        self.partitions = partitions
        self.paused: set[tuple[str, int]] = set()

    def assignment(self) -> list[TopicPartition]:
        return list(self.partitions)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update((tp.topic, tp.partition) for tp in partitions)


def _lane_runner(monkeypatch: Any, max_wait_ms: int,
                 turn_ms: int = 1000) -> tuple[StageRunner, LaneConsumer, list[float]]:
    online, batch = lane_topic("p.", "online", "submitted"), lane_topic("p.", "batch", "submitted")
    consumer = LaneConsumer([TopicPartition(online, 0), TopicPartition(batch, 0), TopicPartition(batch, 1)])
    runner = _runner(DemandStage(), FakeConsumer())
    runner.consumer = consumer  # type: ignore[assignment]
    runner.settings = StreamSettings().replace(batch_max_wait_ms=max_wait_ms, batch_turn_ms=turn_ms)
    runner._paused_since = runner._batch_turn_until = runner._last_lane_check = 0.0
    state = [1000.0, 1]  # [the monotonic clock, the online backlog]
    runner._online_lag = lambda assignment: state[1]  # type: ignore[method-assign]
    monkeypatch.setattr("stream.runtime.time.monotonic", lambda: state[0])
    return runner, consumer, state


def test_the_batch_lane_waits_behind_an_online_backlog_then_gets_a_turn(monkeypatch: Any) -> None:
    runner, consumer, state = _lane_runner(monkeypatch, max_wait_ms=5000, turn_ms=1000)
    runner._schedule_lanes(saw_online=True)
    assert len(consumer.paused) == 2  # online first: both batch partitions paused
    state[0] += 4.9
    runner._schedule_lanes(saw_online=True)
    assert len(consumer.paused) == 2
    state[0] += 0.2  # paused 5.1 s with the online backlog still there: the batch lane's turn
    runner._schedule_lanes(saw_online=True)
    assert consumer.paused == set()
    state[0] += 0.9
    runner._schedule_lanes(saw_online=True)
    assert consumer.paused == set()  # the turn lasts batch_turn_ms
    state[0] += 0.2
    runner._schedule_lanes(saw_online=True)
    assert len(consumer.paused) == 2  # turn over: paused again, and the wait counts afresh
    state[0] += 4.0
    runner._schedule_lanes(saw_online=True)
    assert len(consumer.paused) == 2


def test_strict_priority_when_max_wait_is_zero_and_resume_when_the_backlog_is_gone(monkeypatch: Any) -> None:
    runner, consumer, state = _lane_runner(monkeypatch, max_wait_ms=0)
    runner._schedule_lanes(saw_online=True)
    state[0] += 3600
    runner._schedule_lanes(saw_online=True)
    assert len(consumer.paused) == 2  # never a turn
    state[1] = 0  # the online backlog is drained
    state[0] += 1
    runner._schedule_lanes(saw_online=False)
    assert consumer.paused == set()
