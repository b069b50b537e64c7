"""Job progress: when every item of a bulk job has a result, the job is completed once and announced.

The recorder sees every DetectionResult (on `detections`) after it is stored, so it is where a job's
completion is noticed. Results of one job are spread over partitions (keyed by request id) and maybe
over several recorder instances, so no instance can count a job alone: after each batch, every job the
batch touched is counted exactly in Cassandra (one single-partition read of its items' statuses, at
most `job_max_items` clustering rows, per job per batch). The instance that sees the count reach the total
marks the job COMPLETED and emits a JobEvent. Redelivery may emit it again: the event is
at-least-once, keyed by job id, and consumers dedupe by it.

Counts are rows of job_results keyed by request id, so a redelivered result, or one that supersedes another
(a FAILED result replaced by the OK one of a redriven dead letter), is counted once. A result reaching a job
that is already complete recounts it (one read): if the counts moved (that supersession), the job row gets
the new counts and a new JobEvent, keeping its completion time.

Outages: a job whose check fails (Cassandra away) fails the check of the batch's results of that job only
(the recorder retries those records), and the job is remembered as unsettled: ``recheck`` (every
``recheck_s``, from a thread of the recorder, at most ``recheck_max`` jobs per round) counts it again until
one check succeeds. A job whose last result was stored but whose check kept failing until its record's
retries ran out is still completed, with no record left to carry it; the JobEvent of a job completed by
the recheck leaves with the recorder's next batch (``announcements``).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas import events
from stream.cassandra import execute, fetch_all, timestamp_ms
from stream.errors import TransientError
from stream.records import Output, now_ms

JobKey = tuple[str, str]  # (tenant, job id)
STATUSES = ("OK", "REJECTED", "FAILED")


def jobs_events_topic(prefix: str = "") -> str:
    return f"{prefix}jobs.events"


class JobStore(Protocol):
    def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
        """The jobs row (total, created_at, status; ok, rejected, failed and completed_at once completed), or
        None."""

    def result_count(self, tenant: str, job_id: str) -> int: ...

    def status_counts(self, tenant: str, job_id: str) -> dict[str, int]: ...

    def mark_completed(self, tenant: str, job_id: str, counts: Mapping[str, int], completed_at: int) -> None: ...


@dataclass
class JobCheck:
    """What one check of a batch's jobs found: the events of the jobs now complete, and the jobs whose check
    failed (their results' records are to be retried)."""

    events: dict[JobKey, Output] = field(default_factory=dict)
    failed: dict[JobKey, TransientError] = field(default_factory=dict)


def _row_counts(job: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(job.get(s.lower()) or 0) for s in STATUSES)


class JobTracker:
    """Counts each touched job after a batch is stored; announces the ones that are complete.

    A job's total and creation time never change, so they are read once per job and process (a job id that
    has no jobs row, one produced straight into Kafka, is remembered as such too); after that a batch costs
    one read per job (its items' statuses, counted here), and the job row is read again only when the count
    reaches the total (another recorder may have completed it)."""

    def __init__(self, store: JobStore, prefix: str = "", remember: int = 10_000, *, recheck_s: float = 30.0,
                 recheck_max: int = 50):
        self.store = store
        self.topic = jobs_events_topic(prefix)
        self.recheck_s = recheck_s
        self.recheck_max = recheck_max
        # Bounded: the rows of jobs seen here (None: not a gateway job). A completed job's row holds the counts
        # it was completed with.
        self._known: OrderedDict[JobKey, Mapping[str, Any] | None] = OrderedDict()
        self._remember = remember
        self._unsettled: OrderedDict[JobKey, None] = OrderedDict()  # jobs whose last check failed, oldest first
        self._announce: list[Output] = []  # events of jobs the recheck completed, for the next batch
        self._lock = threading.Lock()  # the recheck thread and the stage's batches share the state above
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._crash: BaseException | None = None

    def _remember_row(self, key: JobKey, job: Mapping[str, Any] | None) -> None:
        self._known[key] = job
        self._known.move_to_end(key)
        while len(self._known) > self._remember:
            self._known.popitem(last=False)

    def _job(self, key: JobKey) -> tuple[Mapping[str, Any] | None, bool]:
        """(the job row, read just now?)"""
        if key in self._known:
            return self._known[key], False
        job = self.store.job(*key)
        self._remember_row(key, job)
        return job, True

    def _check_one(self, key: JobKey) -> Output | None:
        """Count one job; mark it COMPLETED (or correct its counts) when due. Its JobEvent, or None."""
        tenant, job_id = key
        job, fresh = self._job(key)
        if job is None or job.get("total") is None:
            return None  # not a gateway job (an event produced straight into Kafka with a job id)
        counts = self.store.status_counts(tenant, job_id)
        if job.get("status") != "COMPLETED" and sum(counts.values()) < job["total"]:
            return None
        known_complete = not fresh and job.get("status") == "COMPLETED"
        if not fresh and not known_complete:
            job = self.store.job(tenant, job_id) or job  # its status now: another recorder may have marked it
        mine = tuple(counts.get(s, 0) for s in STATUSES)
        if job.get("status") == "COMPLETED":
            if _row_counts(job) == mine:
                if known_complete:
                    return None  # a redelivered result of a job this instance knows complete: nothing new
                completed_at = job.get("completed_at") or now_ms()  # completed by another instance, or earlier
            else:  # a result superseded another since the job completed: the same completion, new counts
                completed_at = job.get("completed_at") or now_ms()
                self.store.mark_completed(tenant, job_id, counts, completed_at)
        else:
            completed_at = now_ms()
            self.store.mark_completed(tenant, job_id, counts, completed_at)
        self._remember_row(key, {**job, "status": "COMPLETED", "completed_at": completed_at,
                                 **{s.lower(): n for s, n in zip(STATUSES, mine, strict=True)}})
        return Output(self.topic, job_id, events.job_event(
            job_id=job_id, tenant=tenant, status="COMPLETED", total=int(job["total"]), ok=mine[0], rejected=mine[1],
            failed=mine[2], created_at=job.get("created_at"), completed_at=completed_at), "JobEvent")

    def check(self, results: Sequence[Mapping[str, Any]]) -> JobCheck:
        """Check each job the (stored) results touch. A job whose check fails is unsettled until one succeeds."""
        self._raise_crash()
        touched = sorted({(r["tenant"], r["job_id"]) for r in results if r.get("job_id")})
        out = JobCheck()
        with self._lock:
            for key in touched:
                try:
                    event = self._check_one(key)
                except TransientError as exc:
                    out.failed[key] = exc
                    self._unsettled[key] = None
                    continue
                self._unsettled.pop(key, None)
                if event is not None:
                    out.events[key] = event
        return out

    def completed(self, results: Sequence[Mapping[str, Any]]) -> dict[JobKey, Output]:
        """(tenant, job id) -> JobEvent output, for each job the results touch that is now complete; the first
        failed check's TransientError if any."""
        found = self.check(results)
        for exc in found.failed.values():
            raise exc
        return found.events

    def recheck(self) -> list[Output]:
        """Count again up to ``recheck_max`` unsettled jobs, oldest first; stop at the first failure (Cassandra is
        still away: the rest wait for the next round). Returns the events of the jobs completed (also queued
        for ``announcements``)."""
        events: list[Output] = []
        with self._lock:
            for key in list(self._unsettled)[:self.recheck_max]:
                try:
                    event = self._check_one(key)
                except TransientError:
                    break
                del self._unsettled[key]
                if event is not None:
                    events.append(event)
            self._announce += events
        return events

    def unsettled(self) -> list[JobKey]:
        with self._lock:
            return list(self._unsettled)

    def announcements(self) -> list[Output]:
        """The JobEvents of jobs the recheck completed since the last call (the caller produces them)."""
        self._raise_crash()
        with self._lock:
            out, self._announce = self._announce, []
        return out

    def requeue(self, events: Sequence[Output]) -> None:
        """Announcements the caller could not send (no record of its batch succeeded): sent with a later one."""
        with self._lock:
            self._announce = [*events, *self._announce]

    def start_rechecks(self) -> None:
        """The recheck thread (a daemon, once): a bug in it stops the stage at its next batch."""
        if self._thread is not None or self.recheck_s <= 0:
            return
        self._thread = threading.Thread(target=self._recheck_loop, name="job-recheck", daemon=True)
        self._thread.start()

    def stop_rechecks(self) -> None:
        self._stop.set()

    def _recheck_loop(self) -> None:
        try:
            while not self._stop.wait(self.recheck_s):
                self.recheck()
        except BaseException as exc:  # re-raised by the stage's thread: a bug crashes the process loudly
            self._crash = exc

    def _raise_crash(self) -> None:
        if self._crash is not None:
            raise RuntimeError("the job recheck thread failed") from self._crash


class CassandraJobs:
    """JobStore on the jobs and job_results tables. Cassandra errors become TransientError."""

    def __init__(self, session: Any, timeout_s: float = 10.0):
        self._session = session
        self._timeout = timeout_s
        self._job = session.prepare("SELECT total, status, created_at, ok, rejected, failed, completed_at FROM jobs "
                                    "WHERE tenant = ? AND job_id = ?")
        self._count = session.prepare("SELECT COUNT(*) AS n FROM job_results WHERE tenant = ? AND job_id = ?")
        self._statuses = session.prepare("SELECT status FROM job_results WHERE tenant = ? AND job_id = ?")
        self._complete = session.prepare(
            "UPDATE jobs SET status = 'COMPLETED', ok = ?, rejected = ?, failed = ?, completed_at = ? "
            "WHERE tenant = ? AND job_id = ?")

    def _execute(self, stmt: Any, params: tuple[Any, ...]) -> Any:
        return execute(self._session, stmt, params, timeout_s=self._timeout)

    def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
        row = self._execute(self._job, (tenant, job_id)).one()
        if row is None:
            return None
        return {"total": row.total, "status": row.status, "created_at": timestamp_ms(row.created_at),
                "ok": row.ok, "rejected": row.rejected, "failed": row.failed,
                "completed_at": timestamp_ms(row.completed_at)}

    def result_count(self, tenant: str, job_id: str) -> int:
        return int(self._execute(self._count, (tenant, job_id)).one().n)

    def status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        # a job of more rows than a page fetches the next pages while they are iterated
        for row in fetch_all(self._session, self._statuses, (tenant, job_id), timeout_s=self._timeout):
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def mark_completed(self, tenant: str, job_id: str, counts: Mapping[str, int], completed_at: int) -> None:

        self._execute(self._complete, (counts.get("OK", 0), counts.get("REJECTED", 0), counts.get("FAILED", 0),
                                       dt.datetime.fromtimestamp(completed_at / 1000, tz=dt.UTC), tenant, job_id))
