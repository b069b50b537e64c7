"""Deletion tombstones and tenant content policies, as the pipeline applies them at write time.

Pure parts (no services): ``hidden`` (is a result of a deleted image), ``deleted_result`` (the terminal
result that replaces it), ``Policy`` and ``apply_policy`` (classes never returned, classes that flag an
image for review), ``abuse_event`` (the one constructor of the AbuseEvent on `abuse`).

``Governance`` reads them from Cassandra for the stages. Tombstones are read per batch, never per
record, and never from a cache (a stale "not deleted" would let a deleted image's result be stored):
one query per tenant per IN_CHUNK images (``image_sha256 IN`` the images plus the tenant-erasure
marker), issued concurrently. Policies are cached ``policy_cache_s`` per process: a policy change
applies everywhere within that time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas import events
from stream.cassandra import DRIVER_ERRORS, timestamp_ms
from stream.errors import TransientError
from stream.records import now_ms
from stream.serde import epoch_ms

# The image_tombstones row (image_sha256 = ERASED) that marks every image of a tenant deleted at once
# (DELETE /v1/tenants/{tenant}/data): work of that tenant submitted before it is never stored.
ERASED = "*"
IMAGE_DELETED = "IMAGE_DELETED"
IN_CHUNK = 8  # images per tombstone query


def hidden(deleted_at: int | None, submitted_at: int | None, completed_at: int | None = None) -> bool:
    """A result of an image deleted at ``deleted_at`` whose request was made at or before then is never
    stored nor served. Without a submission time the completion time decides (older producers)."""
    if deleted_at is None:
        return False
    at = submitted_at if submitted_at is not None else completed_at
    return at is None or at <= deleted_at


def deleted_at_of(tombstones: Mapping[tuple[str, str], int], tenant: str, sha256: str | None) -> int | None:
    """The latest deletion that covers this image: its own tombstone or the tenant's erasure."""
    times = [t for t in (tombstones.get((tenant, sha256)) if sha256 else None, tombstones.get((tenant, ERASED)))
             if t is not None]
    return max(times) if times else None


def result_hidden(result: Mapping[str, Any], tombstones: Mapping[tuple[str, str], int]) -> bool:
    deleted = deleted_at_of(tombstones, result.get("tenant") or "", result.get("image_sha256"))
    return hidden(deleted, epoch_ms(result.get("submitted_at")), epoch_ms(result.get("completed_at")))


def deleted_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a request of a deleted image ends as: REJECTED IMAGE_DELETED, nothing of the image kept (no
    detections, sizes or hash), so that no request waits forever and a job's count still completes. Of
    ``result`` it keeps the request's ids, lane, timings and submission time."""
    return events.detection_result(
        request_id=result["request_id"], tenant=result["tenant"], status="REJECTED",
        timings_ms=result.get("timings_ms") or {}, error_code=IMAGE_DELETED,
        error_message="the image was deleted before its result was stored", job_id=result.get("job_id"),
        lane=result.get("lane") or "BATCH", submitted_at=result.get("submitted_at"), completed_at=now_ms())


@dataclass(frozen=True)
class Policy:
    """A tenant's acceptable-use policy (table tenant_policies; PUT /v1/tenants/{tenant}/policy)."""

    hidden_classes: frozenset[str] = frozenset()
    review_classes: frozenset[str] = frozenset()
    review_retention_days: int | None = None  # None: DETECTFLOW_REVIEW_RETENTION_DAYS
    revision: int = 0

    @property
    def empty(self) -> bool:
        return not self.hidden_classes and not self.review_classes


NO_POLICY = Policy()


@dataclass(frozen=True)
class Applied:
    result: dict[str, Any]
    flagged: tuple[str, ...] = field(default_factory=tuple)  # review classes present in the image


def apply_policy(result: Mapping[str, Any], policy: Policy) -> Applied:
    """Drop the detections of classes the tenant may never see; flag the image when a review class is
    present (judged on every detection, hidden ones included: presence in the image is what counts)."""
    out = dict(result)
    if result.get("status") != "OK" or policy.empty:
        return Applied(out)
    dets = list(result.get("detections") or [])
    present = {d["class_name"] for d in dets}
    flagged = tuple(sorted(present & policy.review_classes))
    out["detections"] = [d for d in dets if d["class_name"] not in policy.hidden_classes]
    out["review"] = bool(flagged)
    return Applied(out, flagged)


def review_key(tenant: str, sha256: str) -> str:
    """Where the review copy of an image lives in the review bucket (under the tenant's prefix)."""
    return f"{tenant}/{sha256}"


def abuse_event(result: Mapping[str, Any], flagged: Iterable[str], review_object: str | None,
                retention_days: int, revision: int) -> dict[str, Any]:
    """The AbuseEvent of a flagged result (the only constructor: postprocess and scan's cache hits use it)."""
    return events.abuse_event(
        tenant=result["tenant"], request_id=result["request_id"], image_sha256=result.get("image_sha256"),
        classes=sorted(flagged), review_object=review_object, retention_days=int(retention_days),
        cache_hit=bool(result.get("cache_hit")), policy_revision=int(revision), flagged_at=now_ms())


class _TTLCache:
    """A bounded map whose entries are good for ``ttl_s``."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> tuple[bool, Any]:
        hit = self._entries.get(key)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def put(self, key: Any, value: Any) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # rare; a cleared cache only costs reads
        self._entries[key] = (time.monotonic() + self.ttl_s, value)


class Governance:
    """Tombstones and policies from Cassandra for the stages. Cassandra errors become TransientError."""

    def __init__(self, session: Any, *, policy_cache_s: float = 10.0, timeout_s: float = 10.0):
        self._session = session
        self._timeout = timeout_s
        self._tombstones = session.prepare(
            "SELECT image_sha256, deleted_at FROM image_tombstones WHERE tenant = ? AND image_sha256 IN ?")
        self._policy = session.prepare(
            "SELECT hidden_classes, review_classes, review_retention_days, revision FROM tenant_policies "
            "WHERE tenant = ?")
        self._policy_cache = _TTLCache(policy_cache_s, 10_000)
        self.reads = 0  # Cassandra queries issued (the cost docs/security.md states)

    def _run(self, statements: list[tuple[Any, tuple[Any, ...]]]) -> list[Any]:
        try:
            futures = [self._session.execute_async(s, p, timeout=self._timeout) for s, p in statements]
            self.reads += len(futures)
            return [f.result() for f in futures]
        except DRIVER_ERRORS as exc:  # every driver error of an outage, not only DriverException's
            raise TransientError(f"cassandra: {type(exc).__name__}: {exc}") from exc

    def tombstones(self, images: Iterable[tuple[str, str | None]]) -> dict[tuple[str, str], int]:
        """(tenant, sha256 or ERASED) -> deleted_at millis, for the given images and their tenants' erasure
        markers (read fresh, batched)."""
        wanted: dict[str, set[str]] = {}
        for tenant, sha in images:
            wanted.setdefault(tenant, {ERASED}).update({sha} if sha else set())
        found: dict[tuple[str, str], int] = {}
        todo = {tenant: sorted(shas) for tenant, shas in wanted.items()}
        # A multi-partition IN is answered partition by partition by one coordinator: measured here, 8 images
        # take 2 ms, 64 take 54 ms. Chunks of IN_CHUNK, issued concurrently, keep a batch's check near one
        # round trip.
        chunks = [(t, sorted(todo[t])[i:i + IN_CHUNK]) for t in sorted(todo) for i in range(0, len(todo[t]), IN_CHUNK)]
        answers = self._run([(self._tombstones, chunk) for chunk in chunks])
        seen_by: dict[str, dict[str, int | None]] = {}
        for (tenant, _), rows in zip(chunks, answers, strict=True):
            seen_by.setdefault(tenant, {}).update({row.image_sha256: timestamp_ms(row.deleted_at) for row in rows})
        for tenant in todo:
            seen = seen_by.get(tenant, {})
            for sha in todo[tenant]:
                if seen.get(sha) is not None:
                    found[(tenant, sha)] = seen[sha]  # type: ignore[assignment]
        return found

    def policies(self, tenants: Iterable[str]) -> dict[str, Policy]:
        out: dict[str, Policy] = {}
        todo = []
        for tenant in set(tenants):
            cached, value = self._policy_cache.get(tenant)
            if cached:
                out[tenant] = value
            else:
                todo.append(tenant)
        for tenant, rows in zip(todo, self._run([(self._policy, (t,)) for t in todo]), strict=True):
            row = rows.one()
            policy = NO_POLICY if row is None else Policy(
                frozenset(row.hidden_classes or ()), frozenset(row.review_classes or ()), row.review_retention_days,
                int(row.revision or 0))
            self._policy_cache.put(tenant, policy)
            out[tenant] = policy
        return out


class ResultWriter(Protocol):
    def save_results(self, results: Sequence[Mapping[str, Any]], *, supersede: bool = False, index: bool = True,
                     cache: Sequence[tuple[Any, Mapping[str, Any]]] = ()) -> None: ...


class Tombstones(Protocol):
    def tombstones(self, images: Iterable[tuple[str, str | None]]) -> dict[tuple[str, str], int]: ...


def store_unless_deleted(results: ResultWriter, governance: Tombstones, batch: Sequence[Mapping[str, Any]], *,
                         index: bool = True, cache: Sequence[tuple[Any, Mapping[str, Any]]] = ()
                         ) -> list[dict[str, Any]]:
    """Store a batch of results (with ``cache`` rows, in the same round trip), then read the tombstones of
    their images (fresh, one query per tenant per IN_CHUNK images) and supersede each result of a deleted
    image with its IMAGE_DELETED result. Returns what to publish. ``index=False``: scan indexed these
    requests already (postprocess's results).

    Storing first and checking after closes the race with a deletion: one whose tombstone was written
    before the check is seen here; one written after it sweeps the image's index, which already holds
    these rows (scan wrote it before its own check). Rows carry their request's submission time, so
    neither order lets a late write win — the cache rows included, which is why they may go with the batch.
    """
    results.save_results(batch, index=index, cache=cache)
    stones = governance.tombstones([(r["tenant"], r.get("image_sha256")) for r in batch if r.get("tenant")])
    out = [deleted_result(r) if result_hidden(r, stones) else dict(r) for r in batch]
    gone = [o for o, r in zip(out, batch, strict=True) if o.get("error_code") == IMAGE_DELETED
            and r.get("error_code") != IMAGE_DELETED]
    if gone:
        results.save_results(gone, supersede=True, index=index)
    return out
