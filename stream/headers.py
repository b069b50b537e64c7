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
FIRST_FAILED_MS = "x-first-failed-ms"  # epoch millis of a retried record's first transient failure
REDRIVEN_FROM = "x-redriven-from"  # "<dlq topic>:<partition>:<offset>" of the letter a record was redriven from

# Headers a stage copies from its input to every output for the same request.
PROPAGATED = (CORRELATION_ID, REPLY_TO, DEADLINE_MS)

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_CORRELATION_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no space
_REPLY_TO = re.compile(r"^([A-Za-z0-9._-]{1,249}):([0-9]{1,6})$")
_EPOCH_MS = re.compile(r"^[0-9]{1,15}$")


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


def reply_address(raw: bytes | None) -> tuple[str, int] | None:
    """A `reply-to` value parsed strictly: (topic, partition), or None when it is not "<topic>:<digits>"."""
    if raw is None:
        return None
    m = _REPLY_TO.match(raw.decode("ascii", errors="replace"))
    return None if m is None else (m.group(1), int(m.group(2)))


def invalid_carried(headers: dict[str, bytes]) -> dict[str, str]:
    """The carried headers (PROPAGATED) that are present and malformed, with why: a correlation id is 1-128
    printable ASCII characters, a deadline decimal epoch millis, a reply-to "<topic>:<partition>". Whether a
    reply-to names a reply topic's existing partition is the runtime's check (it needs the topic's metadata)."""
    bad: dict[str, str] = {}
    cid = headers.get(CORRELATION_ID)
    if cid is not None and not _CORRELATION_ID.match(cid.decode("ascii", errors="replace")):
        bad[CORRELATION_ID] = "not 1-128 printable ASCII characters"
    deadline = headers.get(DEADLINE_MS)
    if deadline is not None and not _EPOCH_MS.match(deadline.decode("ascii", errors="replace")):
        bad[DEADLINE_MS] = "not decimal epoch milliseconds"
    reply = headers.get(REPLY_TO)
    if reply is not None and reply_address(reply) is None:
        bad[REPLY_TO] = 'not "<topic>:<partition>"'
    return bad
