"""Rate limit, daily quota and backpressure of a gateway with tight limits (no pipeline behind it, so a
sync call waits out its deadline and the in-flight and lag bounds can be reached on purpose)."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from gateway_kit import Gateway, start_stack_with_gateway
from stream_kit import kafka_admin

from config import StackSettings
from stream.topics import lane_topic

LIMITS = {"DETECTFLOW_RATE_PER_S": "1", "DETECTFLOW_RATE_BURST": "5", "DETECTFLOW_DAILY_QUOTA": "3",
          "DETECTFLOW_MAX_INFLIGHT": "1", "DETECTFLOW_MAX_ONLINE_LAG": "5", "DETECTFLOW_MAX_ONLINE_LAG_HARD": "10",
          "DETECTFLOW_LAG_CHECK_INTERVAL_S": "0.2"}


@pytest.fixture(scope="module")
def limited(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    prefix = f"gl{uuid.uuid4().hex[:6]}."
    yield from start_stack_with_gateway(stack, prefix, tmp_path_factory.mktemp("limited-logs"), LIMITS,
                                        roles=("gateway",))


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_rate_limit_answers_429_with_retry_after_and_ratelimit_headers(limited: Gateway) -> None:
    t = tenant()
    responses = [limited.call("GET", "/v1/requests/nothing", t) for _ in range(7)]
    statuses = [r.status_code for r in responses]
    assert statuses[:5] == [404] * 5 and 429 in statuses[5:], statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["code"] == "RATE_LIMITED" and int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Limit"] == "5" and refused.headers["RateLimit-Remaining"] == "0"
    assert responses[0].headers["RateLimit-Remaining"] == "4"
    assert limited.call("GET", "/v1/requests/nothing", tenant()).status_code == 404  # other tenants unaffected


def test_daily_quota_answers_429_once_used_up(limited: Gateway, sample_jpeg: bytes) -> None:
    t = tenant()
    statuses = [limited.detect(t, sample_jpeg, params={"timeout_ms": 1}).status_code for _ in range(3)]
    assert statuses == [202, 202, 202]
    over = limited.detect(t, sample_jpeg, params={"timeout_ms": 1})
    assert over.status_code == 429 and over.json()["code"] == "QUOTA_EXCEEDED"
    assert 0 < int(over.headers["Retry-After"]) <= 86400


def test_sync_calls_past_the_in_flight_bound_get_a_fast_503(limited: Gateway, sample_jpeg: bytes) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(limited.detect, tenant(), sample_jpeg, params={"timeout_ms": 4000})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the first call is in flight
            if "detectflow_sync_inflight 1.0" in limited.call("GET", "/metrics").text:
                break
            time.sleep(0.05)
        t0 = time.monotonic()
        fast = limited.detect(tenant(), sample_jpeg, params={"timeout_ms": 4000})
        elapsed = time.monotonic() - t0
        assert slow.result().status_code == 202
    assert fast.status_code == 503 and fast.json()["code"] == "OVERLOADED" and fast.headers["Retry-After"] == "1"
    assert elapsed < 2.0


def test_sync_calls_get_a_fast_503_while_the_online_lane_has_a_backlog(limited: Gateway, stack: StackSettings,
                                                                     sample_jpeg: bytes) -> None:
    """Past the hard bound (MAX_ONLINE_LAG_HARD) every tenant is refused; below it only a heavy tenant is
    (test_gateway_overload.py)."""
    assert limited.pipeline is not None
    prefix = limited.pipeline.prefix
    topic = lane_topic(prefix, "online", "submitted")
    producer = Producer({**kafka_admin(stack)})
    for i in range(12):
        producer.produce(topic, key=str(i), value=b"backlog", partition=0)
    assert producer.flush(10) == 0
    # The scan stage's group has read nothing of it: its committed offset stays at 0.
    consumer = Consumer({**kafka_admin(stack), "group.id": f"{prefix}detectflow.scan",
                         "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
    consumer.close()
    deadline = time.monotonic() + 30
    r = None
    while time.monotonic() < deadline:
        r = limited.detect(tenant(), sample_jpeg, params={"timeout_ms": 1})
        if r.status_code == 503:
            break
        time.sleep(0.1)
    assert r is not None and r.status_code == 503, r.text if r is not None else None
    assert r.json()["code"] == "OVERLOADED" and "backlog" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) >= 1
