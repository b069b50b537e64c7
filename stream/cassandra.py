"""Cassandra connection and the idempotent schema migrations in schemas/cql/."""

from __future__ import annotations

import calendar
import datetime as dt
import logging
from pathlib import Path

from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import DCAwareRoundRobinPolicy

from infra.settings import StreamSettings
from schemas import SCHEMA_DIR
from stream.errors import TransientError

CQL_DIR = SCHEMA_DIR / "cql"

logging.getLogger("cassandra").setLevel(logging.ERROR)


def connect(settings: StreamSettings, *, timeout_s: float = 10.0) -> Session:
    """A session on the keyspace, with schemas/cql applied (idempotent). TransientError if unreachable."""
    profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(), request_timeout=timeout_s)
    cluster = Cluster(list(settings.cassandra_hosts), port=settings.cassandra_port, connect_timeout=timeout_s,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile}, protocol_version=5)
    try:
        session = cluster.connect()
    except NoHostAvailable as exc:
        cluster.shutdown()
        raise TransientError(f"cassandra unreachable: {exc}") from exc
    apply_migrations(session, settings.keyspace)
    session.set_keyspace(settings.keyspace)
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
