"""The MinIO bridge: bucket notifications (JSON on ``minio.events``) become ImageSubmitted events.

- keys arrive query-escaped and are unescaped;
- the tenant is the key's first path segment (``<tenant>/...``);
- the job id comes from the object's ``x-amz-meta-job-id`` metadata;
- the request id is derived from bucket/key/etag, and an object is claimed once in
  Cassandra, so a notification delivered twice yields exactly one event (the
  bridge runs transactionally, so a crash between claim and commit re-emits the
  same event on redelivery rather than losing it).
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from schemas import events
from schemas.names import MODEL_NAME_RULE, valid_model_name
from stream.errors import InvalidRecord
from stream.records import Failure, Outcome, Output, Record, now_ms
from stream.topics import TENANT_RE, lane_topic

EVENTS_TOPIC = "minio.events"
REQUEST_NAMESPACE = uuid.UUID("5d1f3d1e-6a0e-4f1c-9a43-6f1d2f0b7c11")
# Objects the gateway stored itself carry this metadata: it already produced their event.
SUBMITTED_MARK = "detectflow-submitted"


@dataclass(frozen=True)
class ObjectCreated:
    bucket: str
    key: str
    etag: str
    size: int | None
    content_type: str | None
    metadata: Mapping[str, str]

    @property
    def object_id(self) -> str:
        return f"{self.bucket}/{self.key}@{self.etag}"

    @property
    def request_id(self) -> str:
        return str(uuid.uuid5(REQUEST_NAMESPACE, self.object_id))

    def meta(self, name: str) -> str | None:
        wanted = f"x-amz-meta-{name}".lower()
        for k, v in self.metadata.items():
            if k.lower() in (wanted, name.lower()):
                return v
        return None


def parse_notification(event: Mapping[str, Any]) -> list[ObjectCreated]:
    """The object-created records of one MinIO notification (other event kinds are ignored)."""
    records = event.get("Records")
    if not isinstance(records, list):
        raise InvalidRecord("INVALID_NOTIFICATION", "notification has no Records list")
    out = []
    for rec in records:
        try:
            if not str(rec["eventName"]).startswith("s3:ObjectCreated:"):
                continue
            s3 = rec["s3"]
            obj = s3["object"]
            out.append(ObjectCreated(
                bucket=s3["bucket"]["name"],
                key=urllib.parse.unquote_plus(obj["key"]),
                etag=str(obj.get("eTag") or obj.get("sequencer") or ""),
                size=int(obj["size"]) if obj.get("size") is not None else None,
                content_type=obj.get("contentType"),
                metadata=dict(obj.get("userMetadata") or {}),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord("INVALID_NOTIFICATION", f"malformed notification record: {exc!r}") from exc
    return out


def to_submission(obj: ObjectCreated, *, model: str, submitted_at: int) -> dict[str, Any]:
    """The ImageSubmitted of an uploaded object, for ``model`` (the deployment's default model)."""
    tenant, _, rest = obj.key.partition("/")
    if not rest or not TENANT_RE.match(tenant):
        raise InvalidRecord("INVALID_OBJECT_KEY", f"object key {obj.key!r} does not start with '<tenant>/'")
    return events.image_submitted(
        request_id=obj.request_id, tenant=tenant,
        image=events.object_ref(bucket=obj.bucket, key=obj.key, size=obj.size, content_type=obj.content_type),
        lane="BATCH", model=events.model_selector(name=model), params=events.detect_params(),
        job_id=obj.meta("job-id"), submitted_at=submitted_at)


class ClaimStore(Protocol):
    def claim(self, object_id: str, request_id: str, source: str) -> bool:
        """True if this source may emit the object's event (first claim, or the same source again)."""


class CassandraClaims:
    """LWT claims in ``bridge_objects``."""

    def __init__(self, session: Any):
        self._session = session
        self._insert = session.prepare(
            "INSERT INTO bridge_objects (object_id, request_id, source, claimed_at) VALUES (?, ?, ?, ?) IF NOT EXISTS")

    def claim(self, object_id: str, request_id: str, source: str) -> bool:
        from stream.cassandra import DRIVER_ERRORS, transient  # the Cassandra driver: only where the bridge runs

        try:
            row = self._session.execute(self._insert, (object_id, request_id, source, now_ms())).one()
        except DRIVER_ERRORS as exc:
            raise transient(exc) from exc
        return bool(row.applied) or row.source == source


class BridgeStage:
    name = "bridge"
    input_event = None
    emits_terminal_results = False

    def __init__(self, claims: ClaimStore, *, default_model: str, prefix: str = "", events_topic: str = EVENTS_TOPIC,
                 buckets: tuple[str, ...] = ("uploads",), clock: Callable[[], int] = now_ms):
        """``default_model``: what every upload is detected with (PipelineSettings.default_model)."""
        if not valid_model_name(default_model):
            raise ValueError(f"default model {default_model!r} (DETECTFLOW_DEFAULT_MODEL): {MODEL_NAME_RULE}")
        self.claims = claims
        self.default_model = default_model
        self.prefix = prefix
        self.events_topic = events_topic
        self.buckets = buckets
        self.clock = clock

    def input_topics(self) -> list[str]:
        return [self.events_topic]

    def process(self, batch: list[Record]) -> list[Outcome]:
        return [self._one(rec) for rec in batch]

    def _one(self, rec: Record) -> Outcome:
        try:
            objects = parse_notification(rec.value)
            outs: list[Output] = []
            for obj in objects:
                if obj.bucket not in self.buckets or obj.meta(SUBMITTED_MARK):  # the gateway submits these itself
                    continue
                submission = to_submission(obj, model=self.default_model, submitted_at=self.clock())
                source = f"{rec.topic}:{rec.partition}:{rec.offset}"
                if self.claims.claim(obj.object_id, obj.request_id, source):
                    outs.append(Output(lane_topic(self.prefix, "batch", "submitted"), obj.request_id, submission,
                                       "ImageSubmitted"))
            return outs
        except InvalidRecord as exc:
            return Failure(exc)
