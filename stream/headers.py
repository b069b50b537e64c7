"""Header names and W3C trace context carried through every hop."""

from __future__ import annotations

import re
import secrets

CORRELATION_ID = "correlation-id"
REPLY_TO = "reply-to"            # "<topic>:<partition>" of the waiting gateway instance
DEADLINE_MS = "deadline-ms"      # epoch millis, decimal ASCII
TRACEPARENT = "traceparent"
ATTEMPT = "x-attempt"            # processing attempts so far (retry topic)
NOT_BEFORE_MS = "x-not-before-ms"  # a retry record is not processed before this epoch millis
ORIGIN_TOPIC = "x-origin-topic"  # the stage input a retry record came from
ERROR_CLASS = "x-error-class"
ERROR_MESSAGE = "x-error-message"
DLQ_TOPIC = "x-dlq-topic"
DLQ_PARTITION = "x-dlq-partition"
DLQ_OFFSET = "x-dlq-offset"

# Headers a stage copies from its input to every output for the same request.
PROPAGATED = (CORRELATION_ID, REPLY_TO, DEADLINE_MS)

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """Same trace id, new span id; a malformed or absent parent starts a new trace."""
    m = _TRACEPARENT.match(parent or "")
    if m is None or m.group(1) == "0" * 32:
        return new_traceparent()
    return f"00-{m.group(1)}-{secrets.token_hex(8)}-{m.group(3)}"


def trace_id(traceparent: str | None) -> str | None:
    m = _TRACEPARENT.match(traceparent or "")
    return m.group(1) if m else None


def to_dict(headers: list[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Kafka headers as a dict (last value wins), without None values."""
    return {k: v for k, v in (headers or []) if v is not None}


def text(headers: dict[str, bytes], name: str) -> str | None:
    raw = headers.get(name)
    return None if raw is None else raw.decode("utf-8", errors="replace")


def integer(headers: dict[str, bytes], name: str) -> int | None:
    raw = text(headers, name)
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None
