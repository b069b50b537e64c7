"""Cassandra roles, one per process: each logs in as a role granted only the tables that process uses.

Nothing but `detectflow stack` (and the test suite, as the operator) logs in as the admin role
``detectflow_admin``, a superuser made on the first start with authentication; the built-in ``cassandra``
superuser is then disabled (new random password, no login, no superuser). Each role's credentials are made
once into ``<secrets>/cassandra/<role>.json`` (0600), its password is set again and its grants are
written again on every `stack up` (rights no longer listed here are revoked), so a change of rights here
reaches a running stack at its next `up`. Schema changes (schemas/cql) run as the admin role only.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from config import Login, StackSettings
from infra.stack.base import StackError
from stream.cassandra import CassandraLoginRefused, apply_migrations, open_session

SELECT, MODIFY = "SELECT", "MODIFY"  # MODIFY is INSERT, UPDATE, DELETE and TRUNCATE
RW = (SELECT, MODIFY)  # also what a lightweight transaction (IF ...) needs: it reads before it writes

# The keyspace `stack up` migrates and grants; the test suite's own keyspace is prepared by grant_keyspace.
DEFAULT_KEYSPACE = "detectflow"
ADMIN = "admin"
DEFAULT_SUPERUSER = "cassandra"

# role -> table -> permissions. A role is a process kind (infra/roles.py), the gateway, or `detectflow models`.
ROLE_RIGHTS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    # One claim (LWT) per uploaded object, so a notification delivered twice yields one event (stream/bridge.py).
    "bridge": {"bridge_objects": RW},
    # Result-cache lookups before an image goes to the model (processors/scan.py); deleted images and the
    # tenant's content policy (processors/governance.py).
    # It indexes each request by image before checking the tombstones (so a deletion finds requests in flight).
    "scan": {"image_cache": (SELECT,), "image_requests": (MODIFY,), "image_tombstones": (SELECT,),
             "tenant_policies": (SELECT,)},
    # Results and cache entries (processors/results.py: save_results, cache_put), unless the image was deleted,
    # with the tenant's content policy applied.
    "postprocess": {"requests": (MODIFY,), "job_results": (MODIFY,), "image_requests": (MODIFY,),
                    "image_cache": (MODIFY,), "image_tombstones": (SELECT,), "tenant_policies": (SELECT,)},
    # Every terminal result (unless its image was deleted), a job's completion once its last item is in
    # (processors/jobs.py), and the audit rows of TENANT_MISMATCH refusals (processors/recorder.py; no reads).
    "recorder": {"requests": (MODIFY,), "job_results": RW, "image_requests": (MODIFY,), "jobs": RW,
                 "image_tombstones": (SELECT,), "audit_log": (MODIFY,)},
    # The HTTP API (gateway/store.py): requests, jobs, idempotency keys (LWT), quota (LWT), the instances
    # that share the rate limit (heartbeats), audit, tenant policies,
    # image deletion (which removes an image's results and cache rows and leaves a tombstone), tenant erasure
    # (which finds the tenant's partitions of every tenant-keyed table, image_cache included, then deletes them).
    "gateway": {"requests": RW, "job_results": RW, "image_requests": RW, "image_cache": RW, "jobs": RW,
                "idempotency_keys": RW, "image_tombstones": RW, "quota_daily": RW, "gateway_instances": RW,
                "audit_log": RW, "tenant_policies": RW},
    # The guardrail's rollback (LWT on routing, audited) and the shadow agreement counters (processors/monitor.py).
    "monitor": {"model_routing": RW, "shadow_agreement": (MODIFY,), "audit_log": (MODIFY,)},
    # `detectflow models` and the demo's bootstrap (model_store/control/registry.py): the registry's only writer.
    "registry": {"model_versions": RW, "model_routing": RW, "shadow_agreement": RW, "audit_log": RW},
}
ROLES = tuple(ROLE_RIGHTS)


def role_name(role: str) -> str:
    """The Cassandra role of a process role (``admin`` is the stack's superuser)."""
    return f"detectflow_{role.replace('-', '_')}"


def _literal(password: str) -> str:
    # Role options take string literals only (no bind markers); the passwords are URL-safe base64.
    if not password.replace("-", "").replace("_", "").isalnum():
        raise StackError("refusing a Cassandra password with characters outside [A-Za-z0-9_-]")
    return f"'{password}'"


def _path(settings: StackSettings, role: str) -> Any:
    return settings.cassandra_roles_dir / f"{role}.json"


def admin_credentials(settings: StackSettings) -> Login:
    """The admin role's login: only `detectflow stack` and the test suite (as the operator) use it."""
    return Login.load(_path(settings, ADMIN))


def _open(settings: StackSettings, creds: Login, timeout_s: float = 10.0) -> Any:
    return open_session([settings.host], settings.cassandra_port, creds, settings.tls_ca_file, timeout_s=timeout_s)


def admin_session(settings: StackSettings, timeout_s: float = 20.0) -> Any:
    """A session (no keyspace) as the admin role; the caller shuts down ``session.cluster``."""
    return _open(settings, admin_credentials(settings), timeout_s)


# ---- the admin role and the default superuser --------------------------------------------------------------
def ensure_admin(settings: StackSettings, deadline: float, log: Callable[[str], None] = lambda _m: None) -> None:
    """The admin superuser exists and its password is the one in admin.json; ``cassandra`` cannot log in.

    Idempotent: with a working admin login this is one login and one read. Otherwise (first start with
    authentication, or a crash between writing admin.json and creating the role) the default superuser
    ``cassandra``/``cassandra`` sets the admin role up with the password in admin.json (made if missing, never
    replaced). Cassandra creates that default role a few seconds after its first start, and a starting node may
    refuse logins briefly, so both logins are tried until ``deadline``.
    """
    path = _path(settings, ADMIN)
    default = Login(DEFAULT_SUPERUSER, DEFAULT_SUPERUSER)
    while True:
        if path.exists():
            try:
                admin = _open(settings, Login.load(path))
                break
            except CassandraLoginRefused:
                pass
        try:
            session = _open(settings, default)
        except CassandraLoginRefused as exc:
            if time.monotonic() > deadline:
                raise StackError(f"cassandra: neither the admin role ({path}) nor the default superuser could log "
                                 "in before the deadline; see docs/security.md (Cassandra) to recover") from exc
            time.sleep(0.5)  # the default role appears a few seconds after the first start
            continue
        try:
            creds = Login.load_or_create(path, role_name(ADMIN))
            exists = session.execute("SELECT role FROM system_auth.roles WHERE role = %s", (creds.username,)).one()
            session.execute(f"{'ALTER' if exists else 'CREATE'} ROLE {creds.username} WITH PASSWORD = "
                            f"{_literal(creds.password)} AND LOGIN = true AND SUPERUSER = true")
            log(f"  cassandra: admin role {creds.username} {'reset' if exists else 'created'} ({path})")
        finally:
            session.cluster.shutdown()
        admin = _wait_login(settings, Login.load(path), deadline)
        break
    try:
        _disable_default_superuser(admin, log)
    finally:
        admin.cluster.shutdown()


def _wait_login(settings: StackSettings, creds: Login, deadline: float) -> Any:
    while True:
        try:
            return _open(settings, creds)
        except CassandraLoginRefused:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the node's credentials cache (credentials_validity) may hold the old entry


def _disable_default_superuser(session: Any, log: Callable[[str], None]) -> None:
    row = session.execute("SELECT can_login, is_superuser FROM system_auth.roles WHERE role = %s",
                          (DEFAULT_SUPERUSER,)).one()
    if row is not None and (row.can_login or row.is_superuser):
        session.execute(f"ALTER ROLE {DEFAULT_SUPERUSER} WITH PASSWORD = {_literal(secrets.token_urlsafe(32))} "
                        "AND LOGIN = false AND SUPERUSER = false")
        log(f"  cassandra: default superuser {DEFAULT_SUPERUSER!r} disabled (no login, not superuser)")
    # As the creator of the admin role it was granted rights on it; a disabled role keeps nothing.
    for held in session.execute("SELECT resource FROM system_auth.role_permissions WHERE role = %s",
                                (DEFAULT_SUPERUSER,)):
        session.execute(f"REVOKE ALL ON {_cql_resource(held.resource)} FROM {DEFAULT_SUPERUSER}")


# ---- the process roles and their grants ---------------------------------------------------------------------
def ensure_roles(settings: StackSettings, session: Any) -> None:
    """Each role exists, can log in with the password in its credentials file, and is not a superuser."""
    for role in ROLE_RIGHTS:
        creds = Login.load_or_create(_path(settings, role), role_name(role))
        exists = session.execute("SELECT role FROM system_auth.roles WHERE role = %s", (creds.username,)).one()
        session.execute(f"{'ALTER' if exists else 'CREATE'} ROLE {creds.username} WITH PASSWORD = "
                        f"{_literal(creds.password)} AND LOGIN = true AND SUPERUSER = false")


def grant(session: Any, keyspace: str) -> None:
    """Grant each role exactly its ROLE_RIGHTS on ``keyspace``'s tables; revoke anything else it holds there."""
    for role, rights in ROLE_RIGHTS.items():
        name = role_name(role)
        wanted = {f"data/{keyspace}/{table}": set(perms) for table, perms in rights.items()}
        held = {row.resource: set(row.permissions or ())
                for row in session.execute("SELECT resource, permissions FROM system_auth.role_permissions "
                                           "WHERE role = %s", (name,))
                if row.resource == f"data/{keyspace}" or row.resource.startswith(f"data/{keyspace}/")}
        for resource, perms in held.items():
            for perm in sorted(perms - wanted.get(resource, set())):
                session.execute(f"REVOKE {perm} ON {_cql_resource(resource)} FROM {name}")
        for resource, perms in wanted.items():
            for perm in sorted(perms - held.get(resource, set())):
                session.execute(f"GRANT {perm} ON {_cql_resource(resource)} TO {name}")


def _cql_resource(resource: str) -> str:
    """A resource of system_auth.role_permissions as CQL names it."""
    kind, *names = resource.split("/")
    if kind == "data" and len(names) == 2:
        return f"TABLE {names[0]}.{names[1]}"
    if kind == "data" and len(names) == 1:
        return f"KEYSPACE {names[0]}"
    if kind == "data" and not names:
        return "ALL KEYSPACES"
    if kind == "roles" and len(names) == 1:
        return f"ROLE {names[0]}"
    if kind == "roles" and not names:
        return "ALL ROLES"
    raise StackError(f"unexpected Cassandra resource {resource!r}")


def grant_keyspace(settings: StackSettings, keyspace: str) -> None:
    """Apply schemas/cql to ``keyspace`` as the admin role, then grant every role its tables there.

    `stack up` does this for the default keyspace; the test suite for its own after recreating it.
    """
    session = admin_session(settings)
    try:
        apply_migrations(session, keyspace)
        grant(session, keyspace)
    finally:
        session.cluster.shutdown()


def drop_keyspace(settings: StackSettings, keyspace: str) -> None:
    """DROP KEYSPACE as the admin role (Cassandra revokes every grant on it with it)."""
    session = admin_session(settings)
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        # The revocation runs after the drop, asynchronously: a keyspace re-created and granted at once
        # could lose the new grants to it. Wait until no grant on the keyspace is left.
        deadline = time.monotonic() + 60
        while any(r.resource.startswith(f"data/{keyspace}") for r in session.execute(
                "SELECT resource FROM system_auth.role_permissions", timeout=30)):
            if time.monotonic() > deadline:
                raise StackError(f"grants on the dropped keyspace {keyspace} were not revoked within 60 s")
            time.sleep(0.2)
    finally:
        session.cluster.shutdown()


def ensure_access(settings: StackSettings, deadline: float, log: Callable[[str], None] = lambda _m: None) -> None:
    """`stack up`: the admin role, the default keyspace's schema, each role with its grants; idempotent."""
    ensure_admin(settings, deadline, log)
    session = admin_session(settings)
    try:
        ensure_roles(settings, session)
    finally:
        session.cluster.shutdown()
    grant_keyspace(settings, DEFAULT_KEYSPACE)
    log(f"  cassandra: {len(ROLE_RIGHTS)} roles, each granted only its tables (credentials in "
        f"{settings.cassandra_roles_dir})")
