"""stream/cassandra.py's execution helper: every driver error of an outage becomes a TransientError that names the
statement, a bug stays a bug, and no other module sends statements or catches the driver's errors itself."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from cassandra import OperationTimedOut
from test_recorder import DRIVER_FAILURES, FakeSession, Prepared

from stream.cassandra import execute, execute_all, execute_async, fetch_all, statement_name
from stream.errors import TransientError

ROOT = Path(__file__).resolve().parents[2]
JOBS = Prepared("SELECT total, status FROM jobs WHERE tenant = ? AND job_id = ?")


class Callbacks:
    """A driver ResponseFuture that has already failed (or answered): add_callbacks calls back at once."""

    def __init__(self, value: Any):
        self.value = value

    def add_callbacks(self, on_rows: Any, on_error: Any) -> None:
        (on_error if isinstance(self.value, BaseException) else on_rows)(self.value)


@pytest.mark.parametrize("error", DRIVER_FAILURES, ids=lambda e: type(e).__name__)
def test_every_driver_error_is_transient_and_names_the_statement(error: Exception) -> None:
    session = FakeSession(lambda s, p: error)
    for run in (lambda: execute(session, JOBS, ("t", "j"), timeout_s=1.0),  # type: ignore[arg-type]
                lambda: fetch_all(session, JOBS, ("t", "j"), timeout_s=1.0),  # type: ignore[arg-type]
                lambda: execute_async(session, JOBS, ("t", "j"), timeout_s=1.0).result(),  # type: ignore[arg-type]
                lambda: execute_all(session, [(JOBS, ("t", "j"))], 1.0)):  # type: ignore[arg-type]
        with pytest.raises(TransientError) as err:
            run()
        assert err.value.__cause__ is error
        assert "SELECT jobs" in str(err.value) and type(error).__name__ in str(err.value)


def test_a_failed_callback_arrives_as_a_transient_error() -> None:
    class Session(FakeSession):
        def execute_async(self, stmt: Any, params: Any, timeout: float | None = None) -> Any:
            return Callbacks(OperationTimedOut("timed out") if params == ("bad",) else ["row"])

    got: list[Any] = []
    for params in (("bad",), ("good",)):
        execute_async(Session(), JOBS, params, timeout_s=1.0).add_callbacks(got.append, got.append)  # type: ignore[arg-type]
    assert isinstance(got[0], TransientError) and isinstance(got[0].__cause__, OperationTimedOut)
    assert "SELECT jobs" in str(got[0]) and got[1] == ["row"]


def test_a_bug_is_not_made_transient() -> None:
    session = FakeSession(lambda s, p: KeyError("a bug"))
    with pytest.raises(KeyError):
        execute(session, JOBS, (), timeout_s=1.0)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        execute_all(session, [(JOBS, ())], 1.0)  # type: ignore[arg-type]


def test_a_page_that_fails_while_rows_are_read_is_transient() -> None:
    class Pages:
        def __iter__(self) -> Any:
            yield "row"
            raise OperationTimedOut("next page timed out")

    session = FakeSession()
    session.execute = lambda *a, **k: Pages()  # type: ignore[method-assign]
    with pytest.raises(TransientError, match="SELECT jobs"):
        fetch_all(session, JOBS, (), timeout_s=1.0)  # type: ignore[arg-type]


def test_statements_are_named_by_verb_and_table() -> None:
    class Bound:
        prepared_statement = JOBS

    assert statement_name(JOBS) == "SELECT jobs"
    assert statement_name(Bound()) == "SELECT jobs"
    assert statement_name("INSERT INTO bridge_objects (a) VALUES (?) IF NOT EXISTS") == "INSERT bridge_objects"
    assert statement_name("UPDATE jobs SET status = ? WHERE tenant = ?") == "UPDATE jobs"
    assert statement_name("SELECT release_version FROM system.local") == "SELECT system.local"
    assert statement_name("CREATE TABLE IF NOT EXISTS ks.jobs (a int PRIMARY KEY)") == "CREATE ks.jobs"
    assert statement_name("ALTER ROLE admin WITH PASSWORD = 'secret' AND LOGIN = true") == "ALTER ROLE"
    assert statement_name(object()) == "object"


def _sources() -> list[Path]:
    packages = ("stream", "processors", "gateway", "model_store", "infra")
    return sorted(p for d in packages for p in (ROOT / d).rglob("*.py"))


def test_only_stream_cassandra_sends_statements_or_catches_driver_errors() -> None:
    """One home for driver errors: the helper. (The stack's health probe talks to a node over one bare connection,
    not a session, and tells a refused login from a node that is down: infra/stack/cassandra.py.)"""
    import cassandra

    driver_errors = {n for n in dir(cassandra) if isinstance(getattr(cassandra, n), type)
                     and issubclass(getattr(cassandra, n), Exception)}
    driver_errors |= {"NoHostAvailable", "ConnectionException", "ConnectionBusy", "ProtocolError",
                      "NoConnectionsAvailable", "ErrorMessage"}
    offenders = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("stream/cassandra.py", "infra/stack/cassandra.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.type)
                         if isinstance(n, ast.Name | ast.Attribute)}
                if names & (driver_errors | {"DRIVER_ERRORS"}):
                    offenders.append(f"{rel}:{node.lineno} catches {sorted(names)}")
            in_pipeline = rel.split("/")[0] in ("stream", "processors", "gateway", "model_store")
            if (in_pipeline and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("execute", "execute_async")
                    and ast.unparse(node.func.value).split(".")[-1] in ("session", "_session", "_s")):
                offenders.append(f"{rel}:{node.lineno} sends {ast.unparse(node.func)}(...) itself")
    assert offenders == []


def test_shutdown_clusters_ends_every_cluster_the_process_still_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from cassandra.cluster import Cluster

    from stream import cassandra as sc

    opened: weakref.WeakSet[Cluster] = weakref.WeakSet()
    monkeypatch.setattr(sc, "_OPENED", opened)
    held, closed = Cluster(["127.0.0.1"], protocol_version=5), Cluster(["127.0.0.1"], protocol_version=5)
    opened.add(held)
    opened.add(closed)
    closed.shutdown()
    sc.shutdown_clusters()
    assert held.is_shutdown and closed.is_shutdown
