"""The stream runtime against real Kafka and the real registry."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer
from stream_kit import (
    EchoStage,
    detection_results,
    kafka_admin,
    produce,
    read_all,
    stream_settings,
    submission,
)

from config import StackSettings
from infra.stack import manager
from stream import headers as H
from stream import topics as T
from stream.runtime import StageRunner
from stream.serde import AvroSerde
from stream.watchdog import STALLED_EXIT_STATUS

HERE = Path(__file__).resolve().parent


def _run_until(runner: StageRunner, stop_when, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    runner.consumer.subscribe(runner.stage.input_topics() + [T.retry_topic(t) for t in runner.stage.input_topics()])
    try:
        while time.monotonic() < deadline and not stop_when():
            runner.run_once()
    finally:
        runner.close()


def test_poison_record_goes_to_dlq_with_provenance_and_next_record_is_processed(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "online", "submitted")
    p = Producer({**kafka_admin(stack)})
    p.produce(topic, key=b"poison-1", value=b"\x00\x00\x00\x00\x07not avro at all", partition=0)
    p.produce(topic, key=b"bad-magic", value=b"{\"json\": true}", partition=0)
    assert p.flush(10) == 0
    produce(stack, serde, topic, [submission("good-1", lane="ONLINE")])
    runner = StageRunner(EchoStage(prefix), stream_settings(stack, prefix))
    results: dict[str, dict] = {}
    _run_until(runner, lambda: len(results) >= 3 or bool(results.update(
        {r["request_id"]: r for r in detection_results(stack, serde, prefix, 3, timeout_s=0.5)})))
    assert results["good-1"]["status"] == "OK"
    assert results["poison-1"]["status"] == "REJECTED" and results["poison-1"]["error_code"] == "INVALID_EVENT"
    assert results["bad-magic"]["status"] == "REJECTED"

    dlq = read_all(stack, T.dlq_topic(topic), until=2, timeout_s=20)
    assert len(dlq) == 2
    by_key = {m.key(): m for m in dlq}
    hdrs = H.to_dict(by_key[b"poison-1"].headers())
    assert hdrs[H.DLQ_TOPIC].decode() == topic
    assert hdrs[H.DLQ_PARTITION] == b"0"
    assert int(hdrs[H.DLQ_OFFSET]) >= 0
    assert hdrs[H.ERROR_CLASS] == b"DecodeError"
    assert hdrs[H.ERROR_MESSAGE]
    letter = serde.decode(by_key[b"poison-1"].value(), "DeadLetter")
    assert letter["value"] == b"\x00\x00\x00\x00\x07not avro at all"
    assert letter["stage"] == "echo" and letter["topic"] == topic


def test_invalid_record_is_rejected_with_the_stage_code(stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "batch", "submitted")
    produce(stack, serde, topic, [submission("inv-1", tenant="invalid"), submission("ok-1")])
    runner = StageRunner(EchoStage(prefix), stream_settings(stack, prefix))
    seen: dict[str, dict] = {}
    _run_until(runner, lambda: len(seen) >= 2 or bool(seen.update(
        {r["request_id"]: r for r in detection_results(stack, serde, prefix, 2, timeout_s=0.5)})))
    assert (seen["inv-1"]["status"], seen["inv-1"]["error_code"]) == ("REJECTED", "INVALID_TENANT")
    assert seen["ok-1"]["status"] == "OK"
    letters = read_all(stack, T.dlq_topic(topic), until=1, timeout_s=20)
    assert [m.key() for m in letters] == [b"inv-1"]


def test_transient_error_backs_off_then_succeeds(stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    parent = H.new_traceparent()
    produce(stack, serde, T.lane_topic(prefix, "online", "submitted"), [submission("tr-1", lane="ONLINE")],
            headers={H.TRACEPARENT: parent.encode(), H.CORRELATION_ID: b"c-tr-1"})
    stage = EchoStage(prefix, transient_calls=2)
    runner = StageRunner(stage, stream_settings(stack, prefix, backoff_attempts=3))
    got: list[dict] = []
    _run_until(runner, lambda: bool(got) or bool(got.extend(detection_results(stack, serde, prefix, 1, timeout_s=0.5))))
    assert [(r["request_id"], r["status"]) for r in got] == [("tr-1", "OK")]
    (out,) = read_all(stack, T.detections_topic(prefix), until=1, timeout_s=10)
    hdrs = H.to_dict(out.headers())
    # The trace continues (same trace id, new span) and the correlation id travels on.
    assert H.trace_id(H.text(hdrs, H.TRACEPARENT)) == H.trace_id(parent)
    assert H.text(hdrs, H.TRACEPARENT) != parent
    assert hdrs[H.CORRELATION_ID] == b"c-tr-1"
    assert stage.calls == 3, "two transient failures, then success within the in-loop backoff"
    assert read_all(stack, T.retry_topic(T.lane_topic(prefix, "online", "submitted")), until=1, timeout_s=2) == []


def test_transient_error_goes_through_the_retry_topic_then_succeeds(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    topic = T.lane_topic(prefix, "batch", "submitted")
    produce(stack, serde, topic, [submission("rt-1")])
    stage = EchoStage(prefix, transient_calls=2)
    # A 2 s delay makes the runner poll the retry record before it is due (the hold path).
    runner = StageRunner(stage, stream_settings(stack, prefix, backoff_attempts=2, retry_delay_ms=2000))
    got: list[dict] = []
    _run_until(runner, lambda: bool(got) or bool(got.extend(detection_results(stack, serde, prefix, 1, timeout_s=0.3))))
    assert [(r["request_id"], r["status"]) for r in got] == [("rt-1", "OK")]
    retried = read_all(stack, T.retry_topic(topic), until=1, timeout_s=10)
    assert len(retried) == 1
    hdrs = H.to_dict(retried[0].headers())
    assert hdrs[H.ATTEMPT] == b"2" and hdrs[H.ORIGIN_TOPIC].decode() == topic
    assert int(hdrs[H.NOT_BEFORE_MS]) > 0


def test_online_records_overtake_a_batch_backlog(stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    produce(stack, serde, T.lane_topic(prefix, "batch", "submitted"), [submission(f"b-{i}") for i in range(1000)])
    runner = StageRunner(EchoStage(prefix, delay_s=0.004), stream_settings(stack, prefix, max_batch=16))
    thread = threading.Thread(target=runner.run, kwargs={"idle_stop_s": 3.0}, daemon=True)
    thread.start()
    try:
        started = detection_results(stack, serde, prefix, 1, timeout_s=60)
        assert started, "the batch backlog never started"
        produce(stack, serde, T.lane_topic(prefix, "online", "submitted"),
                [submission(f"o-{i}", lane="ONLINE") for i in range(20)])
        results = detection_results(stack, serde, prefix, 1020, timeout_s=120)
    finally:
        runner.stop()
        thread.join(30)
    assert len(results) == 1020
    last_online = max(r["completed_at"] for r in results if r["request_id"].startswith("o-"))
    batch_after = sum(1 for r in results if r["request_id"].startswith("b-") and r["completed_at"] > last_online)
    # The online records arrived behind ~1000 batch records; they must not wait for them.
    assert batch_after >= 500, f"only {batch_after} batch records were still queued when online finished"


@pytest.mark.parametrize("exactly_once", [True, False], ids=["transactional", "at-least-once"])
def test_kill_9_mid_batch_then_restart_loses_nothing(stack: StackSettings, serde: AvroSerde, prefix: str,
                                                      exactly_once: bool) -> None:
    n = 300
    produce(stack, serde, T.lane_topic(prefix, "batch", "submitted"), [submission(f"k-{i}") for i in range(n)])
    args = [sys.executable, str(HERE / "stage_worker.py"), prefix, "0.01"]
    args += ["--exactly-once"] if exactly_once else []
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        # Wait until the worker is mid-way, then kill it without warning.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(detection_results(stack, serde, prefix, 60, timeout_s=1)) < 60:
            assert first.poll() is None, "worker died on its own"
        first.kill()
        first.wait(10)
        done_before = {r["request_id"] for r in detection_results(stack, serde, prefix, n, timeout_s=3)}
        assert 0 < len(done_before) < n, "the kill must land mid-way"
        second = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            seen: set[str] = set()
            while time.monotonic() < deadline and len(seen) < n:
                seen = {r["request_id"] for r in detection_results(stack, serde, prefix, 2 * n, timeout_s=2)}
        finally:
            second.terminate()
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    results = detection_results(stack, serde, prefix, 2 * n, timeout_s=5)
    counts = Counter(r["request_id"] for r in results)
    assert set(counts) == {f"k-{i}" for i in range(n)}, "nothing lost"
    if exactly_once:
        assert max(counts.values()) == 1, "transactional outputs are read exactly once (read_committed)"
    # The at-least-once path may repeat a record; the sink keys by request id, so its view is one per id.
    sink = {r["request_id"]: r for r in results}
    assert len(sink) == n



@pytest.mark.restart
def test_a_kafka_restart_with_a_transaction_open_ends_in_every_result_without_a_hang(
        stack: StackSettings, serde: AvroSerde, prefix: str, tmp_path: Path) -> None:
    # An exactly-once stage lives through a Kafka restart with its transaction open. librdkafka's
    # send_offsets_to_transaction then waits on the stale group coordinator for ~10 minutes, past its own timeout:
    # the runtime replaces such a producer, or stops its loop when a transaction is open (docs/reliability.md).
    n, after = 400, 50
    args = [sys.executable, str(HERE / "stage_worker.py"), prefix, "0.05", "--exactly-once"]
    produce(stack, serde, T.lane_topic(prefix, "batch", "submitted"), [submission(f"k-{i}") for i in range(n)])
    want = {f"k-{i}" for i in range(n)} | {f"a-{i}" for i in range(after)}
    with (tmp_path / "workers.log").open("ab") as log:
        workers = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)]
        try:
            deadline = time.monotonic() + 90
            while len(detection_results(stack, serde, prefix, 40, timeout_s=1)) < 40:  # mid-way through
                assert time.monotonic() < deadline and workers[0].poll() is None, "the worker made no progress"
            manager.down(stack, ["kafka"], log=lambda _m: None)
            manager.up(stack, log=lambda _m: None)  # dependents too, should one have fallen
            back = time.monotonic()
            produce(stack, serde, T.lane_topic(prefix, "batch", "submitted"),
                    [submission(f"a-{i}") for i in range(after)])
            seen: set[str] = set()
            while not want <= seen:
                # The hang held results ~10 minutes; a stage ended by the watchdog's bound, ~40 s plus the
                # broker's transaction timeout (60 s) before its aborted outputs stop blocking read_committed.
                assert time.monotonic() - back < 90, f"{len(want - seen)} records without a result 90 s after Kafka " \
                                                     f"was back ({(tmp_path / 'workers.log')})"
                code = workers[-1].poll()
                if code is not None:  # a transaction was open: the loop stopped; a supervisor starts another
                    assert code != STALLED_EXIT_STATUS, "a call hung until the watchdog ended the process"
                    workers.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log))
                seen = {r["request_id"] for r in detection_results(stack, serde, prefix, 2 * len(want), timeout_s=2)}
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
                    worker.wait(30)
    counts = Counter(r["request_id"] for r in detection_results(stack, serde, prefix, 2 * len(want), timeout_s=5))
    assert set(counts) == want and max(counts.values()) == 1, "every record once (read_committed)"

def test_late_reply_is_never_delivered_to_a_newer_waiter(stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    from stream.reply import ReplyRouter, ReplyTimeout

    router = ReplyRouter(stream_settings(stack, prefix), serde, T.replies_topic(prefix), 3)
    router.start()
    try:
        old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
        router.expect(old_id, time.time() + 0.2)
        with pytest.raises(ReplyTimeout):
            router.wait_sync(old_id, time.time() + 0.2)
        newer = router.expect(new_id, time.time() + 30)

        p = Producer({**kafka_admin(stack)})

        def reply(corr: str, request_id: str) -> None:
            result = {"request_id": request_id, "tenant": "t1", "status": "OK", "completed_at": 1}
            p.produce(T.replies_topic(prefix), partition=3, key=request_id.encode(),
                      value=serde.encode(T.replies_topic(prefix), "DetectionResult", result),
                      headers=[(H.CORRELATION_ID, corr.encode())])
            assert p.flush(10) == 0

        reply(old_id, "old-request")
        deadline = time.monotonic() + 10
        while router.late < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert router.late == 1
        assert not newer.done(), "the late reply must not resolve another waiter"
        reply(new_id, "new-request")
        assert newer.result(timeout=10)["request_id"] == "new-request"
    finally:
        router.close()


def test_sigterm_finishes_the_batch_commits_and_leaves_no_duplicates(
        stack: StackSettings, serde: AvroSerde, prefix: str) -> None:
    n = 200
    produce(stack, serde, T.lane_topic(prefix, "batch", "submitted"), [submission(f"s-{i}") for i in range(n)])
    args = [sys.executable, str(HERE / "stage_worker.py"), prefix, "0.01"]  # at-least-once mode
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(detection_results(stack, serde, prefix, 40, timeout_s=1)) < 40:
            assert first.poll() is None, "worker died on its own"
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, "a SIGTERM'd stage exits cleanly"
    finally:
        if first.poll() is None:
            first.kill()
    done_before = len(detection_results(stack, serde, prefix, n, timeout_s=3))
    assert 0 < done_before < n
    second = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(detection_results(stack, serde, prefix, n, timeout_s=2)) < n:
            pass
    finally:
        second.terminate()
        second.wait(30)
    counts = Counter(r["request_id"] for r in detection_results(stack, serde, prefix, 2 * n, timeout_s=5))
    assert set(counts) == {f"s-{i}" for i in range(n)}
    # Everything the first process produced was committed before it left: nothing is redone.
    assert max(counts.values()) == 1
