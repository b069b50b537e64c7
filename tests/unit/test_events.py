"""One definition per Avro contract: schemas/events.py has a constructor for every record of schemas/*.avsc, each
takes exactly its schema's fields with the schema's defaults, its output validates against the parsed schema,
and no producer writes an event out by hand."""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fastavro
import fastavro.validation
import pytest

import schemas
from schemas import events

ROOT = Path(__file__).resolve().parents[2]
PRODUCER_PACKAGES = ("stream", "processors", "gateway", "model_store", "infra")
# Required in the constructor although the .avsc has a default (why: schemas/events.py's docstring).
REQUIRED_ON_PURPOSE = {("ModelSelector", "name")}
TIMESTAMP = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _avsc() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(schemas.SCHEMA_DIR.glob("*.avsc")):
        doc = json.loads(path.read_text())
        out[doc["name"]] = doc
    return out


AVSC = _avsc()
RECORDS = sorted(name for name, doc in AVSC.items() if doc["type"] == "record")


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _sample(avro_type: Any) -> Any:
    """A value of ``avro_type`` (records through their constructors, so nested ones are exercised too)."""
    if isinstance(avro_type, list):
        return _sample(next(branch for branch in avro_type if branch != "null"))
    if isinstance(avro_type, dict):
        if avro_type.get("logicalType") == "timestamp-millis":
            return TIMESTAMP
        kind = avro_type["type"]
        if kind == "array":
            return [_sample(avro_type["items"])]
        if kind == "map":
            return {"k": _sample(avro_type["values"])}
        return _sample(kind)
    primitives = {"string": "s", "int": 7, "long": 7, "float": 0.5, "double": 0.25, "boolean": True, "bytes": b"x",
                  "null": None}
    if avro_type in primitives:
        return primitives[avro_type]
    named = AVSC[_short(avro_type)]
    if named["type"] == "enum":
        return named["symbols"][-1]
    return _build(named["name"], everything=True)


def _build(record: str, *, everything: bool) -> dict[str, Any]:
    """The record from its constructor: every field given (``everything``), or only the required ones."""
    params = inspect.signature(events.CONSTRUCTORS[record]).parameters
    args = {f["name"]: _sample(f["type"]) for f in AVSC[record]["fields"]
            if everything or params[f["name"]].default is inspect.Parameter.empty}
    return events.CONSTRUCTORS[record](**args)


def _validate(record: str, value: Mapping[str, Any]) -> None:
    fastavro.validation.validate(value, schemas.parsed(record), raise_errors=True)


def test_every_record_has_a_constructor_and_nothing_else_does() -> None:
    assert sorted(events.CONSTRUCTORS) == RECORDS


@pytest.mark.parametrize("record", RECORDS)
def test_the_constructor_takes_exactly_the_schema_fields(record: str) -> None:
    params = inspect.signature(events.CONSTRUCTORS[record]).parameters
    fields = AVSC[record]["fields"]
    assert list(params) == [f["name"] for f in fields], "same fields, same order as the .avsc"
    for f in fields:
        p = params[f["name"]]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f["name"]
        if "default" not in f or (record, f["name"]) in REQUIRED_ON_PURPOSE:
            assert p.default is inspect.Parameter.empty, f"{record}.{f['name']} has no default in the .avsc"
            continue
        assert p.default is not inspect.Parameter.empty, f"{record}.{f['name']}: the .avsc default is missing"
        default: Any = p.default
        if isinstance(f["type"], dict) and f["type"].get("type") == "array":
            default = list(default)
        elif isinstance(f["type"], dict) and f["type"].get("type") == "map":
            default = dict(default)
        assert default == f["default"], f"{record}.{f['name']}"
        assert type(default) is type(f["default"]), f"{record}.{f['name']}"  # 0 is not 0.0, False is not 0


@pytest.mark.parametrize("record", RECORDS)
def test_the_output_validates_against_the_schema(record: str) -> None:
    full = _build(record, everything=True)
    assert list(full) == [f["name"] for f in AVSC[record]["fields"]]
    _validate(record, full)
    minimal = _build(record, everything=False)  # the defaults fill the rest
    assert list(minimal) == list(full)
    _validate(record, minimal)


@pytest.mark.parametrize("record", RECORDS)
def test_the_output_round_trips_through_avro(record: str) -> None:
    import io

    value = _build(record, everything=True)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.parsed(record), value)
    buf.seek(0)
    back = fastavro.schemaless_reader(buf, schemas.parsed(record))
    assert set(back) == set(value)


def test_a_wrong_value_does_not_validate() -> None:
    """The validation above can fail: a missing required field, or a value of the wrong type."""
    result = events.detection_result(request_id="r", tenant="t", completed_at=TIMESTAMP)
    _validate("DetectionResult", result)
    for bad in ({**result, "status": "MAYBE"}, {k: v for k, v in result.items() if k != "completed_at"},
                {**result, "image_width": "wide"}):
        with pytest.raises(fastavro.validation.ValidationError):
            _validate("DetectionResult", bad)


def test_the_constructors_copy_their_arrays_and_maps() -> None:
    timings = {"scan": 1.0}
    dets: list[dict[str, Any]] = []
    result = events.detection_result(request_id="r", tenant="t", timings_ms=timings, detections=dets,
                                     completed_at=TIMESTAMP)
    result["timings_ms"]["postprocess"] = 2.0
    result["detections"].append({})
    assert timings == {"scan": 1.0} and dets == []
    other = events.detection_result(request_id="r2", tenant="t", completed_at=TIMESTAMP)
    assert other["timings_ms"] == {} and other["detections"] == []  # the defaults are not shared


# ---- no event written out by hand -------------------------------------------------------------------------
# Events whose dict literals the scan below looks for: what producers emit, and the request context every
# downstream event carries. The small shared records (Box, ObjectRef, ...) have constructors too, but their few
# generic field names (x1, bucket, name) are also those of unrelated dicts.
SCANNED = ("ImageSubmitted", "ImageScanned", "ImagePreprocessed", "InferenceOutput", "DetectionResult",
           "DeadLetter", "ModelEvent", "JobEvent", "AuditEvent", "AbuseEvent", "RequestContext")
MIN_SHARED = 4  # fewer named fields than this are not an event, whatever they are


def _keys(node: ast.AST) -> tuple[set[str], bool] | None:
    """The constant string keys of a dict literal or dict(...) call, and whether it spreads another mapping into
    itself (``**x``); None for anything else."""
    if isinstance(node, ast.Dict):
        return ({k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)},
                any(k is None for k in node.keys))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg for kw in node.keywords if kw.arg is not None}, bool(node.args) or any(
            kw.arg is None for kw in node.keywords)
    return None


def hand_built_events(source: str, filename: str = "<source>") -> list[tuple[int, str, int]]:
    """(line, event, fields named) of every dict literal in ``source`` that spells out an event: it names every
    field the event requires (and at least MIN_SHARED of its fields), or it copies another mapping and
    overwrites at least half of the event's fields (an event re-made from another)."""
    found = []
    schema = {name: ({f["name"] for f in AVSC[name]["fields"]},
                     {f["name"] for f in AVSC[name]["fields"] if "default" not in f}) for name in SCANNED}
    for node in ast.walk(ast.parse(source, filename)):
        seen = _keys(node)
        if seen is None:
            continue
        keys, spread = seen
        matches = []
        for name, (fields, required) in schema.items():
            shared = len(keys & fields)
            if shared >= MIN_SHARED and (required <= keys or (spread and shared * 2 >= len(fields))):
                matches.append((shared, name))
        if matches:  # the event it names most of (an ImageSubmitted also holds a RequestContext's fields)
            shared, name = max(matches)
            found.append((node.lineno, name, shared))
    return sorted(found)


def test_the_scan_finds_a_hand_built_event() -> None:
    """What the test below relies on: the scan recognises events written out, and passes everything else."""
    by_hand = '''
def result(ctx):
    return {"request_id": ctx["request_id"], "tenant": ctx["tenant"], "status": "OK", "detections": [],
            "error_code": None, "error_message": None, "job_id": None, "lane": "BATCH", "completed_at": 0}
letter = dict(stage="s", topic="t", partition=0, offset=1, value=b"", error_class="E", error_message="m",
              attempts=1, failed_at=0)
spread = {**base, "request_id": "r", "tenant": "t", "image": {}, "model": {}, "params": {}, "submitted_at": 0}
'''
    assert [name for _, name, _ in hand_built_events(by_hand)] == ["DetectionResult", "DeadLetter", "ImageSubmitted"]
    fine = '''
row = {"request_id": r, "status": "PENDING", "submitted_at": t}
audit = {"resource": None, "request_id": None, "detail": None}
result = events.detection_result(request_id="r", tenant="t", status="OK", completed_at=0)
'''
    assert hand_built_events(fine) == []


def test_no_producer_builds_an_event_by_hand() -> None:
    """Every event is made by its constructor in schemas/events.py: a field added to an .avsc is added once."""
    offenders = []
    for package in PRODUCER_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name, shared in hand_built_events(path.read_text(), str(path)):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: a {name} written out by hand ({shared} of its "
                                 f"fields); use schemas.events.{_snake(name)}")
    assert offenders == [], "\n".join(offenders)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def test_every_snake_name_is_a_constructor() -> None:
    assert all(events.CONSTRUCTORS[name] is getattr(events, _snake(name)) for name in RECORDS)
