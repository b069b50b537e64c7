"""Roles that have nothing to do cost nothing: on the real stack, the shadow role fetches no tensor and the
monitor nothing at all while no model has a shadow or a canary version; when one is set (on the `models` topic,
read by a ModelWatcher as in production) they start at the topics' end, and when it is cleared they stop again.
A canary alone has the monitor read `detections` (guardrails), not `detections.shadow`.

The two roles run in-process on the real runtime, under their own Kafka principals, with their real
``on_demand_topics``; only ``process`` is a probe (JSON in, one record out per record), so no model runs.
What "fetches nothing" means is read from the broker: the role's consumer group has no member and no
committed offset on the topics it has no work on.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from stream_kit import kafka_admin, new_prefix, read_all, stream_settings

from config import PipelineSettings, StackSettings
from infra.stack.kafka_access import provision
from model_store.registry import ModelEventLog
from model_store.routing import Routing
from model_store.watch import ModelWatcher
from processors.monitor import MonitorStage
from processors.shadow import ShadowStage, shadow_topic
from stream.records import Outcome, Output, Record
from stream.runtime import StageRunner
from stream.topics import detections_topic, lane_topic

pytestmark = pytest.mark.integration

MODEL = "idle-probe"


class ProbeShadow(ShadowStage):
    """The shadow role's inputs and demand; a probe instead of a model: one JSON result per record."""

    input_event = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def process(self, batch: list[Record]) -> list[Outcome]:
        self.seen += [r.key or "" for r in batch]
        return [[Output(shadow_topic(self.prefix), r.key or "", json.dumps({"request_id": r.key}).encode(), None)]
                for r in batch]


class ProbeMonitor(MonitorStage):
    """The monitor role's inputs and demand; records what it was given."""

    input_event = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, str]] = []

    def process(self, batch: list[Record]) -> list[Outcome]:
        self.seen += [(r.topic, r.key or "") for r in batch]
        return [[] for _ in batch]


@dataclass
class Roles:
    prefix: str
    admin: AdminClient
    events: ModelEventLog
    watcher: ModelWatcher
    shadow: ProbeShadow
    monitor: ProbeMonitor
    runners: dict[str, StageRunner]
    stack: StackSettings

    def route(self, shadow: int | None, canary: int | None = None) -> None:
        routing = Routing(MODEL, production=1, shadow=shadow, canary=canary, canary_percent=10 if canary else 0,
                          versions=(1, 2))
        self.events.publish_state(routing, "CANARY" if canary else "SHADOW", canary or shadow or 1, actor="tests")

    def produce(self, topics: list[str], keys: list[str]) -> None:
        p = Producer({**kafka_admin(self.stack), "enable.idempotence": True, "linger.ms": 5})
        for topic in topics:
            for key in keys:
                p.produce(topic, key=key.encode(), value=json.dumps({"request_id": key}).encode())
        assert p.flush(30) == 0

    def group(self, role: str) -> tuple[set[str], set[str]]:
        """(topics assigned to the role's group's members, topics it has committed offsets on), from the broker."""
        from confluent_kafka import ConsumerGroupTopicPartitions

        group_id = self.runners[role].group_id
        described = self.admin.describe_consumer_groups([group_id], request_timeout=10)[group_id].result(timeout=15)
        assigned = {tp.topic for m in described.members for tp in (m.assignment.topic_partitions if m.assignment
                                                                   else [])}
        offsets = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)],
                                                         request_timeout=10)[group_id].result(timeout=15)
        committed = {tp.topic for tp in offsets.topic_partitions or [] if tp.offset >= 0}
        return assigned, committed


def _until(check: Callable[[], bool], what: str, timeout_s: float = 60.0, show: Callable[[], Any] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} {show()}")
        time.sleep(0.1)


@pytest.fixture
def roles(stack: StackSettings) -> Iterator[Roles]:
    prefix = new_prefix()
    admin_kafka = kafka_admin(stack)
    provision(admin_kafka, prefix)
    for topic in (shadow_topic(prefix),):
        read_all(stack, topic, until=0, timeout_s=0)  # the reader starts before anything is produced
    events = ModelEventLog(admin_kafka, stack.registry_url, prefix, registry_ca=stack.tls_ca_file)
    events.publish_state(Routing(MODEL, production=1, versions=(1, 2)), "PUSHED", 1, actor="tests")
    watcher = ModelWatcher(admin_kafka, stack.registry_url, prefix, registry_ca=stack.tls_ca_file).start(30)
    assert watcher.table.routing(MODEL) is not None
    pipeline = PipelineSettings.from_env()
    settings = pipeline.replace(stream=stream_settings(stack, prefix))
    catalog = type("Catalog", (), {"table": watcher.table})()
    shadow = ProbeShadow(catalog, settings, inference=object())  # type: ignore[arg-type]
    monitor = ProbeMonitor(watcher.table, None, settings)
    runners = {role: StageRunner(stage, stream_settings(stack, prefix, kafka_user=role))
               for role, stage in (("shadow", shadow), ("monitor", monitor))}
    threads = [threading.Thread(target=r.run, name=f"it-{role}", daemon=True) for role, r in runners.items()]
    for t in threads:
        t.start()
    try:
        yield Roles(prefix, AdminClient(admin_kafka), events, watcher, shadow, monitor, runners, stack)
    finally:
        for r in runners.values():
            r.stop()
        for t in threads:
            t.join(30)
        watcher.stop()


def test_shadow_and_monitor_fetch_nothing_without_a_shadow_and_start_at_the_end_when_one_is_set(
        roles: Roles) -> None:
    prefix = roles.prefix
    tensors = [lane_topic(prefix, lane, "preprocessed") for lane in ("online", "batch")]
    results, shadow_results = detections_topic(prefix), shadow_topic(prefix)
    tensor_topics = {*tensors, *(f"{t}.retry" for t in tensors)}
    results_topics = {results, f"{results}.retry"}
    # A backlog from before: tensors, production results and stale shadow results.
    roles.produce(tensors, ["before-1", "before-2"])
    roles.produce([results], ["result-1"])
    roles.produce([shadow_results], ["stale-1"])

    # Idle: neither role is in a group at all (the TENANT_MISMATCH audit on `detections` is the recorder's).
    time.sleep(2.0)  # several turns of both loops
    for role in ("shadow", "monitor"):
        assert roles.runners[role]._subscription == [], role
        assert roles.group(role) == (set(), set()), role
    assert roles.shadow.seen == [] and roles.monitor.seen == []

    # A shadow version is set: both start, from the end (the backlog stays unread).
    roles.route(shadow=2)
    _until(lambda: bool(roles.runners["shadow"]._wanted_since) and bool(roles.runners["monitor"]._wanted_since),
           "the roles to see the shadow")
    _until(lambda: roles.group("shadow")[0] == tensor_topics, "the shadow role to be assigned the tensor topics")
    _until(lambda: roles.group("monitor")[0] == {*results_topics, shadow_results, f"{shadow_results}.retry"},
           "the monitor to be assigned both result topics", show=lambda: roles.group("monitor"))
    first = [f"during-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    roles.produce(tensors, first)
    roles.produce([results], first)
    _until(lambda: sorted(roles.shadow.seen) == sorted(first * 2), f"the shadow to process {first}",
           show=lambda: roles.shadow.seen)
    done = {m.key().decode() for m in read_all(roles.stack, shadow_results, until=1 + len(first) * 2)}
    assert set(first) <= done
    _until(lambda: {k for t, k in roles.monitor.seen if t == shadow_results} == set(first),
           "the monitor to read the new shadow results")
    _until(lambda: {k for t, k in roles.monitor.seen if t == results} == set(first),
           "the monitor to read the new production results", show=lambda: roles.monitor.seen)
    assert not {"stale-1", "result-1"} & {k for _, k in roles.monitor.seen}

    # Cleared: the shadow role leaves its group and so does the monitor.
    roles.route(shadow=None)
    _until(lambda: roles.group("shadow")[0] == set(), "the shadow role to leave its group")
    _until(lambda: roles.group("monitor")[0] == set(), "the monitor to leave its group",
           show=lambda: roles.group("monitor"))
    assert roles.runners["shadow"]._subscription == [] and roles.runners["monitor"]._subscription == []
    # The backlog of this idle time is never read, though the group has committed offsets from before it (and
    # the batch lane is not paused behind the online lane's skipped backlog: both topics' records come through).
    roles.produce(tensors, ["idle-1", "idle-2"])
    roles.produce([results], ["idle-3"])
    assert roles.group("shadow")[1] & tensor_topics
    roles.route(shadow=2)
    _until(lambda: bool(roles.runners["shadow"]._wanted_since), "the shadow role to see the shadow again")
    _until(lambda: roles.group("shadow")[0] == tensor_topics, "the shadow role to be assigned again")
    again = [f"again-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    roles.produce(tensors, again)
    _until(lambda: sorted(roles.shadow.seen) == sorted((first + again) * 2), f"the shadow to process {again}",
           show=lambda: roles.shadow.seen)
    assert not {"before-1", "before-2", "idle-1", "idle-2"} & set(roles.shadow.seen)

    # A canary instead of the shadow: the monitor reads `detections` for the guardrails, not the shadow results;
    # the shadow role has nothing to do again.
    roles.route(shadow=None, canary=2)
    _until(lambda: roles.group("monitor")[0] == results_topics, "the monitor to read detections only",
           show=lambda: roles.group("monitor"))
    _until(lambda: roles.group("shadow")[0] == set(), "the shadow role to leave its group again")
    canary = [f"canary-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    roles.produce([results], canary)
    _until(lambda: set(canary) <= {k for t, k in roles.monitor.seen if t == results},
           "the monitor to read the canary's results", show=lambda: roles.monitor.seen)
    assert "idle-3" not in {k for _, k in roles.monitor.seen}
