"""`detectflow tenants create|revoke NAME`: a tenant's Kafka principal, ingest topic and ACLs.

A system that produces images into Kafka connects as `tenant-<NAME>` and may write only
`<prefix>ingest.<NAME>` (docs/events.md, "Producing into Kafka as a tenant"; docs/security.md).
The operator runs these commands as the `admin` principal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from config import Login, SettingsError, StackSettings, StreamSettings, kafka_client


def add_cli(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tenants", help="Kafka credentials of tenants producing into Kafka (their ingest topics)")
    ts = p.add_subparsers(dest="tenants_action", required=True)
    cr = ts.add_parser("create", help="issue the tenant's SCRAM credential, create its ingest topic and ACLs")
    cr.add_argument("name")
    cr.add_argument("--show-secret", action="store_true", help="also print the password")
    cr.add_argument("--rotate", action="store_true", help="issue a new password (the old one stops working)")
    rv = ts.add_parser("revoke", help="remove the tenant's SCRAM credential and ACLs")
    rv.add_argument("name")
    rv.add_argument("--delete-topic", action="store_true", help="also delete its ingest and reply topics")
    return p


def run_tenants(args: argparse.Namespace, stack: StackSettings) -> int:
    from stream.ingest import principal
    from stream.topics import ingest_tenant

    try:
        tenant = ingest_tenant(args.name)
    except ValueError as exc:
        print(f"detectflow tenants: {exc}", file=sys.stderr)
        return 2
    stream = StreamSettings.from_env()
    if stream.kafka_users_dir is None:
        raise SettingsError("no Kafka credentials directory (DETECTFLOW_KAFKA_USERS_DIR)")
    admin = kafka_client(stream, "admin")
    path = stream.kafka_users_dir / f"{principal(tenant)}.json"
    if args.tenants_action == "create":
        return _create(args, stream, admin, tenant, path)
    return _revoke(args, stream, admin, tenant, path)


def _create(args: argparse.Namespace, stream: StreamSettings, admin: dict[str, Any], tenant: str,
            path: Path) -> int:
    from infra.stack.kafka_access import provision_tenant
    from stream.ingest import principal
    from stream.topics import ingest_topic, tenant_replies_topic, tenant_topics

    login = Login.create(path, principal(tenant)) if args.rotate else Login.load_or_create(path, principal(tenant))
    specs = tenant_topics(stream.topic_prefix, tenant, max_message_bytes=stream.max_message_bytes,
                          raw_retention_hours=stream.raw_retention_hours)
    actions = provision_tenant(admin, stream.topic_prefix, tenant, login.password, specs)
    for spec in specs:
        print(f"{spec.name:<42} {actions.get(spec.name, 'unchanged')}")
    ingest, replies = ingest_topic(stream.topic_prefix, tenant), tenant_replies_topic(stream.topic_prefix, tenant)
    print(f"\ntenant {tenant}: principal {login.username} may write {ingest} and read {replies}; every record on "
          f"{ingest} is tenant {tenant}'s (a record naming another tenant is REJECTED TENANT_MISMATCH)")
    print(f"credentials: {path} (0600)")
    password = login.password if args.show_secret else f"<the 'password' in {path}>"
    print("connect with (librdkafka / confluent-kafka):\n"
          f"  bootstrap.servers={stream.bootstrap}\n  security.protocol=SASL_SSL\n  sasl.mechanism=SCRAM-SHA-512\n"
          f"  sasl.username={login.username}\n  sasl.password={password}\n  ssl.ca.location={stream.tls_ca_file}")
    print(f"try it: detectflow detect --tenant {tenant} IMAGE")
    return 0


def _revoke(args: argparse.Namespace, stream: StreamSettings, admin: dict[str, Any], tenant: str,
            path: Path) -> int:
    from infra.stack.kafka_access import revoke_tenant
    from stream.ingest import principal

    had = revoke_tenant(admin, stream.topic_prefix, tenant, delete_topics=args.delete_topic)
    path.unlink(missing_ok=True)  # a revoked secret is no use to anyone
    print(f"tenant {tenant}: ACLs removed; SCRAM credential of {principal(tenant)} "
          f"{'removed' if had else 'was not there'}; {path} removed; "
          f"topics {'deleted' if args.delete_topic else 'kept'}")
    return 0

