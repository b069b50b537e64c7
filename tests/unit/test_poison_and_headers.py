"""The poison ledger (stream/poison.py) and strict parsing of the carried headers (stream/headers.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from stream import headers as H
from stream.poison import PoisonLedger


def test_a_batch_in_flight_when_the_process_died_becomes_suspect_once_per_death(tmp_path: Path) -> None:
    ledger = PoisonLedger(tmp_path, "g.scan", max_crashes=3)
    ledger.begin([("t", 0, 5), ("t", 0, 6)])
    # The process dies here: the next one finds the marker.
    again = PoisonLedger(tmp_path, "g.scan", max_crashes=3)
    assert (again.crashes(("t", 0, 5)), again.crashes(("t", 0, 6)), again.crashes(("t", 0, 7))) == (1, 1, 0)
    again.begin([("t", 0, 6)])
    third = PoisonLedger(tmp_path, "g.scan", max_crashes=3)
    assert (third.crashes(("t", 0, 5)), third.crashes(("t", 0, 6))) == (1, 2)
    # A suspect that then processes cleanly is forgotten, on disk too.
    third.begin([("t", 0, 5)])
    third.end([("t", 0, 5)])
    fourth = PoisonLedger(tmp_path, "g.scan", max_crashes=3)
    assert (fourth.crashes(("t", 0, 5)), fourth.crashes(("t", 0, 6))) == (0, 2)


def test_a_clean_run_leaves_no_suspects_and_no_marker(tmp_path: Path) -> None:
    ledger = PoisonLedger(tmp_path, "g", max_crashes=3)
    ledger.begin([("t", 1, 1)])
    ledger.end([("t", 1, 1)])
    assert not (tmp_path / "g.inflight").exists()
    assert PoisonLedger(tmp_path, "g", max_crashes=3).crashes(("t", 1, 1)) == 0


def test_a_torn_ledger_starts_afresh_and_names_are_made_safe(tmp_path: Path) -> None:
    (tmp_path / "a_b.json").write_text("{not json")
    ledger = PoisonLedger(tmp_path, "a/b", max_crashes=2)
    assert ledger.path == tmp_path / "a_b.json" and ledger.crashes(("t", 0, 0)) == 0
    ledger.begin([("t", 0, 0)])
    assert json.loads((tmp_path / "a_b.inflight").read_text()) == [["t", 0, 0]]


def test_without_a_state_dir_the_ledger_is_off() -> None:
    ledger = PoisonLedger(None, "g", max_crashes=3)
    ledger.begin([("t", 0, 0)])
    ledger.end([("t", 0, 0)])
    assert not ledger.enabled and ledger.crashes(("t", 0, 0)) == 0


@pytest.mark.parametrize(("headers", "bad"), [
    ({H.REPLY_TO: b"detect.replies:3", H.DEADLINE_MS: b"1764500000000", H.CORRELATION_ID: b"abc-1"}, set()),
    ({H.REPLY_TO: b"detect.replies"}, {H.REPLY_TO}),
    ({H.REPLY_TO: b"detect.replies:-1"}, {H.REPLY_TO}),
    ({H.REPLY_TO: b"a b:1"}, {H.REPLY_TO}),
    ({H.DEADLINE_MS: b"1e309"}, {H.DEADLINE_MS}),
    ({H.DEADLINE_MS: b" 12"}, {H.DEADLINE_MS}),
    ({H.DEADLINE_MS: b"9" * 40}, {H.DEADLINE_MS}),
    ({H.CORRELATION_ID: b""}, {H.CORRELATION_ID}),
    ({H.CORRELATION_ID: b"x" * 129}, {H.CORRELATION_ID}),
    ({H.CORRELATION_ID: "é".encode()}, {H.CORRELATION_ID}),
])
def test_carried_headers_are_parsed_strictly(headers: dict[str, bytes], bad: set[str]) -> None:
    assert set(H.invalid_carried(headers)) == bad


def test_reply_address() -> None:
    assert H.reply_address(b"p.detect.replies:15") == ("p.detect.replies", 15)
    assert H.reply_address(b"models:x") is None and H.reply_address(None) is None


def test_scan_refuses_an_inline_image_past_the_inline_limit_unless_it_is_also_stored() -> None:
    from config import PipelineSettings
    from processors.scan import image_bytes
    from stream.errors import InvalidRecord

    settings = PipelineSettings.from_env({}).replace(inline_max_bytes=1024)
    with pytest.raises(InvalidRecord) as refused:
        image_bytes({"data": b"\xff" * 1025}, "t1", None, settings)  # type: ignore[arg-type]
    assert refused.value.code == "IMAGE_TOO_LARGE" and "object reference" in refused.value.message
    assert image_bytes({"data": b"\xff" * 1024}, "t1", None, settings) == b"\xff" * 1024  # type: ignore[arg-type]
    stored = {"data": b"\xff" * 1025, "stored": {"bucket": settings.uploads_bucket, "key": "t1/x", "sha256": None,
                                                 "size": 1025, "content_type": None}}
    assert len(image_bytes(stored, "t1", None, settings)) == 1025  # type: ignore[arg-type]


class _Msg:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes = b"v") -> None:
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def headers(self) -> list[tuple[str, bytes]]:
        return []

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return self._v

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


def test_a_partition_waits_uncommitted_while_the_registry_is_away() -> None:
    from config import StreamSettings
    from stream.runtime import StageRunner
    from stream.serde import RegistryUnavailable

    class Serde:
        def decode(self, data: bytes, event: str) -> dict:
            if data == b"unknown-schema":
                raise RegistryUnavailable("schema registry unavailable: connection refused")
            return {"request_id": data.decode()}

    class Consumer:
        def __init__(self) -> None:
            self.paused: list = []

        def pause(self, tps: list) -> None:
            self.paused += [(tp.topic, tp.partition) for tp in tps]

    class Stage:
        name, input_event, emits_terminal_results = "s", "ImageSubmitted", True

    runner = object.__new__(StageRunner)
    runner.stage, runner.serde, runner.consumer = Stage(), Serde(), Consumer()  # type: ignore[assignment]
    runner.settings = StreamSettings().replace(backoff_attempts=0)
    runner._held, runner._stop = {}, threading.Event()
    msgs = [_Msg("a", 0, 1, b"unknown-schema"), _Msg("a", 0, 2, b"r2"), _Msg("a", 1, 7, b"r3")]
    admitted = runner._admit(msgs)  # type: ignore[arg-type]
    # Partition a[0] waits from the record the registry could not decode; a[1] goes on.
    assert [p.record.value["request_id"] for p in admitted if p.record] == ["r3"]
    assert [m.offset() for m in runner._held[("a", 0)].msgs] == [1, 2] and runner.consumer.paused == [("a", 0)]
