"""Tenant-bound ingestion, the pure parts: topic names <-> tenants, header binding, the tenant check in scan,
the tenant's ACLs (stream/ingest.py, stream/topics.py, processors/scan.py, infra/stack/kafka_access.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from config import PipelineSettings, StreamSettings
from infra.stack.kafka_access import bindings, retired_bindings, tenant_bindings
from processors.scan import ScanStage
from processors.scanner import ScanVerdict
from stream import headers as H
from stream import ingest
from stream import topics as T
from stream.records import Record, now_ms, result_outputs, terminal_result

P = "u."
SETTINGS = PipelineSettings(stream=StreamSettings(topic_prefix=P), models_dir=Path("/nonexistent"))


# ---- names ------------------------------------------------------------------------------------------------
def test_the_tenant_rule_is_the_gateways() -> None:
    from gateway.auth import TENANT_RE
    from stream.bridge import TENANT_RE as BRIDGE_RE

    assert T.TENANT_RE.pattern == TENANT_RE.pattern and BRIDGE_RE is T.TENANT_RE


@pytest.mark.parametrize("tenant", ["acme", "a", "A-b_9", "x" * 63])
def test_an_ingest_topic_names_its_tenant_and_back(tenant: str) -> None:
    topic = T.ingest_topic(P, tenant)
    assert topic == f"u.ingest.{tenant}"
    assert T.tenant_of_ingest(P, topic) == tenant
    assert T.tenant_of_ingest(P, T.retry_topic(topic)) == tenant  # scan's retry topic of it: the same tenant
    assert T.tenant_of_ingest(P, T.dlq_topic(topic)) is None
    assert re.match(T.ingest_pattern(P), topic) and re.match(T.ingest_pattern(P), T.retry_topic(topic))
    assert not re.match(T.ingest_pattern(P), T.dlq_topic(topic))  # a dead letter is never read back as input


@pytest.mark.parametrize("topic", ["u.detect.online.submitted", "u.ingest.", "u.ingest.a.b", "v.ingest.acme",
                                   "ingest.acme", "u.ingest.-x", "u.ingest.retry", "u.ingest.dlq",
                                   "u.ingest." + "x" * 64, "u.replies.acme"])
def test_other_topics_have_no_tenant(topic: str) -> None:
    assert T.tenant_of_ingest(P, topic) is None


@pytest.mark.parametrize("name", ["", "-a", "a.b", "a/b", "a b", "é", "x" * 64, "retry", "dlq"])
def test_invalid_or_reserved_names_get_no_topic(name: str) -> None:
    with pytest.raises(ValueError):
        T.ingest_topic(P, name)
    with pytest.raises(ValueError):
        T.tenant_replies_topic(P, name)


def test_the_pattern_is_anchored_to_the_prefix() -> None:
    pattern = T.ingest_pattern("it1.")
    assert pattern.startswith("^") and pattern.endswith("$")
    assert not re.match(pattern, "itX1.ingest.acme") and not re.match(pattern, "it1Xingest.acme")


def test_a_tenants_topics() -> None:
    names = [s.name for s in T.tenant_topics(P, "acme")]
    assert names == ["u.ingest.acme", "u.ingest.acme.retry", "u.ingest.acme.dlq", "u.replies.acme"]
    ingest_spec = T.tenant_topics(P, "acme", raw_retention_hours=2)[0]
    assert ingest_spec.config["retention.ms"] == str(2 * 3600 * 1000)  # image bytes: raw retention


# ---- headers ----------------------------------------------------------------------------------------------
def test_bind_headers_keeps_only_the_tenants_own_reply_topic() -> None:
    own = {H.REPLY_TO: b"u.replies.acme:0", H.CORRELATION_ID: b"c"}
    assert ingest.bind_headers(P, "acme", own, from_retry=False) == own
    for foreign in (b"u.detect.replies:3", b"u.replies.other:0", b"u.detect.online.scanned:0", b"u.replies.acme",
                    b"u.replies.acme:x", b"u.audit:0"):
        bound = ingest.bind_headers(P, "acme", {H.REPLY_TO: foreign, H.CORRELATION_ID: b"c"}, from_retry=False)
        assert bound == {H.CORRELATION_ID: b"c"}, foreign


def test_bind_headers_drops_a_tenants_runtime_headers_but_not_a_retry_topics() -> None:
    spoofed = {H.ORIGIN_TOPIC: b"u.detect.online.submitted", H.ATTEMPT: b"99", H.NOT_BEFORE_MS: b"1",
               H.TRACEPARENT: b"t"}
    assert ingest.bind_headers(P, "acme", spoofed, from_retry=False) == {H.TRACEPARENT: b"t"}
    assert ingest.bind_headers(P, "acme", spoofed, from_retry=True) == spoofed


def test_result_outputs_writes_replies_to_reply_topics_only() -> None:
    result = terminal_result(key="r", value=None, lane="batch", status="FAILED", code="C", message="m")
    assert [o.topic for o in result_outputs(P, result, {H.REPLY_TO: b"u.replies.acme:0"})] == [
        "u.detections", "u.replies.acme"]
    assert [o.topic for o in result_outputs(P, result, {H.REPLY_TO: b"u.abuse:0"})] == ["u.detections"]


# ---- the check in scan ------------------------------------------------------------------------------------
class _Scanner:
    name = "fake"

    def scan(self, data: bytes) -> ScanVerdict:
        return ScanVerdict(True)


class _NoCatalog:
    """A mismatch is decided before anything is fetched, resolved or scanned."""

    def resolve(self, *args: Any) -> Any:
        raise AssertionError("resolved a model for a refused record")


def _record(topic: str, tenant: str, *, lane: str = "batch", headers: dict[str, bytes] | None = None) -> Record:
    value = {"request_id": "r1", "tenant": tenant, "image": {"data": b"img"}, "lane": "ONLINE",
             "model": {"name": "yolov4-tiny", "version": None}, "params": {}, "deadline_ms": None,
             "job_id": "their-job", "submitted_at": now_ms()}
    return Record(topic=topic, partition=0, offset=0, key="r1", value=value, headers=headers or {}, lane=lane)


def test_check_reads_the_tenant_from_the_topic() -> None:
    assert not ingest.check(P, _record("u.detect.online.submitted", "anyone")).mismatch  # trusted path
    assert ingest.check(P, _record("u.detect.online.submitted", "anyone")).tenant is None
    assert not ingest.check(P, _record("u.ingest.acme", "acme")).mismatch
    for claimed in ("other", "", "ACME", "acme "):
        verdict = ingest.check(P, _record("u.ingest.acme", claimed))
        assert verdict.mismatch and verdict.tenant == "acme" and verdict.claimed == claimed


def test_scan_refuses_a_record_naming_another_tenant_under_the_topics_tenant() -> None:
    stage = ScanStage(object(), _Scanner(), _NoCatalog(), None, SETTINGS)  # type: ignore[arg-type]
    rec = _record("u.ingest.acme", "victim", headers={H.REPLY_TO: b"u.replies.acme:0", H.CORRELATION_ID: b"c"})
    (out,) = stage.process([rec])
    assert isinstance(out, list)
    assert [(o.topic, o.partition) for o in out] == [("u.detections", None), ("u.replies.acme", 0)]
    result = out[0].value
    assert isinstance(result, dict)
    assert (result["status"], result["error_code"], result["tenant"]) == ("REJECTED", "TENANT_MISMATCH", "acme")
    assert result["job_id"] is None and result["lane"] == "BATCH" and result["request_id"] == "r1"
    assert "'victim'" in result["error_message"]


class _Results:
    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []

    def save_results(self, results: Any, **_kw: Any) -> None:
        self.saved += [dict(r) for r in results]


class _AuditLog:
    """stream/cassandra.py AuditLog's contract: rows keyed by event id; TransientError while Cassandra is down."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.writes = 0
        self.down = False

    def write(self, events: Any) -> None:
        from stream.errors import TransientError

        if self.down:
            raise TransientError("cassandra unavailable")
        self.writes += 1
        self.rows.update({e["event_id"]: dict(e) for e in events})


def _refused_result() -> dict[str, Any]:
    stage = ScanStage(object(), _Scanner(), _NoCatalog(), None, SETTINGS)  # type: ignore[arg-type]
    (out,) = stage.process([_record("u.ingest.acme", "victim")])
    assert isinstance(out, list)
    result = out[0].value
    assert isinstance(result, dict)
    return result


def test_the_recorder_audits_a_tenant_mismatch_once_per_request() -> None:
    from processors.recorder import RecorderStage

    result = _refused_result()
    results, audit = _Results(), _AuditLog()
    recorder = RecorderStage(results, P, audit=audit)  # type: ignore[arg-type]
    as_read = Record(topic="u.detections", partition=0, offset=0, key="r1", value=result, headers={}, lane="batch")
    other = {**result, "error_code": None}
    outs = recorder.process([as_read, replace_value(as_read, other), as_read])
    (out,) = outs[0]  # type: ignore[misc]
    assert outs[1] == [] and outs[2] == outs[0]  # redelivered: the same event (same id)
    assert (out.topic, out.key, out.event) == ("u.audit", "acme", "AuditEvent")
    event = out.value
    assert (event["tenant"], event["subject"], event["action"], event["outcome"], event["status"]) == (
        "acme", "tenant-acme", "ingest", "denied", 403)
    assert event["resource"] == "u.ingest.acme" and event["request_id"] == "r1"
    assert event["detail"].startswith("TENANT_MISMATCH") and "'victim'" in event["detail"]
    assert event == ingest.audit_event(P, result)  # the one constructor of the event
    # Cassandra too, in one write for the batch (an upsert by event id), and the result itself is stored.
    assert audit.rows == {event["event_id"]: event} and audit.writes == 1
    assert [r["error_code"] for r in results.saved] == ["TENANT_MISMATCH", None, "TENANT_MISMATCH"]


def test_the_recorder_retries_a_batch_whose_audit_rows_cassandra_did_not_take() -> None:
    from processors.recorder import RecorderStage
    from stream.errors import TransientError
    from stream.records import Failure

    results, audit = _Results(), _AuditLog()
    audit.down = True
    recorder = RecorderStage(results, P, audit=audit)  # type: ignore[arg-type]
    rec = Record(topic="u.detections", partition=0, offset=0, key="r1", value=_refused_result(), headers={},
                 lane="batch")
    outs = recorder.process([rec, replace_value(rec, {**rec.value, "request_id": "r2", "error_code": None})])
    # The refusal whose audit row failed is retried (nothing of it published); the other record is done.
    assert isinstance(outs[0], Failure) and isinstance(outs[0].error, TransientError) and outs[1] == []
    audit.down = False
    ((out,),) = recorder.process([rec])  # type: ignore[misc]
    assert out.topic == "u.audit" and list(audit.rows) == [out.value["event_id"]]


def test_a_recorder_without_an_audit_log_and_other_results_audit_nothing() -> None:
    from processors.recorder import RecorderStage

    rec = Record(topic="u.detections", partition=0, offset=0, key="r1", value=_refused_result(), headers={},
                 lane="batch")
    assert RecorderStage(_Results(), P).process([rec]) == [[]]
    audit = _AuditLog()
    other = replace_value(rec, {**rec.value, "error_code": "UNSUPPORTED_MEDIA_TYPE"})
    assert RecorderStage(_Results(), P, audit=audit).process([other]) == [[]]  # type: ignore[arg-type]
    assert audit.writes == 0  # no Cassandra round trip for a batch without a refusal


def test_the_audit_log_writes_one_prepared_row_per_event_and_cassandra_errors_are_transient() -> None:
    import datetime as dt

    from cassandra import OperationTimedOut

    from stream.cassandra import AUDIT_INSERT, AUDIT_TTL_S, AuditLog
    from stream.errors import TransientError

    class _Future:
        def __init__(self, error: Exception | None) -> None:
            self.error = error

        def result(self) -> None:
            if self.error is not None:
                raise self.error

    class _Session:
        def __init__(self) -> None:
            self.prepared: list[str] = []
            self.rows: list[tuple[Any, ...]] = []
            self.error: Exception | None = None

        def prepare(self, cql: str) -> str:
            self.prepared.append(cql)
            return cql

        def execute_async(self, stmt: str, params: tuple[Any, ...], timeout: float) -> _Future:
            assert stmt == AUDIT_INSERT and timeout > 0
            self.rows.append(params)
            return _Future(self.error)

    session = _Session()
    log = AuditLog(session)  # type: ignore[arg-type]
    event = ingest.audit_event(P, _refused_result())
    assert event is not None
    event = {**event, "event_time": 1_767_225_600_000}  # 2026-01-01T00:00:00Z
    log.write([event])
    assert session.prepared == [AUDIT_INSERT]  # once, at construction
    (row,) = session.rows
    assert row == ("acme", "2026-01-01", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), event["event_id"], "tenant-acme",
                   "ingest", "u.ingest.acme", "denied", 403, "r1", event["detail"], AUDIT_TTL_S)
    session.error = OperationTimedOut("no answer")
    with pytest.raises(TransientError):
        log.write([event])


def replace_value(rec: Record, value: dict[str, Any]) -> Record:
    from dataclasses import replace

    return replace(rec, value=value)


def test_scan_stamps_the_topics_tenant_and_lane_on_a_matching_record(tmp_path: Path) -> None:
    from model_store.catalog import ModelCatalog, ModelNotFound

    class _Catalog(ModelCatalog):
        def resolve(self, *args: Any) -> Any:
            raise ModelNotFound("no model here")

    stage = ScanStage(object(), _Scanner(), _Catalog(tmp_path), None, SETTINGS)  # type: ignore[arg-type]
    # Past the tenant check, the record goes on like any submission (here to MODEL_NOT_FOUND).
    (out,) = stage.process([_record("u.ingest.acme", "acme")])
    assert not isinstance(out, list) and out.error.code == "MODEL_NOT_FOUND"  # type: ignore[attr-defined]
    assert ingest.stamped({"tenant": "acme", "lane": "ONLINE", "x": 1}, "acme", "batch") == {
        "tenant": "acme", "lane": "BATCH", "x": 1}


def test_scan_subscribes_to_every_tenants_ingest_topic() -> None:
    stage = ScanStage(object(), _Scanner(), _NoCatalog(), None, SETTINGS)  # type: ignore[arg-type]
    assert stage.input_patterns() == [T.ingest_pattern(P)]


# ---- ACLs -------------------------------------------------------------------------------------------------
def _names(grants: list[Any], principal: str, op: str) -> set[str]:
    return {g.name for g in grants if g.principal == principal and g.resource == "topic" and op in g.operations}


def test_a_tenant_writes_its_own_ingest_topic_only_and_literally() -> None:
    grants = tenant_bindings(P, "acme")
    assert _names(grants, "tenant-acme", "write") == {"u.ingest.acme"}
    assert _names(grants, "tenant-acme", "read") == {"u.replies.acme"}
    assert not [g for g in grants if g.resource == "topic" and g.prefixed]  # `ingest.acme` != `ingest.acme*`
    assert _names(grants, "scan", "read") == {"u.ingest.acme", "u.ingest.acme.retry"}
    assert _names(grants, "scan", "write") == {"u.ingest.acme.retry", "u.ingest.acme.dlq", "u.replies.acme"}
    assert {g.principal for g in grants if "u.replies.acme" in g.name and "write" in g.operations} == {
        "scan", "preprocess", "inference", "postprocess"}
    (group,) = [g for g in grants if g.resource == "group"]
    assert group.prefixed and group.name == "detectflow.replies.tenant-acme." and group.operations == ("read",)


def test_only_pipeline_principals_write_submissions() -> None:
    submitted = {T.lane_topic(P, lane, "submitted") for lane in T.LANES}
    writers = {g.principal for g in bindings(P) if g.name in submitted and "write" in g.operations}
    assert writers == {"bridge", "gateway"}
    assert {g.name for g in retired_bindings(P) if g.principal == "client" and "write" in g.operations} == submitted
    assert "u.audit" not in _names(bindings(P), "scan", "write")  # the recorder audits TENANT_MISMATCH
    assert "u.audit" in _names(bindings(P), "recorder", "write")
