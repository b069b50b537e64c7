"""The Cassandra grants table, the node's security settings and the client settings, without a node."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import Login, SettingsError, StackSettings, StreamSettings
from infra.stack.cassandra import CassandraService
from infra.stack.cassandra_access import ADMIN, MODIFY, ROLE_RIGHTS, SELECT, grant, role_name
from stream.cassandra import CQL_DIR, statements


def _schema_tables() -> set[str]:
    tables: set[str] = set()
    for path in sorted(CQL_DIR.glob("*.cql")):
        for stmt in statements(path, "ks"):
            m = re.match(r"CREATE TABLE IF NOT EXISTS ks\.(\w+)", stmt)
            if m:
                tables.add(m.group(1))
            m = re.match(r"DROP TABLE IF EXISTS ks\.(\w+)", stmt)
            if m:
                tables.discard(m.group(1))
    return tables


def test_every_table_of_the_schema_is_granted_to_some_role() -> None:
    granted = {table for rights in ROLE_RIGHTS.values() for table in rights}
    assert _schema_tables() - granted == set(), "a table no role may use: grant it in cassandra_access.py"


def test_every_granted_table_exists_in_the_schema() -> None:
    for role, rights in ROLE_RIGHTS.items():
        assert set(rights) <= _schema_tables(), role


def test_roles_get_only_select_and_modify_on_single_tables() -> None:
    assert ADMIN not in ROLE_RIGHTS
    for role, rights in ROLE_RIGHTS.items():
        for table, perms in rights.items():
            assert perms and set(perms) <= {SELECT, MODIFY}, (role, table, perms)
            assert len(set(perms)) == len(perms), (role, table)


def test_the_registry_is_the_only_writer_of_model_versions() -> None:
    writers = {role for role, rights in ROLE_RIGHTS.items() if MODIFY in rights.get("model_versions", ())}
    assert writers == {"registry"}
    # No pipeline stage may read the audit log or change routing, except the monitor's guarded rollback.
    assert {r for r, rights in ROLE_RIGHTS.items() if SELECT in rights.get("audit_log", ())} == {"gateway", "registry"}
    # Audit rows are written by the gateway, the registry, the monitor (an audited rollback) and the recorder
    # (TENANT_MISMATCH refusals); never by scan, which refuses them.
    assert {r for r, rights in ROLE_RIGHTS.items() if MODIFY in rights.get("audit_log", ())} == {
        "gateway", "registry", "monitor", "recorder"}
    assert {r for r, rights in ROLE_RIGHTS.items() if "model_routing" in rights} == {"monitor", "registry"}


def test_role_names_are_plain_identifiers() -> None:
    for role in (ADMIN, *ROLE_RIGHTS):
        assert re.fullmatch(r"detectflow_[a-z_]+", role_name(role))


class _RecordingSession:
    """Answers the grant read with ``held`` and records every statement run."""

    def __init__(self, held: dict[str, list[tuple[str, set[str]]]]):
        self.held = held
        self.statements: list[str] = []

    def execute(self, query: str, params: Any = None) -> Any:
        if query.startswith("SELECT resource, permissions FROM system_auth.role_permissions"):
            from types import SimpleNamespace

            return [SimpleNamespace(resource=r, permissions=p) for r, p in self.held.get(params[0], [])]
        self.statements.append(query)
        return []


def test_grant_adds_what_is_missing_and_revokes_what_is_not_declared() -> None:
    session = _RecordingSession({
        "detectflow_scan": [("data/ks/image_cache", {"SELECT", "MODIFY"}), ("data/ks/requests", {"SELECT"}),
                            ("data/other/requests", {"SELECT"})],
        "detectflow_bridge": [("data/ks/bridge_objects", {"SELECT", "MODIFY"})],
    })
    grant(session, "ks")
    ran = set(session.statements)
    assert "REVOKE MODIFY ON TABLE ks.image_cache FROM detectflow_scan" in ran
    assert "REVOKE SELECT ON TABLE ks.requests FROM detectflow_scan" in ran
    assert not any("other" in s for s in ran), "another keyspace's grants are left alone"
    assert not any("detectflow_bridge" in s for s in ran), "a role holding exactly its rights is not touched"
    expected = {f"GRANT {p} ON TABLE ks.{t} TO {role_name(r)}" for r, rights in ROLE_RIGHTS.items()
                for t, perms in rights.items() for p in perms if r not in ("bridge",)}
    expected.discard("GRANT SELECT ON TABLE ks.image_cache TO detectflow_scan")
    assert {s for s in ran if s.startswith("GRANT")} == expected


def test_the_node_requires_logins_and_tls(tmp_path: Path) -> None:
    conf = yaml.safe_load(CassandraService(StackSettings(home=tmp_path)).render_yaml())
    assert (conf["authenticator"], conf["authorizer"], conf["role_manager"]) == \
        ("PasswordAuthenticator", "CassandraAuthorizer", "CassandraRoleManager")
    tls = conf["client_encryption_options"]
    assert tls["enabled"] is True and tls["optional"] is False
    assert tls["ssl_context_factory"]["class_name"] == "org.apache.cassandra.security.PEMBasedSslContextFactory"
    assert tls["keystore"] == str(tmp_path / "secrets" / "tls" / "cassandra.pem")
    assert not set(tls["accepted_protocols"]) & {"TLSv1", "TLSv1.1", "SSLv3"}


def test_credentials_are_private_and_never_in_repr(tmp_path: Path) -> None:
    path = tmp_path / "cassandra" / "gateway.json"
    first = Login.load_or_create(path, "detectflow_gateway")
    assert Login.load_or_create(path, "detectflow_gateway") == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert first.password not in repr(first) and len(first.password) >= 32
    rotated = Login.create(path, "detectflow_gateway")
    assert rotated.password != first.password and Login.load(path) == rotated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_stream_settings_locate_credentials_and_ca(tmp_path: Path) -> None:
    s = StreamSettings.from_env({"DETECTFLOW_HOME": str(tmp_path)})
    assert s.cassandra_secrets_dir == tmp_path.resolve() / "secrets" / "cassandra"
    assert s.cassandra_ca_file == tmp_path.resolve() / "secrets" / "tls" / "ca.crt"
    s = StreamSettings.from_env({"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_CASSANDRA_SECRETS_DIR": "/run/secrets",
                                 "DETECTFLOW_CASSANDRA_CA_FILE": "/run/ca.crt"})
    assert (s.cassandra_secrets_dir, s.cassandra_ca_file) == (Path("/run/secrets"), Path("/run/ca.crt"))
    with pytest.raises(SettingsError, match="DETECTFLOW_CASSANDRA_CA_FILE"):
        StreamSettings.from_env({"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_CASSANDRA_CA_FILE": " "})
    with pytest.raises(SettingsError, match="invalid Cassandra role"):
        s.cassandra_credentials("../admin")
    with pytest.raises(SettingsError, match="stack up"):
        s.cassandra_credentials("gateway")  # no such file
    with pytest.raises(SettingsError, match="DETECTFLOW_CASSANDRA_SECRETS_DIR"):
        StreamSettings().cassandra_credentials("gateway")
