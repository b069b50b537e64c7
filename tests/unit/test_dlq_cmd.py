"""The pure parts of `detectflow dlq` (infra/dlq_cmd.py): --since, where a letter goes back, its headers, the
redrive group, what list/show print (never the image bytes)."""

from __future__ import annotations

import datetime as dt

import pytest

from infra.cli import main
from infra.dlq_cmd import (
    DROPPED_HEADERS,
    REDRIVEN_FROM,
    DlqError,
    Letter,
    list_line,
    parse_since,
    redrive_group,
    show_text,
)
from stream import headers as H

NOW = 1_790_000_000_000


def letter(topic: str = "p.detect.batch.submitted", headers: dict[str, bytes] | None = None,
           value: bytes | None = b"\x00\x00\x00\x00\x07" + b"\xff\xd8\xffIMAGEBYTES") -> Letter:
    return Letter(dlq_topic="p.detect.batch.submitted.dlq", partition=0, offset=42, stage="scan", topic=topic,
                  source_partition=2, source_offset=7, key=b"req-1", value=value,
                  value_size=len(value or b""), headers=headers or {}, letter_headers={H.DLQ_OFFSET: b"7"},
                  error_class="TransientError", error_message="minio unavailable:\n  MaxRetryError " + "x" * 300,
                  attempts=5, request_id="req-1", failed_at_ms=NOW)


@pytest.mark.parametrize(("raw", "back_s"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800),
                                              ("1.5h", 5400)])
def test_since_takes_a_duration(raw: str, back_s: int) -> None:
    assert parse_since(raw, NOW) == NOW - back_s * 1000


def test_since_takes_an_iso_time_utc_unless_it_says() -> None:
    assert parse_since("2026-11-30T12:00:00Z", NOW) == int(dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC).timestamp()
                                                           * 1000)
    assert parse_since("2026-11-30T12:00:00", NOW) == parse_since("2026-11-30T12:00:00+00:00", NOW)
    assert parse_since("2026-11-30T14:00:00+02:00", NOW) == parse_since("2026-11-30T12:00:00Z", NOW)
    with pytest.raises(DlqError, match="duration"):
        parse_since("yesterday", NOW)


def test_a_letter_goes_back_to_the_topic_it_was_read_from() -> None:
    assert letter().target == "p.detect.batch.submitted"


def test_a_retry_record_goes_back_to_its_origin_topic() -> None:
    retry = "p.detect.batch.submitted.retry"
    assert letter(retry, {H.ORIGIN_TOPIC: b"p.ingest.acme"}).target == "p.ingest.acme"
    assert letter(retry).target == "p.detect.batch.submitted"  # no header: the topic the retry topic is of


def test_redrive_headers_drop_retry_and_provenance_and_name_the_letter() -> None:
    original = {H.CORRELATION_ID: b"c1", H.TRACEPARENT: b"00-ab-cd-01", H.ATTEMPT: b"5", H.NOT_BEFORE_MS: b"1",
                H.ORIGIN_TOPIC: b"t", H.ERROR_CLASS: b"TransientError", H.ERROR_MESSAGE: b"m", H.DLQ_TOPIC: b"t",
                H.DLQ_PARTITION: b"0", H.DLQ_OFFSET: b"1", REDRIVEN_FROM: b"older:0:1"}
    out = letter(headers=original).redrive_headers()
    assert dict(out) == {H.CORRELATION_ID: b"c1", H.TRACEPARENT: b"00-ab-cd-01",
                         REDRIVEN_FROM: b"p.detect.batch.submitted.dlq:0:42"}
    assert len(out) == 3 and not DROPPED_HEADERS & {k for k, _ in out}


def test_the_redrive_group_lives_under_the_prefix() -> None:
    group = redrive_group("it1.", "it1.detect.online.submitted.dlq")
    assert group == "it1.detectflow.redrive.detect.online.submitted.dlq"
    assert redrive_group("", "detections.dlq") == "detectflow.redrive.detections.dlq"


def test_list_and_show_never_print_the_image_bytes() -> None:
    x = letter()
    line = list_line(x, redriven=True)
    assert line.startswith("p.detect.batch.submitted.dlq:0:42 ") and "req-1" in line and "[redriven]" in line
    assert "\n" not in line and "IMAGEBYTES" not in line and len(line) < 300
    text = show_text(x, redriven=False)
    assert "IMAGEBYTES" not in text and f"{x.value_size} bytes, Confluent-framed schema id 7" in text
    assert "x" * 300 in text  # the full error message
    assert "redrive to   p.detect.batch.submitted" in text and "x-dlq-offset: 7" in text


def test_the_cli_parses_the_three_actions(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.dlq_cmd

    calls: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(infra.dlq_cmd, "run_dlq", lambda action, **kw: calls.append((action, kw)) or 0)
    assert main(["dlq", "redrive", "--topic", "detect.batch.submitted", "--since", "2h", "--dry-run"]) == 0
    action, kw = calls[-1]
    assert (action, kw["topic"], kw["since"], kw["dry_run"]) == ("redrive", "detect.batch.submitted", "2h", True)
    assert main(["dlq", "show", "t.dlq:0:5"]) == 0 and calls[-1] == ("show", {"letter": "t.dlq:0:5"})
    assert main(["dlq", "list"]) == 0 and calls[-1][0] == "list" and calls[-1][1]["since"] is None
