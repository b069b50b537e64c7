"""Schema registry (Apicurio, Confluent API): the calls the pipeline makes, through confluent-kafka.

Apicurio's Confluent compatibility layer has had gaps; each call detectflow relies on
is exercised here against the real service.
"""

from __future__ import annotations

import json
import secrets

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from config import StackSettings
from infra.stack import manager
from stream.serde import registry_config


def _record_schema(name: str, extra_fields: list[dict[str, object]] | None = None) -> Schema:
    fields: list[dict[str, object]] = [
        {"name": "image_id", "type": "string"},
        {"name": "size_bytes", "type": "long"},
        *(extra_fields or []),
    ]
    return Schema(json.dumps({"type": "record", "name": name, "namespace": "it.detectflow", "fields": fields}),
                  "AVRO")


def _client(stack: StackSettings) -> SchemaRegistryClient:
    # A new client per use: its cache must not answer for the server.
    return SchemaRegistryClient(registry_config(stack.registry_url, stack.tls_ca_file))


@pytest.fixture()
def subject() -> str:
    return f"it-{secrets.token_hex(6)}-value"


def test_register_then_fetch_by_id_and_latest(stack: StackSettings, subject: str) -> None:
    schema = _record_schema("Fetched")
    schema_id = _client(stack).register_schema(subject, schema)
    assert _client(stack).register_schema(subject, schema) == schema_id, "re-registering must be idempotent"

    by_id = _client(stack).get_schema(schema_id)
    assert by_id.schema_type == "AVRO"
    assert json.loads(by_id.schema_str)["name"] == "Fetched"

    latest = _client(stack).get_latest_version(subject)
    assert latest.schema_id == schema_id
    assert latest.version == 1
    assert json.loads(latest.schema.schema_str)["fields"] == json.loads(schema.schema_str)["fields"]


def test_avro_serde_uses_confluent_framing(stack: StackSettings, subject: str) -> None:
    schema = _record_schema("Framed")
    topic = subject.removesuffix("-value")
    ctx = SerializationContext(topic, MessageField.VALUE)
    record = {"image_id": "img-" + secrets.token_hex(4), "size_bytes": 123_456}

    payload = AvroSerializer(_client(stack), schema.schema_str)(record, ctx)
    assert payload is not None
    # Confluent wire format: magic byte 0, then the 4-byte big-endian schema id.
    assert payload[0] == 0
    schema_id = int.from_bytes(payload[1:5], "big")
    assert _client(stack).get_latest_version(subject).schema_id == schema_id

    # The reader learns the schema from the registry, by the id in the frame.
    assert AvroDeserializer(_client(stack))(payload, ctx) == record


def test_backward_transitive_refuses_incompatible_change(stack: StackSettings, subject: str) -> None:
    client = _client(stack)
    client.register_schema(subject, _record_schema("Evolving"))
    # confluent-kafka returns the response body ({"compatibility": ...}) despite its `-> str` hint.
    answer: object = client.set_compatibility(subject, "BACKWARD_TRANSITIVE")
    assert answer == "BACKWARD_TRANSITIVE" or (isinstance(answer, dict)
                                               and answer["compatibility"] == "BACKWARD_TRANSITIVE")
    assert _client(stack).get_compatibility(subject) == "BACKWARD_TRANSITIVE"

    # A new optional field with a default can read every older record.
    compatible = _record_schema("Evolving", [{"name": "tenant", "type": ["null", "string"], "default": None}])
    assert client.test_compatibility(subject, compatible)
    client.register_schema(subject, compatible)

    # A new required field cannot read older records that lack it.
    incompatible = _record_schema("Evolving", [{"name": "lane", "type": "string"}])
    assert not client.test_compatibility(subject, incompatible)
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, incompatible)
    assert refused.value.http_status_code == 409
    assert _client(stack).get_latest_version(subject).version == 2


@pytest.mark.restart
def test_schemas_survive_a_restart(stack: StackSettings, subject: str) -> None:
    schema_id = _client(stack).register_schema(subject, _record_schema("Durable"))

    # Kafka holds the registry's journal, so both restart; the rest of the stack stays up.
    manager.down(stack, ["kafka", "registry"])
    assert not any(h.running for h in manager.status(stack, ["kafka", "registry"]))
    manager.up(stack, ["kafka", "registry"])

    assert json.loads(_client(stack).get_schema(schema_id).schema_str)["name"] == "Durable"
    assert _client(stack).get_latest_version(subject).schema_id == schema_id
    # A schema registered after the restart gets a fresh id, not a reused one.
    assert _client(stack).register_schema(f"{subject}-after", _record_schema("Later")) != schema_id
