"""The Avro contracts, as .avsc files named by their full name.

A schema may refer to a named type defined in a sibling file
(``io.detectflow.events.ObjectRef`` -> ``io.detectflow.events.ObjectRef.avsc``).
``expanded`` inlines those definitions, docs included, so the registry holds
self-contained schemas that any Confluent Avro deserializer reads as they are.

Beside them: ``schemas.events`` (one constructor per record, what every producer builds events with) and
``schemas.names`` (the model-name rule).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parent
NAMESPACE = "io.detectflow.events"

# Top-level event types (the others are named types they share).
EVENTS = ("ImageSubmitted", "ImageScanned", "ImagePreprocessed", "InferenceOutput", "DetectionResult",
          "DeadLetter", "ModelEvent")

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class SchemaNotFound(KeyError):
    """No .avsc file defines that name."""


def fullname(name: str) -> str:
    return name if "." in name else f"{NAMESPACE}.{name}"


@functools.cache
def raw(name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{fullname(name)}.avsc"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SchemaNotFound(name) from exc


@functools.cache
def expanded(name: str) -> str:
    """The schema of ``name`` as canonical JSON text with every named type inlined once."""
    seen: set[str] = set()

    def inline(node: Any, namespace: str) -> Any:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return node
            full = node if "." in node else f"{namespace}.{node}"
            if full in seen:
                return full
            return inline(raw(full), namespace)
        if isinstance(node, list):
            return [inline(branch, namespace) for branch in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind in ("record", "enum", "fixed", "error"):
            ns = node.get("namespace", namespace)
            seen.add(f"{ns}.{node['name']}" if "." not in node["name"] else node["name"])
            out = dict(node)
            if kind in ("record", "error"):
                out["fields"] = [{**fld, "type": inline(fld["type"], ns)} for fld in node["fields"]]
            return out
        if kind == "array":
            return {**node, "items": inline(node["items"], namespace)}
        if kind == "map":
            return {**node, "values": inline(node["values"], namespace)}
        if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind not in _PRIMITIVES):
            return {**node, "type": inline(kind, namespace)}
        return node

    return json.dumps(inline(raw(name), NAMESPACE), separators=(",", ":"))


@functools.cache
def parsed(name: str) -> Any:
    """fastavro-parsed schema of ``name``, parsed once per process."""

    return fastavro.parse_schema(json.loads(expanded(name)))
