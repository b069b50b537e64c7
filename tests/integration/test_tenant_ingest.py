"""Tenant-bound ingestion on the real stack: a tenant's principal writes only its own ingest topic, and scan
takes the tenant from the topic (stream/ingest.py, infra/tenants_cmd.py, docs/events.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pipeline_kit import Pipeline, start_pipeline
from stream_kit import read_all

from config import StackSettings, kafka_client
from infra.cli import main
from stream import headers as H
from stream.client import DetectClient
from stream.records import now_ms
from stream.serde import AvroSerde
from stream.topics import ingest_topic, lane_topic, tenant_replies_topic

# The stages a submission passes, and the recorder (it audits TENANT_MISMATCH).
ROLES = ("scan", "preprocess", "inference", "postprocess", "recorder")


@pytest.fixture(scope="module")
def pipeline(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    prefix = f"tn{uuid.uuid4().hex[:6]}."
    yield from start_pipeline(stack, prefix, tmp_path_factory.mktemp("tenant-logs"), roles=ROLES)


@pytest.fixture(scope="module")
def tenants(pipeline: Pipeline) -> Iterator[tuple[str, str]]:
    """Two tenants, created the operator's way while the pipeline runs (scan finds their topics by pattern)."""
    a, b = f"ta{uuid.uuid4().hex[:6]}", f"tb{uuid.uuid4().hex[:6]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTFLOW_TOPIC_PREFIX", pipeline.prefix)
        for name in (a, b):
            assert main(["tenants", "create", name]) == 0
        try:
            yield a, b
        finally:
            for name in (a, b):
                main(["tenants", "revoke", name, "--delete-topic"])


def _login(stack: StackSettings, tenant: str) -> dict[str, Any]:
    return kafka_client(_stream(stack), f"tenant-{tenant}")


def _stream(stack: StackSettings) -> Any:
    from stream_kit import stream_settings

    return stream_settings(stack, "")


def _refused(conf: dict[str, Any], topic: str) -> str | None:
    """The error one record on ``topic`` gets (None: written)."""
    from confluent_kafka import Producer

    errors: list[str] = []
    p = Producer({**conf, "message.timeout.ms": 8000, "socket.timeout.ms": 5000, "log_level": 0})
    p.produce(topic, b"x", on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
    left = p.flush(15)
    return errors[0] if errors else ("not delivered" if left else None)


def _auth_error(conf: dict[str, Any]) -> str | None:
    """The authentication error a fresh client gets (None: it connected)."""
    from confluent_kafka import KafkaError, KafkaException, Producer

    errors: list[KafkaError] = []
    p = Producer({**conf, "log_level": 0, "error_cb": errors.append})
    try:
        p.list_topics(timeout=10)
    except KafkaException as exc:
        errors.append(exc.args[0])
    p.poll(0.5)  # error_cb is served by poll
    auth = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
    return str(auth[0]) if auth else None


def _serde(pipeline: Pipeline) -> AvroSerde:
    return AvroSerde.from_url(pipeline.settings.stream.registry_url, pipeline.settings.stream.tls_ca_file)


def _find(stack: StackSettings, serde: AvroSerde, topic: str, event: str, key: str,
          timeout_s: float = 180.0) -> dict[str, Any]:
    """The first record on ``topic`` keyed ``key``, decoded; waits until the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        for msg in read_all(stack, topic, until=10**9, timeout_s=1.0):
            if msg.key() == key.encode():
                return serde.decode(msg.value(), event)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no record keyed {key} on {topic} within {timeout_s:.0f}s")


def _audit_row(stack: StackSettings, pipeline: Pipeline, event: dict[str, Any]) -> tuple[Any, ...] | None:
    """The audit_log row of ``event`` (as the operator), or None."""
    from infra.stack.cassandra_access import admin_session
    from stream.cassandra import audit_day
    from stream.serde import epoch_ms

    session = admin_session(stack)
    try:
        session.set_keyspace(pipeline.settings.stream.keyspace)
        rows = session.execute(
            "SELECT event_id, subject, action, outcome, status, request_id FROM audit_log "
            "WHERE tenant = %s AND day = %s",
            (event["tenant"], audit_day(epoch_ms(event["event_time"]) or 0)))
        mine = [tuple(r)[1:] for r in rows if r.event_id == event["event_id"]]
    finally:
        session.cluster.shutdown()
    return mine[0] if len(mine) == 1 else None


def test_create_prints_how_to_connect_but_not_the_secret(pipeline: Pipeline, tenants: tuple[str, str],
                                                          stack: StackSettings,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = tenants
    monkeypatch.setenv("DETECTFLOW_TOPIC_PREFIX", pipeline.prefix)
    capsys.readouterr()
    path = stack.kafka_users_dir / f"tenant-{a}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    password = _login(stack, a)["sasl.password"]
    assert main(["tenants", "create", a]) == 0  # idempotent: same credential
    out = capsys.readouterr().out
    assert f"sasl.username=tenant-{a}" in out and ingest_topic(pipeline.prefix, a) in out and password not in out
    assert _login(stack, a)["sasl.password"] == password
    assert main(["tenants", "create", a, "--show-secret"]) == 0
    assert password in capsys.readouterr().out
    assert main(["tenants", "create", "retry"]) == 2 and main(["tenants", "create", "a.b"]) == 2


def test_a_tenants_submission_is_served_as_that_tenant(pipeline: Pipeline, tenants: tuple[str, str],
                                                        sample_jpeg: bytes) -> None:
    a, _ = tenants
    with DetectClient(pipeline.settings.stream, default_model=pipeline.settings.default_model, tenant=a,
                      as_tenant=True) as client:
        assert client.router.topic == tenant_replies_topic(pipeline.prefix, a)
        result = client.detect(sample_jpeg, lane="online", timeout_s=240)
    assert (result["status"], result["tenant"], result["lane"]) == ("OK", a, "BATCH"), (
        result["error_code"], result["error_message"])
    assert result["detections"]


def test_a_record_claiming_another_tenant_is_rejected_and_audited(pipeline: Pipeline, tenants: tuple[str, str],
                                                                   stack: StackSettings) -> None:
    from confluent_kafka import Producer

    a, b = tenants
    serde = _serde(pipeline)
    topic = ingest_topic(pipeline.prefix, a)
    request_id = str(uuid.uuid4())
    event = {"request_id": request_id, "tenant": b, "image": {"data": b"\xff\xd8\xff", "sha256": None,
                                                              "content_type": None},
             "lane": "ONLINE", "model": {"name": "yolov4-tiny", "version": None}, "params": {},
             "deadline_ms": None, "idempotency_key": None, "job_id": "b-job", "submitted_at": now_ms()}
    # A foreign reply-to is dropped: the result must not reach the gateway's reply topic through it.
    headers = [(H.REPLY_TO, f"{pipeline.prefix}detect.replies:0".encode())]
    producer = Producer({**_login(stack, a), "enable.idempotence": True, "log_level": 0})
    producer.produce(topic, key=request_id.encode(), value=serde.encode(topic, "ImageSubmitted", event),
                     headers=headers)
    assert producer.flush(30) == 0

    result = _find(stack, serde, f"{pipeline.prefix}detections", "DetectionResult", request_id)
    assert (result["status"], result["error_code"], result["tenant"]) == ("REJECTED", "TENANT_MISMATCH", a)
    assert result["job_id"] is None and b in result["error_message"]
    audit = _find(stack, serde, f"{pipeline.prefix}audit", "AuditEvent", a, timeout_s=120)
    assert (audit["tenant"], audit["subject"], audit["action"], audit["outcome"], audit["request_id"]) == (
        a, f"tenant-{a}", "ingest", "denied", request_id)
    assert audit["detail"].startswith("TENANT_MISMATCH")
    # The same event in the audit log (`GET /v1/audit`), written by the recorder under its own role.
    assert _audit_row(stack, pipeline, audit) == (f"tenant-{a}", "ingest", "denied", 403, request_id)
    replies = read_all(stack, f"{pipeline.prefix}detect.replies", until=1, timeout_s=2)
    assert not [m for m in replies if m.key() == request_id.encode()]


def test_a_tenant_cannot_write_another_tenants_topic_or_the_pipelines(pipeline: Pipeline,
                                                                       tenants: tuple[str, str],
                                                                       stack: StackSettings) -> None:
    a, b = tenants
    conf = _login(stack, a)
    for foreign in (ingest_topic(pipeline.prefix, b), lane_topic(pipeline.prefix, "online", "submitted"),
                    lane_topic(pipeline.prefix, "batch", "submitted"), f"{ingest_topic(pipeline.prefix, a)}.retry",
                    f"{pipeline.prefix}detections"):
        assert "TOPIC_AUTHORIZATION_FAILED" in (_refused(conf, foreign) or ""), foreign


def test_after_revoke_the_tenant_cannot_authenticate(pipeline: Pipeline, stack: StackSettings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tr{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("DETECTFLOW_TOPIC_PREFIX", pipeline.prefix)
    assert main(["tenants", "create", name]) == 0
    conf = _login(stack, name)
    topic = ingest_topic(pipeline.prefix, name)
    assert _auth_error(conf) is None and _refused(conf, topic) is None  # it could connect and write
    assert main(["tenants", "revoke", name, "--delete-topic"]) == 0
    assert not (stack.kafka_users_dir / f"tenant-{name}.json").exists()
    deadline = time.monotonic() + 30
    while (error := _auth_error(conf)) is None:  # the broker applies the committed deletion a moment later
        assert time.monotonic() < deadline, "the revoked tenant still authenticates"
    assert "SASL" in error or "uthentication" in error, error
