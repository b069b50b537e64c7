"""Cassandra on the local stack: logins only, TLS only, one role per process with only its tables."""

from __future__ import annotations

import socket
import ssl
import stat
import uuid
from pathlib import Path

import pytest
from cassandra import AuthenticationFailed, ProtocolVersion, Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable

from config import Login, StackSettings, StreamSettings
from infra.stack import manager
from infra.stack.cassandra_access import (
    ADMIN,
    DEFAULT_KEYSPACE,
    DEFAULT_SUPERUSER,
    ROLE_RIGHTS,
    admin_session,
    role_name,
)
from infra.stack.pki import Pki, ensure_ca
from stream.cassandra import CassandraLoginRefused, connect, open_session, tls_context
from stream.errors import TransientError


def _stream(stack: StackSettings) -> StreamSettings:
    return StreamSettings(cassandra_hosts=(stack.host,), cassandra_port=stack.cassandra_port,
                          keyspace=DEFAULT_KEYSPACE, cassandra_secrets_dir=stack.cassandra_roles_dir,
                          cassandra_ca_file=stack.tls_ca_file)


def _refusal(exc: NoHostAvailable) -> BaseException:
    (error,) = exc.errors.values()
    return error


def test_a_client_without_credentials_is_refused(stack: StackSettings) -> None:
    cluster = Cluster([stack.host], port=stack.cassandra_port, protocol_version=ProtocolVersion.V5,
                      ssl_context=tls_context(stack.tls_ca_file), connect_timeout=5)
    try:
        with pytest.raises(NoHostAvailable) as caught:
            cluster.connect()
    finally:
        cluster.shutdown()
    assert isinstance(_refusal(caught.value), AuthenticationFailed)
    assert "requires authentication" in str(_refusal(caught.value))


def test_a_plaintext_client_is_refused_even_with_valid_credentials(stack: StackSettings) -> None:
    creds = Login.load(stack.cassandra_roles_dir / "gateway.json")
    cluster = Cluster([stack.host], port=stack.cassandra_port, protocol_version=ProtocolVersion.V5,
                      auth_provider=PlainTextAuthProvider(creds.username, creds.password), connect_timeout=5)
    try:
        with pytest.raises(NoHostAvailable):
            cluster.connect()
    finally:
        cluster.shutdown()
    # On the wire: a plaintext native-protocol OPTIONS frame gets no protocol answer (the TLS server sees no
    # ClientHello: it answers with a TLS alert or closes the connection).
    options_v4 = bytes([0x04, 0x00, 0x00, 0x01, 0x05, 0, 0, 0, 0])
    with socket.create_connection((stack.host, stack.cassandra_port), timeout=5) as sock:
        sock.sendall(options_v4)
        try:
            reply = sock.recv(64)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"\x84"), "the node answered a plaintext CQL frame"


def test_the_node_certificate_is_issued_by_the_project_ca_for_its_address(stack: StackSettings) -> None:
    ctx = tls_context(stack.tls_ca_file)
    with socket.create_connection((stack.host, stack.cassandra_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=stack.host) as tls:
        cert = tls.getpeercert()
        version = tls.version()
    assert ("IP Address", stack.host) in cert["subjectAltName"]
    assert dict(x[0] for x in cert["subject"])["commonName"] == "cassandra"
    assert version in ("TLSv1.2", "TLSv1.3")


def test_a_client_trusting_another_ca_is_refused(stack: StackSettings, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other-ca")
    ensure_ca(other)
    with socket.create_connection((stack.host, stack.cassandra_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_context(other.ca_cert).wrap_socket(raw, server_hostname=stack.host)
    creds = Login.load(stack.cassandra_roles_dir / "gateway.json")
    with pytest.raises(TransientError, match="certificate verify failed"):
        open_session([stack.host], stack.cassandra_port, creds, other.ca_cert, timeout_s=5)


def test_the_default_superuser_cannot_log_in(stack: StackSettings) -> None:
    with pytest.raises(CassandraLoginRefused):
        open_session([stack.host], stack.cassandra_port, Login(DEFAULT_SUPERUSER, DEFAULT_SUPERUSER),
                     stack.tls_ca_file, timeout_s=5)
    session = admin_session(stack)
    try:
        roles = {r.role: r for r in session.execute("SELECT role, can_login, is_superuser FROM system_auth.roles")}
        held = list(session.execute("SELECT resource FROM system_auth.role_permissions WHERE role = %s",
                                    (DEFAULT_SUPERUSER,)))
    finally:
        session.cluster.shutdown()
    assert (roles[DEFAULT_SUPERUSER].can_login, roles[DEFAULT_SUPERUSER].is_superuser) == (False, False)
    assert held == []
    # The admin role is the only superuser; every process role can log in and is not one.
    assert {name for name, r in roles.items() if r.is_superuser} == {role_name(ADMIN)}
    for role in ROLE_RIGHTS:
        assert roles[role_name(role)].can_login and not roles[role_name(role)].is_superuser


def test_each_role_holds_exactly_its_declared_grants(stack: StackSettings) -> None:
    session = admin_session(stack)
    try:
        for role, rights in ROLE_RIGHTS.items():
            held = {r.resource: set(r.permissions) for r in session.execute(
                "SELECT resource, permissions FROM system_auth.role_permissions WHERE role = %s", (role_name(role),))}
            for keyspace in (DEFAULT_KEYSPACE, StreamSettings.from_env().keyspace):
                mine = {res: perms for res, perms in held.items() if res.startswith(f"data/{keyspace}/")}
                assert mine == {f"data/{keyspace}/{t}": set(p) for t, p in rights.items()}, (role, keyspace)
            assert not [res for res in held if not res.startswith("data/") or res.count("/") < 2], \
                f"{role} holds rights beyond single tables: {held}"
    finally:
        session.cluster.shutdown()


def test_credentials_files_are_private(stack: StackSettings) -> None:
    for role in (ADMIN, *ROLE_RIGHTS):
        path = stack.cassandra_roles_dir / f"{role}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(stack.cassandra_roles_dir.stat().st_mode) == 0o700


def test_a_role_cannot_touch_tables_it_has_no_grant_on(stack: StackSettings) -> None:
    settings = _stream(stack)
    gateway = connect(settings, "gateway")
    recorder = connect(settings, "recorder")
    scan = connect(settings, "scan")
    try:
        # What each does works ...
        gateway.execute("SELECT request_id FROM requests WHERE tenant = %s AND request_id = %s", ("t", "r"))
        scan.execute("SELECT result FROM image_cache WHERE tenant = %s AND image_sha256 = %s", ("t", "0"))
        # ... what it does not do is refused.
        with pytest.raises(Unauthorized, match=r"no SELECT permission on <table detectflow\.model_routing>"):
            gateway.execute("SELECT model_name FROM model_routing LIMIT 1")
        with pytest.raises(Unauthorized, match=r"no MODIFY permission on <table detectflow\.audit_log>"):
            scan.execute("INSERT INTO audit_log (tenant, day, event_time, event_id) VALUES (%s, %s, %s, %s)",
                         ("t", "2026-01-01", 0, str(uuid.uuid4())))
        with pytest.raises(Unauthorized, match=r"no SELECT permission on <table detectflow\.audit_log>"):
            recorder.execute("SELECT event_id FROM audit_log WHERE tenant = %s AND day = %s", ("t", "2026-01-01"))
        with pytest.raises(Unauthorized, match=r"no MODIFY permission on <table detectflow\.image_cache>"):
            scan.execute("DELETE FROM image_cache WHERE tenant = %s AND image_sha256 = %s", ("t", "0"))
        with pytest.raises(Unauthorized, match=r"no SELECT permission on <table system_auth\.roles>"):
            gateway.execute("SELECT role FROM system_auth.roles")
        with pytest.raises(Unauthorized):
            gateway.execute("CREATE TABLE detectflow.sneaky (k text PRIMARY KEY)")
        with pytest.raises(Unauthorized):
            gateway.execute("DROP TABLE detectflow.requests")
    finally:
        for session in (gateway, recorder, scan):
            session.cluster.shutdown()


def test_up_again_keeps_every_login(stack: StackSettings) -> None:
    # `stack up` on a running, already migrated node: no new admin password, every role still logs in.
    admin_file = stack.cassandra_roles_dir / f"{ADMIN}.json"
    before = admin_file.read_bytes()
    manager.up(stack, ["cassandra"])
    assert admin_file.read_bytes() == before
    settings = _stream(stack)
    for role in ROLE_RIGHTS:
        connect(settings, role).cluster.shutdown()


def _suite_settings() -> StreamSettings:
    settings = StreamSettings.from_env()
    assert settings.keyspace != DEFAULT_KEYSPACE, "writes test rows: only in the suite's own keyspace"
    return settings


def test_each_role_can_run_what_its_code_runs(stack: StackSettings) -> None:
    # The grants are exactly enough: every store each process builds, run as that process's role.
    import asyncio

    from gateway.store import GatewayStore
    from model_store.registry import RegistryStore, audit_event
    from model_store.routing import Routing
    from processors.governance import Governance, store_unless_deleted
    from processors.jobs import CassandraJobs
    from processors.params import CacheKey
    from processors.results import ResultStore
    from stream.bridge import CassandraClaims
    from stream.cassandra import AuditLog
    from stream.records import now_ms

    settings = _suite_settings()
    tenant, sha, model = f"it{uuid.uuid4().hex[:10]}", uuid.uuid4().hex * 2, f"it-{uuid.uuid4().hex[:8]}"
    result = {"tenant": tenant, "request_id": "r1", "status": "OK", "model_name": model, "model_version": 1,
              "job_id": "j1", "lane": "batch", "image_sha256": sha, "submitted_at": now_ms(),
              "completed_at": now_ms(), "detections": []}
    key = CacheKey(tenant, sha, model, 1, "p")
    sessions = {role: connect(settings, role) for role in ROLE_RIGHTS}
    try:
        s = sessions["postprocess"]
        post = ResultStore(s, result_ttl_s=60, cache_ttl_s=60)
        store_unless_deleted(post, Governance(s), [result])
        post.cache_put([(key, result)])
        assert Governance(s).policies([tenant])[tenant] is not None

        s = sessions["scan"]
        scan_results = ResultStore(s, result_ttl_s=60, cache_ttl_s=60)
        assert scan_results.cache_get(key) is not None
        scan_results.index_images([(tenant, sha, "r1", now_ms())])
        Governance(s).tombstones([(tenant, sha)])
        Governance(s).policies([tenant])

        s = sessions["recorder"]
        store_unless_deleted(ResultStore(s, result_ttl_s=60, cache_ttl_s=60), Governance(s), [result])
        jobs = CassandraJobs(s)
        jobs.job(tenant, "j1")
        assert jobs.result_count(tenant, "j1") == 1 and jobs.status_counts(tenant, "j1") == {"OK": 1}
        jobs.mark_completed(tenant, "j1", {"OK": 1}, now_ms())
        AuditLog(s, ttl_s=60).write([{**audit_event("tenant-it", "ingest", "ingest.it", outcome="denied",
                                                    status=403), "tenant": tenant}])

        assert CassandraClaims(sessions["bridge"]).claim(f"uploads/{tenant}@e", "r1", "it:0:0")

        registry = RegistryStore(sessions["registry"])
        assert registry.compare_and_set(Routing(model, production=1, versions=(1,)), None, "tests")
        assert registry.versions(model) == [] and model in registry.models()
        registry.audit(audit_event("tests", "models.it", model), "2026-01-01")
        registry.audit_events("2026-01-01")
        monitor = RegistryStore(sessions["monitor"])
        current = monitor.routing(model)
        assert current is not None and monitor.compare_and_set(current, current.revision, "guardrail")
        monitor.add_agreement(model, 1, 2, "*", images=1)
        monitor.audit(audit_event("guardrail", "models.rolled_back", model), "2026-01-01")
        assert registry.agreement(model)
        registry.delete_model(model)

        async def gateway_calls() -> dict[str, int]:
            store = GatewayStore(sessions["gateway"], result_ttl_s=60, idempotency_ttl_s=60, audit_ttl_s=60)
            await store.put_request(tenant, "r2", lane="online", image_sha256=sha, source=None, model_name=model,
                                    submitted_at=now_ms())
            assert await store.get_request(tenant, "r1") is not None
            assert (await store.claim_idempotency_key(tenant, "k", "f", "request:r2", now_ms()))[0]
            await store.put_job(tenant, "j2", total=1, model_name=model, params={}, subject="tests",
                                created_at=now_ms())
            await store.get_job(tenant, "j1")
            await store.job_results_page(tenant, "j1", None, 10)
            await store.quota_add(tenant, "2026-01-01", 1)
            await store.quota_used(tenant, "2026-01-01")
            await store.put_policy(tenant, hidden_classes=["cat"], review_classes=[], review_retention_days=None,
                                   subject="tests", at_ms=now_ms())
            await store.audit({"event_id": str(uuid.uuid4()), "tenant": tenant, "subject": "tests", "action": "it",
                               "resource": None, "outcome": "success", "status": 200, "request_id": None,
                               "detail": None, "event_time": now_ms()}, "2026-01-01")
            await store.audit_events(tenant, "2026-01-01")
            return await store.erase_tenant(tenant, "tests", now_ms())

        erased = asyncio.run(gateway_calls())
        assert erased["requests"] == 2 and erased["image_cache"] == 1 and erased["tenant_policies"] == 1
    finally:
        for session in sessions.values():
            session.cluster.shutdown()
