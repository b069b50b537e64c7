"""The local Cassandra node: schema changes, prepared writes and reads, TTLs, restarts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from cassandra import ProtocolVersion
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy

from config import StackSettings
from infra.stack import manager
from infra.stack.cassandra_access import admin_credentials
from stream.cassandra import tls_context

TABLE_DDL = """
CREATE TABLE {ks}.results (
    request_id uuid PRIMARY KEY,
    tenant text,
    label text,
    score float
)
"""


def _connect(settings: StackSettings) -> Cluster:
    # As the operator (the admin role: these tests make and drop keyspaces), over verified TLS.
    # One local node: a plain round robin avoids the driver's DC-aware warnings.
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=20.0)
    admin = admin_credentials(settings)
    return Cluster([settings.host], port=settings.cassandra_port, protocol_version=ProtocolVersion.V5,
                   execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=5.0,
                   auth_provider=PlainTextAuthProvider(admin.username, admin.password),
                   ssl_context=tls_context(settings.tls_ca_file))


@pytest.fixture(scope="module")
def cluster(stack: StackSettings) -> Iterator[Cluster]:
    cluster = _connect(stack)
    yield cluster
    cluster.shutdown()


def _create_keyspace(session: Session) -> str:
    name = f"it_{uuid.uuid4().hex[:12]}"
    session.execute(
        f"CREATE KEYSPACE {name} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")
    session.execute(TABLE_DDL.format(ks=name))
    return name


@pytest.fixture(scope="module")
def keyspace(stack: StackSettings) -> Iterator[str]:
    with _connect(stack) as setup:
        name = _create_keyspace(setup.connect())
    yield name
    # A fresh connection: the restart test (run last) may have bounced the node since.
    with _connect(stack) as teardown:
        teardown.connect().execute(f"DROP KEYSPACE IF EXISTS {name}")


@pytest.fixture
def session(cluster: Cluster, keyspace: str) -> Session:
    return cluster.connect(keyspace)


def test_node_reports_its_version(session: Session, stack: StackSettings) -> None:
    row = session.execute("SELECT release_version FROM system.local").one()
    assert row.release_version == stack.versions.cassandra


def test_prepared_insert_then_select(session: Session) -> None:
    insert = session.prepare("INSERT INTO results (request_id, tenant, label, score) VALUES (?, ?, ?, ?)")
    select = session.prepare("SELECT tenant, label, score FROM results WHERE request_id = ?")
    request_id = uuid.uuid4()

    session.execute(insert, (request_id, "acme", "person", 0.875))

    row = session.execute(select, (request_id,)).one()
    assert (row.tenant, row.label, row.score) == ("acme", "person", pytest.approx(0.875))


def test_reinsert_with_same_key_keeps_one_row(session: Session) -> None:
    # Delivery is at-least-once: a replayed write must overwrite, never duplicate.
    insert = session.prepare("INSERT INTO results (request_id, tenant, label, score) VALUES (?, ?, ?, ?)")
    count = session.prepare("SELECT COUNT(*) FROM results WHERE request_id = ?")
    request_id = uuid.uuid4()

    session.execute(insert, (request_id, "acme", "bus", 0.5))
    session.execute(insert, (request_id, "acme", "bus", 0.5))

    assert session.execute(count, (request_id,)).one().count == 1


def test_row_written_with_ttl_reports_it(session: Session) -> None:
    insert = session.prepare(
        "INSERT INTO results (request_id, tenant, label, score) VALUES (?, ?, ?, ?) USING TTL ?")
    select = session.prepare("SELECT TTL(label) AS ttl FROM results WHERE request_id = ?")
    request_id = uuid.uuid4()

    session.execute(insert, (request_id, "acme", "dog", 0.25, 3600))

    ttl = session.execute(select, (request_id,)).one().ttl
    assert 0 < ttl <= 3600


@pytest.mark.restart
def test_row_survives_a_restart(stack: StackSettings) -> None:
    # Its own cluster objects and keyspace: connections do not survive the node's restart.
    request_id = uuid.uuid4()
    with _connect(stack) as before:
        session = before.connect()
        keyspace = _create_keyspace(session)
        session.set_keyspace(keyspace)
        session.execute("INSERT INTO results (request_id, tenant, label) VALUES (%s, %s, %s)",
                        (request_id, "acme", "cat"))

    manager.down(stack, ["cassandra"])
    manager.up(stack, ["cassandra"])

    with _connect(stack) as after:
        session = after.connect(keyspace)
        try:
            row = session.execute("SELECT label FROM results WHERE request_id = %s", (request_id,)).one()
        finally:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
    assert row is not None and row.label == "cat"
