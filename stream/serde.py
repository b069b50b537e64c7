"""Avro on the wire in Confluent framing: magic byte 0, 4-byte schema id, Avro binary.

Subjects follow TopicNameStrategy (``<topic>-value``) with BACKWARD_TRANSITIVE
compatibility, so any standard Confluent Avro deserializer reads our topics.
fastavro does the encoding; parsed schemas and registry ids are cached, so the
registry is asked once per (topic, schema) and once per unseen writer id.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
import threading
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

import schemas

MAGIC = 0
_HEADER = struct.Struct(">bI")
COMPATIBILITY = "BACKWARD_TRANSITIVE"


class SerdeError(Exception):
    """Base of the serde's errors."""


class DecodeError(SerdeError):
    """Bytes that are not a record we can read: a poison message, never retried."""


class RegistryUnavailable(SerdeError):
    """The schema registry did not answer: transient."""


def subject_for(topic: str) -> str:
    return f"{topic}-value"


def epoch_ms(value: int | dt.datetime | None) -> int | None:
    """timestamp-millis fields decode to datetimes; the domain code uses epoch millis."""
    if value is None or isinstance(value, int):
        return value
    return int(value.timestamp() * 1000)


def registry_config(url: str, ca_file: Path | None = None) -> dict[str, Any]:
    """SchemaRegistryClient's configuration: the URL, a deadline, and the CA its certificate is checked against."""
    return {"url": url, "timeout": 10, **({"ssl.ca.location": str(ca_file)} if ca_file is not None else {})}


class AvroSerde:
    """Encode/decode detectflow events for one process; thread-safe caches."""

    def __init__(self, registry: SchemaRegistryClient):
        self._registry = registry
        self._ids: dict[tuple[str, str], int] = {}
        self._writers: dict[int, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, ca_file: Path | None = None) -> AvroSerde:
        """A serde on the registry at ``url``; its HTTPS certificate is verified against ``ca_file`` (the project
        CA, DETECTFLOW_TLS_CA_FILE), or the system's trust store when None."""
        return cls(SchemaRegistryClient(registry_config(url, ca_file)))

    # ---- registration ------------------------------------------------------------------
    def schema_id(self, topic: str, event: str) -> int:
        key = (topic, event)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        subject = subject_for(topic)
        try:
            self._ensure_compatibility(subject)
            schema_id = self._registry.register_schema(subject, Schema(schemas.expanded(event), "AVRO"))
        except SchemaRegistryError as exc:
            raise SerdeError(f"registry refused {event} for {subject}: {exc}") from exc
        except Exception as exc:  # httpx/transport errors surface as various types
            raise RegistryUnavailable(f"schema registry unavailable: {exc}") from exc
        with self._lock:
            self._ids[key] = schema_id
            self._writers.setdefault(schema_id, schemas.parsed(event))
        return schema_id

    def _ensure_compatibility(self, subject: str) -> None:
        if self._compatibility(subject) == COMPATIBILITY:
            return
        try:
            self._registry.set_compatibility(subject, COMPATIBILITY)
        except SchemaRegistryError as exc:
            # Processes that produce to a new topic at the same moment race to create the subject's
            # rule; the losers get 409 (Apicurio: "rule already exists"). Fine if the winner set ours.
            if exc.http_status_code != 409 or self._compatibility(subject) != COMPATIBILITY:
                raise

    def _compatibility(self, subject: str) -> str | None:
        try:
            return self._registry.get_compatibility(subject)
        except SchemaRegistryError:
            return None  # no rule on the subject yet

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, topic: str, event: str, record: dict[str, Any]) -> bytes:
        schema_id = self.schema_id(topic, event)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, schema_id))
        try:
            fastavro.schemaless_writer(buf, schemas.parsed(event), record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerdeError(f"{event} record does not fit its schema: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes | None, event: str) -> dict[str, Any]:
        """Decode with the writer's schema (from the registry) resolved to our ``event`` schema."""
        if data is None or len(data) < _HEADER.size:
            raise DecodeError("record is empty or shorter than the Confluent header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DecodeError(f"unknown magic byte {magic}")
        writer = self._writer_schema(schema_id)
        try:
            return fastavro.schemaless_reader(io.BytesIO(data[_HEADER.size:]), writer, schemas.parsed(event))
        except Exception as exc:  # fastavro raises many types on corrupt bytes or unresolvable schemas
            raise DecodeError(f"cannot decode schema id {schema_id} as {event}: {type(exc).__name__}: {exc}") from exc

    def _writer_schema(self, schema_id: int) -> Any:
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        try:
            schema = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if getattr(exc, "http_status_code", None) == 404:
                raise DecodeError(f"schema id {schema_id} is not in the registry") from exc
            raise RegistryUnavailable(f"schema registry error for id {schema_id}: {exc}") from exc
        except Exception as exc:
            raise RegistryUnavailable(f"schema registry unavailable: {exc}") from exc
        try:
            writer = fastavro.parse_schema(json.loads(schema.schema_str))
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id} is not a usable Avro schema: {exc}") from exc
        with self._lock:
            self._writers[schema_id] = writer
        return writer
