"""`detectflow stack down && detectflow stack up` keeps data, and `up` is idempotent."""

from __future__ import annotations

import io
import secrets

import pytest
from cassandra.cluster import Cluster, Session
from minio import Minio
from object_kit import minio_as

from config import StackSettings
from infra.stack import manager
from infra.stack.cassandra_access import admin_session


def _minio(stack: StackSettings) -> Minio:
    creds = stack.minio_credentials()
    return minio_as(stack, creds)


def _session(stack: StackSettings) -> tuple[Cluster, Session]:
    session = admin_session(stack)  # as the operator: this test makes its own keyspace
    return session.cluster, session


def test_second_up_is_a_no_op(stack: StackSettings) -> None:
    pids = {h.name: h.pid for h in manager.status(stack)}
    manager.up(stack)
    assert {h.name: h.pid for h in manager.status(stack)} == pids
    assert all(h.healthy for h in manager.status(stack))


@pytest.mark.restart
def test_down_up_keeps_cassandra_rows_and_minio_objects(stack: StackSettings) -> None:
    token = secrets.token_hex(8)
    cluster, session = _session(stack)
    try:
        session.execute("CREATE KEYSPACE IF NOT EXISTS it_restart WITH replication = "
                        "{'class': 'SimpleStrategy', 'replication_factor': 1}")
        session.execute("CREATE TABLE IF NOT EXISTS it_restart.kv (k text PRIMARY KEY, v text)")
        session.execute("INSERT INTO it_restart.kv (k, v) VALUES (%s, %s)", (token, "kept"))
    finally:
        cluster.shutdown()
    body = secrets.token_bytes(4096)
    _minio(stack).put_object("derived", f"restart/{token}", io.BytesIO(body), len(body))

    manager.down(stack)
    assert not any(h.running for h in manager.status(stack))
    # The warm start time is measured by `detectflow stack up` itself (it prints it), not asserted here.
    manager.up(stack)
    assert all(h.healthy for h in manager.status(stack))

    cluster, session = _session(stack)
    try:
        row = session.execute("SELECT v FROM it_restart.kv WHERE k = %s", (token,)).one()
        assert row is not None and row.v == "kept"
    finally:
        cluster.shutdown()
    resp = _minio(stack).get_object("derived", f"restart/{token}")
    try:
        assert resp.read() == body
    finally:
        resp.close()
        resp.release_conn()
