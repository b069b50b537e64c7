"""`detectflow tenants create|revoke NAME`: a tenant's Kafka principal, ingest topic and ACLs.

A system that produces images into Kafka connects as `tenant-<NAME>` and may write only
`<prefix>ingest.<NAME>` (docs/events.md, "Producing into Kafka as a tenant"; docs/security.md).
The operator runs these commands as the `admin` principal.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from config import Login, SettingsError, StackSettings, StreamSettings
from infra.stack.kafka_access import provision_tenant, revoke_tenant
from stream.ingest import principal
from stream.kafka import kafka_connection
from stream.topics import ingest_tenant, ingest_topic, tenant_replies_topic, tenant_topics


def run_tenants(stack: StackSettings, action: str, name: str, *, show_secret: bool = False, rotate: bool = False,
                delete_topic: bool = False) -> int:
    """`detectflow tenants create NAME [--show-secret] [--rotate]` and `tenants revoke NAME [--delete-topic]`."""
    try:
        tenant = ingest_tenant(name)
    except ValueError as exc:
        print(f"detectflow tenants: {exc}", file=sys.stderr)
        return 2
    stream = StreamSettings.from_env()
    if stream.kafka_users_dir is None:
        raise SettingsError("no Kafka credentials directory (DETECTFLOW_KAFKA_USERS_DIR)")
    admin = kafka_connection(stream, "admin")
    path = stream.kafka_users_dir / f"{principal(tenant)}.json"
    if action == "create":
        return _create(stream, admin, tenant, path, show_secret=show_secret, rotate=rotate)
    return _revoke(stream, admin, tenant, path, delete_topic=delete_topic)


def _create(stream: StreamSettings, admin: dict[str, Any], tenant: str, path: Path, *, show_secret: bool,
            rotate: bool) -> int:
    login = Login.create(path, principal(tenant)) if rotate else Login.load_or_create(path, principal(tenant))
    specs = tenant_topics(stream.topic_prefix, tenant, max_message_bytes=stream.max_message_bytes,
                          raw_retention_hours=stream.raw_retention_hours)
    actions = provision_tenant(admin, stream.topic_prefix, tenant, login.password, specs)
    for spec in specs:
        print(f"{spec.name:<42} {actions.get(spec.name, 'unchanged')}")
    ingest, replies = ingest_topic(stream.topic_prefix, tenant), tenant_replies_topic(stream.topic_prefix, tenant)
    print(f"\ntenant {tenant}: principal {login.username} may write {ingest} and read {replies}; every record on "
          f"{ingest} is tenant {tenant}'s (a record naming another tenant is REJECTED TENANT_MISMATCH)")
    print(f"credentials: {path} (0600)")
    password = login.password if show_secret else f"<the 'password' in {path}>"
    print("connect with (librdkafka / confluent-kafka):\n"
          f"  bootstrap.servers={stream.bootstrap}\n  security.protocol=SASL_SSL\n  sasl.mechanism=SCRAM-SHA-512\n"
          f"  sasl.username={login.username}\n  sasl.password={password}\n  ssl.ca.location={stream.tls_ca_file}")
    print(f"try it: detectflow detect --tenant {tenant} IMAGE")
    return 0


def _revoke(stream: StreamSettings, admin: dict[str, Any], tenant: str, path: Path, *, delete_topic: bool) -> int:
    had = revoke_tenant(admin, stream.topic_prefix, tenant, delete_topics=delete_topic)
    path.unlink(missing_ok=True)  # a revoked secret is no use to anyone
    print(f"tenant {tenant}: ACLs removed; SCRAM credential of {principal(tenant)} "
          f"{'removed' if had else 'was not there'}; {path} removed; "
          f"topics {'deleted' if delete_topic else 'kept'}")
    return 0

