"""`detectflow dlq list|show|redrive` against the real broker and registry: letters written the way the runtime
writes them (stream/runtime.py _dead_letter), read back, shown, redriven once and only once."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from stream_kit import kafka_admin, make_topics, new_prefix, read_all, submission

from config import StackSettings
from infra.cli import main
from infra.dlq_cmd import REDRIVEN_FROM
from stream import headers as H
from stream import topics as T
from stream.records import now_ms
from stream.serde import AvroSerde


@pytest.fixture
def prefix(stack: StackSettings, monkeypatch: pytest.MonkeyPatch) -> str:
    p = new_prefix()
    make_topics(stack, p)
    monkeypatch.setenv("DETECTFLOW_TOPIC_PREFIX", p)  # the CLI reads its deployment prefix from the environment
    return p


@pytest.fixture(scope="module")
def serde(stack: StackSettings) -> AvroSerde:
    return AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)


def dead_letter(stack: StackSettings, serde: AvroSerde, *, read_from: str, origin: str, value: bytes,
                headers: dict[str, bytes], request_id: str, offset: int) -> None:
    """One letter on ``origin``'s DLQ topic, as StageRunner._dead_letter writes it: the original record's key,
    bytes and headers in the DeadLetter, the original headers plus provenance on the letter itself."""
    letter = {"stage": "scan", "topic": read_from, "partition": 0, "offset": offset, "key": request_id.encode(),
              "value": value, "headers": headers, "error_class": "TransientError",
              "error_message": "minio unavailable: MaxRetryError", "attempts": 5, "request_id": request_id,
              "failed_at": now_ms()}
    provenance = {H.DLQ_TOPIC: read_from.encode(), H.DLQ_PARTITION: b"0", H.DLQ_OFFSET: str(offset).encode(),
                  H.ERROR_CLASS: b"TransientError", H.ERROR_MESSAGE: b"minio unavailable", H.ATTEMPT: b"5"}
    dlq = T.dlq_topic(origin)
    p = Producer({**kafka_admin(stack), "enable.idempotence": True})
    p.produce(dlq, key=request_id.encode(), value=serde.encode(dlq, "DeadLetter", letter),
              headers=list({**headers, **provenance}.items()))
    assert p.flush(30) == 0


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["dlq", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_show_and_redrive_once(stack: StackSettings, serde: AvroSerde, prefix: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = T.lane_topic(prefix, "batch", "submitted")
    dlq = T.dlq_topic(source)
    rid = str(uuid.uuid4())
    original = serde.encode(source, "ImageSubmitted", submission(rid))
    # A record that failed on the retry topic: its headers carry the retry bookkeeping the redrive must drop.
    headers = {H.CORRELATION_ID: b"corr-1", H.TRACEPARENT: H.new_traceparent().encode(), H.ATTEMPT: b"5",
               H.NOT_BEFORE_MS: b"123", H.ORIGIN_TOPIC: source.encode(), H.ERROR_CLASS: b"TransientError",
               H.ERROR_MESSAGE: b"minio unavailable"}
    dead_letter(stack, serde, read_from=T.retry_topic(source), origin=source, value=original, headers=headers,
                request_id=rid, offset=17)
    letter_id = f"{dlq}:0:0"

    code, out, _ = cli(capsys, "list", "--topic", dlq)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(letter_id) and rid in lines[0]
    assert "TransientError" in lines[0] and f"{T.retry_topic(source)}:0:17" in lines[0]
    assert "[redriven]" not in lines[0]
    assert cli(capsys, "list", "--topic", dlq, "--since", "2000-01-01T00:00:00Z")[1] == out
    assert cli(capsys, "list", "--topic", dlq, "--since", "2099-01-01T00:00:00Z")[1] == ""

    code, out, _ = cli(capsys, "show", letter_id)
    assert code == 0
    assert f"redrive to   {source}\n" in out and f"value        {len(original)} bytes" in out
    assert "correlation-id: corr-1" in out and "x-dlq-offset: 17" in out and "minio unavailable" in out

    code, out, err = cli(capsys, "redrive", "--topic", dlq, "--dry-run")
    assert code == 0 and out.startswith(f"would redrive {letter_id} -> {source} ") and "dry run" in err

    code, out, _ = cli(capsys, "redrive", "--topic", source)  # the source topic names its DLQ too
    assert code == 0 and out.startswith(f"redrove {letter_id} -> {source} ")
    assert "[redriven]" in cli(capsys, "list", "--topic", dlq)[1]

    code, out, err = cli(capsys, "redrive", "--topic", dlq)
    assert code == 0 and out == "" and "redrove 0 letter(s)" in err

    # A sentinel after both redrives: once it is read, everything the redrives produced has been read too.
    sentinel = str(uuid.uuid4())
    p = Producer(kafka_admin(stack))
    p.produce(source, key=sentinel.encode(), value=b"sentinel")
    assert p.flush(30) == 0
    msgs: list[Any] = []
    for _ in range(60):
        msgs = read_all(stack, source, until=len(msgs) + 1, timeout_s=2)
        if any(m.key() == sentinel.encode() for m in msgs):
            break
    assert msgs and msgs[-1].key() == sentinel.encode()
    redriven = msgs[:-1]
    assert len(redriven) == 1  # neither the dry run nor the second redrive produced anything
    m = redriven[0]
    assert m.value() == original and m.key() == rid.encode()
    got = H.to_dict(m.headers())
    assert got[REDRIVEN_FROM] == letter_id.encode()
    assert got[H.CORRELATION_ID] == b"corr-1" and got[H.TRACEPARENT] == headers[H.TRACEPARENT]
    assert not {H.ATTEMPT, H.NOT_BEFORE_MS, H.ORIGIN_TOPIC, H.ERROR_CLASS, H.ERROR_MESSAGE, H.DLQ_TOPIC,
                H.DLQ_PARTITION, H.DLQ_OFFSET} & set(got)


def test_show_names_a_letter_that_is_not_there(stack: StackSettings, prefix: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    dlq = T.dlq_topic(T.lane_topic(prefix, "online", "submitted"))
    code, _, err = cli(capsys, "show", f"{dlq}:0:0")
    assert code == 1 and "not 0" in err
    code, _, err = cli(capsys, "list", "--topic", f"{prefix}no.such.topic")
    assert code == 1 and "no DLQ topic" in err
