"""What a stage sees and returns: plain data, no Kafka objects."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas import events
from stream import headers as H
from stream.errors import InvalidRecord, StreamError, TransientError
from stream.serde import epoch_ms
from stream.topics import TENANT_REPLIES, detections_topic, replies_topic


@dataclass(frozen=True)
class Record:
    """One decoded input record."""

    topic: str          # the stage input topic (for a retry record: the topic it first came from)
    partition: int
    offset: int
    key: str | None
    value: dict[str, Any]
    headers: Mapping[str, bytes]
    lane: str           # "online" | "batch"
    attempt: int = 1    # processing attempts including this one
    timestamp_ms: int = 0


@dataclass(frozen=True)
class Output:
    """One record to produce. ``event`` names the schema (None: value is already bytes)."""

    topic: str
    key: str
    value: dict[str, Any] | bytes
    event: str | None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    partition: int | None = None


@dataclass(frozen=True)
class Failure:
    """A per-record failure returned by a stage instead of outputs."""

    error: StreamError


Outcome = list[Output] | Failure


class Stage(Protocol):
    """A pipeline stage: a name, its inputs, and a process function the runtime calls per batch.

    ``process`` returns one Outcome per input record, in order. It may raise
    TransientError to fail the whole batch transiently (e.g. a service is down);
    any other exception is a bug and stops the process. A stage may also define
    ``input_patterns() -> list[str]``: librdkafka regex subscriptions beside its topics
    (scan: every tenant's ingest topic, stream/ingest.py).
    """

    name: str
    input_event: str | None          # schema of input values; None for JSON inputs (MinIO events)
    emits_terminal_results: bool     # on a terminal failure, emit a FAILED/REJECTED DetectionResult

    def input_topics(self) -> list[str]: ...

    def process(self, batch: list[Record]) -> list[Outcome]: ...


def per_record(batch: list[Record], one: Callable[[Record], list[Output]]) -> list[Outcome]:
    """A stage's process() for stages that handle each record on its own: InvalidRecord and
    TransientError become that record's Failure; anything else is a bug and propagates."""
    out: list[Outcome] = []
    for rec in batch:
        try:
            out.append(one(rec))
        except (InvalidRecord, TransientError) as exc:
            out.append(Failure(exc))
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


def request_fields(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """request_id / tenant / job_id / lane / submitted_at of a decoded event, wherever they sit."""
    if not value:
        return {}
    ctx = value.get("context") if isinstance(value.get("context"), Mapping) else value
    return {
        "request_id": ctx.get("request_id"),
        "tenant": ctx.get("tenant"),
        "job_id": ctx.get("job_id"),
        "lane": ctx.get("lane"),
        "submitted_at": epoch_ms(ctx.get("submitted_at")),
    }


def terminal_result(*, key: str | None, value: Mapping[str, Any] | None, lane: str, status: str,
                    code: str, message: str, timings_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The DetectionResult that closes a request which cannot succeed."""
    req = request_fields(value)
    return events.detection_result(
        request_id=req.get("request_id") or key or "", tenant=req.get("tenant") or "", status=status,
        timings_ms=timings_ms or {}, error_code=code, error_message=message[:2000], job_id=req.get("job_id"),
        lane=(req.get("lane") or lane).upper(), submitted_at=req.get("submitted_at"), completed_at=now_ms())


def result_outputs(prefix: str, result: dict[str, Any], carried: dict[str, bytes]) -> list[Output]:
    """A DetectionResult goes to `detections`, and to the waiting gateway when there is one. A `reply-to` that
    names anything but a reply topic (`detect.replies`, a tenant's `replies.<tenant>`) is ignored: a stage
    writes there with its own rights."""
    outs = [Output(detections_topic(prefix), result["request_id"], result, "DetectionResult", carried)]
    reply = H.text(carried, H.REPLY_TO)
    if reply:
        topic, _, part = reply.rpartition(":")
        if (topic == replies_topic(prefix) or topic.startswith(f"{prefix}{TENANT_REPLIES}")) and part.isdigit():
            outs.append(Output(topic, result["request_id"], result, "DetectionResult", carried, int(part)))
    return outs
