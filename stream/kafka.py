"""Kafka clients: the one place that writes librdkafka's configuration.

A *connection* says where the brokers are and who we are (SASL_SSL with SCRAM-SHA-512 as a principal, its
password read from the principal's credentials file, TLS verified against the project CA; or the stack's own
mutual-TLS listener). Producers, consumers and admin clients are built from a connection plus the few settings a
caller chooses (transactional id, group id, isolation level, compression, linger, record size), on top of the
defaults every client of ours shares:

- producers are idempotent with ``acks=all``: a retried send is never written twice, and a record is durable
  before its delivery report says so (the runtime commits input offsets only after that);
- consumers never auto-commit: offsets are committed by their owner once the outputs are durable;
- every client logs at warning level unless told otherwise (librdkafka's default is chatty);
- every client waits ``RECONNECT_BACKOFF_MS`` between attempts to reach a broker that is down (below).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from config import Login, SettingsError, StreamSettings

# Room for a record's headers and batch framing above the largest value we send (the producer's limit) ...
PRODUCE_HEADROOM = 64 * 1024
# ... and for a fetch response's framing above the largest record we read (the consumer's).
FETCH_HEADROOM = 1024 * 1024
# librdkafka's own fetch.max.bytes: a larger record limit raises it, never lowers it.
DEFAULT_FETCH_MAX = 52428800
LOG_WARNING = 3
# librdkafka asks for "any broker" every reconnect.backoff.ms / 2 while none is up, and each ask skips the
# doubling backoff: at its default (100 ms) every consumer dialled a stopped broker 20 times a second and
# logged each refusal (45 MB of logs in a 10-minute Kafka outage, docs/reliability.md). At 1 s it is 2 a second,
# and a client finds the broker back at most 0.5 s later.
RECONNECT_BACKOFF_MS = 1000


def scram_connection(bootstrap: str, username: str, password: str, ca_file: Path | str) -> dict[str, Any]:
    """SASL_SSL as ``username`` (SCRAM-SHA-512), the brokers' certificate verified against ``ca_file``."""
    return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": username, "sasl.password": password, "ssl.ca.location": str(ca_file)}


def mtls_connection(bootstrap: str, ca_file: Path | str, cert_file: Path | str, key_file: Path | str
                    ) -> dict[str, Any]:
    """Mutual TLS (the stack's internal listener: works before any SCRAM user exists)."""
    return {"bootstrap.servers": bootstrap, "security.protocol": "SSL", "ssl.ca.location": str(ca_file),
            "ssl.certificate.location": str(cert_file), "ssl.key.location": str(key_file)}


def plaintext_connection(bootstrap: str) -> dict[str, Any]:
    """No TLS, no login: only a throwaway broker of a benchmark listens like this."""
    return {"bootstrap.servers": bootstrap}


def kafka_connection(settings: StreamSettings, principal: str | None = None) -> dict[str, Any]:
    """The connection of ``principal`` (default: the settings' own) to the deployment's brokers."""
    name = principal or settings.kafka_user
    if settings.kafka_users_dir is None or settings.tls_ca_file is None:
        raise SettingsError("Kafka needs DETECTFLOW_KAFKA_USERS_DIR and DETECTFLOW_TLS_CA_FILE")
    if not name.replace("-", "").replace("_", "").isalnum():  # a role, or tenant-<tenant name>
        raise SettingsError(f"invalid Kafka principal {name!r}")
    password = Login.load(settings.kafka_users_dir / f"{name}.json").password
    return scram_connection(settings.bootstrap, name, password, settings.tls_ca_file)


def producer_config(connection: Mapping[str, Any], *, linger_ms: int, compression: str | None = None,
                    max_record_bytes: int | None = None, transactional_id: str | None = None,
                    log_level: int = LOG_WARNING, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An idempotent ``acks=all`` producer's settings. ``max_record_bytes``: the largest value it sends (the
    deployment's max_message_bytes); ``transactional_id`` makes it a transactional (exactly-once) producer."""
    conf: dict[str, Any] = {**connection, "enable.idempotence": True, "acks": "all", "linger.ms": linger_ms,
                            "log_level": log_level, "reconnect.backoff.ms": RECONNECT_BACKOFF_MS}
    if compression is not None:
        conf["compression.type"] = compression
    if max_record_bytes is not None:
        conf["message.max.bytes"] = max_record_bytes + PRODUCE_HEADROOM
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
    return {**conf, **(extra or {})}


def consumer_config(connection: Mapping[str, Any], group_id: str, *, isolation: str = "read_committed",
                    offset_reset: str | None = None, max_record_bytes: int | None = None,
                    log_level: int = LOG_WARNING, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A consumer's settings: auto-commit off, ``isolation`` (read_committed: aborted transactions' records are
    never seen), ``offset_reset`` where the group has no committed offset (librdkafka's default: the end).
    ``max_record_bytes``: the largest record it must be able to fetch."""
    conf: dict[str, Any] = {**connection, "group.id": group_id, "enable.auto.commit": False,
                            "isolation.level": isolation, "log_level": log_level,
                            "reconnect.backoff.ms": RECONNECT_BACKOFF_MS}
    if offset_reset is not None:
        conf["auto.offset.reset"] = offset_reset
    if max_record_bytes is not None:
        fetch_max = max_record_bytes + FETCH_HEADROOM
        conf.update({"fetch.max.bytes": max(fetch_max, DEFAULT_FETCH_MAX), "max.partition.fetch.bytes": fetch_max,
                     "message.max.bytes": fetch_max})
    return {**conf, **(extra or {})}


def admin_config(connection: Mapping[str, Any], *, log_level: int = LOG_WARNING,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {**connection, "log_level": log_level, "reconnect.backoff.ms": RECONNECT_BACKOFF_MS, **(extra or {})}


def kafka_producer(connection: Mapping[str, Any], **options: Any) -> Producer:
    """A Producer from ``producer_config(connection, **options)``."""
    return Producer(producer_config(connection, **options))


def kafka_consumer(connection: Mapping[str, Any], group_id: str, **options: Any) -> Consumer:
    """A Consumer from ``consumer_config(connection, group_id, **options)``."""
    return Consumer(consumer_config(connection, group_id, **options))


def kafka_admin(connection: Mapping[str, Any], **options: Any) -> AdminClient:
    """An AdminClient from ``admin_config(connection, **options)``."""
    return AdminClient(admin_config(connection, **options))
