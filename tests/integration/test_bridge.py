"""The MinIO bridge on the real stack: a real upload's notification becomes one ImageSubmitted."""

from __future__ import annotations

import io
import json
import secrets
import time
import urllib.parse

from confluent_kafka import Producer
from object_kit import minio_as
from stream_kit import kafka_admin, new_prefix, read_all, stream_settings

from config import StackSettings, StreamSettings
from stream import topics as T
from stream.bridge import EVENTS_TOPIC, SUBMITTED_MARK, BridgeStage, CassandraClaims
from stream.cassandra import connect
from stream.runtime import StageRunner
from stream.serde import AvroSerde


def _find_notification(stack: StackSettings, key: str, timeout_s: float = 30) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for m in read_all(stack, EVENTS_TOPIC, until=10**9, timeout_s=1.0):
            for rec in json.loads(m.value()).get("Records", []):
                if urllib.parse.unquote_plus(rec["s3"]["object"]["key"]) == key:
                    return m.value()
    raise AssertionError(f"no notification for {key}")


def test_notifications_become_exactly_one_submission_per_object(stack: StackSettings) -> None:
    prefix = new_prefix()
    wanted = {T.lane_topic(prefix, "batch", "submitted"), EVENTS_TOPIC, T.retry_topic(EVENTS_TOPIC),
              T.dlq_topic(EVENTS_TOPIC)}
    T.apply(kafka_admin(stack), [s for s in T.all_topics(prefix) + T.all_topics("") if s.name in wanted])

    creds = stack.minio_credentials()
    client = minio_as(stack, creds)
    key = f"it-tenant/{secrets.token_hex(6)} photo+1.jpg"
    marked = f"it-tenant/{secrets.token_hex(6)}-gateway.jpg"
    body = b"\xff\xd8\xff\xe0" + secrets.token_bytes(64)
    client.put_object("uploads", key, io.BytesIO(body), len(body), content_type="image/jpeg",
                      metadata={"x-amz-meta-job-id": "job-42"})
    client.put_object("uploads", marked, io.BytesIO(body), len(body), content_type="image/jpeg",
                      metadata={f"x-amz-meta-{SUBMITTED_MARK}": "true"})
    raw = _find_notification(stack, key)
    _find_notification(stack, marked)
    # MinIO delivers at least once: deliver the same notification a second time.
    p = Producer({**kafka_admin(stack)})
    p.produce(EVENTS_TOPIC, key=b"uploads/dup", value=raw)
    assert p.flush(10) == 0

    settings: StreamSettings = stream_settings(stack, prefix, max_batch=200)
    session = connect(settings, "bridge")
    stage = BridgeStage(CassandraClaims(session), default_model="yolov4-tiny", prefix=prefix)
    runner = StageRunner(stage, settings, exactly_once=True)
    runner.run(idle_stop_s=3.0)
    session.cluster.shutdown()

    serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
    out = [serde.decode(m.value(), "ImageSubmitted")
           for m in read_all(stack, T.lane_topic(prefix, "batch", "submitted"), until=10**9, timeout_s=3)]
    mine = [e for e in out if e["image"]["key"] == key]
    assert len(mine) == 1, f"expected exactly one submission for the object, got {len(mine)}"
    event = mine[0]
    assert event["tenant"] == "it-tenant"
    assert event["job_id"] == "job-42"
    assert event["image"]["bucket"] == "uploads" and event["image"]["size"] == len(body)
    assert event["lane"] == "BATCH"
    assert not [e for e in out if e["image"]["key"] == marked], "gateway-submitted objects are not bridged"
    client.remove_object("uploads", key)
    client.remove_object("uploads", marked)
