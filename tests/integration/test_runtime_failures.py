"""No single record can stop a stage (real Kafka and registry): a forged header, an output that does not fit its
schema or its topic, a record that kills its process; each ends in its DLQ letter and a terminal result, and the
stage serves the next record."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from stream_kit import (
    EchoStage,
    kafka_admin,
    make_topics,
    new_prefix,
    produce,
    read_all,
    stream_settings,
    submission,
)

from config import StackSettings
from stream import headers as H
from stream import topics as T
from stream.runtime import StageRunner
from stream.serde import AvroSerde, epoch_ms

HERE = Path(__file__).resolve().parent


@pytest.fixture
def prefix(stack: StackSettings) -> str:
    p = new_prefix()
    make_topics(stack, p)
    return p


@pytest.fixture(scope="module")
def serde(stack: StackSettings) -> AvroSerde:
    return AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)


def _serve_until(runner: StageRunner, stack: StackSettings, serde: AvroSerde, prefix: str, ids: set[str],
                 timeout_s: float = 60.0) -> dict[str, dict]:
    """Run the stage until every id in ``ids`` has a result on `detections` (or the deadline)."""
    runner.consumer.subscribe(runner.stage.input_topics() + [T.retry_topic(t) for t in runner.stage.input_topics()])
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not ids <= set(seen):
            runner.run_once()
            seen.update({r["request_id"]: r for r in _results(stack, serde, prefix, len(ids), 0.2)})
    finally:
        runner.close()
    return seen


def _results(stack: StackSettings, serde: AvroSerde, prefix: str, n: int, timeout_s: float) -> list[dict]:
    return [serde.decode(m.value(), "DetectionResult")
            for m in read_all(stack, T.detections_topic(prefix), until=n, timeout_s=timeout_s)]


def _letters(stack: StackSettings, serde: AvroSerde, topic: str, n: int) -> dict[str, dict]:
    return {m.key().decode(): {**serde.decode(m.value(), "DeadLetter"), "hdrs": H.to_dict(m.headers())}
            for m in read_all(stack, T.dlq_topic(topic), until=n, timeout_s=20)}


def test_forged_reply_to_headers_are_rejected_and_the_stage_goes_on(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "online", "submitted")
    forged = {"to-models": b"models:0", "no-partition": f"{T.replies_topic(prefix)}:999".encode(),
              "malformed": b"detect.replies", "bad-deadline": None}
    for rid, reply in forged.items():
        hdrs = {H.CORRELATION_ID: f"c-{rid}".encode()}
        if reply is not None:
            hdrs[H.REPLY_TO] = reply
        else:
            hdrs[H.DEADLINE_MS] = b"1e309"
        produce(stack, serde, topic, [submission(rid, lane="ONLINE")], headers=hdrs)
    produce(stack, serde, topic, [submission("after", lane="ONLINE")],
            headers={H.REPLY_TO: f"{T.replies_topic(prefix)}:2".encode(), H.CORRELATION_ID: b"c-after"})
    runner = StageRunner(EchoStage(prefix), stream_settings(stack, prefix))
    seen = _serve_until(runner, stack, serde, prefix, set(forged) | {"after"})

    assert seen["after"]["status"] == "OK", "the stage served the record after the forged ones"
    for rid in forged:
        assert (seen[rid]["status"], seen[rid]["error_code"]) == ("REJECTED", "INVALID_HEADER"), rid
    letters = _letters(stack, serde, topic, len(forged))
    assert set(letters) == set(forged)
    assert letters["to-models"]["error_class"] == "InvalidHeader"
    assert "not a reply topic" in letters["to-models"]["error_message"]
    assert "no partition 999" in letters["no-partition"]["error_message"]
    assert letters["to-models"]["hdrs"][H.DLQ_TOPIC].decode() == topic
    # The only reply written is the valid one, on the partition it named; nothing reached `models`.
    replies = read_all(stack, T.replies_topic(prefix), until=2, timeout_s=5)
    assert [(m.key(), m.partition()) for m in replies] == [(b"after", 2)]


def test_an_output_that_fits_neither_its_schema_nor_its_topic_is_dead_lettered(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "batch", "submitted")
    produce(stack, serde, topic, [submission("unencodable"), submission("oversized"), submission("fine")])
    stage = EchoStage(prefix, unencodable=frozenset({"unencodable"}), oversized=frozenset({"oversized"}))
    seen = _serve_until(StageRunner(stage, stream_settings(stack, prefix)), stack, serde, prefix,
                        {"unencodable", "oversized", "fine"})
    assert seen["fine"]["status"] == "OK"
    for rid in ("unencodable", "oversized"):
        assert (seen[rid]["status"], seen[rid]["error_code"]) == ("FAILED", "INVALID_OUTPUT"), rid
    letters = _letters(stack, serde, topic, 2)
    assert "does not fit its schema" in letters["unencodable"]["error_message"]
    assert "over the" in letters["oversized"]["error_message"]
    # All or none: the record whose second output was too large produced neither.
    results = _results(stack, serde, prefix, 10, 3)
    assert [r["status"] for r in results if r["request_id"] == "oversized"] == ["FAILED"]


def test_retries_are_budgeted_by_time_then_end_in_the_dlq_with_a_failed_result(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "online", "submitted")
    produce(stack, serde, topic, [submission("slow-dead", lane="ONLINE")], headers={H.CORRELATION_ID: b"c-sd"})
    settings = stream_settings(stack, prefix, backoff_attempts=1, retry_delay_ms=100, retry_delay_max_ms=400,
                               retry_budget_ms=3000)
    started = time.time() * 1000
    seen = _serve_until(StageRunner(EchoStage(prefix, transient_calls=10_000), settings), stack, serde, prefix,
                        {"slow-dead"})
    assert (seen["slow-dead"]["status"], seen["slow-dead"]["error_code"]) == ("FAILED", "RETRIES_EXHAUSTED")
    letter = _letters(stack, serde, topic, 1)["slow-dead"]
    first = int(letter["hdrs"][H.FIRST_FAILED_MS])
    assert first >= started and epoch_ms(letter["failed_at"]) - first >= 3000, "failed only once the budget was spent"
    assert letter["attempts"] >= 5, "delays of 100, 200, 400, 400... ms: several tries within the budget"
    assert letter["hdrs"][H.CORRELATION_ID] == b"c-sd"


def test_a_record_that_kills_its_process_is_set_aside_after_three_crashes(
        stack: StackSettings, serde: AvroSerde, prefix: str, tmp_path: Path) -> None:
    topic = T.lane_topic(prefix, "batch", "submitted")
    produce(stack, serde, topic, [submission(f"p-{i}") for i in range(5)])
    env = {**os.environ, "DETECTFLOW_STATE_DIR": str(tmp_path)}
    args = [sys.executable, str(HERE / "stage_worker.py"), prefix, "0", "--crash-on", "p-2"]
    exits: list[int] = []
    deadline = time.monotonic() + 180
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline and len(seen) < 5:
        worker = subprocess.Popen(args, stdout=subprocess.DEVNULL, env=env)
        try:
            # Until it dies (the poison) or everything has a result.
            while worker.poll() is None and len(seen) < 5 and time.monotonic() < deadline:
                seen = {r["request_id"]: r for r in _results(stack, serde, prefix, 5, 0.5)}
        finally:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)
        if worker.returncode < 0 and worker.returncode != -15:
            exits.append(worker.returncode)
    assert exits == [-9, -9, -9], "the poison killed the process three times, then never again"
    assert (seen["p-2"]["status"], seen["p-2"]["error_code"]) == ("FAILED", "POISON_RECORD")
    assert all(seen[f"p-{i}"]["status"] == "OK" for i in (0, 1, 3, 4))
    letter = _letters(stack, serde, topic, 1)["p-2"]
    assert letter["error_class"] == "PoisonRecord" and letter["hdrs"][H.DLQ_OFFSET]


def test_a_record_of_another_event_type_is_rejected_and_the_stage_goes_on(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "batch", "submitted")
    # A DetectionResult (its schema id registered for `detections`) written where ImageSubmitted is expected.
    wrong = {"request_id": "wrong-type", "tenant": "t1", "status": "OK", "detections": [], "timings_ms": {},
             "lane": "BATCH", "completed_at": 0}
    p = Producer(kafka_admin(stack))
    p.produce(topic, key=b"wrong-type", value=serde.encode(T.detections_topic(prefix), "DetectionResult", wrong))
    assert p.flush(10) == 0
    produce(stack, serde, topic, [submission("right-type")])
    seen = _serve_until(StageRunner(EchoStage(prefix), stream_settings(stack, prefix)), stack, serde, prefix,
                        {"wrong-type", "right-type"})
    assert seen["right-type"]["status"] == "OK"
    assert (seen["wrong-type"]["status"], seen["wrong-type"]["error_code"]) == ("REJECTED", "INVALID_EVENT")
    letter = _letters(stack, serde, topic, 1)["wrong-type"]
    assert letter["error_class"] == "DecodeError" and "ImageSubmitted" in letter["error_message"]
