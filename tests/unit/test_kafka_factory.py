"""stream/kafka.py: the librdkafka settings each kind of client gets, and no other module writing them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from config import Login, SettingsError, StreamSettings
from stream.kafka import (
    admin_config,
    consumer_config,
    kafka_admin,
    kafka_connection,
    kafka_consumer,
    kafka_producer,
    mtls_connection,
    producer_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> StreamSettings:
    users = tmp_path / "users"
    users.mkdir()
    Login.create(users / "scan.json", "scan")
    Login.create(users / "admin.json", "admin")
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a client dials")
    return StreamSettings.from_env({}).replace(kafka_users_dir=users, tls_ca_file=ca, kafka_user="scan",
                                               bootstrap="127.0.0.1:9092")


def test_a_connection_is_scram_over_verified_tls_as_the_principal(settings: StreamSettings) -> None:
    conn = kafka_connection(settings)
    assert conn == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "scan",
                    "sasl.password": Login.load(settings.kafka_users_dir / "scan.json").password,  # type: ignore[operator]
                    "ssl.ca.location": str(settings.tls_ca_file)}
    assert kafka_connection(settings, "admin")["sasl.username"] == "admin"


def test_a_connection_refuses_a_bad_principal_or_missing_files(settings: StreamSettings) -> None:
    with pytest.raises(SettingsError, match="invalid Kafka principal"):
        kafka_connection(settings, "../admin")
    with pytest.raises(SettingsError, match="cannot read credentials"):
        kafka_connection(settings, "recorder")  # no credentials file
    with pytest.raises(SettingsError, match="DETECTFLOW_KAFKA_USERS_DIR"):
        kafka_connection(settings.replace(kafka_users_dir=None))


def test_the_mtls_connection_names_the_client_certificate() -> None:
    assert mtls_connection("h:9094", "ca.pem", "admin.pem", "admin.key") == {
        "bootstrap.servers": "h:9094", "security.protocol": "SSL", "ssl.ca.location": "ca.pem",
        "ssl.certificate.location": "admin.pem", "ssl.key.location": "admin.key"}


CONN = {"bootstrap.servers": "b:1"}


def test_a_producer_is_idempotent_with_acks_all_and_what_the_caller_chose() -> None:
    assert producer_config(CONN, linger_ms=5) == {"bootstrap.servers": "b:1", "enable.idempotence": True,
                                                  "acks": "all", "linger.ms": 5, "log_level": 3,
                                                  "reconnect.backoff.ms": 1000}
    conf = producer_config(CONN, linger_ms=2, compression="lz4", max_record_bytes=1_000_000,
                           transactional_id="scan-0", log_level=4, extra={"message.timeout.ms": 15000})
    assert conf == {"bootstrap.servers": "b:1", "enable.idempotence": True, "acks": "all", "linger.ms": 2,
                    "log_level": 4, "reconnect.backoff.ms": 1000, "compression.type": "lz4",
                    "message.max.bytes": 1_000_000 + 64 * 1024,
                    "transactional.id": "scan-0", "message.timeout.ms": 15000}


def test_a_consumer_never_auto_commits_and_reads_committed_unless_told() -> None:
    assert consumer_config(CONN, "g") == {"bootstrap.servers": "b:1", "group.id": "g", "enable.auto.commit": False,
                                          "isolation.level": "read_committed", "log_level": 3,
                                          "reconnect.backoff.ms": 1000}
    conf = consumer_config(CONN, "g", isolation="read_uncommitted", offset_reset="earliest",
                           max_record_bytes=16 * 1024 * 1024, extra={"enable.partition.eof": True})
    fetch = 17 * 1024 * 1024
    assert conf == {"bootstrap.servers": "b:1", "group.id": "g", "enable.auto.commit": False,
                    "isolation.level": "read_uncommitted", "log_level": 3, "reconnect.backoff.ms": 1000,
                    "auto.offset.reset": "earliest",
                    "fetch.max.bytes": 52428800, "max.partition.fetch.bytes": fetch, "message.max.bytes": fetch,
                    "enable.partition.eof": True}
    # A record limit above librdkafka's own fetch.max.bytes raises it (a fetch must hold one record).
    big = consumer_config(CONN, "g", max_record_bytes=64 * 1024 * 1024)
    assert big["fetch.max.bytes"] == big["max.partition.fetch.bytes"] == 65 * 1024 * 1024


def test_an_admin_logs_warnings_only_and_backs_off_reconnects_unless_told() -> None:
    assert admin_config(CONN) == {"bootstrap.servers": "b:1", "log_level": 3, "reconnect.backoff.ms": 1000}
    assert admin_config(CONN, log_level=0, extra={"socket.timeout.ms": 2000, "reconnect.backoff.ms": 100}) == {
        "bootstrap.servers": "b:1", "log_level": 0, "socket.timeout.ms": 2000, "reconnect.backoff.ms": 100}


def test_the_factory_builds_clients_librdkafka_accepts() -> None:
    """librdkafka checks a configuration when the client is made (no broker needed): each kind's settings are
    accepted as they are, the transactional producer's too."""
    producer = kafka_producer(CONN, linger_ms=2, compression="lz4", max_record_bytes=16 * 1024 * 1024,
                              transactional_id="t-0")
    consumer = kafka_consumer(CONN, "g", offset_reset="earliest", max_record_bytes=16 * 1024 * 1024)
    admin = kafka_admin(CONN)
    assert isinstance(producer, Producer) and isinstance(consumer, Consumer) and isinstance(admin, AdminClient)
    consumer.close()


def test_no_other_module_writes_librdkafka_settings_or_makes_clients() -> None:
    made_by_hand = {"Producer", "Consumer", "AdminClient"}
    base_keys = {"bootstrap.servers", "security.protocol", "sasl.mechanism", "enable.idempotence",
                 "enable.auto.commit", "group.id", "transactional.id", "isolation.level"}
    offenders = []
    for package in ("stream", "processors", "gateway", "model_store", "infra"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "stream/kafka.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in made_by_hand:
                    offenders.append(f"{rel}:{node.lineno} {node.func.id}(...)")
                if isinstance(node, ast.Dict):  # writing a setting (reading one for a message is fine)
                    offenders += [f"{rel}:{node.lineno} {k.value!r}" for k in node.keys
                                  if isinstance(k, ast.Constant) and k.value in base_keys]
    assert offenders == []
