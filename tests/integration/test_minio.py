"""MinIO: objects round-trip and every upload's notification arrives on Kafka."""

from __future__ import annotations

import io
import json
import secrets
import time
import urllib.parse

from confluent_kafka import Consumer
from minio import Minio
from object_kit import minio_as
from stream_kit import kafka_admin

from config import StackSettings
from infra.stack.minio import EVENTS_TOPIC


def _client(stack: StackSettings) -> Minio:
    creds = stack.minio_credentials()
    return minio_as(stack, creds)


def test_put_get_round_trip(stack: StackSettings) -> None:
    client = _client(stack)
    key = f"it-tenant/{secrets.token_hex(8)}.bin"
    body = secrets.token_bytes(300_000)
    client.put_object("derived", key, io.BytesIO(body), len(body), content_type="application/octet-stream")
    resp = client.get_object("derived", key)
    try:
        assert resp.read() == body
    finally:
        resp.close()
        resp.release_conn()
    client.remove_object("derived", key)


def test_upload_notification_arrives_on_kafka(stack: StackSettings) -> None:
    consumer = Consumer({
        **kafka_admin(stack),
        "group.id": "it-minio-" + secrets.token_hex(6),
        "auto.offset.reset": "latest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([EVENTS_TOPIC])
    # Wait for partition assignment so that "latest" is pinned before we upload.
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.2)
    assert consumer.assignment(), "no partitions assigned for minio.events"
    positions = consumer.position(consumer.assignment())
    assert all(p.offset >= 0 or p.offset == -1001 for p in positions)

    client = _client(stack)
    # A key with characters MinIO query-escapes in its events.
    key = f"it-tenant/{secrets.token_hex(6)} photo+1.jpg"
    client.put_object("uploads", key, io.BytesIO(b"\xff\xd8\xff\xe0 not really a jpeg"), 22,
                      content_type="image/jpeg", metadata={"x-amz-meta-job-id": "job-123"})
    try:
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            event = json.loads(msg.value())
            for record in event.get("Records", []):
                if urllib.parse.unquote_plus(record["s3"]["object"]["key"]) == key:
                    found = record
        assert found is not None, "notification for the uploaded object never arrived"
        assert found["eventName"].startswith("s3:ObjectCreated:")
        assert found["s3"]["bucket"]["name"] == "uploads"
        assert found["s3"]["object"]["size"] == 22
    finally:
        consumer.close()
        client.remove_object("uploads", key)
