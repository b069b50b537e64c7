"""HTTP handlers. Each one only validates, stores, publishes and awaits; the pipeline does the work."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from gateway import metrics as GM
from gateway.auth import Principal
from gateway.contract import bodies, params, replies, rules
from gateway.inputs import (
    ImageInput,
    body_params,
    page_token,
    parse_page_token,
    read_image_input,
    read_json,
)
from gateway.problems import Problem
from gateway.state import DOCUMENT, GATEWAY, Gateway
from gateway.views import coco_view, iso, pending_view, result_view
from model_store.serving.catalog import ModelNotFound
from processors.governance import deleted_result, hidden
from schemas import events
from stream import headers as H
from stream.cassandra import utc_day
from stream.records import now_ms
from stream.reply import ReplyTimeout
from stream.serde import epoch_ms
from stream.topics import lane_topic

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JOB_NAMESPACE = uuid.UUID("0b8f6f0e-3f5c-4a8e-9d6e-51a4c0d7e2b9")


def _json(body: BaseModel | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    """A JSON response built from a contract model (gateway/contract/replies.py); a dict only for the OpenAPI
    document."""
    raw = (body.model_dump_json(by_alias=True) if isinstance(body, BaseModel)
           else json.dumps(body, separators=(",", ":")))
    return web.Response(status=status, body=raw.encode(), content_type="application/json", headers=headers)


def _query(request: web.Request, model: type[rules.M]) -> rules.M:
    return rules.parse(model, dict(request.query), request.app[GATEWAY].settings)


def _path(request: web.Request, model: type[rules.M], missing: str) -> rules.M:
    """The path's parameters; a malformed id names nothing (404 ``missing``)."""
    try:
        return rules.parse(model, dict(request.match_info), None)
    except Problem as exc:
        raise Problem("NOT_FOUND", missing) from exc


def endpoint(action: str, scope: str) -> Callable[[Handler], Handler]:
    """Authenticate, check the scope and the tenant's rate, run the handler, audit the outcome."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def inner(request: web.Request) -> web.StreamResponse:
            gw = request.app[GATEWAY]
            principal = await gw.auth.authenticate(request.headers.get("Authorization"))  # unauthenticated: not audited
            request["principal"] = principal
            audit: dict[str, Any] = {"resource": request.match_info.get("id"), "request_id": None, "detail": None}
            request["audit"] = audit
            status = 500
            decision = None
            try:
                principal.require(scope)
                decision = gw.buckets.take(principal.tenant)
                if not decision.allowed:
                    GM.REFUSED.labels("rate_limited").inc()
                    raise Problem("RATE_LIMITED", f"more than {gw.buckets.rate:g} calls per second for this tenant",
                                  headers={"Retry-After": str(decision.retry_after_s), **decision.headers()})
                resp = await handler(request)
                resp.headers.update(decision.headers())
                status = resp.status
                return resp
            except web.HTTPException as exc:  # aiohttp's own (e.g. 413 from the body reader)
                status = exc.status
                raise
            except Problem as p:
                status = p.status
                audit["detail"] = p.code
                if decision is not None:
                    for name, value in decision.headers().items():
                        p.headers.setdefault(name, value)
                raise
            finally:
                gw.audit.record(tenant=principal.tenant, subject=principal.subject, action=action, status=status,
                                **audit)

        return inner

    return wrap


def _gw(request: web.Request) -> tuple[Gateway, Principal]:
    return request.app[GATEWAY], request["principal"]


def _class_names(gw: Gateway, model: str | None = None) -> tuple[str, ...] | None:
    """The default model's class names when the gateway sees the model repository (else the pipeline checks)."""
    if gw.catalog is None:
        return None
    try:
        return tuple(gw.catalog.resolve(model or gw.settings.pipeline.default_model).config.class_names)
    except ModelNotFound:
        return None


def _check_model(gw: Gateway, name: str, version: int | None) -> None:
    if gw.catalog is None:
        return
    try:
        gw.catalog.check(name, version)
    except ModelNotFound as exc:
        raise Problem("INVALID_PARAMS", str(exc), param="model") from exc


def _idempotency_key(request: web.Request) -> str | None:
    idem = request.headers.get("Idempotency-Key")
    return rules.parse(params.IdempotencyHeaders, {} if idem is None else {"Idempotency-Key": idem},
                     None).idempotency_key


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _format(request: web.Request) -> str:
    return _query(request, params.FormatQuery).format


def _result_response(result: dict[str, Any], fmt: str) -> web.Response:
    """200 with the detections; a REJECTED image is a 422 problem, a FAILED request a 502 problem."""
    status = result.get("status")
    headers = {"X-Request-Id": result["request_id"]}
    if status == "REJECTED":
        raise Problem("IMAGE_REJECTED", result.get("error_message") or "", image_code=result.get("error_code"),
                      request_id=result["request_id"], headers=headers)
    if status == "FAILED":
        raise Problem("PIPELINE_FAILED", result.get("error_message") or "", failure_code=result.get("error_code"),
                      request_id=result["request_id"], headers=headers)
    return _json(coco_view(result) if fmt == "coco" else result_view(result), headers=headers)


def _accepted(request_id: str, submitted_at: int | None) -> web.Response:
    location = f"/v1/requests/{request_id}"
    return _json(pending_view(request_id, submitted_at), status=202,
                 headers={"Location": location, "Retry-After": "1", "X-Request-Id": request_id})


def _admit(gw: Gateway, tenant: str) -> None:
    """Count a sync call in flight (before its body is read) or refuse it fast: every tenant when the online
    lane's backlog passes the hard bound, else only a tenant over its share (gateway/limits.py FairShares)."""
    lag = gw.bus.online_lag
    if lag > gw.settings.max_online_lag_hard:
        GM.REFUSED.labels("overloaded_lag").inc()
        raise Problem("OVERLOADED", f"the online lane has a backlog of {lag} records",
                      headers={"Retry-After": str(max(1, min(30, lag // 50)))})
    try:
        gw.shares.admit(tenant, lagging=lag > gw.settings.max_online_lag)
    except Problem as exc:
        GM.REFUSED.labels("overloaded_inflight" if exc.code == "OVERLOADED" else "fair_share").inc()
        raise
    GM.SYNC_INFLIGHT.set(gw.shares.total)


async def _charge(gw: Gateway, tenant: str, n: int, *, lease: bool = False) -> None:
    try:
        await gw.quota.charge(tenant, n, lease=lease)
    except Problem as exc:
        GM.REFUSED.labels("quota" if exc.code == "QUOTA_EXCEEDED" else "quota_contention").inc()
        raise


async def _release_key(gw: Gateway, tenant: str, key: str) -> None:
    """Give an Idempotency-Key back when its call was refused or failed before anything was submitted, so the
    client's retry with the same key is processed (not answered with a resource that does not exist)."""
    try:
        await asyncio.shield(gw.store.release_idempotency_key(tenant, key))
    except Problem as exc:  # the key expires with its TTL; the client may use a new one meanwhile
        log.warning("idempotency key not released: %s", exc)


async def _await_stored(gw: Gateway, tenant: str, request_id: str, deadline: float) -> dict[str, Any] | None:
    """Poll the stored result until the deadline (an idempotent replay of a request that may be in flight)."""
    while True:
        row = await gw.store.get_request(tenant, request_id)
        if row is not None and row.result is not None:
            if await _row_hidden(gw, tenant, row):
                raise Problem("NOT_FOUND", "no such request")
            return row.result
        if time.time() >= deadline:
            return None
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.time())))


# ---------------------------------------------------------------------------------------------- detect


@endpoint("detect", "detect:write")
async def detect(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    query = _query(request, params.SyncQuery)
    fmt, timeout_s = query.format, query.timeout_s(gw.settings)
    deadline = time.time() + timeout_s
    _admit(gw, who.tenant)
    try:
        return await _detect(request, gw, who, fmt, deadline)
    finally:
        gw.shares.release(who.tenant)
        GM.SYNC_INFLIGHT.set(gw.shares.total)


async def _detect(request: web.Request, gw: Gateway, who: Principal, fmt: str, deadline: float
                  ) -> web.StreamResponse:
    image: ImageInput = await read_image_input(request, gw.settings, _class_names(gw))
    params = image.params
    _check_model(gw, params.model, params.version)
    sha = image.sha256
    key = f"{who.tenant}/{sha}" if sha is not None else image.key
    assert key is not None
    if image.data is None:
        size = await (gw.objects.verified_upload_size(key) if _signed_upload(who.tenant, key)
                      else gw.objects.size(key))
        if size > gw.settings.pipeline.image_max_bytes:
            raise Problem("IMAGE_REJECTED", f"the object has {size} bytes", image_code="IMAGE_TOO_LARGE")
    request_id = str(uuid.uuid4())
    idem = _idempotency_key(request)
    if idem is not None:
        claimed, fp, resource = await gw.store.claim_idempotency_key(
            who.tenant, idem, _fingerprint("detect", sha or f"key:{key}", params.canonical()),
            f"request:{request_id}", now_ms())
        if not claimed:
            if fp != _fingerprint("detect", sha or f"key:{key}", params.canonical()) or not resource.startswith(
                    "request:"):
                raise Problem("IDEMPOTENCY_KEY_REUSED", "this key was used with a different request")
            request_id = resource.split(":", 1)[1]
            request["audit"]["request_id"] = request_id
            GM.SYNC_OUTCOME.labels("idempotent_replay").inc()
            stored = await _await_stored(gw, who.tenant, request_id, deadline)
            return _accepted(request_id, None) if stored is None else _result_response(stored, fmt)
    request["audit"]["request_id"] = request_id
    try:
        submitted_at, correlation, future = await _submit(request, gw, who, image, key, request_id, idem, deadline)
    except BaseException:
        if idem is not None:  # nothing was submitted: the key is the client's again
            await _release_key(gw, who.tenant, idem)
        raise
    try:
        result = await gw.bus.router.wait(correlation, deadline, future)
    except ReplyTimeout:
        GM.SYNC_OUTCOME.labels("deadline").inc()
        return _accepted(request_id, submitted_at)
    GM.SYNC_OUTCOME.labels("replied").inc()
    return _result_response(result, fmt)


async def _submit(request: web.Request, gw: Gateway, who: Principal, image: ImageInput, key: str, request_id: str,
                  idem: str | None, deadline: float) -> tuple[int, str, asyncio.Future[Any]]:
    """Charge the quota, store the request (and the image), publish it: (submitted_at, correlation, reply
    future). Raises before anything reached the online lane, or not at all."""
    params, sha = image.params, image.sha256
    await _charge(gw, who.tenant, 1, lease=True)  # the sync path spends from this instance's lease
    submitted_at = now_ms()
    writes = [gw.store.put_request(who.tenant, request_id, lane="ONLINE", image_sha256=sha,
                                   source=f"{gw.objects.bucket}/{key}", model_name=params.model,
                                   submitted_at=submitted_at)]
    if image.data is not None:
        writes.append(gw.objects.put_image(key, image.data, image.media_type or "application/octet-stream"))
    await asyncio.gather(*writes)
    stored = events.object_ref(bucket=gw.objects.bucket, key=key, sha256=sha, size=image.size,
                               content_type=image.media_type)
    # Bytes the gateway holds travel inline as well (scan reads them instead of fetching the object back);
    # the stored object stays the durable copy, and the one scan quarantines.
    inline = image.data is not None and len(image.data) <= gw.settings.pipeline.inline_max_bytes
    event = events.image_submitted(
        request_id=request_id, tenant=who.tenant,
        image=events.inline_image(data=image.data, sha256=sha, content_type=image.media_type, stored=stored)
        if inline else stored,
        lane="ONLINE", model=events.model_selector(name=params.model, version=params.version),
        params=params.event_params(), idempotency_key=idem, submitted_at=submitted_at)
    correlation = uuid.uuid4().hex
    traceparent = request.headers.get("traceparent")
    headers = {H.CORRELATION_ID: correlation.encode(), H.REPLY_TO: gw.bus.router.reply_to.encode(),
               H.DEADLINE_MS: str(int(deadline * 1000)).encode(),
               H.TRACEPARENT: H.child_traceparent(traceparent).encode()}
    future = gw.bus.router.expect(correlation, deadline)
    topic = lane_topic(gw.bus.prefix, "online", "submitted")
    try:
        await gw.bus.delivered([gw.bus.produce(topic, request_id, "ImageSubmitted", event, headers)],
                               timeout_s=max(1.0, min(15.0, deadline - time.time())))
    except Problem:
        gw.bus.router.forget(correlation)
        await gw.store.fail_request(who.tenant, request_id, "SUBMIT_FAILED", now_ms())
        raise
    return submitted_at, correlation, future


# ---------------------------------------------------------------------------------------------- reads


async def _row_hidden(gw: Gateway, tenant: str, row: Any) -> bool:
    """A request of an image deleted after the request was made (or of an erased tenant) is never served."""
    sha = row.image_sha256 or (row.result or {}).get("image_sha256")
    if not sha:
        return False
    deleted = (await gw.store.deleted_at_many(tenant, [sha])).get(sha)
    return hidden(deleted, row.submitted_at, row.completed_at)


async def _unless_deleted(gw: Gateway, tenant: str, rows: list[tuple[str, dict[str, Any]]]
                          ) -> list[tuple[str, dict[str, Any]]]:
    """A page's results with those of deleted images replaced by their IMAGE_DELETED stub (one query)."""
    shas = [r["image_sha256"] for _, r in rows if r.get("image_sha256")]
    if not shas:
        return rows
    deleted = await gw.store.deleted_at_many(tenant, shas)
    out = []
    for rid, r in rows:
        sha = r.get("image_sha256")
        if sha and hidden(deleted.get(sha), epoch_ms(r.get("submitted_at")), epoch_ms(r.get("completed_at"))):
            r = deleted_result(r)
        out.append((rid, r))
    return out


@endpoint("requests.read", "results:read")
async def get_request(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    fmt = _format(request)
    rid = _path(request, params.RequestPath, "no such request").id
    row = await gw.store.get_request(who.tenant, rid)
    if row is None:
        raise Problem("NOT_FOUND", "no such request")
    if await _row_hidden(gw, who.tenant, row):
        raise Problem("NOT_FOUND", "no such request")
    request["audit"]["request_id"] = rid
    if row.result is None:
        if row.status == "FAILED":  # the gateway could not submit it
            return _json(pending_view(rid, row.submitted_at, row.job_id).model_copy(update={
                "status": "FAILED",
                "error": replies.SubmitFailed(code="SUBMIT_FAILED", message="the request was never submitted")}))
        return _json(pending_view(rid, row.submitted_at, row.job_id), headers={"Retry-After": "1"})
    return _json(coco_view(row.result) if fmt == "coco" else result_view(row.result))


# ---------------------------------------------------------------------------------------------- uploads


def _signed_upload(tenant: str, key: str) -> bool:
    """Keys under ``<tenant>/uploads/`` are written only through the gateway's pre-signed URLs."""
    return key.startswith(f"{tenant}/uploads/")


async def _verify_uploads(gw: Gateway, keys: list[str]) -> None:
    """Every existing upload a job names must be the one the gateway signed (UPLOAD_MISMATCH otherwise); a
    missing one becomes that item's REJECTED result (OBJECT_NOT_FOUND) as before."""
    async def one(key: str) -> None:
        try:
            await gw.objects.verified_upload_size(key)
        except Problem as exc:
            if exc.code != "NOT_FOUND":
                raise
    await asyncio.gather(*(one(k) for k in dict.fromkeys(keys)))


@endpoint("uploads.create", "detect:write")
async def create_uploads(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    body = rules.parse(bodies.UploadRequest, await read_json(request, gw.settings), gw.settings)
    out = []
    for f in body.files:
        upload_id = uuid.uuid4().hex
        url, headers, expires = gw.objects.presigned_put(f"{who.tenant}/uploads/{upload_id}", f.content_type,
                                                         f.content_length)
        out.append(replies.UploadSlot(upload_id=upload_id, url=url, headers=headers, expires_at=iso(expires * 1000)))
    return _json(replies.UploadResponse(uploads=out), status=201)


# ---------------------------------------------------------------------------------------------- jobs


def job_request_id(job_id: str, index: int) -> str:
    """Deterministic: re-publishing a job's items (a retried create) never makes new requests."""
    return str(uuid.uuid5(JOB_NAMESPACE, f"{job_id}/{index}"))


@endpoint("jobs.create", "detect:write")
async def create_job(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    class_names = _class_names(gw)
    body = rules.parse(bodies.JobRequest, await read_json(request, gw.settings), gw.settings, class_names=class_names)
    params = body_params(body, gw.settings, class_names)
    _check_model(gw, params.model, params.version)
    keys = [item.object_key(who.tenant) for item in body.items]
    signed = [k for k in keys if _signed_upload(who.tenant, k)]
    await _verify_uploads(gw, signed)
    await asyncio.gather(*(gw.objects.claim_upload(k) for k in dict.fromkeys(signed)))  # no longer "unclaimed"
    job_id = str(uuid.uuid4())
    idem = _idempotency_key(request)
    fingerprint = _fingerprint("jobs", params.canonical(), *keys)
    existing = None
    if idem is not None:
        claimed, fp, resource = await gw.store.claim_idempotency_key(who.tenant, idem, fingerprint, f"job:{job_id}",
                                                                     now_ms())
        if not claimed:
            if fp != fingerprint or not resource.startswith("job:"):
                raise Problem("IDEMPOTENCY_KEY_REUSED", "this key was used with a different request")
            job_id = resource.split(":", 1)[1]
            existing = await gw.store.get_job(who.tenant, job_id)
            if existing is not None and existing.published:
                request["audit"]["resource"] = job_id
                return _job_created(job_id, len(keys))
            # The first attempt did not finish publishing: publish again (same request ids, so no duplicates;
            # its job row exists only once its charge was made, so it is not charged twice).
    request["audit"]["resource"] = job_id
    created = existing.created_at if existing is not None and existing.created_at is not None else now_ms()
    if existing is None:
        try:
            await _charge(gw, who.tenant, len(keys))
            await gw.store.put_job(who.tenant, job_id, total=len(keys), model_name=params.model,
                                   params=json.loads(params.canonical()), created_at=created, subject=who.subject)
        except BaseException:
            if idem is not None:  # refused or failed before the job existed: the key is the client's again
                await _release_key(gw, who.tenant, idem)
            raise
    rows = [{"request_id": job_request_id(job_id, i), "lane": "BATCH", "source": f"{gw.objects.bucket}/{k}",
             "model_name": params.model, "submitted_at": created, "job_id": job_id} for i, k in enumerate(keys)]
    await gw.store.put_requests(who.tenant, rows)
    topic = lane_topic(gw.bus.prefix, "batch", "submitted")
    futures = []
    for row, key in zip(rows, keys, strict=True):
        event = events.image_submitted(
            request_id=row["request_id"], tenant=who.tenant, image=events.object_ref(bucket=gw.objects.bucket, key=key),
            lane="BATCH", model=events.model_selector(name=params.model, version=params.version),
            params=params.event_params(), idempotency_key=idem, job_id=job_id, submitted_at=created)
        futures.append(gw.bus.produce(topic, row["request_id"], "ImageSubmitted", event,
                                      {H.TRACEPARENT: H.new_traceparent().encode()}))
        if len(futures) % 1000 == 0:
            await asyncio.sleep(0)  # let deliveries settle between chunks
    await gw.bus.delivered(futures, timeout_s=60.0)
    await gw.store.mark_job_published(who.tenant, job_id)
    return _job_created(job_id, len(keys))


def _job_created(job_id: str, total: int) -> web.Response:
    return _json(replies.JobCreated(job_id=job_id, total=total,
                                request_ids=[job_request_id(job_id, i) for i in range(total)],
                                links=replies.JobLinks.of(job_id)),
                 status=202, headers={"Location": f"/v1/jobs/{job_id}"})


@endpoint("jobs.read", "results:read")
async def get_job(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    job_id = _path(request, params.JobPath, "no such job").id
    job = await gw.store.get_job(who.tenant, job_id)
    if job is None:
        raise Problem("NOT_FOUND", "no such job")
    counts = job.counts if job.counts is not None else await gw.store.job_status_counts(who.tenant, job_id)
    done = sum(counts.values())
    return _json(replies.JobStatus(
        job_id=job_id, status=job.status, total=job.total, done=done,
        pending=max(0, job.total - done), progress=round(done / job.total, 4) if job.total else 1.0,
        counts=replies.JobCounts(**{s: counts.get(s, 0) for s in ("OK", "REJECTED", "FAILED")}),
        model=job.model_name, created_at=iso(job.created_at), completed_at=iso(job.completed_at),
        links=replies.JobLinks.of(job_id),
    ))


@endpoint("jobs.results", "results:read")
async def job_results(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    query = _query(request, params.ResultsQuery)
    fmt = query.format
    size = gw.settings.page_size_default if query.page_size is None else query.page_size
    after = parse_page_token(query.page_token) if query.page_token else None
    job_id = _path(request, params.JobPath, "no such job").id
    job = await gw.store.get_job(who.tenant, job_id)
    if job is None:
        raise Problem("NOT_FOUND", "no such job")
    loop = asyncio.get_running_loop()
    head = json.dumps({"job_id": job_id}, separators=(",", ":")).encode()[:-1] + b',"items":['
    items: list[bytes] = []
    used = len(head) + 64  # the head, the brackets and the next token
    cursor, more = after, False
    while True:
        want = min(PAGE_FETCH_ROWS, size - len(items) + 1)  # one past the page: is there more?
        fetched = await gw.store.job_results_raw(who.tenant, job_id, cursor, want)
        rows = await _unless_deleted(gw, who.tenant, await loop.run_in_executor(None, _parse_results, fetched))
        taken = await loop.run_in_executor(None, functools.partial(
            _encode_items, rows, fmt, max_items=size - len(items), max_bytes=gw.settings.page_max_bytes - used,
            at_least_one=not items))
        for rid, encoded in taken:
            items.append(encoded)
            used += len(encoded) + 1
            cursor = rid
        if len(taken) < len(rows):
            more = True  # the page is full, by count or by bytes
            break
        if len(fetched) < want:
            break  # the job has no more results
        cursor = fetched[-1][0]
    next_token = page_token(cursor) if more and cursor is not None else None
    body = b"".join((head, b",".join(items), b'],"next_page_token":',
                     json.dumps(next_token).encode(), b"}"))
    GM.PAGE_BYTES.observe(len(body))
    return web.Response(body=body, content_type="application/json")


# Results are fetched, parsed and encoded this many rows at a time: a page of large results never sits in
# memory twice over, and the event loop runs between the chunks (parsing and encoding run in the executor).
PAGE_FETCH_ROWS = 100


def _parse_results(rows: list[tuple[str, str | None]]) -> list[tuple[str, dict[str, Any]]]:
    return [(rid, json.loads(raw)) for rid, raw in rows if raw]


def _encode_items(rows: list[tuple[str, dict[str, Any]]], fmt: str, *, max_items: int, max_bytes: int,
                  at_least_one: bool) -> list[tuple[str, bytes]]:
    """The rows' views as JSON, in order, while they fit ``max_items`` and ``max_bytes`` (the first item of a
    page is taken whatever its size, so a page always moves the cursor on). Item by item, so the interpreter
    lets the event loop's thread in between. The page around them is replies.JobResultsPage's shape."""
    out: list[tuple[str, bytes]] = []
    for rid, r in rows:
        if len(out) >= max_items:
            break
        encoded = (coco_view(r) if fmt == "coco" else result_view(r)).model_dump_json().encode()
        if len(encoded) + 1 > max_bytes and not (at_least_one and not out):
            break
        max_bytes -= len(encoded) + 1
        out.append((rid, encoded))
    return out


# ---------------------------------------------------------------------------------------------- deletion


@endpoint("images.delete", "detect:write")
async def delete_image(request: web.Request) -> web.StreamResponse:
    """Remove the image (content-addressed object and any upload it came from), its results and cache rows;
    record a tombstone so a result still in flight is never served."""
    gw, who = _gw(request)
    sha = _path(request, params.ImagePath,
                "no such image (an image id is the sha256 of its bytes, 64 hex digits)").id
    request_ids = await gw.store.image_request_ids(who.tenant, sha)
    content_key = f"{who.tenant}/{sha}"
    has_object = await gw.objects.exists(content_key)
    if not request_ids and not has_object:
        raise Problem("NOT_FOUND", "no such image")
    now = now_ms()
    await gw.store.tombstone(who.tenant, sha, who.subject, now)
    removed: set[str] = set()
    if has_object:
        await gw.objects.remove(content_key)
        removed.add(content_key)
    for rid in request_ids:
        row = await gw.store.get_request(who.tenant, rid)
        if row is None:
            continue
        bucket_key = (row.source or "").split("/", 1)
        if len(bucket_key) == 2 and bucket_key[0] == gw.objects.bucket and bucket_key[1].startswith(who.tenant + "/") \
                and bucket_key[1] not in removed:
            await gw.objects.remove(bucket_key[1])  # removing a missing object is not an error in S3
            removed.add(bucket_key[1])
        await gw.store.delete_request(who.tenant, row)
    await gw.store.delete_image_rows(who.tenant, sha)
    return _json(replies.DeleteResult(image_id=sha, deleted_at=iso(now), requests_deleted=len(request_ids),
                                  objects_deleted=len(removed)))


# ---------------------------------------------------------------------------------------------- tenants


def _own_tenant(request: web.Request, who: Principal) -> str:
    """An admin acts on its own tenant only (the tenant comes from the token); another is 404, never 403."""
    tenant = rules.parse(params.TenantPath, dict(request.match_info), None).tenant
    if tenant != who.tenant:
        raise Problem("NOT_FOUND", "no such tenant")
    request["audit"]["resource"] = tenant
    return tenant


@endpoint("tenants.erase", "admin")
async def erase_tenant(request: web.Request) -> web.StreamResponse:
    """Erase everything the tenant has: objects under its prefix in every bucket, its rows in every
    tenant-keyed table; the erasure's tombstone and the audit log stay (the record that it happened)."""
    gw, who = _gw(request)
    tenant = _own_tenant(request, who)
    now = now_ms()
    p = gw.settings.pipeline
    objects = await gw.objects.erase_prefix(f"{tenant}/", (p.uploads_bucket, p.quarantine_bucket, p.review_bucket,
                                                           "derived"))
    rows = await gw.store.erase_tenant(tenant, who.subject, now)
    request["audit"]["detail"] = f"erased rows={sum(rows.values())} objects={sum(objects.values())}"
    return _json(replies.TenantErasure(tenant=tenant, erased_at=iso(now), rows_deleted=rows, objects_deleted=objects))


def _policy_view(tenant: str, policy: dict[str, Any] | None, cache_s: float) -> replies.TenantPolicy:
    policy = policy or {"hidden_classes": [], "review_classes": [], "review_retention_days": None, "revision": 0,
                        "updated_by": None, "updated_at": None}
    return replies.TenantPolicy(tenant=tenant, **{**policy, "updated_at": iso(policy["updated_at"])},
                            applies_within_s=cache_s)


@endpoint("tenants.policy.read", "admin")
async def get_policy(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    tenant = _own_tenant(request, who)
    return _json(_policy_view(tenant, await gw.store.get_policy(tenant), gw.settings.pipeline.policy_cache_s))


@endpoint("tenants.policy.write", "admin")
async def put_policy(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    tenant = _own_tenant(request, who)
    body = rules.parse(bodies.TenantPolicyRequest, await read_json(request, gw.settings), gw.settings,
                     class_names=_class_names(gw))
    revision = await gw.store.put_policy(tenant, subject=who.subject, at_ms=now_ms(), **body.model_dump())
    request["audit"]["detail"] = f"revision={revision}"
    return _json(_policy_view(tenant, await gw.store.get_policy(tenant), gw.settings.pipeline.policy_cache_s))


# ---------------------------------------------------------------------------------------------- audit


@endpoint("audit.read", "admin")
async def audit_events(request: web.Request) -> web.StreamResponse:
    gw, who = _gw(request)
    query = _query(request, params.AuditQuery)
    day = query.day or utc_day()
    rows = await gw.store.audit_events(who.tenant, day, query.limit)
    return _json(replies.AuditPage(tenant=who.tenant, day=day, events=[
        replies.AuditEvent(**{**e, "event_time": iso(e["event_time"])}) for e in rows]))


# ---------------------------------------------------------------------------------------------- operations


async def openapi(request: web.Request) -> web.StreamResponse:
    """The document gateway/openapi.py generated when the app was built."""
    return _json(request.app[DOCUMENT])


async def livez(request: web.Request) -> web.StreamResponse:
    return _json(replies.Live())


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready when the last background probe (every 2 s, each service within 2 s) found Kafka, MinIO and
    Cassandra answering. Answered from memory: it never waits on them, nor on any overload gate."""
    ready, checks = request.app[GATEWAY].health.ready()
    if ready:
        return _json(replies.Ready(checks=checks))
    raise Problem("UNAVAILABLE", "a backing service does not answer", checks=checks, headers={"Retry-After": "5"})


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
