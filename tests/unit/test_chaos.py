"""The chaos drill's pure parts (infra/chaos_drill.py): the fault schedule, reconciliation, the figures, the summary."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re

import pytest

from infra.chaos import parse_duration
from infra.chaos_drill import (
    DOWN,
    KILL_ROLE,
    PAUSE,
    REQUEST_PATH,
    RESTART,
    RESTART_ESTIMATE_S,
    RESTARTABLE,
    SHORT_FORM_MAX_S,
    FaultWindow,
    ResultCopy,
    Sent,
    Summary,
    SyncCall,
    describe_losses,
    fingerprint,
    format_summary,
    longest_stall,
    non_loopback,
    parse_fault,
    percentile,
    plan_faults,
    reconcile,
    recovery_times,
    result_copy,
    result_times,
    rss_growth,
    split_latencies,
)
from infra.procstats import rss_bytes

ROLES = ("bridge", "scan", "preprocess", "inference", "postprocess", "recorder", "shadow", "monitor")


def _result(rid: str, *, lane: str = "ONLINE", status: str = "OK", completed: int = 1_000, boxes: int = 1,
            took: float = 5.0) -> dict[str, object]:
    return {"request_id": rid, "tenant": "t", "status": status, "lane": lane,
            "detections": [{"class_id": 0, "score": 0.9}] * boxes, "error_code": None,
            "timings_ms": {"inference": took}, "cache_hit": False, "completed_at": completed}


def _copy(rid: str, **kwargs: object) -> ResultCopy:
    return result_copy(_result(rid, **kwargs))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("seed", range(20))
def test_the_short_form_is_a_kill_a_pause_and_a_restart_inside_the_duration(seed: int) -> None:
    plan = plan_faults(120, seed, roles=ROLES)
    assert [f.kind for f in plan] == [KILL_ROLE, PAUSE, RESTART]
    assert plan[0].target in REQUEST_PATH
    assert plan[1].target in ("cassandra", "clamd") and 20 <= plan[1].hold_s <= 30
    assert plan[2].target in ("minio", "clamd")
    starts = [f.at_s for f in plan]
    assert starts == sorted(starts) and starts[0] > 0
    # One at a time: each starts after the previous one's expected end plus a recovery gap.
    for prev, nxt in itertools.pairwise(plan):
        assert nxt.at_s >= prev.at_s + prev.expected_s()
    assert plan[-1].at_s + plan[-1].expected_s() <= 120


@pytest.mark.parametrize("duration", [10, 30, 60, 90, 301, 400, 900, 3600])
def test_no_fault_is_scheduled_past_the_deadline(duration: float) -> None:
    for seed in range(5):
        plan = plan_faults(duration, seed, roles=ROLES)
        assert all(f.at_s + f.expected_s() <= duration for f in plan)
        assert len(plan) <= (3 if duration <= SHORT_FORM_MAX_S else 2 * len(RESTARTABLE) + 2)


def test_a_short_run_gets_fewer_faults_and_a_long_one_every_service() -> None:
    assert plan_faults(10, 0, roles=ROLES) == []
    long_plan = plan_faults(1800, 0, roles=ROLES)
    assert {f.target for f in long_plan if f.kind == RESTART} == set(RESTARTABLE)
    assert {f.target for f in long_plan if f.kind == PAUSE} == {"cassandra", "clamd"}
    assert all(30 <= f.hold_s <= 120 for f in long_plan if f.kind == PAUSE)
    assert plan_faults(1800, 0, roles=ROLES) == long_plan  # the seed makes it reproducible
    assert plan_faults(1800, 1, roles=ROLES) != long_plan


def test_chosen_faults_replace_the_schedule_in_their_order() -> None:
    chosen = [parse_fault(spec, ROLES) for spec in ("kill:recorder", "restart:kafka", "pause:clamd:45",
                                                     "pause:cassandra")]
    plan = plan_faults(400, 7, roles=ROLES, chosen=chosen)
    assert [(f.kind, f.target, f.hold_s) for f in plan] == [
        (KILL_ROLE, "recorder", 0), (RESTART, "kafka", 0), (PAUSE, "clamd", 45.0), (PAUSE, "cassandra", 30.0)]
    for prev, nxt in itertools.pairwise(plan):  # still one at a time, with the long form's recovery gap
        assert nxt.at_s >= prev.at_s + prev.expected_s() + 30
    # Still bounded by the duration: what does not fit is dropped.
    assert [f.target for f in plan_faults(120, 7, roles=ROLES, chosen=chosen)] == ["recorder", "kafka"]


def test_an_outage_holds_its_service_down_ten_minutes_by_default_and_is_scheduled_with_its_restart() -> None:
    minio, kafka = parse_fault("down:minio:120", ROLES), parse_fault("down:kafka", ROLES)
    assert (minio.kind, minio.target, minio.hold_s, kafka.hold_s) == (DOWN, "minio", 120.0, 600.0)
    assert kafka.label == "down kafka 600s" and kafka.expected_s() == 600 + RESTART_ESTIMATE_S["kafka"]
    plan = plan_faults(800, 7, roles=ROLES, chosen=[kafka, minio])
    assert [f.target for f in plan] == ["kafka"]  # the second does not fit after the first's 10 minutes
    assert plan[0].at_s + plan[0].expected_s() + 30 <= 800


@pytest.mark.parametrize("spec", ["restart:kafkaa", "kill:gateway", "kill", "pause:kafka", "pause:clamd:0",
                                  "pause:clamd:1000", "pause:clamd:1e3", "restart:kafka:30", "stop:clamd", "",
                                  "down:gateway", "down:clamd:0", "down:kafka:1000"])
def test_a_fault_spec_outside_the_known_kinds_and_targets_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="not a fault"):
        parse_fault(spec, ROLES)


# ---------------------------------------------------------------------------------------------- reconciliation


def test_one_result_per_request_is_clean() -> None:
    sent = [Sent("a", "sync", "ONLINE", 0), Sent("b", "job", "BATCH", 0), Sent("c", "ingest", "BATCH", 0)]
    rec = reconcile(sent, [_copy("a"), _copy("b", lane="BATCH"), _copy("c", lane="BATCH", status="REJECTED")])
    assert (rec.lost, rec.duplicated, rec.redelivered_copies) == ([], [], 0)
    assert rec.sent == 3 and rec.sent_by_kind == {"sync": 1, "job": 1, "ingest": 1}
    assert rec.statuses == {"OK": 2, "REJECTED": 1}


def test_a_request_without_a_result_is_lost_and_foreign_results_are_ignored() -> None:
    sent = [Sent("a", "sync", "ONLINE", 0), Sent("b", "job", "BATCH", 0)]
    rec = reconcile(sent, [_copy("a"), _copy("someone-else")])
    assert rec.lost == ["b"] and rec.duplicated == [] and "b" not in rec.first_completion


def test_an_online_copy_with_the_same_answer_is_a_redelivery_not_a_duplicate() -> None:
    # A postprocess killed before its commit answers again: other timings and completion time, same answer.
    sent = [Sent("a", "sync", "ONLINE", 0)]
    rec = reconcile(sent, [_copy("a", completed=2_000, took=5.0), _copy("a", completed=1_500, took=9.0),
                           _copy("a", completed=3_000, took=1.0)])
    assert rec.duplicated == [] and rec.redelivered_copies == 2
    assert rec.first_completion["a"] == 1.5  # the earliest copy completes the request


def test_two_different_answers_are_a_duplicate_on_either_lane() -> None:
    sent = [Sent("a", "sync", "ONLINE", 0)]
    rec = reconcile(sent, [_copy("a"), _copy("a", status="FAILED", boxes=0)])
    assert rec.duplicated == ["a"] and rec.redelivered_copies == 0


def test_any_second_copy_on_the_exactly_once_batch_lane_is_a_duplicate() -> None:
    sent = [Sent("j", "job", "BATCH", 0), Sent("i", "ingest", "BATCH", 0)]
    rec = reconcile(sent, [_copy("j", lane="BATCH"), _copy("j", lane="BATCH"), _copy("i", lane="BATCH")])
    assert rec.duplicated == ["j"] and rec.redelivered_copies == 0 and rec.lost == []


def test_the_fingerprint_ignores_only_the_timing_fields() -> None:
    a = _result("a", completed=1, took=1.0)
    assert fingerprint(a) == fingerprint({**a, "completed_at": 2, "timings_ms": {"x": 3.0}, "cache_hit": True})
    assert fingerprint(a) != fingerprint({**a, "status": "FAILED"})


def test_a_decoded_timestamp_and_epoch_milliseconds_read_the_same() -> None:
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert _copy("a", completed=int(when.timestamp() * 1000)).completed_at == \
        result_copy({**_result("a"), "completed_at": when}).completed_at


# ---------------------------------------------------------------------------------------------- figures


def test_the_longest_stall_counts_only_time_with_requests_outstanding() -> None:
    sent = [Sent("a", "sync", "ONLINE", 0.0), Sent("b", "sync", "ONLINE", 1.0),
            Sent("c", "sync", "ONLINE", 20.0), Sent("d", "sync", "ONLINE", 21.0)]
    # a done at 2, b at 3; nothing outstanding 3..20; c waits 20..30 (10 s), d done at 30.5.
    stall, at = longest_stall(sent, {"a": 2.0, "b": 3.0, "c": 30.0, "d": 30.5}, end=40.0)
    assert (stall, at) == (10.0, 20.0)


def test_a_lost_request_stalls_until_the_end() -> None:
    sent = [Sent("a", "sync", "ONLINE", 0.0), Sent("b", "sync", "ONLINE", 1.0)]
    assert longest_stall(sent, {"a": 2.0}, end=50.0) == (48.0, 2.0)
    assert longest_stall([], {}, end=5.0) == (0.0, 0.0)


def test_latencies_split_by_overlap_with_a_fault_and_only_for_200s() -> None:
    faults = [FaultWindow("pause cassandra", 10.0, 20.0)]
    calls = [SyncCall(0.0, 0.1, 200), SyncCall(9.0, 11.0, 200), SyncCall(15.0, 16.0, 200),
             SyncCall(25.0, 25.2, 200), SyncCall(12.0, 13.0, 502)]
    outside, during = split_latencies(calls, faults)
    assert outside == pytest.approx([100.0, 200.0]) and during == pytest.approx([2000.0, 1000.0])


def test_percentile_by_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99 and percentile(values, 1.0) == 100
    assert percentile([], 0.5) is None and percentile([7.0], 0.99) == 7.0


def test_recovery_is_the_first_completion_after_the_fault_ended() -> None:
    faults = [FaultWindow("kill-role scan", 10.0, 12.0), FaultWindow("restart minio", 30.0, 40.0)]
    assert recovery_times(faults, [5.0, 11.0, 14.5, 41.0]) == [2.5, 1.0]
    assert recovery_times(faults, [5.0]) == [None, None]


def test_rss_growth_compares_the_first_and_last_windows() -> None:
    flat = [(float(t), 100) for t in range(0, 1200, 5)]
    assert rss_growth(flat) == 0.0
    leaking = [(float(t), 100 + t // 10) for t in range(0, 1200, 5)]  # +10 bytes a 100 s
    growth = rss_growth(leaking)
    assert growth is not None and growth > 0.10
    short = [(0.0, 100), (10.0, 100), (20.0, 200), (30.0, 200), (40.0, 200)]  # under 2 windows: fifths
    assert rss_growth(short) == 1.0
    assert rss_growth([(0.0, 1)]) is None


def test_rss_is_read_per_process() -> None:
    rss = rss_bytes(os.getpid())
    assert rss is not None and rss > 1 << 20
    assert rss_bytes(2**22 + 12345) is None  # above pid_max: never a process


# ---------------------------------------------------------------------------------------------- summary


def _summary(sent: list[Sent], copies: list[ResultCopy], jobs: list[dict[str, object]]) -> Summary:
    rec = reconcile(sent, copies)
    faults = [FaultWindow("kill-role scan", 10.0, 11.0, "pid 1 -> 2")]
    return Summary(rec, faults, [0.5], 3.0, [40.0, 60.0], [900.0], {503: 4}, {}, jobs, 200.0, stall_from_s=12.0,
                   lag_end={"detectflow.scan": 0, "detectflow.recorder": 3},
                   health_ms={"/livez": [1.0, 2.0, 3.0, 40.0], "/readyz": [2.5]}, health_failed={"/readyz": 2})


def test_the_summary_passes_and_names_every_figure() -> None:
    job = {"job_id": "j1", "status": "COMPLETED", "total": 1, "done": 1, "counts": {"OK": 1}, "paged": 1}
    s = _summary([Sent("a", "sync", "ONLINE", 0), Sent("b", "job", "BATCH", 0)],
                 [_copy("a"), _copy("a", took=1.0), _copy("b", lane="BATCH")], [job])
    text = format_summary(s)
    assert s.passed
    for line in ("requests sent: 2 (job 1, sync 1)", "lost: 0", "duplicated: 0",
                 "redelivered copies (online, at-least-once): 1", "longest stall: 3.0s (from +12s)",
                 "consumer lag at the end: 3 (detectflow.recorder 3)",
                 "P50 40ms P99 60ms (n=2); during faults: P50 900ms", "503 x4",
                 "fault kill-role scan: 1.0s (pid 1 -> 2); recovered: first result 0.5s after", "verdict: PASS",
                 "health /livez: P50 2.0ms P99 40.0ms max 40.0ms (n=4; not 200 within 2s: 0)",
                 "health /readyz: P50 2.5ms P99 2.5ms max 2.5ms (n=1; not 200 within 2s: 2)"):
        assert line in text, (line, text)


@pytest.mark.parametrize("case", ["lost", "duplicated", "job"])
def test_the_summary_fails_on_a_loss_a_duplicate_or_an_unfinished_job(case: str) -> None:
    job = {"job_id": "j1", "status": "COMPLETED", "total": 1, "done": 1, "counts": {"OK": 1}, "paged": 1}
    sent = [Sent("b", "job", "BATCH", 0)]
    copies = [_copy("b", lane="BATCH")]
    if case == "lost":
        copies = []
    elif case == "duplicated":
        copies *= 2
    else:
        job = {**job, "status": "RUNNING", "done": 0}
    s = _summary(sent, copies, [job])
    assert not s.passed and "verdict: FAIL" in format_summary(s)


# ---------------------------------------------------------------------------------------------- CLI pieces


def test_durations_parse() -> None:
    assert [parse_duration(v) for v in ("180", "180s", "3m", "1.5h")] == [180, 180, 180, 5400]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("three minutes")


def test_only_a_loopback_stack_is_accepted() -> None:
    assert non_loopback({"kafka": "127.0.0.1:9092", "registry": "https://localhost:8081/apis/ccompat/v7",
                         "cassandra": "127.0.0.1,::1", "clamd": "127.0.0.2"}) == []
    assert non_loopback({"kafka": "10.0.0.5:9092", "minio": "minio.example.com:9000",
                         "cassandra": "127.0.0.1,10.1.1.1"}) == \
        ["kafka=10.0.0.5:9092", "minio=minio.example.com:9000", "cassandra=127.0.0.1,10.1.1.1"]


def test_the_cli_refuses_a_non_loopback_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    from config import PipelineSettings, StackSettings
    from infra.chaos_drill import ChaosError
    from infra.chaos_run import check_loopback

    monkeypatch.setenv("DETECTFLOW_KAFKA_BOOTSTRAP", "10.2.3.4:9092")
    with pytest.raises(ChaosError, match=re.escape("kafka=10.2.3.4:9092")):
        check_loopback(StackSettings.from_env(), PipelineSettings.from_env())


def test_detectflow_chaos_refuses_a_non_loopback_stack_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from infra.cli import main

    monkeypatch.setenv("DETECTFLOW_CLAMD_HOST", "192.0.2.7")
    assert main(["chaos", "--duration", "30s", "--seed", "3"]) == 2
    assert "clamd=192.0.2.7" in capsys.readouterr().err


def test_each_lost_or_duplicated_request_is_described_with_its_faults_dlq_and_stored_status() -> None:
    sent = [Sent("s1", "sync", "ONLINE", 112.0), Sent("j1", "job", "BATCH", 101.0), Sent("ok", "sync", "ONLINE", 1.0)]
    rec = reconcile(sent, [_copy("ok"), _copy("j1", lane="BATCH"), _copy("j1", lane="BATCH")])
    faults = [FaultWindow("pause cassandra", 110.0, 130.0), FaultWindow("restart minio", 300.0, 310.0)]
    lines = describe_losses(rec, sent, faults, 100.0, {"s1": ["p.detect.online.scanned.dlq"]}, {"s1": "PENDING"})
    assert lines == [
        "  lost sync s1: sent at +12.0s near faults [pause cassandra]; on DLQ: p.detect.online.scanned.dlq; "
        "API: PENDING",
        "  duplicated job j1 (lane BATCH), sent at +1.0s"]


def test_late_growth_tells_a_warm_up_from_a_leak() -> None:
    from infra.chaos_drill import rss_late_growth

    warm = [(float(t), 100 + min(t, 600) // 6) for t in range(0, 1800, 5)]  # grows 10 min, then holds still
    leak = [(float(t), 100 + t // 18) for t in range(0, 1800, 5)]           # grows all the way
    assert rss_late_growth(warm) == 0.0
    late = rss_late_growth(leak)
    assert late is not None and late > 0.2
    assert rss_late_growth(warm[:100]) is None  # 500 s: too short for two windows per half


def test_time_to_result_is_per_kind_from_sending_to_the_first_result() -> None:
    sent = [Sent("a", "sync", "ONLINE", 100.0), Sent("b", "ingest", "BATCH", 100.0),
            Sent("c", "ingest", "BATCH", 110.0), Sent("d", "ingest", "BATCH", 120.0)]
    times = result_times(sent, {"a": 100.2, "b": 400.0, "c": 111.0})  # d has no result: not counted here (lost)
    assert times == {"sync": [pytest.approx(0.2)], "ingest": [300.0, 1.0]}
    job = {"job_id": "j1", "status": "COMPLETED", "total": 1, "done": 1, "counts": {"OK": 1}, "paged": 1}
    s = _summary([Sent("a", "sync", "ONLINE", 0)], [_copy("a")], [job])
    s.result_s = times
    text = format_summary(s)
    assert "time to result, ingest: P50 1.0s P99 300.0s max 300.0s (n=2)" in text, text
    assert "time to result, sync: P50 0.2s" in text


def test_the_load_keeps_ten_seconds_of_calls_open_so_an_overload_is_offered_not_waited_for() -> None:
    from infra.chaos_run import in_flight_cap

    assert in_flight_cap(2.0) == 32  # the drill's steady load: a cap it never reaches
    assert in_flight_cap(68.5) == 685  # 4x a 17/s capacity: past the gateway's own in-flight limit
