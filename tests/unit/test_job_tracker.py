"""The recorder's job tracker: a job is announced once, when its last item has a result; outages of Cassandra
delay a job's completion, never prevent it."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from processors.jobs import JobTracker
from processors.recorder import RecorderStage
from stream.errors import TransientError
from stream.records import Failure, Output, Record


class FakeJobs:
    """One gateway job, j1 (any other id has no jobs row). ``down``: every call fails, as with Cassandra away;
    ``down_for``: the calls that fail (job, status_counts, mark_completed)."""

    def __init__(self, total: int):
        self.rows: dict[str, str] = {}
        self.total = total
        self.completed: list[tuple[str, Mapping[str, int]]] = []
        self.completed_at: list[int] = []
        self.status = "RUNNING"
        self.counts: dict[str, int] = {}
        self.down_for: set[str] = set()
        self.calls = 0

    def _call(self, name: str) -> None:
        self.calls += 1
        if name in self.down_for:
            raise TransientError(f"cassandra: NoHostAvailable ({name})")

    def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
        self._call("job")
        if job_id != "j1":
            return None
        row: dict[str, Any] = {"total": self.total, "status": self.status, "created_at": 5}
        if self.status == "COMPLETED":
            row.update({"ok": self.counts.get("OK", 0), "rejected": self.counts.get("REJECTED", 0),
                        "failed": self.counts.get("FAILED", 0), "completed_at": self.completed_at[-1]})
        return row

    def result_count(self, tenant: str, job_id: str) -> int:
        return len(self.rows)

    def status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
        self._call("status_counts")
        counts: dict[str, int] = {}
        for s in self.rows.values():
            counts[s] = counts.get(s, 0) + 1
        return counts

    def mark_completed(self, tenant: str, job_id: str, counts: Mapping[str, int], completed_at: int) -> None:
        self._call("mark_completed")
        self.completed.append((job_id, dict(counts)))
        self.completed_at.append(completed_at)
        self.counts = dict(counts)
        self.status = "COMPLETED"


class Results:
    def __init__(self, jobs: FakeJobs):
        self.jobs = jobs

    def save_results(self, results: Any) -> None:
        for r in results:
            if r.get("job_id") == "j1":
                self.jobs.rows[r["request_id"]] = r["status"]


def rec(rid: str, status: str = "REJECTED", job: str | None = "j1") -> Record:
    return Record("detections", 0, 0, rid, {"request_id": rid, "tenant": "t", "status": status, "job_id": job},
                  {}, "batch")


def test_the_job_is_announced_once_when_complete() -> None:
    jobs = FakeJobs(total=3)
    stage = RecorderStage(Results(jobs), jobs=JobTracker(jobs))
    assert stage.process([rec("a"), rec("b", "FAILED"), rec("x", job=None)]) == [[], [], []]
    out = stage.process([rec("c"), rec("c")])
    assert len(out[0]) == 1 and out[1] == []
    event = out[0][0]
    assert isinstance(event, Output) and event.topic == "jobs.events" and event.key == "j1"
    assert {k: event.value[k] for k in ("total", "ok", "rejected", "failed", "status", "created_at")} == {
        "total": 3, "ok": 0, "rejected": 2, "failed": 1, "status": "COMPLETED", "created_at": 5}
    assert jobs.completed == [("j1", {"REJECTED": 2, "FAILED": 1})]
    # A redelivered result of a completed job is not announced again by this instance.
    assert stage.process([rec("a")]) == [[]]


def test_a_restarted_recorder_announces_a_job_completed_before_but_does_not_recount() -> None:
    jobs = FakeJobs(total=1)
    jobs.rows = {"a": "REJECTED"}
    jobs.mark_completed("t", "j1", {"REJECTED": 1}, 7)
    jobs.completed = []
    out = RecorderStage(Results(jobs), jobs=JobTracker(jobs)).process([rec("a")])
    assert len(out[0]) == 1 and jobs.completed == []  # at-least-once event, no second mark


def test_results_of_unknown_jobs_are_stored_without_events() -> None:
    jobs = FakeJobs(total=1)
    out = RecorderStage(Results(jobs), jobs=JobTracker(jobs)).process([rec("a", job="other")])
    assert out == [[]]


def test_a_superseding_result_after_completion_corrects_the_counts_without_counting_twice() -> None:
    # The FAILED result of b (its retries ran out) completed the job; a redrive later stores b's OK result
    # under the same request id: the job keeps one item per request and its completion time.
    jobs = FakeJobs(total=2)
    stage = RecorderStage(Results(jobs), jobs=JobTracker(jobs, recheck_s=0))
    out = stage.process([rec("a"), rec("b", "FAILED")])
    assert len(out[0]) == 1 and jobs.completed == [("j1", {"REJECTED": 1, "FAILED": 1})]
    first_at = jobs.completed_at[-1]
    out = stage.process([_cache_hit(rec("b", "OK"))])
    assert jobs.completed[-1] == ("j1", {"REJECTED": 1, "OK": 1}) and jobs.completed_at[-1] == first_at
    (event,) = out[0]  # type: ignore[misc]
    assert (event.value["ok"], event.value["rejected"], event.value["failed"], event.value["total"]) == (1, 1, 0, 2)
    assert event.value["completed_at"] == first_at
    # The same result again (a redelivery): counted once, nothing to correct or announce.
    assert stage.process([_cache_hit(rec("b", "OK"))]) == [[]] and len(jobs.completed) == 2


def _cache_hit(r: Record) -> Record:
    """A cache hit's OK result: the recorder stores those (postprocess stores the others)."""
    return Record(r.topic, r.partition, r.offset, r.key, {**r.value, "cache_hit": True}, r.headers, r.lane)


def test_a_failed_job_check_fails_only_that_jobs_records_and_the_retry_completes_it() -> None:
    jobs = FakeJobs(total=2)
    jobs.rows = {"a": "REJECTED"}
    tracker = JobTracker(jobs, recheck_s=0)
    stage = RecorderStage(Results(jobs), jobs=tracker)
    jobs.down_for = {"mark_completed"}  # the last result is stored, the mark fails
    out = stage.process([rec("b"), rec("x", job=None), rec("y", job="other")])
    assert isinstance(out[0], Failure) and isinstance(out[0].error, TransientError)
    assert out[1] == [] and out[2] == []
    assert jobs.rows["b"] == "REJECTED" and tracker.unsettled() == [("t", "j1")]
    jobs.down_for = set()
    out = stage.process([rec("b")])  # the runtime's retry of b
    assert len(out[0]) == 1 and out[0][0].event == "JobEvent"  # type: ignore[union-attr]
    assert jobs.completed == [("j1", {"REJECTED": 2})] and tracker.unsettled() == []


def test_the_recheck_completes_a_job_whose_records_ran_out_of_retries() -> None:
    jobs = FakeJobs(total=1)
    tracker = JobTracker(jobs, recheck_s=0)
    stage = RecorderStage(Results(jobs), jobs=tracker)
    jobs.down_for = {"status_counts"}
    (out,) = stage.process([rec("a")])
    assert isinstance(out, Failure) and jobs.rows == {"a": "REJECTED"}
    # Its record went to the DLQ; Cassandra is still away at the first recheck: nothing, and the job stays.
    assert tracker.recheck() == [] and tracker.unsettled() == [("t", "j1")]
    jobs.down_for = set()
    (event,) = tracker.recheck()
    assert event.event == "JobEvent" and jobs.completed == [("j1", {"REJECTED": 1})] and tracker.unsettled() == []
    # Announced with the recorder's next batch (the first record that succeeds), once.
    out = stage.process([rec("z", job=None)])
    assert out == [[event]]
    assert stage.process([rec("z", job=None)]) == [[]]


def test_an_announcement_waits_for_a_batch_with_a_success() -> None:
    jobs = FakeJobs(total=1)
    jobs.rows = {"a": "REJECTED"}
    tracker = JobTracker(jobs, recheck_s=0)
    jobs.down_for = {"status_counts"}
    assert tracker.check([{"tenant": "t", "job_id": "j1"}]).failed
    jobs.down_for = set()
    (event,) = tracker.recheck()

    class DownResults:
        def save_results(self, results: Any, **_: Any) -> None:
            raise TransientError("cassandra: NoHostAvailable")

    stage = RecorderStage(DownResults(), jobs=tracker)  # type: ignore[arg-type]
    (out,) = stage.process([rec("q", job=None)])
    assert isinstance(out, Failure)
    assert tracker.announcements() == [event]  # still queued


def test_a_recheck_round_is_bounded_and_stops_at_the_first_failure() -> None:
    class ManyJobs(FakeJobs):
        def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
            self._call("job")
            return {"total": 1, "status": "RUNNING", "created_at": 5}

    jobs = ManyJobs(total=1)
    tracker = JobTracker(jobs, recheck_s=0, recheck_max=3)
    jobs.down_for = {"job"}
    assert len(tracker.check([{"tenant": "t", "job_id": f"j{i}"} for i in range(10)]).failed) == 10
    calls = jobs.calls
    assert tracker.recheck() == [] and jobs.calls == calls + 1  # still away: one failed read, then wait
    jobs.down_for = set()
    tracker.recheck()
    assert len(tracker.unsettled()) == 7  # three per round, oldest first
    assert tracker.unsettled()[0] == ("t", "j3")


def test_the_recheck_thread_runs_by_itself_and_a_bug_in_it_stops_the_stage() -> None:
    jobs = FakeJobs(total=1)
    jobs.rows = {"a": "REJECTED"}
    tracker = JobTracker(jobs, recheck_s=0.01)
    jobs.down_for = {"status_counts"}
    tracker.check([{"tenant": "t", "job_id": "j1"}])
    jobs.down_for = set()
    stage = RecorderStage(Results(jobs), jobs=tracker)
    stage.process([rec("z", job=None)])  # starts the thread
    deadline = time.monotonic() + 5
    while jobs.completed == [] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.completed == [("j1", {"REJECTED": 1})]
    tracker.stop_rechecks()

    broken = JobTracker(jobs, recheck_s=0.01)
    broken._unsettled[("t", "j1")] = None
    boom = threading.Event()

    def bug() -> dict[str, int]:
        boom.set()
        raise KeyError("a bug")

    jobs.status_counts = lambda *_: bug()  # type: ignore[method-assign,assignment]
    broken.start_rechecks()
    assert boom.wait(5)
    deadline = time.monotonic() + 5
    while broken._crash is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="recheck thread"):
        RecorderStage(Results(jobs), jobs=broken).process([rec("z", job=None)])
