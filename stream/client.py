"""Submit images straight into Kafka and await their DetectionResults on a reply partition.

What `detectflow detect`, the demo and the pipeline benchmark use (no HTTP): images up to the pipeline's
inline limit (PipelineSettings.inline_max_bytes, the gateway's rule) travel inline in the ImageSubmitted
event; larger ones are stored content-addressed in the uploads bucket first (``<tenant>/<sha256>``, the
gateway's layout) and referenced, and without an uploader they are refused, never sent inline. Each request
carries correlation-id / reply-to / deadline headers; replies are routed by a ReplyRouter reading one
partition of the replies topic.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer

from config import PipelineSettings, StreamSettings, kafka_client
from schemas import events
from schemas.names import MODEL_NAME_RULE, valid_model_name
from stream import headers as H
from stream.errors import TransientError
from stream.ingest import principal
from stream.records import now_ms
from stream.reply import ReplyRouter, ReplyTimeout
from stream.serde import AvroSerde
from stream.topics import ingest_topic, lane_topic, replies_topic, tenant_replies_topic


class InlineLimitExceeded(ValueError):
    """An image over the inline limit, and no uploader to send it by reference."""


@dataclass(frozen=True)
class Submitted:
    request_id: str
    correlation_id: str
    deadline: float  # time.time() seconds: when the caller stops waiting
    future: concurrent.futures.Future[dict[str, Any]]


class DetectClient:
    """As an operator (``as_tenant=False``: the settings' principal, `detect.<lane>.submitted`, any tenant) or as
    a tenant (``as_tenant=True``: the principal `tenant-<tenant>`, its ingest topic, the batch lane, replies on
    its own reply topic; docs/events.md, "Producing into Kafka as a tenant")."""

    def __init__(self, settings: StreamSettings, *, default_model: str, tenant: str = "cli",
                 reply_partition: int | None = None,
                 inline_max_bytes: int = PipelineSettings.default_of("inline_max_bytes"),
                 upload: Callable[[str, bytes, str | None], tuple[str, str]] | None = None,
                 serde: AvroSerde | None = None, as_tenant: bool = False):
        if not valid_model_name(default_model):
            raise ValueError(f"default model {default_model!r} (DETECTFLOW_DEFAULT_MODEL): {MODEL_NAME_RULE}")
        if as_tenant:
            settings = settings.replace(kafka_user=principal(tenant))
        self.settings = settings
        self.default_model = default_model  # what a submission that names no model asks for
        self.tenant = tenant
        self.as_tenant = as_tenant
        self.inline_max_bytes = inline_max_bytes
        self.upload = upload  # (key, data, content type) -> (bucket, key); for images over the inline limit
        self.serde = serde or AvroSerde.from_url(settings.registry_url, settings.tls_ca_file)
        self.producer = Producer({**kafka_client(settings), "enable.idempotence": True,
                                  "acks": "all", "linger.ms": 1, "compression.type": settings.compression,
                                  "message.max.bytes": settings.max_message_bytes + 64 * 1024, "log_level": 3})
        prefix = settings.topic_prefix
        if as_tenant:  # one partition, its own: the tenant's replies topic
            self.router = ReplyRouter(settings, self.serde, tenant_replies_topic(prefix, tenant), reply_partition or 0)
        else:
            partition = random.randrange(16) if reply_partition is None else reply_partition  # noqa: S311
            self.router = ReplyRouter(settings, self.serde, replies_topic(prefix), partition)
        self._started = False

    def __enter__(self) -> DetectClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if not self._started:
            self.router.start()
            self._started = True

    def close(self) -> None:
        self.producer.flush(10)
        self.router.close()

    def submit(self, data: bytes, *, lane: str = "online", timeout_s: float = 60.0,
               params: Mapping[str, Any] | None = None, model: str | None = None, version: int | None = None,
               content_type: str | None = None, job_id: str | None = None, deadline_ms: int | None = None,
               request_id: str | None = None) -> Submitted:
        """Produce one ImageSubmitted; its reply is awaited until ``timeout_s`` from now."""
        sha = hashlib.sha256(data).hexdigest()
        if len(data) <= self.inline_max_bytes:
            image = events.inline_image(data=data, sha256=sha, content_type=content_type)
        elif self.upload is None:
            raise InlineLimitExceeded(f"{len(data)} bytes is over the inline limit of {self.inline_max_bytes} "
                                      "and this client has no MinIO uploader to send it by reference")
        else:
            bucket, key = self._upload(f"{self.tenant}/{sha}", data, content_type, time.monotonic() + timeout_s)
            image = events.object_ref(bucket=bucket, key=key, sha256=sha, size=len(data), content_type=content_type)
        return self.submit_image(image, lane=lane, timeout_s=timeout_s, params=params, model=model, version=version,
                                 job_id=job_id, deadline_ms=deadline_ms, request_id=request_id)

    def _upload(self, key: str, data: bytes, content_type: str | None, deadline: float) -> tuple[str, str]:
        """The uploader, retried through MinIO outages (TransientError) with backoff until ``deadline``."""
        assert self.upload is not None
        wait = 0.5
        while True:
            try:
                return self.upload(key, data, content_type)
            except TransientError:
                if time.monotonic() + wait >= deadline:
                    raise
            time.sleep(wait * (1 + 0.2 * random.random()))  # noqa: S311 - jitter, not a secret
            wait = min(8.0, wait * 2)

    def submit_ref(self, bucket: str, key: str, **kwargs: Any) -> Submitted:
        """Submit an object already in MinIO by reference (what systems producing into Kafka send)."""
        return self.submit_image(events.object_ref(bucket=bucket, key=key), **kwargs)

    def submit_image(self, image: dict[str, Any], *, lane: str = "online", timeout_s: float = 60.0,
                     params: Mapping[str, Any] | None = None, model: str | None = None, version: int | None = None,
                     job_id: str | None = None, deadline_ms: int | None = None,
                     request_id: str | None = None) -> Submitted:
        """Produce one ImageSubmitted for ``image`` (an events.object_ref or events.inline_image); ``model`` None
        asks for the default model."""
        model = self.default_model if model is None else model
        if not valid_model_name(model):
            raise ValueError(f"model {model!r}: {MODEL_NAME_RULE}")
        self.start()
        request_id = request_id or str(uuid.uuid4())
        correlation = uuid.uuid4().hex
        deadline = time.time() + timeout_s
        if self.as_tenant:
            lane = "batch"  # an ingest topic is the batch lane (the gateway is the online path)
        event = events.image_submitted(
            request_id=request_id, tenant=self.tenant, image=image, lane=lane.upper(),
            model=events.model_selector(name=model, version=version), params=events.detect_params(**(params or {})),
            deadline_ms=deadline_ms, job_id=job_id, submitted_at=now_ms())
        topic = (ingest_topic(self.settings.topic_prefix, self.tenant) if self.as_tenant
                 else lane_topic(self.settings.topic_prefix, lane, "submitted"))
        headers = {H.CORRELATION_ID: correlation.encode(), H.REPLY_TO: self.router.reply_to.encode(),
                   H.DEADLINE_MS: str(int(deadline * 1000)).encode(), H.TRACEPARENT: H.new_traceparent().encode()}
        future = self.router.expect(correlation, deadline)
        self.producer.produce(topic, key=request_id.encode(), value=self.serde.encode(topic, "ImageSubmitted", event),
                              headers=list(headers.items()))
        self.producer.poll(0)
        return Submitted(request_id, correlation, deadline, future)

    def flush(self, timeout_s: float = 30.0) -> None:
        if self.producer.flush(timeout_s):
            raise ReplyTimeout("submissions were not delivered to Kafka in time")

    def wait(self, sub: Submitted) -> dict[str, Any]:
        """The DetectionResult, or ReplyTimeout at the submission's deadline."""
        self.producer.flush(max(0.1, sub.deadline - time.time()))
        return self.router.wait_sync(sub.correlation_id, sub.deadline, sub.future)

    def detect(self, data: bytes, **kwargs: Any) -> dict[str, Any]:
        return self.wait(self.submit(data, **kwargs))
