"""The gateway's Cassandra reads and writes, awaitable. Every statement names the tenant in its partition key.

Driver futures are bridged into asyncio with callbacks (no thread per call); reads that may span pages
(a job's statuses) run in the default executor. Driver errors become Problem UNAVAILABLE (503).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cassandra.query import UNSET_VALUE, BatchStatement, BatchType

from gateway.problems import Problem
from processors.governance import ERASED, deleted_result
from processors.results import result_json
from stream.cassandra import AUDIT_INSERT, audit_row, execute_async, fetch_all, timestamp_ms
from stream.errors import TransientError

to_ms = timestamp_ms


def _cause_name(exc: BaseException) -> str:
    """The driver's error behind a TransientError (what an operator can look up), else the error itself."""
    return type(exc.__cause__ if isinstance(exc, TransientError) and exc.__cause__ else exc).__name__


def from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    job_id: str | None
    lane: str | None
    image_sha256: str | None
    source: str | None
    model_name: str | None
    submitted_at: int | None
    status: str | None
    result: dict[str, Any] | None
    completed_at: int | None


@dataclass(frozen=True)
class JobRow:
    job_id: str
    total: int
    model_name: str | None
    params: dict[str, Any]
    created_at: int | None
    status: str
    counts: dict[str, int] | None  # final counts once COMPLETED
    completed_at: int | None
    published: bool


class GatewayStore:
    def __init__(self, session: Any, *, result_ttl_s: int, idempotency_ttl_s: int, audit_ttl_s: int,
                 timeout_s: float = 5.0):
        self._session = session
        self._timeout = timeout_s
        self._result_ttl = result_ttl_s
        self._idem_ttl = idempotency_ttl_s
        self._audit_ttl = audit_ttl_s
        self._batch_type = BatchType.UNLOGGED
        p = session.prepare
        self._put_request = p(
            "UPDATE requests USING TTL ? SET job_id = ?, lane = ?, image_sha256 = ?, source = ?, model_name = ?, "
            "submitted_at = ? WHERE tenant = ? AND request_id = ?")
        self._fail_request = p(
            "UPDATE requests USING TTL ? SET status = 'FAILED', error_code = ?, completed_at = ? "
            "WHERE tenant = ? AND request_id = ?")
        self._get_request = p(
            "SELECT request_id, job_id, lane, image_sha256, source, model_name, submitted_at, status, result, "
            "completed_at FROM requests WHERE tenant = ? AND request_id = ?")
        self._delete_request = p("DELETE FROM requests WHERE tenant = ? AND request_id = ?")
        self._claim_key = p(
            "INSERT INTO idempotency_keys (tenant, idempotency_key, fingerprint, resource, created_at) "
            "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?")
        self._release_key = p("DELETE FROM idempotency_keys WHERE tenant = ? AND idempotency_key = ?")
        self._put_job = p(
            "INSERT INTO jobs (tenant, job_id, total, model_name, params, created_at, subject, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'RUNNING') USING TTL ?")
        self._get_job = p(
            "SELECT job_id, total, model_name, params, created_at, status, ok, rejected, failed, completed_at, "
            "published FROM jobs WHERE tenant = ? AND job_id = ?")
        self._job_published = p("UPDATE jobs USING TTL ? SET published = true WHERE tenant = ? AND job_id = ?")
        self._job_statuses = p("SELECT status FROM job_results WHERE tenant = ? AND job_id = ?")
        self._job_page_first = p(
            "SELECT request_id, result FROM job_results WHERE tenant = ? AND job_id = ? LIMIT ?")
        self._job_page_after = p(
            "SELECT request_id, result FROM job_results WHERE tenant = ? AND job_id = ? AND request_id > ? LIMIT ?")
        self._delete_job_result = p("DELETE FROM job_results WHERE tenant = ? AND job_id = ? AND request_id = ?")
        self._image_requests = p("SELECT request_id FROM image_requests WHERE tenant = ? AND image_sha256 = ?")
        self._delete_image_requests = p("DELETE FROM image_requests WHERE tenant = ? AND image_sha256 = ?")
        self._delete_image_cache = p("DELETE FROM image_cache WHERE tenant = ? AND image_sha256 = ?")
        self._put_tombstone = p(
            "INSERT INTO image_tombstones (tenant, image_sha256, deleted_at, subject) VALUES (?, ?, ?, ?) USING TTL ?")
        self._get_tombstone = p("SELECT deleted_at FROM image_tombstones WHERE tenant = ? AND image_sha256 = ?")
        self._get_tombstones = p(
            "SELECT image_sha256, deleted_at FROM image_tombstones WHERE tenant = ? AND image_sha256 IN ?")
        self._supersede_job_result = p(
            "INSERT INTO job_results (tenant, job_id, request_id, status, error_code, result, completed_at) "
            "VALUES (?, ?, ?, 'REJECTED', 'IMAGE_DELETED', ?, ?) USING TTL ?")
        self._get_policy = p(
            "SELECT hidden_classes, review_classes, review_retention_days, revision, updated_by, updated_at "
            "FROM tenant_policies WHERE tenant = ?")
        self._put_policy = p(
            "INSERT INTO tenant_policies (tenant, hidden_classes, review_classes, review_retention_days, revision, "
            "updated_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
        self._quota_get = p("SELECT images FROM quota_daily WHERE tenant = ? AND day = ?")
        self._quota_first = p("INSERT INTO quota_daily (tenant, day, images) VALUES (?, ?, ?) IF NOT EXISTS")
        self._quota_cas = p("UPDATE quota_daily SET images = ? WHERE tenant = ? AND day = ? IF images = ?")
        self._heartbeat = p(
            "INSERT INTO gateway_instances (deployment, instance_id, last_seen) VALUES (?, ?, ?) USING TTL ?")
        self._instances = p("SELECT instance_id FROM gateway_instances WHERE deployment = ?")
        self._instance_gone = p("DELETE FROM gateway_instances WHERE deployment = ? AND instance_id = ?")
        self._audit = p(AUDIT_INSERT)
        self._audit_read = p(
            "SELECT event_time, subject, action, resource, outcome, status, request_id, detail FROM audit_log "
            "WHERE tenant = ? AND day = ? LIMIT ?")
        self._ping = p("SELECT release_version FROM system.local")

    # ---- plumbing ------------------------------------------------------------------------------------
    def _execute(self, stmt: Any, params: Sequence[Any]) -> asyncio.Future[Any]:
        """One statement; resolves to its first page of rows (a list)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(rows: Any) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(rows))

        def failed(exc: BaseException) -> None:
            err = Problem("UNAVAILABLE", f"the result store did not answer ({_cause_name(exc)})")
            err.__cause__ = exc
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(err))

        try:
            rf = execute_async(self._session, stmt, params, timeout_s=self._timeout)
        except Exception as exc:
            failed(exc)
            return fut
        rf.add_callbacks(done, failed)
        return fut

    async def _all(self, stmt: Any, params: Sequence[Any]) -> list[Any]:
        """Every row, across pages (in the executor: paging is synchronous in the driver)."""
        def run() -> list[Any]:
            return fetch_all(self._session, stmt, params, timeout_s=self._timeout)

        try:
            return await asyncio.get_running_loop().run_in_executor(None, run)
        except TransientError as exc:
            raise Problem("UNAVAILABLE", f"the result store did not answer ({_cause_name(exc)})") from exc

    async def ping(self) -> None:
        await self._execute(self._ping, ())

    # ---- requests ------------------------------------------------------------------------------------
    async def put_request(self, tenant: str, request_id: str, *, lane: str, image_sha256: str | None,
                          source: str | None, model_name: str, submitted_at: int, job_id: str | None = None) -> None:
        # An unknown value (a job item's hash) is left unset, not written as null: the pipeline's write of the
        # same column carries the older submission timestamp (processors/results.py) and must not lose to it.
        def keep(value: Any) -> Any:
            return UNSET_VALUE if value is None else value

        await self._execute(self._put_request, (self._result_ttl, keep(job_id), lane, keep(image_sha256),
                                                keep(source), model_name, from_ms(submitted_at), tenant, request_id))

    async def put_requests(self, tenant: str, rows: Sequence[Mapping[str, Any]], *, concurrency: int = 64) -> None:
        """Many request rows (a job's items), with a bound on statements in flight."""
        sem = asyncio.Semaphore(concurrency)

        async def one(r: Mapping[str, Any]) -> None:
            async with sem:
                await self.put_request(tenant, r["request_id"], lane=r["lane"], image_sha256=r.get("image_sha256"),
                                       source=r.get("source"), model_name=r["model_name"],
                                       submitted_at=r["submitted_at"], job_id=r.get("job_id"))

        await asyncio.gather(*(one(r) for r in rows))

    async def fail_request(self, tenant: str, request_id: str, code: str, at_ms: int) -> None:
        await self._execute(self._fail_request, (self._result_ttl, code, from_ms(at_ms), tenant, request_id))

    async def get_request(self, tenant: str, request_id: str) -> RequestRow | None:
        rows = await self._execute(self._get_request, (tenant, request_id))
        if not rows:
            return None
        r = rows[0]
        return RequestRow(r.request_id, r.job_id, r.lane, r.image_sha256, r.source, r.model_name,
                          to_ms(r.submitted_at), r.status, json.loads(r.result) if r.result else None,
                          to_ms(r.completed_at))

    # ---- idempotency ---------------------------------------------------------------------------------
    async def claim_idempotency_key(self, tenant: str, key: str, fingerprint: str, resource: str,
                                    now_ms: int) -> tuple[bool, str, str]:
        """(claimed, fingerprint, resource): the stored ones when the key was claimed before."""
        rows = await self._execute(self._claim_key, (tenant, key, fingerprint, resource, from_ms(now_ms),
                                                     self._idem_ttl))
        row = rows[0]
        if row.applied:
            return True, fingerprint, resource
        return False, row.fingerprint, row.resource

    async def release_idempotency_key(self, tenant: str, key: str) -> None:
        await self._execute(self._release_key, (tenant, key))

    # ---- jobs ----------------------------------------------------------------------------------------
    async def put_job(self, tenant: str, job_id: str, *, total: int, model_name: str, params: Mapping[str, Any],
                      created_at: int, subject: str) -> None:
        await self._execute(self._put_job, (tenant, job_id, total, model_name, json.dumps(params),
                                            from_ms(created_at), subject, self._result_ttl))

    async def get_job(self, tenant: str, job_id: str) -> JobRow | None:
        rows = await self._execute(self._get_job, (tenant, job_id))
        if not rows:
            return None
        r = rows[0]
        counts = ({"OK": r.ok or 0, "REJECTED": r.rejected or 0, "FAILED": r.failed or 0}
                  if r.status == "COMPLETED" else None)
        return JobRow(r.job_id, r.total, r.model_name, json.loads(r.params or "{}"), to_ms(r.created_at),
                      r.status or "RUNNING", counts, to_ms(r.completed_at), bool(r.published))

    async def mark_job_published(self, tenant: str, job_id: str) -> None:
        await self._execute(self._job_published, (self._result_ttl, tenant, job_id))

    async def job_status_counts(self, tenant: str, job_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in await self._all(self._job_statuses, (tenant, job_id)):
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    async def job_results_page(self, tenant: str, job_id: str, after: str | None,
                               limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``limit`` results in request-id order, strictly after ``after``: pages never overlap."""
        return [(rid, json.loads(raw)) for rid, raw in await self.job_results_raw(tenant, job_id, after, limit) if raw]

    async def job_results_raw(self, tenant: str, job_id: str, after: str | None,
                              limit: int) -> list[tuple[str, str | None]]:
        """As job_results_page, the results still as stored (JSON text, None while missing): parsing a large
        page is left to the caller, off the event loop."""
        if after is None:
            rows = await self._execute(self._job_page_first, (tenant, job_id, limit))
        else:
            rows = await self._execute(self._job_page_after, (tenant, job_id, after, limit))
        return [(r.request_id, r.result) for r in rows]

    # ---- images --------------------------------------------------------------------------------------
    async def image_request_ids(self, tenant: str, sha256: str) -> list[str]:
        return [r.request_id for r in await self._all(self._image_requests, (tenant, sha256))]

    async def tombstone(self, tenant: str, sha256: str, subject: str, at_ms: int) -> None:
        await self._execute(self._put_tombstone, (tenant, sha256, from_ms(at_ms), subject, self._result_ttl))

    async def deleted_at(self, tenant: str, sha256: str) -> int | None:
        rows = await self._execute(self._get_tombstone, (tenant, sha256))
        return to_ms(rows[0].deleted_at) if rows else None

    async def deleted_at_many(self, tenant: str, shas: Sequence[str]) -> dict[str, int]:
        """sha256 -> when it was deleted, for those of ``shas`` that were (the tenant's erasure covers all):
        one query, whatever the number of images."""
        rows = await self._execute(self._get_tombstones, (tenant, sorted({*shas, ERASED})))
        found = {r.image_sha256: to_ms(r.deleted_at) for r in rows}
        erased = found.pop(ERASED, None)
        return {sha: max(t for t in (found.get(sha), erased) if t is not None)
                for sha in shas if found.get(sha) is not None or erased is not None}

    async def delete_request(self, tenant: str, row: RequestRow, deleted_at: int | None = None) -> None:
        """Remove a request row. A job item's result becomes the IMAGE_DELETED stub instead of vanishing, so
        the job's count still reaches its total; written now, it outlives any late write of the request's
        own result (those carry the older submission time, processors/results.py)."""
        await self._execute(self._delete_request, (tenant, row.request_id))
        if row.job_id:
            stub = deleted_result({"request_id": row.request_id, "tenant": tenant, "job_id": row.job_id,
                                   "lane": row.lane or "BATCH", "timings_ms": {}, "submitted_at": row.submitted_at})
            await self._execute(self._supersede_job_result, (tenant, row.job_id, row.request_id, result_json(stub),
                                                             from_ms(stub["completed_at"]), self._result_ttl))

    async def delete_image_rows(self, tenant: str, sha256: str) -> None:
        await asyncio.gather(self._execute(self._delete_image_cache, (tenant, sha256)),
                             self._execute(self._delete_image_requests, (tenant, sha256)))

    # ---- quota ---------------------------------------------------------------------------------------
    async def quota_used(self, tenant: str, day: str) -> int | None:
        """Images charged to the tenant that day; None before the day's first charge."""
        rows = await self._execute(self._quota_get, (tenant, day))
        return rows[0].images if rows else None

    async def quota_compare_and_set(self, tenant: str, day: str, expected: int | None,
                                    new: int) -> tuple[bool, int | None]:
        """Set the day's count to ``new`` if it is still ``expected`` (None: no row yet), as one lightweight
        transaction. (applied, the count now): on a lost race, the value that won."""
        if expected is None:
            rows = await self._execute(self._quota_first, (tenant, day, new))
        else:
            rows = await self._execute(self._quota_cas, (new, tenant, day, expected))
        row = rows[0]
        if row.applied:
            return True, new
        return False, getattr(row, "images", None)

    async def quota_add(self, tenant: str, day: str, n: int, *, attempts: int = 32) -> None:
        """Add ``n`` whatever the count (no limit): compare-and-set until it applies."""
        current = await self.quota_used(tenant, day)
        for _ in range(attempts):
            applied, current = await self.quota_compare_and_set(tenant, day, current, (current or 0) + n)
            if applied:
                return
        raise Problem("UNAVAILABLE", "the quota row is contended")

    # ---- instances -----------------------------------------------------------------------------------
    async def heartbeat(self, deployment: str, instance_id: str, at_ms: int, ttl_s: int) -> None:
        await self._execute(self._heartbeat, (deployment, instance_id, from_ms(at_ms), ttl_s))

    async def live_instances(self, deployment: str) -> int:
        return len(await self._execute(self._instances, (deployment,)))

    async def instance_gone(self, deployment: str, instance_id: str) -> None:
        await self._execute(self._instance_gone, (deployment, instance_id))

    # ---- audit ---------------------------------------------------------------------------------------
    def _audit_params(self, event: Mapping[str, Any], day: str) -> tuple[Any, ...]:
        return audit_row(event, self._audit_ttl, day)

    async def audit(self, event: Mapping[str, Any], day: str) -> None:
        await self._execute(self._audit, self._audit_params(event, day))

    async def audit_many(self, events: Sequence[Mapping[str, Any]], day: str) -> None:
        """Events of one tenant and day (one audit_log partition): one UNLOGGED BATCH per AUDIT_BATCH rows, so
        the node applies them as one mutation. Idempotent: each row is keyed by its event id."""
        if len(events) == 1:
            await self.audit(events[0], day)
            return
        batches = []
        for i in range(0, len(events), AUDIT_BATCH):
            batch = BatchStatement(batch_type=self._batch_type)
            for event in events[i:i + AUDIT_BATCH]:
                batch.add(self._audit, self._audit_params(event, day))
            batches.append(self._execute(batch, ()))
        await asyncio.gather(*batches)

    async def audit_events(self, tenant: str, day: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._execute(self._audit_read, (tenant, day, limit))
        return [{"event_time": to_ms(r.event_time), "subject": r.subject, "action": r.action,
                 "resource": r.resource, "outcome": r.outcome, "status": r.status, "request_id": r.request_id,
                 "detail": r.detail} for r in rows]

    # ---- content policy ------------------------------------------------------------------------------
    async def get_policy(self, tenant: str) -> dict[str, Any] | None:
        rows = await self._execute(self._get_policy, (tenant,))
        if not rows:
            return None
        r = rows[0]
        return {"hidden_classes": sorted(r.hidden_classes or ()), "review_classes": sorted(r.review_classes or ()),
                "review_retention_days": r.review_retention_days, "revision": int(r.revision or 0),
                "updated_by": r.updated_by, "updated_at": to_ms(r.updated_at)}

    async def put_policy(self, tenant: str, *, hidden_classes: Sequence[str], review_classes: Sequence[str],
                         review_retention_days: int | None, subject: str, at_ms: int) -> int:
        """Replace the tenant's policy; returns its new revision."""
        old = await self.get_policy(tenant)
        revision = (old["revision"] if old else 0) + 1
        await self._execute(self._put_policy, (tenant, set(hidden_classes), set(review_classes),
                                               review_retention_days, revision, subject, from_ms(at_ms)))
        return revision

    # ---- tenant erasure ------------------------------------------------------------------------------
    async def erase_tenant(self, tenant: str, subject: str, at_ms: int, *, concurrency: int = 32) -> dict[str, int]:
        """Delete every row of ``tenant`` in every tenant-keyed table; table -> rows (partitions) deleted.

        Cassandra cannot list a tenant's partitions when the tenant is only part of the partition key, so
        each table is scanned with ALLOW FILTERING (cost: a read of the whole table, once per erasure).
        The erasure is marked with an image tombstone of every image (processors/governance.py ERASED),
        written first, so that work of the tenant still in flight is never stored; the audit log is kept.
        """
        await self.tombstone(tenant, ERASED, subject, at_ms)
        sem = asyncio.Semaphore(concurrency)
        counts: dict[str, int] = {}
        for table, keys in ERASABLE_TABLES.items():
            # Table and column names come from ERASABLE_TABLES (constants), values are bound.
            select = self._session.prepare(
                f"SELECT {', '.join(keys or ('tenant',))} FROM {table} WHERE tenant = ? ALLOW FILTERING")  # noqa: S608
            where = " AND ".join(f"{k} = ?" for k in ("tenant", *keys))
            delete = self._session.prepare(f"DELETE FROM {table} WHERE {where}")  # noqa: S608
            found = {tuple(getattr(r, k) for k in keys) for r in await self._all(select, (tenant,))}
            if table == "image_tombstones":
                found.discard((ERASED,))  # the erasure's own marker stays

            async def one(key: tuple[Any, ...], stmt: Any = delete) -> None:
                async with sem:
                    await self._execute(stmt, (tenant, *key))

            await asyncio.gather(*(one(k) for k in found))
            counts[table] = len(found)
        return counts


# Audit rows per UNLOGGED BATCH: ~250 bytes each, so a batch stays under the node's 5 KiB
# batch_size_warn_threshold (a bigger one is still applied, with a warning in the node's log).
AUDIT_BATCH = 16

# Every table keyed by tenant, with the rest of its partition key (schemas/cql/*.cql); audit_log is kept
# (the record of the erasure itself and of who did what before it).
ERASABLE_TABLES: dict[str, tuple[str, ...]] = {
    "requests": ("request_id",),
    "job_results": ("job_id",),
    "jobs": ("job_id",),
    "image_cache": ("image_sha256",),
    "image_requests": ("image_sha256",),
    "image_tombstones": ("image_sha256",),
    "idempotency_keys": ("idempotency_key",),
    "quota_daily": ("day",),
    "tenant_policies": (),
}
