"""Kafka principals and their ACLs: each role reads only its inputs and writes only its outputs.

The broker (infra/stack/kafka.py) authenticates clients with SCRAM-SHA-512 over TLS on its client
listener, and its own traffic (inter-broker, controller) and the stack's bootstrap with mutual TLS on the
internal listener; ``StandardAuthorizer`` denies whatever no ACL allows. Super users: the broker's own
certificate and ``admin`` (operator tools, the stack, the test harness).

Each principal's SCRAM password is made once into ``<secrets>/kafka/<name>.json`` (0600). ACLs are per
deployment prefix (``DETECTFLOW_TOPIC_PREFIX``): `detectflow topics apply` writes a prefix's topics and
its ACLs together, so a second deployment on the same cluster gets its own grants, and a pipeline under
one prefix cannot touch another's topics.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from config import Login, StackSettings
from infra.stack.pki import Pki
from stream import topics
from stream.ingest import principal
from stream.kafka import kafka_admin, mtls_connection
from stream.topics import (
    LANES,
    detections_topic,
    dlq_topic,
    ingest_topic,
    lane_topic,
    replies_topic,
    retry_topic,
    tenant_replies_topic,
)

ADMIN = "admin"
BROKER_CN = "kafka-broker"
SCHEMA_REGISTRY_CN = "schema-registry"  # Apicurio's kafkasql storage, over mutual TLS
# SCRAM principals: the pipeline's roles, the gateway, the registry CLI, MinIO's notifier. A system producing
# into Kafka is a tenant principal, `tenant-<name>` (`detectflow tenants create`, ``tenant_bindings``).
ROLES = ("bridge", "scan", "preprocess", "inference", "postprocess", "recorder", "shadow", "monitor",
         "gateway", "registry", "minio")
# The stages that close a request themselves, so write a tenant's reply topic (emits_terminal_results).
TERMINAL_STAGES = ("scan", "preprocess", "inference", "postprocess")
MINIO_EVENTS = "minio.events"  # MinIO's notifier writes the unprefixed topic (infra/stack/minio.py)
REGISTRY_TOPICS = ("kafkasql-journal", "kafkasql-snapshots", "registry-events")  # infra/stack/registry.py
REGISTRY_GROUP_PREFIX = "apicurio-"  # Apicurio's kafkasql consumer groups: <prefix><uuid>
SCRAM_ITERATIONS = 8192


@dataclass(frozen=True)
class Grant:
    principal: str
    resource: str  # topic | group | transactional_id
    name: str
    operations: tuple[str, ...]  # read | write | describe | describe_configs
    prefixed: bool = False


def _topic(principal: str, names: Iterable[str], *ops: str) -> list[Grant]:
    return [Grant(principal, "topic", n, ops) for n in names]


def stage_grants(principal: str, prefix: str, inputs: Iterable[str], outputs: Iterable[str],
                 group: str | None = None) -> list[Grant]:
    """A stream-runtime stage: reads its inputs and their retry topics, writes its outputs, the retry and
    dead-letter topics of its inputs and terminal results (`detections`, the reply topic); its consumer
    group and transactional ids share the group's name."""
    inputs = list(inputs)
    group = group or f"{prefix}detectflow.{principal}"
    terminal = [detections_topic(prefix), replies_topic(prefix)]
    return [*_topic(principal, [*inputs, *(retry_topic(t) for t in inputs)], "read"),
            *_topic(principal, [*outputs, *(retry_topic(t) for t in inputs), *(dlq_topic(t) for t in inputs),
                                *terminal], "write"),
            Grant(principal, "group", group, ("read",), prefixed=True),
            Grant(principal, "transactional_id", group, ("write", "describe"), prefixed=True)]


def bindings(prefix: str = "") -> list[Grant]:
    """Every grant of one deployment prefix."""
    def lanes(step: str) -> list[str]:
        return [lane_topic(prefix, lane, step) for lane in LANES]

    models, audit, shadow = f"{prefix}models", f"{prefix}audit", f"{prefix}detections.shadow"
    watchers = ("scan", "inference", "shadow", "monitor", "gateway", "registry")  # model_store.control.watch readers
    watch = [g for p in watchers for g in _topic(p, [models], "read")]
    grants = [
        *stage_grants("bridge", prefix, [f"{prefix}{MINIO_EVENTS}"], [lane_topic(prefix, "batch", "submitted")]),
        # scan answers cache hits itself, so it publishes their AbuseEvents (processors/scan.py) too.
        *stage_grants("scan", prefix, lanes("submitted"), [*lanes("scanned"), f"{prefix}abuse"]),
        *stage_grants("preprocess", prefix, lanes("scanned"), lanes("preprocessed")),
        *stage_grants("inference", prefix, lanes("preprocessed"), [*lanes("inferred"), models]),
        *stage_grants("postprocess", prefix, lanes("inferred"), [f"{prefix}abuse"]),
        # The recorder audits TENANT_MISMATCH refusals (processors/recorder.py): scan may not write `audit`.
        *stage_grants("recorder", prefix, [detections_topic(prefix)], [f"{prefix}jobs.events", audit]),
        *stage_grants("shadow", prefix, lanes("preprocessed"), [shadow]),
        # The monitor's guardrail rolls a canary back through the registry: published on `models`, audited.
        *stage_grants("monitor", prefix, [detections_topic(prefix), shadow], [models, audit]),
        *watch,
        # The gateway submits, awaits replies, audits, and reads the stages' group offsets (online lag).
        *_topic("gateway", [*lanes("submitted"), audit], "write"),
        *_topic("gateway", [replies_topic(prefix)], "read"),
        *_topic("gateway", [t for step in ("submitted", "scanned", "preprocessed", "inferred") for t in lanes(step)],
                "describe"),
        Grant("gateway", "group", f"{prefix}detectflow.", ("describe",), prefixed=True),
        *_topic("registry", [models, audit], "write"),
    ]
    return grants


def retired_bindings(prefix: str = "") -> list[Grant]:
    """Grants earlier versions made and this one revokes (``provision`` deletes them): the generic `client`
    principal could write a submission for any tenant; systems producing into Kafka are tenants now."""
    return [*_topic("client", [lane_topic(prefix, lane, "submitted") for lane in LANES], "write"),
            *_topic("client", [replies_topic(prefix)], "read")]


def tenant_bindings(prefix: str, tenant: str) -> list[Grant]:
    """One tenant's grants (all LITERAL, so `ingest.a` never covers `ingest.ab` or `ingest.a.retry`): its
    principal writes its ingest topic and reads its reply topic; scan reads the ingest topic and its retry
    topic and writes their retry and dead-letter topics; the stages that close requests write its replies."""
    ingest, replies, who = ingest_topic(prefix, tenant), tenant_replies_topic(prefix, tenant), principal(tenant)
    return [*_topic(who, [ingest], "write"),
            *_topic(who, [replies], "read"),
            # Its request/reply client's consumer is assigned, never commits (stream/reply.py: the group id).
            Grant(who, "group", f"detectflow.replies.{who}.", ("read",), prefixed=True),
            *_topic("scan", [ingest, retry_topic(ingest)], "read"),
            *_topic("scan", [retry_topic(ingest), dlq_topic(ingest)], "write"),
            *(g for stage in TERMINAL_STAGES for g in _topic(stage, [replies], "write"))]


def global_bindings() -> list[Grant]:
    """Grants that no prefix owns: MinIO's notifier, Apicurio's storage, the assigned (never committing)
    consumers' group names."""
    assigned = [Grant(p, "group", g, ("read",), prefixed=True) for p in ROLES
                for g in ("models-watch-", "detectflow.replies.")]
    return [*_topic("minio", [MINIO_EVENTS], "write"),
            # It checks its topics' configs (retention, compaction) at start.
            *_topic(SCHEMA_REGISTRY_CN, REGISTRY_TOPICS, "read", "write", "describe", "describe_configs"),
            Grant(SCHEMA_REGISTRY_CN, "group", REGISTRY_GROUP_PREFIX, ("read",), prefixed=True),
            *assigned]


def _acl_bindings(grants: Iterable[Grant]) -> list[Any]:
    kinds = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP,
             "transactional_id": ResourceType.TRANSACTIONAL_ID}
    ops = {"read": AclOperation.READ, "write": AclOperation.WRITE, "describe": AclOperation.DESCRIBE,
           "describe_configs": AclOperation.DESCRIBE_CONFIGS}
    out = []
    for g in grants:
        for op in g.operations:
            out.append(AclBinding(kinds[g.resource], g.name,
                                  ResourcePatternType.PREFIXED if g.prefixed else ResourcePatternType.LITERAL,
                                  f"User:{g.principal}", "*", ops[op], AclPermissionType.ALLOW))
    return out


def apply_acls(kafka: Mapping[str, Any], grants: Iterable[Grant], *, timeout_s: float = 30.0) -> int:
    """Create the ACLs (creating one that exists is a no-op); returns how many were sent."""
    acls = _acl_bindings(grants)
    if acls:
        admin = kafka_admin(kafka)
        for future in admin.create_acls(acls, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)
        _await_acls(admin, acls, timeout_s)
    return len(acls)


def _await_acls(admin: Any, acls: list[Any], timeout_s: float) -> None:
    """Wait until the broker enforces the new ACLs: the controller commits them first, and the broker's
    authorizer applies them from its metadata log a moment later (a client that started in between was
    refused)."""
    wanted = {_key(b) for b in acls}
    any_acl = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY,
                               AclPermissionType.ANY)
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {_key(b) for b in admin.describe_acls(any_acl, request_timeout=timeout_s).result(timeout=timeout_s)}
        if wanted <= seen:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(wanted - seen)} ACLs not in effect after {timeout_s:.0f}s")
        time.sleep(0.05)


def _key(b: Any) -> tuple[Any, ...]:
    return (b.restype, b.name, b.resource_pattern_type, b.principal, b.operation, b.permission_type)


def delete_acls(kafka: Mapping[str, Any], grants: Iterable[Grant], *, timeout_s: float = 30.0) -> None:
    filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
                                b.permission_type) for b in _acl_bindings(grants)]
    if filters:
        admin = kafka_admin(kafka)
        for future in admin.delete_acls(filters, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)


def internal_admin(settings: StackSettings) -> dict[str, Any]:
    """The stack's own admin connection: mutual TLS on the internal listener (works before any SCRAM user)."""
    pki = Pki(settings.tls_dir)
    leaf = pki.leaf(ADMIN)
    return mtls_connection(f"{settings.host}:{settings.kafka_internal_port}", pki.ca_cert, leaf.cert, leaf.key)


def ensure_users(settings: StackSettings) -> None:
    """A SCRAM-SHA-512 credential per principal (password made once, 0600); re-sent on every `stack up`."""
    upserts = []
    for name in (ADMIN, *ROLES):
        login = Login.load_or_create(settings.kafka_users_dir / f"{name}.json", name)
        upserts.append(UserScramCredentialUpsertion(
            name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), login.password.encode(),
            secrets.token_bytes(16)))
    admin = kafka_admin(internal_admin(settings))
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=30).values():
        future.result(timeout=30)


def provision(kafka: Mapping[str, Any], prefix: str, specs: list[Any] | None = None) -> dict[str, str]:
    """A deployment prefix's topics (stream/topics.py) and its ACLs, together; idempotent."""
    actions = topics.apply(kafka, specs if specs is not None else topics.all_topics(prefix))
    apply_acls(kafka, bindings(prefix))
    delete_acls(kafka, retired_bindings(prefix))
    return actions


def deprovision(kafka: Mapping[str, Any], prefix: str) -> None:
    """Delete a prefix's topics and ACLs (test and benchmark prefixes)."""
    topics.delete(kafka, [spec.name for spec in topics.all_topics(prefix)])
    delete_acls(kafka, bindings(prefix))


# ---- tenants: `detectflow tenants create|revoke` --------------------------------------------------------------
def upsert_scram(kafka: Mapping[str, Any], name: str, password: str, *, timeout_s: float = 30.0) -> None:
    """Set ``name``'s SCRAM-SHA-512 credential (``kafka``: an admin connection)."""
    upsert = UserScramCredentialUpsertion(name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS),
                                          password.encode(), secrets.token_bytes(16))
    admin = kafka_admin(kafka)
    for future in admin.alter_user_scram_credentials([upsert], request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)


def delete_scram(kafka: Mapping[str, Any], name: str, *, timeout_s: float = 30.0) -> bool:
    """Remove ``name``'s SCRAM-SHA-512 credential: no new connection authenticates as it. False if it had none."""
    admin = kafka_admin(kafka)
    deletion = UserScramCredentialDeletion(name, ScramMechanism.SCRAM_SHA_512)
    for future in admin.alter_user_scram_credentials([deletion], request_timeout=timeout_s).values():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if "RESOURCE_NOT_FOUND" in str(exc):
                return False
            raise
    return True


def provision_tenant(kafka: Mapping[str, Any], prefix: str, tenant: str, password: str,
                     specs: list[Any] | None = None) -> dict[str, str]:
    """A tenant's topics, its SCRAM credential and its ACLs (``tenant_bindings``); idempotent."""
    actions = topics.apply(kafka, specs if specs is not None else topics.tenant_topics(prefix, tenant))
    upsert_scram(kafka, principal(tenant), password)
    apply_acls(kafka, tenant_bindings(prefix, tenant))
    return actions


def revoke_tenant(kafka: Mapping[str, Any], prefix: str, tenant: str, *, delete_topics: bool = False) -> bool:
    """Take a tenant's rights away: its ACLs (in effect at once, also on connections already open) and its SCRAM
    credential (no new connection); its topics go too with ``delete_topics``. False if it had no credential."""
    delete_acls(kafka, tenant_bindings(prefix, tenant))
    had = delete_scram(kafka, principal(tenant))
    if delete_topics:
        topics.delete(kafka, [spec.name for spec in topics.tenant_topics(prefix, tenant)])
    return had
