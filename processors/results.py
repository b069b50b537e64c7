"""Results and the result cache in Cassandra: idempotent upserts keyed by (tenant, request id)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from cassandra.query import UNSET_VALUE, BatchStatement, BatchType

from processors.params import CacheKey
from stream.cassandra import WriteFailed, execute_each
from stream.errors import TransientError
from stream.serde import epoch_ms


def result_json(result: Mapping[str, Any]) -> str:
    """A DetectionResult as JSON, timestamps as epoch millis (the Avro logical type's value)."""
    return json.dumps({k: epoch_ms(v) if isinstance(v, dt.datetime) else v for k, v in result.items()},
                      separators=(",", ":"))


def write_time_us(result: Mapping[str, Any]) -> int:
    """The write timestamp of a result's rows: its request's submission time (microseconds).

    A deletion (DELETE /v1/images/{sha}, a tenant erasure) removes rows at the time it runs, so a late write
    of a request submitted before it carries an older timestamp and stays shadowed: it can never recreate a
    deleted row, whatever order the writes arrive in. Without a submission time: now.
    """
    ms = epoch_ms(result.get("submitted_at"))
    return (ms if ms else int(dt.datetime.now(dt.UTC).timestamp() * 1000)) * 1000


def _ts(value: Any) -> dt.datetime | None:
    ms = epoch_ms(value)
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


class ResultStore:
    """The pipeline's writes and the cache's reads. Cassandra errors become TransientError."""

    def __init__(self, session: Any, *, result_ttl_s: int, cache_ttl_s: int, timeout_s: float = 10.0):
        self._session = session
        self.session = session  # shared with the stage's other Cassandra readers (processors/governance.py)
        self._timeout = timeout_s
        self._result_ttl = result_ttl_s
        self._cache_ttl = cache_ttl_s
        self._put_request = session.prepare(
            "UPDATE requests USING TTL ? AND TIMESTAMP ? SET status = ?, model_name = ?, model_version = ?, "
            "error_code = ?, cache_hit = ?, result = ?, completed_at = ?, job_id = ?, lane = ?, image_sha256 = ? "
            "WHERE tenant = ? AND request_id = ?")
        self._put_job = session.prepare(
            "INSERT INTO job_results (tenant, job_id, request_id, status, error_code, result, completed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?")
        self._put_image = session.prepare(
            "INSERT INTO image_requests (tenant, image_sha256, request_id) VALUES (?, ?, ?) "
            "USING TTL ? AND TIMESTAMP ?")
        self._put_cache = session.prepare(
            "INSERT INTO image_cache (tenant, image_sha256, model_name, model_version, params_hash, result, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?")
        self._get_cache = session.prepare(
            "SELECT result FROM image_cache WHERE tenant = ? AND image_sha256 = ? AND model_name = ? "
            "AND model_version = ? AND params_hash = ?")
        self._get_request = session.prepare("SELECT result, status FROM requests WHERE tenant = ? AND request_id = ?")

    def _run(self, statements: Sequence[tuple[Any, tuple[Any, ...] | None]]) -> list[Any]:
        answers = execute_each(self._session, statements, self._timeout)
        for a in answers:
            if isinstance(a, TransientError):
                raise a
        return answers

    def save_results(self, results: Sequence[Mapping[str, Any]], *, supersede: bool = False, index: bool = True,
                     cache: Sequence[tuple[CacheKey, Mapping[str, Any]]] = ()) -> None:
        """Upsert each result into requests (+ job_results, image_requests), and ``cache`` rows, all at once
        (concurrently; a job's rows of the batch as one UNLOGGED BATCH: one partition). Safe to repeat.
        ``supersede`` writes one microsecond later than the result's own write time: it replaces a result
        already stored for the same request (an IMAGE_DELETED result replacing the one stored a moment before).
        ``index=False`` leaves image_requests alone: for results whose requests scan indexed already (the
        same row and write time, processors/scan.py), i.e. postprocess's.

        Every statement runs even when others fail (no extra round trip: the same concurrent statements).
        WriteFailed (a TransientError) names the positions in ``results`` of the results whose rows were not
        all written; the others are stored. A failed cache row fails every result (the caller retries all)."""

        def keep(value: Any) -> Any:  # a value the result lacks leaves the gateway's column as it is
            return UNSET_VALUE if value is None else value

        stmts: list[tuple[Any, tuple[Any, ...] | None]] = []
        owners: list[tuple[int, ...]] = []  # per statement: the positions of the results it writes
        jobs: dict[tuple[str, str], list[tuple[int, tuple[Any, ...]]]] = {}
        for i, r in enumerate(results):
            text = result_json(r)
            done = _ts(r.get("completed_at"))
            at = write_time_us(r) + (1 if supersede else 0)
            stmts.append((self._put_request, (
                self._result_ttl, at, r["status"], keep(r.get("model_name")), r.get("model_version"),
                r.get("error_code"), bool(r.get("cache_hit")), text, done, keep(r.get("job_id")), r.get("lane"),
                keep(r.get("image_sha256")), r["tenant"], r["request_id"])))
            owners.append((i,))
            if r.get("job_id"):
                jobs.setdefault((r["tenant"], r["job_id"]), []).append((i, (
                    r["tenant"], r["job_id"], r["request_id"], r["status"], r.get("error_code"), text, done,
                    self._result_ttl, at)))
            if index and r.get("image_sha256"):
                stmts.append((self._put_image, (r["tenant"], r["image_sha256"], r["request_id"], self._result_ttl,
                                                at)))
                owners.append((i,))
        for rows in jobs.values():
            owners.append(tuple(i for i, _ in rows))
            if len(rows) == 1:
                stmts.append((self._put_job, rows[0][1]))
                continue
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)  # one partition: one mutation on the node
            for _, row in rows:
                batch.add(self._put_job, row)
            stmts.append((batch, None))
        cache_rows = self._cache_rows(cache)
        owners += [tuple(range(len(results)))] * len(cache_rows)
        answers = execute_each(self._session, [*stmts, *cache_rows], self._timeout)
        errors = [a for a in answers if isinstance(a, TransientError)]
        if errors:
            failed = frozenset(i for a, own in zip(answers, owners, strict=True) if isinstance(a, TransientError)
                               for i in own)
            first = errors[0]
            raise WriteFailed(f"{len(failed)} of {len(results)} results not stored ({first})",
                              failed) from first.__cause__

    def index_images(self, entries: Sequence[tuple[str, str, str, int | None]]) -> None:
        """(tenant, sha256, request id, submitted_at ms): scan's index of every request past it, so a deletion
        finds (and removes the upload of) requests still in flight. Same row and write time as save_results."""
        self._run([(self._put_image, (tenant, sha, rid, self._result_ttl,
                                      write_time_us({"submitted_at": submitted})))
                   for tenant, sha, rid, submitted in entries])

    def _cache_rows(self, entries: Sequence[tuple[CacheKey, Mapping[str, Any]]]) -> list[tuple[Any, tuple[Any, ...]]]:
        return [(self._put_cache, (k.tenant, k.image_sha256, k.model_name, k.model_version, k.params_hash,
                                   result_json(r), _ts(r.get("completed_at")), self._cache_ttl, write_time_us(r)))
                for k, r in entries]

    def cache_put(self, entries: Sequence[tuple[CacheKey, Mapping[str, Any]]]) -> None:
        self._run(self._cache_rows(entries))

    def cache_get(self, key: CacheKey) -> dict[str, Any] | None:
        (rows,) = self._run([(self._get_cache, (key.tenant, key.image_sha256, key.model_name, key.model_version,
                                                key.params_hash))])
        row = rows.one()
        return None if row is None else json.loads(row.result)

    def get_result(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        (rows,) = self._run([(self._get_request, (tenant, request_id))])
        row = rows.one()
        return None if row is None or row.result is None else json.loads(row.result)
