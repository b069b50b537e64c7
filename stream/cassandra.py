"""Cassandra connections (authenticated, TLS only) and the idempotent schema migrations in schemas/cql/.

Every process logs in as its own role (infra/stack/cassandra_access.py grants each role the tables it uses)
and verifies the node's certificate against the project CA. Migrations need the admin role: `stack up`
applies them, never a pipeline process.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cassandra import AuthenticationFailed, DriverException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import DCAwareRoundRobinPolicy

from infra.settings import Login, SettingsError, StreamSettings
from schemas import SCHEMA_DIR
from stream.errors import StreamError, TransientError

CQL_DIR = SCHEMA_DIR / "cql"

logging.getLogger("cassandra").setLevel(logging.ERROR)


class CassandraLoginRefused(StreamError):
    """The node refused this role's credentials: a configuration error (retrying will not help)."""


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


def open_session(hosts: Sequence[str], port: int, credentials: Login, ca_file: Path, *,
                 timeout_s: float = 10.0) -> Session:
    """A session (no keyspace) as ``credentials`` over verified TLS. TransientError if no node answers,
    CassandraLoginRefused if the credentials are refused."""
    profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(), request_timeout=timeout_s)
    cluster = Cluster(list(hosts), port=port, connect_timeout=timeout_s, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile}, ssl_context=tls_context(ca_file),
                      auth_provider=PlainTextAuthProvider(credentials.username, credentials.password))
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
# registry (model_store/registry.py) and the recorder's TENANT_MISMATCH refusals (processors/recorder.py).
AUDIT_INSERT = (
    "INSERT INTO audit_log (tenant, day, event_time, event_id, subject, action, resource, outcome, status, "
    "request_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?")
AUDIT_TTL_S = 400 * 24 * 3600


def audit_day(epoch_ms: int) -> str:
    """The audit_log partition day (UTC) of an event time."""
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def audit_row(event: Mapping[str, Any], ttl_s: int, day: str | None = None) -> tuple[Any, ...]:
    """AUDIT_INSERT's parameters for an AuditEvent (by default in the partition of its own event time)."""
    at = dt.datetime.fromtimestamp(event["event_time"] / 1000, dt.UTC)
    return (event["tenant"], day or audit_day(event["event_time"]), at, event["event_id"], event["subject"],
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
        """Each event, concurrently; returns once all are written."""
        try:
            futures = [self._session.execute_async(self._insert, audit_row(e, self._ttl), timeout=self._timeout)
                       for e in events]
            for f in futures:
                f.result()
        except (DriverException, NoHostAvailable, OSError) as exc:
            raise TransientError(f"cassandra: audit_log: {type(exc).__name__}: {exc}") from exc
