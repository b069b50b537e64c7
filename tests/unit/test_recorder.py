# ruff: noqa: F811  (the catalog fixture is imported from test_processors and used as an argument)
"""Sinks during an outage of Cassandra (with fakes of the driver's session): the recorder writes what it can and
retries only what failed; postprocess never publishes what it could not store; every driver error becomes a
TransientError."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionBusy, ConnectionException, ConnectionShutdown
from cassandra.pool import NoConnectionsAvailable
from cassandra.protocol import OverloadedErrorMessage, ServerError
from cassandra.query import BatchStatement
from test_governance import FakeGovernance
from test_processors import SETTINGS, FakeResults, catalog, inferred, record  # noqa: F401  (catalog: a fixture)

import stream.cassandra
from config import Login
from model_store.catalog import ModelCatalog
from processors.governance import IMAGE_DELETED
from processors.jobs import CassandraJobs, JobTracker
from processors.postprocess import PostprocessStage
from processors.recorder import RecorderStage
from processors.results import ResultStore
from stream.cassandra import AuditLog, WriteFailed, execute_each
from stream.errors import TransientError
from stream.records import Failure, Record, now_ms

DRIVER_FAILURES: list[Exception] = [
    NoHostAvailable("no host", {"127.0.0.1:9042": ConnectionRefusedError(111, "refused")}),
    OperationTimedOut("timed out"),
    Unavailable("unavailable"),
    WriteTimeout("write timeout", write_type=0),
    ReadTimeout("read timeout"),
    ConnectionException("connection lost"),
    ConnectionShutdown("connection shut down"),
    ConnectionBusy("busy"),
    NoConnectionsAvailable(),
    ServerError(0, "server error", {}),
    OverloadedErrorMessage(0, "overloaded", {}),
    ConnectionResetError(104, "reset"),
]


class Answer:
    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class Prepared:
    """A prepared statement as BatchStatement.add sees a simple one."""

    keyspace = routing_key = custom_payload = None

    def __init__(self, cql: str):
        self.cql = cql
        self.query_string = cql.replace("?", "%s")


class FakeSession:
    """``fail(statement, params)`` returns the error a statement fails with."""

    def __init__(self, fail: Callable[[Any, Any], BaseException | None] = lambda s, p: None):
        self.fail = fail
        self.executed: list[tuple[Any, Any]] = []

    def prepare(self, cql: str) -> Prepared:
        return Prepared(cql)

    def execute_async(self, stmt: Any, params: Any, timeout: float | None = None) -> Answer:
        self.executed.append((stmt, params))
        return Answer(self.fail(stmt, params) or [])

    def execute(self, stmt: Any, params: Any, timeout: float | None = None) -> Any:
        return self.execute_async(stmt, params, timeout).result()


def result(rid: str, job: str | None = None, status: str = "REJECTED", **extra: Any) -> dict[str, Any]:
    return {"request_id": rid, "tenant": "t", "status": status, "error_code": "UNSUPPORTED_FORMAT", "job_id": job,
            "image_sha256": f"sha-{rid}", "submitted_at": 1_700_000_000_000, "completed_at": 1_700_000_000_500,
            "detections": [], **extra}


def rec(value: dict[str, Any]) -> Record:
    return Record("u.detections", 0, 0, value["request_id"], value, {}, "batch")


def requests_row_of(rid: str) -> Callable[[Any, Any], BaseException | None]:
    def fail(stmt: Any, params: Any) -> BaseException | None:
        is_request = isinstance(stmt, Prepared) and stmt.cql.startswith("UPDATE requests")
        return WriteTimeout("write timeout", write_type=0) if is_request and params[-1] == rid else None
    return fail


# ---- stream/cassandra.py: every driver error of an outage is transient -------------------------------------

@pytest.mark.parametrize("error", DRIVER_FAILURES, ids=lambda e: type(e).__name__)
def test_every_driver_error_of_an_outage_is_a_transient_error(error: Exception) -> None:
    session = FakeSession(lambda s, p: error if p == (2,) else None)
    answers = execute_each(session, [("q", (1,)), ("q", (2,)), ("q", (3,))], 1.0)  # type: ignore[arg-type]
    assert answers[0] == [] and answers[2] == []  # one failure hides none of the others
    assert isinstance(answers[1], TransientError) and answers[1].__cause__ is error
    jobs = CassandraJobs(FakeSession(lambda s, p: error))
    with pytest.raises(TransientError):
        jobs.job("t", "j1")


def test_sessions_dial_a_down_node_every_few_seconds_for_as_long_as_it_takes(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    made: dict[str, Any] = {}

    class Cluster:
        def __init__(self, hosts: Any, **kwargs: Any):
            made.update(kwargs)

        def connect(self) -> str:
            return "session"

    monkeypatch.setattr(stream.cassandra, "Cluster", Cluster)
    monkeypatch.setattr(stream.cassandra, "tls_context", lambda ca: None)
    assert stream.cassandra.open_session(["h"], 9042, Login("u", "p"), tmp_path / "ca.pem") == "session"
    delays = list(itertools.islice(made["reconnection_policy"].new_schedule(), 1000))
    assert len(delays) == 1000 and max(delays) <= stream.cassandra.RECONNECT_MAX_S  # never gives up


def test_a_bug_is_not_made_transient() -> None:
    with pytest.raises(KeyError):
        execute_each(FakeSession(lambda s, p: KeyError("a bug")), [("q", (1,))], 1.0)  # type: ignore[arg-type]


def test_a_failing_page_of_a_big_job_is_transient() -> None:
    class Pages:
        def __iter__(self) -> Any:
            yield type("Row", (), {"status": "OK"})()
            raise OperationTimedOut("next page timed out")

    session = FakeSession()
    session.execute = lambda *a, **k: Pages()  # type: ignore[method-assign]
    with pytest.raises(TransientError):
        CassandraJobs(session).status_counts("t", "j1")


def test_the_audit_log_names_the_events_it_could_not_write() -> None:
    session = FakeSession(lambda s, p: Unavailable("unavailable") if p[3] == "e2" else None)
    events = [{"tenant": "t", "event_time": 1_700_000_000_000, "event_id": f"e{i}", "subject": "s", "action": "a",
               "outcome": "DENIED", "status": 403} for i in range(3)]
    with pytest.raises(WriteFailed) as err:
        AuditLog(session).write(events)  # type: ignore[arg-type]
    assert err.value.failed == {2} and len(session.executed) == 3


# ---- processors/results.py: per-result outcomes, the same statements ----------------------------------------

def test_save_results_names_the_results_whose_rows_failed_with_the_same_statements() -> None:
    rows = [result("a", "j1"), result("b", "j1"), result("c", "j2"), result("d")]
    healthy = FakeSession()
    ResultStore(healthy, result_ttl_s=60, cache_ttl_s=60).save_results(rows)
    # requests x4, image_requests x4, job_results: j1 as one batch, j2 as one row
    assert len(healthy.executed) == 10

    session = FakeSession(requests_row_of("d"))
    with pytest.raises(WriteFailed) as err:
        ResultStore(session, result_ttl_s=60, cache_ttl_s=60).save_results(rows)
    assert err.value.failed == {3} and len(session.executed) == 10

    # A job's rows of the batch are one statement: when it fails, every result of that job is retried.
    session = FakeSession(lambda s, p: WriteTimeout("timeout", write_type=0) if isinstance(s, BatchStatement) else None)
    with pytest.raises(WriteFailed) as err:
        ResultStore(session, result_ttl_s=60, cache_ttl_s=60).save_results(rows)
    assert err.value.failed == {0, 1}


# ---- processors/recorder.py: per-record outcomes -----------------------------------------------------------

def test_the_recorder_retries_only_the_records_whose_writes_failed() -> None:
    session = FakeSession(requests_row_of("b"))
    stage = RecorderStage(ResultStore(session, result_ttl_s=60, cache_ttl_s=60), "u.")
    out = stage.process([rec(result("a")), rec(result("b")), rec(result("c", status="OK"))])
    assert out[0] == [] and out[2] == []  # c: stored by postprocess already
    assert isinstance(out[1], Failure) and isinstance(out[1].error, TransientError)
    # The retry of b alone: one result's statements.
    session.fail = lambda s, p: None
    session.executed.clear()
    assert stage.process([rec(result("b"))]) == [[]] and len(session.executed) == 2


def test_the_recorder_fails_every_record_when_cassandra_is_away() -> None:
    session = FakeSession(lambda s, p: NoHostAvailable("no host", {}))
    store = ResultStore(session, result_ttl_s=60, cache_ttl_s=60)
    out = RecorderStage(store, "u.").process([rec(result("a")), rec(result("b"))])
    assert all(isinstance(o, Failure) and isinstance(o.error, TransientError) for o in out)


def test_the_recorder_does_not_count_a_job_with_a_result_it_failed_to_store() -> None:
    class Jobs:
        def __init__(self) -> None:
            self.touched: list[str] = []

        def job(self, tenant: str, job_id: str) -> dict[str, Any]:
            self.touched.append(job_id)
            return {"total": 9, "status": "RUNNING", "created_at": 1}

        def status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
            return {"REJECTED": 1}

    session = FakeSession(requests_row_of("b"))
    jobs = Jobs()
    stage = RecorderStage(ResultStore(session, result_ttl_s=60, cache_ttl_s=60), "u.",
                          JobTracker(jobs, recheck_s=0))  # type: ignore[arg-type]
    out = stage.process([rec(result("a", "j1")), rec(result("b", "j2"))])
    assert out[0] == [] and isinstance(out[1], Failure) and jobs.touched == ["j1"]


def test_a_failed_tombstone_read_retries_the_results_it_was_for() -> None:
    class AwayGovernance(FakeGovernance):
        def tombstones(self, images: Any) -> dict[tuple[str, str], int]:
            raise TransientError("cassandra: NoHostAvailable")

    results = FakeResults()
    out = RecorderStage(results, "u.", governance=AwayGovernance()).process([rec(result("a"))])
    assert isinstance(out[0], Failure) and isinstance(out[0].error, TransientError)


def test_a_failed_supersession_retries_only_that_result() -> None:
    session = FakeSession()
    store = ResultStore(session, result_ttl_s=60, cache_ttl_s=60)
    gov = FakeGovernance({("t", "sha-b"): now_ms()})  # b's image was deleted after b was submitted

    def fail(stmt: Any, params: Any) -> BaseException | None:
        superseding = (isinstance(stmt, Prepared) and stmt.cql.startswith("UPDATE requests")
                       and params[5] == IMAGE_DELETED)
        return Unavailable("unavailable") if superseding else None

    session.fail = fail
    out = RecorderStage(store, "u.", governance=gov).process([rec(result("a")), rec(result("b"))])
    assert out[0] == [] and isinstance(out[1], Failure)


# ---- processors/postprocess.py: nothing published that is not stored ---------------------------------------

def test_postprocess_retries_its_batch_when_some_writes_failed(catalog: ModelCatalog) -> None:
    class Partial(FakeResults):
        def save_results(self, results: Any, **_: Any) -> None:
            raise WriteFailed("1 of 2 results not stored", frozenset({1}))

    stage = PostprocessStage(catalog, Partial(), SETTINGS)
    outs = stage.process([record(inferred(catalog, [])), record(inferred(catalog, []))])
    assert all(isinstance(o, Failure) and isinstance(o.error, TransientError) for o in outs)
    # With the content policy: the same (stored first, then the tombstones, then published).
    stage = PostprocessStage(catalog, Partial(), SETTINGS, FakeGovernance())
    outs = stage.process([record(inferred(catalog, []))])
    assert isinstance(outs[0], Failure) and isinstance(outs[0].error, TransientError)


def test_postprocess_retries_when_its_cassandra_reads_fail(catalog: ModelCatalog) -> None:
    class AwayGovernance(FakeGovernance):
        def tombstones(self, images: Any) -> dict[tuple[str, str], int]:
            raise TransientError("cassandra: OperationTimedOut")

    results = FakeResults()
    stage = PostprocessStage(catalog, results, SETTINGS, AwayGovernance())
    outs = stage.process([record(inferred(catalog, []))])
    assert isinstance(outs[0], Failure) and isinstance(outs[0].error, TransientError)
