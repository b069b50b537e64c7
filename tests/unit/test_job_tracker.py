"""The recorder's job tracker: a job is announced once, when its last item has a result."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from processors.jobs import JobTracker
from processors.recorder import RecorderStage
from stream.records import Output, Record


class FakeJobs:
    def __init__(self, total: int):
        self.rows: dict[str, str] = {}
        self.total = total
        self.completed: list[tuple[str, Mapping[str, int]]] = []
        self.status = "RUNNING"

    def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
        return {"total": self.total, "status": self.status, "created_at": 5} if job_id == "j1" else None

    def result_count(self, tenant: str, job_id: str) -> int:
        return len(self.rows)

    def status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.rows.values():
            counts[s] = counts.get(s, 0) + 1
        return counts

    def mark_completed(self, tenant: str, job_id: str, counts: Mapping[str, int], completed_at: int) -> None:
        self.completed.append((job_id, dict(counts)))
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
    jobs.status = "COMPLETED"
    out = RecorderStage(Results(jobs), jobs=JobTracker(jobs)).process([rec("a")])
    assert len(out[0]) == 1 and jobs.completed == []  # at-least-once event, no second mark


def test_results_of_unknown_jobs_are_stored_without_events() -> None:
    jobs = FakeJobs(total=1)
    out = RecorderStage(Results(jobs), jobs=JobTracker(jobs)).process([rec("a", job="other")])
    assert out == [[]]
