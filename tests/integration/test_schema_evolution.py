"""Schema evolution through the real registry: BACKWARD_TRANSITIVE, both read directions."""

from __future__ import annotations

import io
import json
import struct

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from stream_kit import new_prefix, submission

import schemas
from config import StackSettings
from stream.serde import COMPATIBILITY, AvroSerde, registry_config, subject_for


def _evolved(add_field: dict) -> dict:
    schema = json.loads(schemas.expanded("ImageSubmitted"))
    schema["fields"].append(add_field)
    return schema


def _frame(schema_id: int, parsed: object, record: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


@pytest.fixture
def topic() -> str:
    return new_prefix() + "evolution"


def test_old_reader_decodes_a_new_event_and_new_reader_an_old_one(stack: StackSettings, topic: str) -> None:
    registry = SchemaRegistryClient(registry_config(stack.registry_url, stack.tls_ca_file))
    serde = AvroSerde(registry)
    old_bytes = serde.encode(topic, "ImageSubmitted", submission("evo-old"))
    assert registry.get_compatibility(subject_for(topic)) in (COMPATIBILITY, {"compatibilityLevel": COMPATIBILITY})

    new_schema = _evolved({"name": "priority", "type": "int", "default": 0, "doc": "Scheduling priority."})
    new_id = registry.register_schema(subject_for(topic), Schema(json.dumps(new_schema), "AVRO"))
    new_parsed = fastavro.parse_schema(new_schema)
    new_bytes = _frame(new_id, new_parsed, {**submission("evo-new"), "priority": 7})

    # Our (old) reader reads the new writer's record: the unknown field is skipped.
    decoded = serde.decode(new_bytes, "ImageSubmitted")
    assert decoded["request_id"] == "evo-new" and "priority" not in decoded

    # A new reader reads our old record: the added field takes its default.
    old = fastavro.schemaless_reader(io.BytesIO(old_bytes[5:]), schemas.parsed("ImageSubmitted"), new_parsed)
    assert old["request_id"] == "evo-old" and old["priority"] == 0


def test_registry_refuses_an_incompatible_change(stack: StackSettings, topic: str) -> None:
    registry = SchemaRegistryClient(registry_config(stack.registry_url, stack.tls_ca_file))
    AvroSerde(registry).encode(topic, "ImageSubmitted", submission("evo-1"))
    # A new required field without a default cannot read old records.
    breaking = _evolved({"name": "required_now", "type": "string", "doc": "No default."})
    with pytest.raises(SchemaRegistryError) as info:
        registry.register_schema(subject_for(topic), Schema(json.dumps(breaking), "AVRO"))
    assert info.value.http_status_code == 409
    # A type change of an existing field is refused as well.
    retyped = json.loads(schemas.expanded("ImageSubmitted"))
    next(f for f in retyped["fields"] if f["name"] == "tenant")["type"] = "int"
    with pytest.raises(SchemaRegistryError):
        registry.register_schema(subject_for(topic), Schema(json.dumps(retyped), "AVRO"))



def _first_encodes_at_once(stack: StackSettings, topic: str, processes: int) -> tuple[list[int], list[BaseException]]:
    """``processes`` serdes (each its own registry client) ask for ``topic``'s schema id at one instant."""
    import threading

    serdes = [AvroSerde.from_url(stack.registry_url, stack.tls_ca_file) for _ in range(processes)]
    start = threading.Barrier(processes)
    ids: list[int] = []
    errors: list[BaseException] = []

    def first_encode(serde: AvroSerde) -> None:
        start.wait(timeout=30)
        try:
            ids.append(serde.schema_id(topic, "ImageSubmitted"))
        except BaseException as exc:  # collected and asserted by the caller
            errors.append(exc)

    threads = [threading.Thread(target=first_encode, args=(s,)) for s in serdes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return ids, errors


def test_processes_registering_a_new_subject_at_once_all_succeed(stack: StackSettings) -> None:
    """Every stage registers its output schema on first use; on a fresh topic several processes do it
    at the same moment (they race to set the subject's compatibility rule), and none may fail."""
    for round_ in range(3):
        topic = new_prefix() + f"race{round_}"
        ids, errors = _first_encodes_at_once(stack, topic, 8)
        assert not errors, errors[:2]
        assert len(ids) == 8 and len(set(ids)) == 1, ids
        registry = SchemaRegistryClient(registry_config(stack.registry_url, stack.tls_ca_file))
        assert registry.get_compatibility(subject_for(topic)) == COMPATIBILITY
