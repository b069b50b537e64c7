"""The stream package's pure parts: schemas, serde framing, headers, topics, records, routing helpers."""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

import schemas
from stream import headers as H
from stream.records import terminal_result
from stream.runtime import lane_of, origin_of, result_outputs
from stream.serde import COMPATIBILITY, MAGIC, AvroSerde, DecodeError, RegistryUnavailable, SerdeError, epoch_ms
from stream.topics import LANES, STAGE_INPUTS, all_topics, detections_topic, dlq_topic, lane_topic, retry_topic

AVSC_FILES = sorted(schemas.SCHEMA_DIR.glob("*.avsc"))
NAMED_KINDS = ("record", "enum", "fixed", "error")


# ---- schemas ---------------------------------------------------------------------------------------
def _definitions(node: Any, namespace: str = schemas.NAMESPACE) -> Iterator[tuple[str, dict[str, Any]]]:
    """(fullname, definition) of every named type defined anywhere in a schema tree."""
    if isinstance(node, list):
        for branch in node:
            yield from _definitions(branch, namespace)
    elif isinstance(node, dict):
        if node.get("type") in NAMED_KINDS:
            ns = node.get("namespace", namespace)
            yield (node["name"] if "." in node["name"] else f"{ns}.{node['name']}"), node
            namespace = ns
        for key in ("type", "items", "values", "fields"):
            if key in node:
                yield from _definitions(node[key], namespace)


def test_schema_files_are_named_by_their_full_name() -> None:
    assert len(AVSC_FILES) >= len(schemas.EVENTS)
    for path in AVSC_FILES:
        raw = json.loads(path.read_text())
        assert path.name == f"{raw['namespace']}.{raw['name']}.avsc"


@pytest.mark.parametrize("path", AVSC_FILES, ids=lambda p: Path(p).stem.rsplit(".", 1)[-1])
def test_every_type_and_field_has_a_doc(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert raw.get("doc", "").strip(), f"{path.name} has no doc"
    for fld in raw.get("fields", []):
        assert isinstance(fld.get("doc"), str) and fld["doc"].strip(), f"{path.name}:{fld['name']} has no doc"


@pytest.mark.parametrize("event", schemas.EVENTS)
def test_expanded_schema_is_self_contained_and_parses(event: str) -> None:
    tree = json.loads(schemas.expanded(event))
    # A fresh named_schemas: a reference to a type defined elsewhere would fail here.
    fastavro.parse_schema(tree, named_schemas={})
    defined = Counter(name for name, _ in _definitions(tree))
    assert defined[schemas.fullname(event)] == 1
    assert [name for name, n in defined.items() if n != 1] == []


@pytest.mark.parametrize("event", schemas.EVENTS)
def test_expanded_schema_keeps_every_doc(event: str) -> None:
    tree = json.loads(schemas.expanded(event))
    for name, definition in _definitions(tree):
        assert definition.get("doc", "").strip(), f"{name} lost its doc"
        for fld in definition.get("fields", []):
            assert fld.get("doc", "").strip(), f"{name}.{fld['name']} lost its doc"


def test_expanded_inlines_shared_types_once_per_schema() -> None:
    # ImageScanned meets ObjectRef twice (context.source and image): defined once, then referenced.
    text = schemas.expanded("ImageScanned")
    defined = Counter(name for name, _ in _definitions(json.loads(text)))
    assert defined["io.detectflow.events.ObjectRef"] == 1
    assert text.count('"io.detectflow.events.ObjectRef"') >= 1


def test_unknown_schema_is_reported() -> None:
    with pytest.raises(schemas.SchemaNotFound):
        schemas.raw("NoSuchEvent")


# ---- serde -------------------------------------------------------------------------------------------
class FakeRegistry:
    """The four SchemaRegistryClient calls AvroSerde makes, in memory."""

    def __init__(self, first_id: int = 0x01020304, compatibility: str | None = None):
        self.next_id = first_id
        self.by_id: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.compat: dict[str, str] = {}
        self.default_compat = compatibility
        self.calls: Counter[str] = Counter()
        self.fail_with: SchemaRegistryError | None = None

    def register_schema(self, subject: str, schema: Schema) -> int:
        self.calls["register_schema"] += 1
        known = {text: known_id for known_id, text in self.by_id.items()}
        schema_id = known.get(schema.schema_str)
        if schema_id is None:
            schema_id, self.next_id = self.next_id, self.next_id + 1
            self.by_id[schema_id] = schema.schema_str
        self.subjects.setdefault(subject, []).append(schema_id)
        return schema_id

    def get_schema(self, schema_id: int, *_args: Any, **_kwargs: Any) -> Schema:
        self.calls["get_schema"] += 1
        if self.fail_with is not None:
            raise self.fail_with
        if schema_id not in self.by_id:
            raise SchemaRegistryError(404, 40403, f"schema {schema_id} not found")
        return Schema(self.by_id[schema_id], "AVRO")

    def get_compatibility(self, subject: str) -> str:
        self.calls["get_compatibility"] += 1
        level = self.compat.get(subject, self.default_compat)
        if level is None:
            raise SchemaRegistryError(404, 40401, f"subject {subject} not found")
        return level

    def set_compatibility(self, subject: str, level: str) -> dict[str, str]:
        self.calls["set_compatibility"] += 1
        self.compat[subject] = level
        return {"compatibility": level}

    def config(self) -> dict[str, Any]:  # read by confluent's deserializers when they configure rule executors
        return {}


def _submission(request_id: str = "req-1") -> dict[str, Any]:
    return {
        "request_id": request_id, "tenant": "t1",
        "image": {"data": b"\xff\xd8\xff", "sha256": None, "content_type": "image/jpeg", "stored": None},
        "lane": "ONLINE", "model": {"name": "yolov4-tiny", "version": 2},
        "params": {"score_threshold": 0.25, "max_detections": None, "classes": ["person"]},
        "deadline_ms": 1_700_000_005_000, "idempotency_key": None, "job_id": "job-9",
        "submitted_at": 1_700_000_000_000,
    }


def test_encode_frames_confluent_style_and_decodes_back() -> None:
    registry = FakeRegistry(first_id=0x01020304)
    serde = AvroSerde(registry)  # type: ignore[arg-type]
    data = serde.encode("detect.online.submitted", "ImageSubmitted", _submission())
    assert data[:5] == b"\x00\x01\x02\x03\x04"  # magic 0, then the id big-endian
    assert struct.unpack(">bI", data[:5]) == (MAGIC, 0x01020304)
    assert registry.subjects == {"detect.online.submitted-value": [0x01020304]}
    assert registry.by_id[0x01020304] == schemas.expanded("ImageSubmitted")
    assert registry.compat == {"detect.online.submitted-value": COMPATIBILITY}

    # A fresh serde has no writer cached: it fetches the writer schema by id.
    decoded = AvroSerde(registry).decode(data, "ImageSubmitted")  # type: ignore[arg-type]
    assert registry.calls["get_schema"] == 1
    assert decoded["image"] == _submission()["image"]
    assert decoded["params"] == _submission()["params"]
    assert isinstance(decoded["submitted_at"], dt.datetime)
    assert epoch_ms(decoded["submitted_at"]) == 1_700_000_000_000
    assert epoch_ms(decoded["deadline_ms"]) == 1_700_000_005_000
    assert {k: v for k, v in decoded.items() if k not in ("submitted_at", "deadline_ms")} == {
        k: v for k, v in _submission().items() if k not in ("submitted_at", "deadline_ms")}


def test_ids_are_cached_per_topic_and_event() -> None:
    registry = FakeRegistry()
    serde = AvroSerde(registry)  # type: ignore[arg-type]
    first = serde.encode("a", "ImageSubmitted", _submission("1"))
    second = serde.encode("a", "ImageSubmitted", _submission("2"))
    assert first[:5] == second[:5]
    assert registry.calls["register_schema"] == 1
    serde.encode("b", "ImageSubmitted", _submission("3"))
    assert registry.calls["register_schema"] == 2
    assert sorted(registry.subjects) == ["a-value", "b-value"]
    # The encoder's own writers are cached: decoding needs no registry lookup.
    assert serde.decode(second, "ImageSubmitted")["request_id"] == "2"
    assert registry.calls["get_schema"] == 0


def test_compatibility_is_left_alone_when_already_set() -> None:
    registry = FakeRegistry(compatibility=COMPATIBILITY)
    AvroSerde(registry).encode("c", "ImageSubmitted", _submission())  # type: ignore[arg-type]
    assert registry.calls["set_compatibility"] == 0


class RacingRegistry(FakeRegistry):
    """Another process sets the subject's rule between our read and our write (Apicurio: 409)."""

    def __init__(self, winner_sets: str):
        super().__init__()
        self.winner_sets = winner_sets

    def set_compatibility(self, subject: str, level: str) -> dict[str, str]:
        self.calls["set_compatibility"] += 1
        self.compat[subject] = self.winner_sets
        raise SchemaRegistryError(409, 0, "A rule named 'COMPATIBILITY' already exists.")


def test_losing_the_race_to_set_the_rule_is_fine_when_the_winner_set_ours() -> None:
    registry = RacingRegistry(winner_sets=COMPATIBILITY)
    data = AvroSerde(registry).encode("r", "ImageSubmitted", _submission())  # type: ignore[arg-type]
    assert data[0] == MAGIC and registry.subjects == {"r-value": [registry.next_id - 1]}


def test_losing_the_race_to_another_rule_is_an_error() -> None:
    registry = RacingRegistry(winner_sets="NONE")
    with pytest.raises(SerdeError, match="already exists"):
        AvroSerde(registry).encode("r", "ImageSubmitted", _submission())  # type: ignore[arg-type]
    assert registry.calls["register_schema"] == 0


def test_a_record_that_does_not_fit_its_schema_is_a_serde_error() -> None:
    serde = AvroSerde(FakeRegistry())  # type: ignore[arg-type]
    broken = _submission()
    del broken["tenant"]
    with pytest.raises(SerdeError):
        serde.encode("d", "ImageSubmitted", broken)


@pytest.mark.parametrize("data", [None, b"", b"\x00", b"\x00\x00\x00\x01"], ids=["none", "empty", "1B", "4B"])
def test_short_input_is_a_decode_error(data: bytes | None) -> None:
    with pytest.raises(DecodeError):
        AvroSerde(FakeRegistry()).decode(data, "ImageSubmitted")  # type: ignore[arg-type]


def test_unknown_magic_byte_is_a_decode_error() -> None:
    serde = AvroSerde(FakeRegistry())  # type: ignore[arg-type]
    good = serde.encode("e", "ImageSubmitted", _submission())
    with pytest.raises(DecodeError, match="magic"):
        serde.decode(b"\x01" + good[1:], "ImageSubmitted")


def test_garbage_after_a_valid_header_is_a_decode_error() -> None:
    serde = AvroSerde(FakeRegistry())  # type: ignore[arg-type]
    good = serde.encode("f", "ImageSubmitted", _submission())
    with pytest.raises(DecodeError):
        serde.decode(good[:5] + b"\xff\xff\xff", "ImageSubmitted")
    with pytest.raises(DecodeError):
        serde.decode(good[:-20], "ImageSubmitted")


def test_unknown_schema_id_is_a_decode_error_and_a_registry_fault_is_transient() -> None:
    registry = FakeRegistry()
    with pytest.raises(DecodeError, match="not in the registry"):
        AvroSerde(registry).decode(b"\x00\x00\x00\x00\x63" + b"\x02", "ImageSubmitted")  # type: ignore[arg-type]
    registry.fail_with = SchemaRegistryError(500, 50001, "boom")
    with pytest.raises(RegistryUnavailable):
        AvroSerde(registry).decode(b"\x00\x00\x00\x00\x63" + b"\x02", "ImageSubmitted")  # type: ignore[arg-type]


def test_confluents_own_deserializer_reads_our_bytes() -> None:
    registry = FakeRegistry()
    data = AvroSerde(registry).encode("detections", "DetectionResult", _result("r-c"))  # type: ignore[arg-type]
    # The explicit topic strategy keeps the fake free of the association API (a 404 on Apicurio anyway).
    deserializer = AvroDeserializer(registry, conf={"subject.name.strategy": topic_subject_name_strategy})  # type: ignore[arg-type]
    value = deserializer(data, SerializationContext("detections", MessageField.VALUE))
    assert isinstance(value, dict)
    assert value["request_id"] == "r-c" and value["status"] == "FAILED" and value["lane"] == "ONLINE"


def test_terminal_result_round_trips_as_detection_result() -> None:
    serde = AvroSerde(FakeRegistry())  # type: ignore[arg-type]
    result = terminal_result(key="k1", value=None, lane="online", status="FAILED", code="RETRIES_EXHAUSTED",
                             message="clamd down")
    decoded = serde.decode(serde.encode("detections", "DetectionResult", result), "DetectionResult")
    assert decoded["request_id"] == "k1" and decoded["status"] == "FAILED" and decoded["lane"] == "ONLINE"


# ---- headers ---------------------------------------------------------------------------------------
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def test_child_traceparent_keeps_the_trace_and_flags_and_changes_the_span() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    child = H.child_traceparent(parent)
    assert TRACEPARENT.match(child)
    _, trace, span, flags = child.split("-")
    assert trace == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span != "00f067aa0ba902b7"
    assert flags == "00"
    assert H.trace_id(child) == trace


@pytest.mark.parametrize("parent", [None, "", "garbage", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                                    "00-" + "0" * 32 + "-00f067aa0ba902b7-01"])
def test_malformed_traceparent_starts_a_new_trace(parent: str | None) -> None:
    child = H.child_traceparent(parent)
    assert TRACEPARENT.match(child)
    assert child.endswith("-01")
    assert H.trace_id(child) not in (None, "0" * 32, "4bf92f3577b34da6a3ce929d0e0e4736")


def test_header_helpers() -> None:
    hdrs = H.to_dict([("a", b"1"), ("b", None), ("a", b"2"), (H.DEADLINE_MS, b"12x")])
    assert hdrs == {"a": b"2", H.DEADLINE_MS: b"12x"}
    assert H.text(hdrs, "a") == "2" and H.text(hdrs, "missing") is None
    assert H.integer(hdrs, "a") == 2 and H.integer(hdrs, H.DEADLINE_MS) is None
    assert H.to_dict(None) == {}
    assert H.PROPAGATED == (H.CORRELATION_ID, H.REPLY_TO, H.DEADLINE_MS)


# ---- topics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "t123."])
def test_topic_names_are_unique_and_every_stage_input_has_retry_and_dlq(prefix: str) -> None:
    specs = all_topics(prefix)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert all(n.startswith(prefix) for n in names)
    for lane in LANES:
        for step in STAGE_INPUTS:
            name = lane_topic(prefix, lane, step)
            assert {name, retry_topic(name), dlq_topic(name)} <= set(names)
    assert retry_topic("x") == "x.retry" and dlq_topic("x") == "x.dlq"


def test_topic_configs() -> None:
    specs = {s.name: s for s in all_topics("", max_message_bytes=1_000_000)}
    assert specs["detect.online.submitted"].partitions == 3
    assert specs["detect.batch.inferred"].partitions == 6
    big = specs["detect.batch.preprocessed"].config
    assert big["max.message.bytes"] == str(1_000_000 + 64 * 1024)
    assert big["compression.type"] == "producer"
    assert big["retention.ms"] == str(6 * 3600 * 1000)  # raw bytes and tensors: hours, not days
    assert specs["detect.online.scanned.retry"].partitions == 3
    assert specs["detect.online.scanned.dlq"].partitions == 1
    assert specs["detect.online.scanned.dlq"].config["retention.ms"] == str(6 * 3600 * 1000)
    short = {s.name: s.config.get("retention.ms") for s in all_topics("", raw_retention_hours=2.5)}
    raw = [lane_topic("", lane, step) for lane in LANES for step in STAGE_INPUTS]
    assert {short[n] for t in raw for n in (t, retry_topic(t), dlq_topic(t))} == {str(int(2.5 * 3600 * 1000))}
    assert specs["abuse"].partitions == 3
    replies = specs["detect.replies"]
    assert replies.partitions == 16 and replies.config == {"retention.ms": "3600000"}
    models = specs["models"]
    assert models.partitions == 1 and models.config == {"cleanup.policy": "compact"}
    assert specs[detections_topic()].partitions == 6
    assert specs[detections_topic()].config == {"retention.ms": str(7 * 24 * 3600 * 1000)}
    assert "minio.events.dlq" in specs


# ---- records ---------------------------------------------------------------------------------------
def test_terminal_result_uses_the_key_when_the_value_is_unknown() -> None:
    result = terminal_result(key="req-k", value=None, lane="batch", status="REJECTED", code="INVALID_EVENT",
                             message="x" * 5000)
    assert result["request_id"] == "req-k"
    assert result["tenant"] == "" and result["job_id"] is None
    assert result["status"] == "REJECTED" and result["error_code"] == "INVALID_EVENT"
    assert result["lane"] == "BATCH" and result["detections"] == [] and result["cache_hit"] is False
    assert len(result["error_message"]) == 2000
    assert terminal_result(key=None, value=None, lane="batch", status="FAILED", code="C", message="m")[
        "request_id"] == ""


def test_terminal_result_reads_context_fields() -> None:
    value = {"context": {"request_id": "req-c", "tenant": "acme", "job_id": "j1", "lane": "ONLINE",
                         "submitted_at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}, "tensor": b""}
    result = terminal_result(key="other-key", value=value, lane="batch", status="FAILED", code="RETRIES_EXHAUSTED",
                             message="m", timings_ms={"scan": 1.5})
    assert result["request_id"] == "req-c" and result["tenant"] == "acme" and result["job_id"] == "j1"
    assert result["lane"] == "ONLINE"  # the request's lane wins over the topic's
    assert result["timings_ms"] == {"scan": 1.5}
    # Top-level fields (ImageSubmitted) are read the same way.
    flat = terminal_result(key=None, value={"request_id": "req-f", "tenant": "t"}, lane="online", status="FAILED",
                           code="C", message="m")
    assert flat["request_id"] == "req-f" and flat["tenant"] == "t" and flat["lane"] == "ONLINE"


# ---- runtime helpers ---------------------------------------------------------------------------------
def _result(request_id: str = "r1") -> dict[str, Any]:
    return terminal_result(key=request_id, value=None, lane="online", status="FAILED", code="C", message="m")


def test_result_outputs_goes_to_detections_and_the_reply_partition() -> None:
    carried = {H.CORRELATION_ID: b"c1", H.REPLY_TO: b"p.detect.replies:7"}
    outs = result_outputs("p.", _result(), carried)
    assert [(o.topic, o.partition, o.key, o.event) for o in outs] == [
        ("p.detections", None, "r1", "DetectionResult"), ("p.detect.replies", 7, "r1", "DetectionResult")]
    assert all(o.headers == carried for o in outs)


@pytest.mark.parametrize("reply_to", [b"detect.replies", b"detect.replies:", b":3", b"detect.replies:x",
                                      b"detect.replies:-1"])
def test_result_outputs_ignores_a_malformed_reply_to(reply_to: bytes) -> None:
    outs = result_outputs("", _result(), {H.REPLY_TO: reply_to})
    assert [(o.topic, o.partition) for o in outs] == [("detections", None)]


def test_result_outputs_without_reply_to() -> None:
    assert [o.topic for o in result_outputs("", _result(), {})] == ["detections"]


@pytest.mark.parametrize("topic,lane", [("detect.online.scanned", "online"), ("p.detect.online.inferred.retry",
                                                                                "online"),
                                        ("detect.batch.scanned", "batch"), ("minio.events", "batch")])
def test_lane_of(topic: str, lane: str) -> None:
    assert lane_of(topic) == lane


def test_origin_of() -> None:
    assert origin_of("detect.online.scanned.retry") == "detect.online.scanned"
    assert origin_of("detect.online.scanned") == "detect.online.scanned"
    assert origin_of("detect.online.scanned.dlq") == "detect.online.scanned.dlq"
