"""Job progress: when every item of a bulk job has a result, the job is completed once and announced.

The recorder sees every DetectionResult (on `detections`) after it is stored, so it is where a job's
completion is noticed. Results of one job are spread over partitions (keyed by request id) and maybe
over several recorder instances, so no instance can count a job alone: after each batch, every job the
batch touched is counted exactly in Cassandra (one single-partition read of its items' statuses, at
most `job_max_items` clustering rows, per job per batch). The instance that sees the count reach the total
marks the job COMPLETED and emits a JobEvent. Redelivery may emit it again: the event is
at-least-once, keyed by job id, and consumers dedupe by it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from stream.cassandra import timestamp_ms
from stream.errors import TransientError
from stream.records import Output, now_ms


def jobs_events_topic(prefix: str = "") -> str:
    return f"{prefix}jobs.events"


class JobStore(Protocol):
    def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
        """The jobs row (total, created_at, status), or None."""

    def result_count(self, tenant: str, job_id: str) -> int: ...

    def status_counts(self, tenant: str, job_id: str) -> dict[str, int]: ...

    def mark_completed(self, tenant: str, job_id: str, counts: Mapping[str, int], completed_at: int) -> None: ...


class JobTracker:
    """Counts each touched job after a batch is stored; announces the ones that are complete.

    A job's total and creation time never change, so they are read once per job and process (a job id that
    has no jobs row, one produced straight into Kafka, is remembered as such too); after that a batch costs
    one read per job (its items' statuses, counted here), and the job row is read again only when the count
    reaches the total (another recorder may have completed it)."""

    def __init__(self, store: JobStore, prefix: str = "", remember: int = 10_000):
        self.store = store
        self.topic = jobs_events_topic(prefix)
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()  # bounded: completed jobs seen here
        self._known: OrderedDict[tuple[str, str], Mapping[str, Any] | None] = OrderedDict()  # running jobs' rows
        self._remember = remember

    def _job(self, tenant: str, job_id: str) -> tuple[Mapping[str, Any] | None, bool]:
        """(the job row, read just now?)"""
        if (tenant, job_id) in self._known:
            return self._known[(tenant, job_id)], False
        job = self.store.job(tenant, job_id)
        self._known[(tenant, job_id)] = job
        while len(self._known) > self._remember:
            self._known.popitem(last=False)
        return job, True

    def completed(self, results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Output]:
        """(tenant, job id) -> JobEvent output, for each job the results touch that is now complete."""
        touched = {(r["tenant"], r["job_id"]) for r in results if r.get("job_id")}
        out: dict[tuple[str, str], Output] = {}
        for tenant, job_id in sorted(touched):
            if (tenant, job_id) in self._done:
                continue
            job, fresh = self._job(tenant, job_id)
            if job is None or job.get("total") is None:
                continue  # not a gateway job (an event produced straight into Kafka with a job id)
            counts = self.store.status_counts(tenant, job_id)
            if job.get("status") != "COMPLETED" and sum(counts.values()) < job["total"]:
                continue
            if not fresh:
                job = self.store.job(tenant, job_id) or job  # its status now: another recorder may have marked it
            completed_at = now_ms()
            if job.get("status") != "COMPLETED":
                self.store.mark_completed(tenant, job_id, counts, completed_at)
            out[(tenant, job_id)] = Output(self.topic, job_id, {
                "job_id": job_id, "tenant": tenant, "status": "COMPLETED", "total": int(job["total"]),
                "ok": counts.get("OK", 0), "rejected": counts.get("REJECTED", 0), "failed": counts.get("FAILED", 0),
                "created_at": job.get("created_at"), "completed_at": completed_at}, "JobEvent")
            self._known.pop((tenant, job_id), None)
            self._done[(tenant, job_id)] = None
            while len(self._done) > self._remember:
                self._done.popitem(last=False)
        return out


class CassandraJobs:
    """JobStore on the jobs and job_results tables. Cassandra errors become TransientError."""

    def __init__(self, session: Any, timeout_s: float = 10.0):
        self._session = session
        self._timeout = timeout_s
        self._job = session.prepare("SELECT total, status, created_at FROM jobs WHERE tenant = ? AND job_id = ?")
        self._count = session.prepare("SELECT COUNT(*) AS n FROM job_results WHERE tenant = ? AND job_id = ?")
        self._statuses = session.prepare("SELECT status FROM job_results WHERE tenant = ? AND job_id = ?")
        self._complete = session.prepare(
            "UPDATE jobs SET status = 'COMPLETED', ok = ?, rejected = ?, failed = ?, completed_at = ? "
            "WHERE tenant = ? AND job_id = ?")

    def _execute(self, stmt: Any, params: tuple[Any, ...]) -> Any:
        from cassandra import DriverException
        from cassandra.cluster import NoHostAvailable

        try:
            return self._session.execute(stmt, params, timeout=self._timeout)
        except (DriverException, NoHostAvailable, OSError) as exc:
            raise TransientError(f"cassandra: {type(exc).__name__}: {exc}") from exc

    def job(self, tenant: str, job_id: str) -> Mapping[str, Any] | None:
        row = self._execute(self._job, (tenant, job_id)).one()
        if row is None:
            return None
        return {"total": row.total, "status": row.status,
                "created_at": timestamp_ms(row.created_at)}

    def result_count(self, tenant: str, job_id: str) -> int:
        return int(self._execute(self._count, (tenant, job_id)).one().n)

    def status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._execute(self._statuses, (tenant, job_id)):
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def mark_completed(self, tenant: str, job_id: str, counts: Mapping[str, int], completed_at: int) -> None:
        import datetime as dt

        self._execute(self._complete, (counts.get("OK", 0), counts.get("REJECTED", 0), counts.get("FAILED", 0),
                                       dt.datetime.fromtimestamp(completed_at / 1000, tz=dt.UTC), tenant, job_id))

