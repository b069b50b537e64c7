"""stream.client.DetectClient: images go inline up to the pipeline's inline limit, by reference past it, never
inline past it; the upload rides out a MinIO outage until the submission's deadline (no Kafka: the client is
built without its producer and reply router, and submit_image is captured)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from config import PipelineSettings, StreamSettings
from stream.client import DetectClient, InlineLimitExceeded
from stream.errors import TransientError

LIMIT = 1000


def client(upload: Any) -> tuple[DetectClient, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    c = DetectClient.__new__(DetectClient)  # no producer, no router: only the inline/reference decision runs
    c.tenant, c.inline_max_bytes, c.upload = "acme", LIMIT, upload
    c.submit_image = lambda image, **kw: sent.append(image)  # type: ignore[method-assign]
    return c, sent


def test_the_default_inline_limit_is_the_pipelines() -> None:
    import inspect

    default = inspect.signature(DetectClient.__init__).parameters["inline_max_bytes"].default
    assert default == PipelineSettings(stream=StreamSettings(), models_dir=Path("/nonexistent")).inline_max_bytes


def test_up_to_the_limit_inline_past_it_by_reference_under_the_gateways_key() -> None:
    uploads: list[tuple[str, bytes, str | None]] = []

    def upload(key: str, data: bytes, content_type: str | None) -> tuple[str, str]:
        uploads.append((key, data, content_type))
        return "uploads", key

    c, sent = client(upload)
    c.submit(b"x" * LIMIT, content_type="image/jpeg")
    big = b"y" * (LIMIT + 1)
    c.submit(big, content_type="image/png")
    sha = hashlib.sha256(big).hexdigest()
    assert sent[0]["data"] == b"x" * LIMIT and "key" not in sent[0]
    assert sent[1] == {"bucket": "uploads", "key": f"acme/{sha}", "sha256": sha, "size": LIMIT + 1,
                       "content_type": "image/png"}
    assert uploads == [(f"acme/{sha}", big, "image/png")]


def test_without_an_uploader_a_large_image_is_refused_not_sent_inline() -> None:
    c, sent = client(None)
    with pytest.raises(InlineLimitExceeded, match=f"over the inline limit of {LIMIT}"):
        c.submit(b"z" * (LIMIT + 1))
    assert sent == []


def test_the_upload_is_retried_through_a_minio_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.client as module

    waits: list[float] = []
    monkeypatch.setattr(module.time, "sleep", waits.append)
    calls = 0

    def flaky(key: str, data: bytes, content_type: str | None) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TransientError("minio unavailable: MaxRetryError")
        return "uploads", key

    c, sent = client(flaky)
    c.submit(b"w" * (LIMIT + 1), timeout_s=60)
    assert calls == 3 and len(waits) == 2 and sent[0]["bucket"] == "uploads"

    def down(key: str, data: bytes, content_type: str | None) -> tuple[str, str]:
        raise TransientError("minio unavailable: MaxRetryError")

    c, sent = client(down)
    with pytest.raises(TransientError):
        c.submit(b"w" * (LIMIT + 1), timeout_s=0.1)  # the deadline comes before a second try
    assert sent == []


class _Produced:
    """The client's producer, router and serde, recording what would have been produced."""

    reply_to = "detect.replies:3"

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def encode(self, topic: str, event: str, value: dict[str, Any]) -> bytes:
        self.events.append((event, value))
        return b""

    def produce(self, *args: Any, **kwargs: Any) -> None: ...

    def poll(self, timeout: float) -> int:
        return 0

    def expect(self, correlation: str, deadline: float) -> Any:
        return None


def producing_client(default_model: str) -> tuple[DetectClient, _Produced]:
    from config import StreamSettings

    fake = _Produced()
    c = DetectClient.__new__(DetectClient)  # the real submit_image, with Kafka faked
    c.settings, c.tenant, c.as_tenant, c.default_model = StreamSettings.from_env({}), "acme", False, default_model
    c.producer = c.router = c.serde = fake  # type: ignore[assignment]
    c._started = True
    return c, fake


def test_the_default_model_setting_reaches_the_submission() -> None:
    """`detectflow detect` asks for DETECTFLOW_DEFAULT_MODEL unless told otherwise; the event fits its schema."""
    import fastavro.validation

    import schemas
    from schemas import events

    settings = PipelineSettings.from_env({"DETECTFLOW_DEFAULT_MODEL": "ppe-v2"})
    c, fake = producing_client(settings.default_model)
    c.submit_image(events.object_ref(bucket="uploads", key="acme/x"), params={"score_threshold": 0.5})
    c.submit_image(events.inline_image(data=b"img"), model="yolov8n", version=2)
    (_, first), (_, second) = fake.events
    assert first["model"] == {"name": "ppe-v2", "version": None} and first["params"]["score_threshold"] == 0.5
    assert second["model"] == {"name": "yolov8n", "version": 2}
    for _, value in fake.events:
        assert fastavro.validation.validate(value, schemas.parsed("ImageSubmitted"), raise_errors=True)


def test_the_client_refuses_what_the_model_name_rule_refuses() -> None:
    c, fake = producing_client("yolov4-tiny")
    for name in ("YoloV5", "x..y"):
        with pytest.raises(ValueError, match="model name"):
            c.submit_image({"bucket": "uploads", "key": "acme/x"}, model=name)
    assert fake.events == []
    with pytest.raises(ValueError, match="default model"):
        DetectClient(None, default_model="YoloV5")  # type: ignore[arg-type]  # refused before any connection
