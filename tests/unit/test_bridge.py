"""The bridge's pure parts: notification parsing, key unescaping, tenant and job id, claims."""

from __future__ import annotations

import json

import pytest

from stream.bridge import BridgeStage, parse_notification, to_submission
from stream.errors import InvalidRecord
from stream.records import Failure, Record


def _notification(key: str, *, event: str = "s3:ObjectCreated:Put", meta: dict | None = None) -> dict:
    return {"EventName": event, "Key": f"uploads/{key}", "Records": [{
        "eventName": event,
        "s3": {"bucket": {"name": "uploads"},
               "object": {"key": key, "size": 123, "eTag": "abc123", "contentType": "image/jpeg",
                          "userMetadata": meta or {}}}}]}


class _Claims:
    def __init__(self) -> None:
        self.owner: dict[str, str] = {}

    def claim(self, object_id: str, request_id: str, source: str) -> bool:
        return self.owner.setdefault(object_id, source) == source


def _record(value: dict, offset: int) -> Record:
    return Record(topic="minio.events", partition=0, offset=offset, key=None, value=value, headers={}, lane="batch")


def test_keys_are_unescaped_and_tenant_and_job_come_from_key_and_metadata() -> None:
    (obj,) = parse_notification(_notification("acme/2026%2F11/a+b%2Bc.jpg", meta={"X-Amz-Meta-Job-Id": "j-1"}))
    assert obj.key == "acme/2026/11/a b+c.jpg"
    sub = to_submission(obj, model="yolov4-tiny", submitted_at=5)
    assert (sub["tenant"], sub["job_id"], sub["lane"]) == ("acme", "j-1", "BATCH")
    assert sub["image"] == {"bucket": "uploads", "key": "acme/2026/11/a b+c.jpg", "sha256": None, "size": 123,
                            "content_type": "image/jpeg"}


def test_request_id_is_deterministic_per_object_version() -> None:
    (a,) = parse_notification(_notification("acme/x.jpg"))
    (b,) = parse_notification(_notification("acme/x.jpg"))
    assert a.request_id == b.request_id
    other = json.loads(json.dumps(_notification("acme/x.jpg")).replace("abc123", "def456"))
    assert parse_notification(other)[0].request_id != a.request_id


@pytest.mark.parametrize("key", ["no-tenant-prefix.jpg", "bad tenant!/x.jpg", "/x.jpg"])
def test_keys_without_a_valid_tenant_prefix_are_invalid(key: str) -> None:
    (obj,) = parse_notification(_notification(key))
    with pytest.raises(InvalidRecord) as info:
        to_submission(obj, model="yolov4-tiny", submitted_at=0)
    assert info.value.code == "INVALID_OBJECT_KEY"


def test_non_create_events_are_ignored_and_garbage_is_invalid() -> None:
    assert parse_notification(_notification("acme/x.jpg", event="s3:ObjectRemoved:Delete")) == []
    with pytest.raises(InvalidRecord):
        parse_notification({"Records": [{"eventName": "s3:ObjectCreated:Put"}]})
    with pytest.raises(InvalidRecord):
        parse_notification({"nothing": 1})


def test_a_duplicate_notification_emits_once_but_a_redelivery_re_emits() -> None:
    stage = BridgeStage(_Claims(), default_model="yolov4-tiny", prefix="p.")
    note = _notification("acme/x.jpg")
    first, duplicate = stage.process([_record(note, 10), _record(note, 11)])
    assert isinstance(first, list) and len(first) == 1 and first[0].topic == "p.detect.batch.submitted"
    assert duplicate == []
    # The same record again (a redelivery after a crash) may emit again: same request id, idempotent downstream.
    (again,) = stage.process([_record(note, 10)])
    assert isinstance(again, list) and again[0].key == first[0].key


def test_invalid_notification_becomes_a_failure_not_an_exception() -> None:
    (out,) = BridgeStage(_Claims(), default_model="yolov4-tiny").process([_record({"Records": "nope"}, 1)])
    assert isinstance(out, Failure) and isinstance(out.error, InvalidRecord)


def test_uploads_are_detected_with_the_default_model_setting() -> None:
    """DETECTFLOW_DEFAULT_MODEL reaches bridge uploads (it once was a literal here), and the event fits its schema."""
    import fastavro.validation

    import schemas
    from config import PipelineSettings

    settings = PipelineSettings.from_env({"DETECTFLOW_DEFAULT_MODEL": "ppe-v2"})
    stage = BridgeStage(_Claims(), default_model=settings.default_model)
    ((out,),) = stage.process([_record(_notification("acme/x.jpg"), 1)])
    assert out.event == "ImageSubmitted" and out.value["model"] == {"name": "ppe-v2", "version": None}
    assert fastavro.validation.validate(out.value, schemas.parsed("ImageSubmitted"), raise_errors=True)


@pytest.mark.parametrize("name", ["YoloV5", "x..y", ""])
def test_a_default_model_that_is_not_a_model_name_is_refused_at_start(name: str) -> None:
    with pytest.raises(ValueError, match="default model"):
        BridgeStage(_Claims(), default_model=name)
