"""Cassandra connections (authenticated, TLS only) and the idempotent schema migrations in schemas/cql/.

Every process logs in as its own role (infra/stack/cassandra_access.py grants each role the tables it uses)
and verifies the node's certificate against the project CA. Migrations need the admin role: `stack up`
applies them, never a pipeline process.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import re
import ssl
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cassandra import AuthenticationFailed, DriverException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionBusy, ConnectionException, ProtocolError
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy
from cassandra.pool import NoConnectionsAvailable
from cassandra.protocol import ErrorMessage

from config import Login, SettingsError, StreamSettings
from schemas import SCHEMA_DIR
from stream.errors import StreamError, TransientError

CQL_DIR = SCHEMA_DIR / "cql"

logging.getLogger("cassandra").setLevel(logging.ERROR)


class CassandraLoginRefused(StreamError):
    """The node refused this role's credentials: a configuration error (retrying will not help)."""


# What the driver raises while a node is away, restarting, slow or overloaded. Several are not DriverExceptions
# (NoHostAvailable, a connection's errors, the node's own error messages); every one must reach the stage as a
# TransientError: one escaping as a bug would restart the process again and again for as long as the outage lasts.
DRIVER_ERRORS: tuple[type[Exception], ...] = (DriverException, NoHostAvailable, ConnectionException, ConnectionBusy,
                                              ProtocolError, NoConnectionsAvailable, ErrorMessage, OSError)


def transient(exc: Exception, what: str = "cassandra") -> TransientError:
    """A driver error as the TransientError that stands for it (the driver's error as its cause)."""
    err = TransientError(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def statement_name(stmt: Any) -> str:
    """A statement as its error messages name it: the verb and the table (``SELECT jobs``), else its first two
    words (``ALTER ROLE``). Never more of its text: a literal in it may be a password."""
    text = stmt if isinstance(stmt, str) else (
        getattr(stmt, "query_string", None) or getattr(getattr(stmt, "prepared_statement", None), "query_string", None)
        or getattr(stmt, "cql", None))
    if not isinstance(text, str):
        return type(stmt).__name__
    verb = text.split(None, 1)[0].upper() if text.strip() else ""
    table = re.search(r"\b(?:FROM|INTO|UPDATE|TABLE)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?([\w.]+)", text, re.IGNORECASE)
    return f"{verb} {table.group(1)}" if verb and table else " ".join(text.split()[:2])


def _failed(exc: Exception, stmt: Any) -> TransientError:
    return transient(exc, f"cassandra {statement_name(stmt)}")


def execute(session: Session, stmt: Any, params: Any = None, *, timeout_s: float) -> Any:
    """One statement, waited for: its result set (first page; ``fetch_all`` follows the pages). Every driver error
    of an outage raises TransientError naming the statement, the driver's error as its cause."""
    try:
        return session.execute(stmt, params, timeout=timeout_s)
    except DRIVER_ERRORS as exc:
        raise _failed(exc, stmt) from exc


def fetch_all(session: Session, stmt: Any, params: Any = None, *, timeout_s: float) -> list[Any]:
    """Every row of one statement, across pages (the driver fetches the next page while they are iterated, so a
    page that fails is as transient as the first)."""
    try:
        return list(session.execute(stmt, params, timeout=timeout_s))
    except DRIVER_ERRORS as exc:
        raise _failed(exc, stmt) from exc


class Pending:
    """A statement under way (``execute_async``): ``result()`` waits for its first page; ``add_callbacks`` calls
    back from the driver's thread. Driver errors arrive as TransientError either way."""

    def __init__(self, future: Any, stmt: Any):
        self._future = future
        self._stmt = stmt

    def result(self) -> Any:
        try:
            return self._future.result()
        except DRIVER_ERRORS as exc:
            raise _failed(exc, self._stmt) from exc

    def add_callbacks(self, on_rows: Callable[[Any], None], on_error: Callable[[BaseException], None]) -> None:
        def failed(exc: BaseException) -> None:
            on_error(_failed(exc, self._stmt) if isinstance(exc, DRIVER_ERRORS) else exc)

        self._future.add_callbacks(on_rows, failed)


def execute_async(session: Session, stmt: Any, params: Any = None, *, timeout_s: float) -> Pending:
    """One statement, sent: TransientError at once if it cannot be (no node, no connection)."""
    try:
        return Pending(session.execute_async(stmt, params, timeout=timeout_s), stmt)
    except DRIVER_ERRORS as exc:
        raise _failed(exc, stmt) from exc


def execute_all(session: Session, statements: Sequence[tuple[Any, Any]], timeout_s: float) -> list[Any]:
    """Every (statement, parameters) concurrently, then each one's first page in order; the first failure raises
    (TransientError) once all were sent."""
    pending = [execute_async(session, stmt, params, timeout_s=timeout_s) for stmt, params in statements]
    return [p.result() for p in pending]


class WriteFailed(TransientError):
    """Some writes of a batch failed, the others are durable: ``failed`` holds the positions (in the batch the
    caller passed) of the items not wholly written, so only those are retried."""

    def __init__(self, message: str, failed: frozenset[int]):
        super().__init__(message)
        self.failed = failed


def execute_each(session: Session, statements: Sequence[tuple[Any, Any]], timeout_s: float
                 ) -> list[Any | TransientError]:
    """Run every (statement, parameters) concurrently and wait for all: per statement its first page of rows, or
    the TransientError it failed with. One failure neither hides nor cancels the others' outcomes."""
    sent: list[Pending | TransientError] = []
    for stmt, params in statements:
        try:
            sent.append(execute_async(session, stmt, params, timeout_s=timeout_s))
        except TransientError as exc:
            sent.append(exc)
    out: list[Any | TransientError] = []
    for p in sent:
        if isinstance(p, TransientError):
            out.append(p)
            continue
        try:
            out.append(p.result())
        except TransientError as exc:
            out.append(exc)
    return out


def tls_context(ca_file: Path) -> ssl.SSLContext:
    """TLS 1.2+ that accepts only a certificate chaining to ``ca_file`` and naming the address dialled
    (the driver passes each node's address as server_hostname)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot read the CA certificate {ca_file} ({type(exc).__name__}); "
                            "`detectflow stack up` creates it") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


RECONNECT_MAX_S = 5.0
_OPENED: weakref.WeakSet[Cluster] = weakref.WeakSet()  # every cluster open_session made, for shutdown_clusters


def shutdown_clusters() -> None:
    """Shut down every cluster this process opened and still holds. A process that holds sessions to its
    end (a test session) calls it before exiting: the driver's own exit hook runs after the interpreter has
    closed its thread pools, so a reconnection the driver schedules then dies with "cannot schedule new
    futures after shutdown"."""
    for cluster in list(_OPENED):
        if not cluster.is_shutdown:
            cluster.shutdown()


def open_session(hosts: Sequence[str], port: int, credentials: Login, ca_file: Path, *,
                 timeout_s: float = 10.0) -> Session:
    """A session (no keyspace) as ``credentials`` over verified TLS. TransientError if no node answers,
    CassandraLoginRefused if the credentials are refused."""
    profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(), request_timeout=timeout_s)
    # A node marked down is dialled again after 1 s, doubling to RECONNECT_MAX_S, for as long as it takes (the
    # driver's default grows to 10 minutes, and gives up after 64 tries): while every node is down each query
    # fails at once, so this bounds how long a process keeps failing after Cassandra is back.
    cluster = Cluster(list(hosts), port=port, connect_timeout=timeout_s, protocol_version=5,
                      reconnection_policy=ExponentialReconnectionPolicy(1.0, RECONNECT_MAX_S, max_attempts=None),
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile}, ssl_context=tls_context(ca_file),
                      auth_provider=PlainTextAuthProvider(credentials.username, credentials.password))
    _OPENED.add(cluster)
    try:
        return cluster.connect()
    except NoHostAvailable as exc:
        cluster.shutdown()
        if exc.errors and all(isinstance(e, AuthenticationFailed) for e in exc.errors.values()):
            raise CassandraLoginRefused(f"cassandra refused the login of {credentials.username!r}") from exc
        raise TransientError(f"cassandra unreachable: {exc}") from exc


def connect(settings: StreamSettings, role: str, *, timeout_s: float = 10.0) -> Session:
    """A session on the keyspace as ``role`` (its credentials file under settings.cassandra_secrets_dir).
    The schema is not touched here: `stack up` applies schemas/cql as the admin role."""
    if settings.cassandra_ca_file is None:
        raise SettingsError("no CA certificate configured for Cassandra (DETECTFLOW_CASSANDRA_CA_FILE)")
    session = open_session(settings.cassandra_hosts, settings.cassandra_port, settings.cassandra_credentials(role),
                           settings.cassandra_ca_file, timeout_s=timeout_s)
    try:
        session.set_keyspace(settings.keyspace)
    except DriverException:
        session.cluster.shutdown()
        raise
    return session


def statements(path: Path, keyspace: str) -> list[str]:
    # Comments are dropped before splitting on ';' (a comment may contain one). Our CQL has no string
    # literal containing '--'.
    text = "\n".join(line.split("--", 1)[0] for line in path.read_text().splitlines())
    return [s.strip().replace("{keyspace}", keyspace) for s in text.split(";") if s.strip()]


def apply_migrations(session: Session, keyspace: str) -> None:
    for path in sorted(CQL_DIR.glob("*.cql")):
        for stmt in statements(path, keyspace):
            session.execute(stmt)


def timestamp_ms(value: dt.datetime | None) -> int | None:
    """A timestamp column as epoch millis (cassandra-driver returns naive UTC datetimes)."""
    if value is None:
        return None
    return calendar.timegm(value.timetuple()) * 1000 + value.microsecond // 1000


# ---- the audit log -------------------------------------------------------------------------------------------
# One row per AuditEvent (schemas/cql/003_gateway.cql, partition (tenant, UTC day)), keyed by its event id, so
# writing an event again is a no-op. One statement for every writer: the gateway (gateway/store.py), the
# registry (model_store/control/registry.py) and the recorder's TENANT_MISMATCH refusals (processors/recorder.py).
AUDIT_INSERT = (
    "INSERT INTO audit_log (tenant, day, event_time, event_id, subject, action, resource, outcome, status, "
    "request_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?")
AUDIT_TTL_S = 400 * 24 * 3600


def utc_day(epoch_s: float | None = None) -> str:
    """The UTC day (YYYY-MM-DD) of a time (default: now): the partition of the day-partitioned tables
    (audit_log, the daily quota rows)."""
    return dt.datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, dt.UTC).strftime("%Y-%m-%d")


def audit_row(event: Mapping[str, Any], ttl_s: int, day: str | None = None) -> tuple[Any, ...]:
    """AUDIT_INSERT's parameters for an AuditEvent (by default in the partition of its own event time)."""
    at = dt.datetime.fromtimestamp(event["event_time"] / 1000, dt.UTC)
    return (event["tenant"], day or utc_day(event["event_time"] / 1000), at, event["event_id"], event["subject"],
            event["action"], event.get("resource"), event["outcome"], event["status"], event.get("request_id"),
            event.get("detail"), ttl_s)


class AuditLog:
    """AuditEvents into audit_log with one prepared INSERT; Cassandra errors become TransientError (retried)."""

    def __init__(self, session: Session, *, ttl_s: int = AUDIT_TTL_S, timeout_s: float = 10.0):
        self._session = session
        self._insert = session.prepare(AUDIT_INSERT)
        self._ttl = ttl_s
        self._timeout = timeout_s

    def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Each event, concurrently; returns once all are written. WriteFailed (a TransientError) names the
        positions of the events that were not."""
        answers = execute_each(self._session, [(self._insert, audit_row(e, self._ttl)) for e in events],
                               self._timeout)
        failed = frozenset(i for i, a in enumerate(answers) if isinstance(a, TransientError))
        if failed:
            first = next(a for a in answers if isinstance(a, TransientError))
            raise WriteFailed(f"audit_log: {len(failed)} of {len(events)} events not written ({first})", failed)
