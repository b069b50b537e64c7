"""The HTTP clients ride out 503/429 and a restarting gateway: infra/http_retry.py and the jobs client, against a
small in-process aiohttp server that refuses on cue (no services)."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from infra import jobs_cmd
from infra.http_retry import DeadlineExceeded, RefusedError, RetryPolicy, call_with_retries, retry_after_s
from infra.jobs_cmd import JobsClient

FAST = RetryPolicy(max_wait_s=0.05, backoff_initial_s=0.01, backoff_max_s=0.05, jitter=0.2)


# ---------------------------------------------------------------------------------------------- the policy


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 0 ") == 0.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    now = time.time()
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def refusing(answers: list[BaseException | str]) -> Callable[[], Awaitable[str]]:
    """A send() that raises each exception in turn, then returns the first string."""
    async def send() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer
    return send


def test_waits_follow_retry_after_capped_and_jittered() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_wait_s=30.0, jitter=0.2)
    send = refusing([RefusedError(503, "busy", "2"), RefusedError(429, "slow", "600"), "ok"])
    out = asyncio.run(call_with_retries(send, what="POST /v1/jobs", deadline=1000.0, idempotent=False, policy=policy,
                                        sleep=t.sleep, clock=t.clock, rand=lambda: 1.0))
    assert out == "ok"
    assert t.waits == [pytest.approx(2 * 1.2), pytest.approx(30 * 1.2)]  # Retry-After, capped at max_wait_s


def test_jitter_stretches_but_never_shortens_a_wait() -> None:
    for r in (0.0, 0.5, 0.999):
        t = FakeTime()
        asyncio.run(call_with_retries(refusing([RefusedError(503, "", "1"), "ok"]), what="x", deadline=100.0,
                                      idempotent=True, sleep=t.sleep, clock=t.clock, rand=lambda r=r: r))
        assert 1.0 <= t.waits[0] <= 1.2


def test_without_retry_after_the_backoff_doubles_to_its_cap() -> None:
    t = FakeTime()
    policy = RetryPolicy(backoff_initial_s=0.5, backoff_max_s=2.0, jitter=0.0)
    answers: list[BaseException | str] = [RefusedError(503, "", None) for _ in range(5)] + ["ok"]
    asyncio.run(call_with_retries(refusing(answers), what="x", deadline=100.0, idempotent=True, policy=policy,
                                  sleep=t.sleep, clock=t.clock))
    assert t.waits == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_the_deadline_ends_the_retries_with_a_clear_error() -> None:
    t = FakeTime()
    answers: list[BaseException | str] = [RefusedError(503, {"code": "OVERLOADED"}, "1") for _ in range(100)]
    with pytest.raises(DeadlineExceeded) as info:
        asyncio.run(call_with_retries(refusing(answers), what="GET /v1/jobs/j1", deadline=10.0, idempotent=True,
                                      sleep=t.sleep, clock=t.clock, rand=lambda: 0.0))
    assert t.now <= 10.0 and len(t.waits) == 9
    assert "GET /v1/jobs/j1" in str(info.value) and "HTTP 503" in str(info.value) and "10 attempt(s)" in str(info.value)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value.__cause__, RefusedError)


def test_a_retry_after_past_the_deadline_fails_at_once() -> None:
    t = FakeTime()
    with pytest.raises(DeadlineExceeded, match="QUOTA_EXCEEDED"):
        asyncio.run(call_with_retries(refusing([RefusedError(429, "QUOTA_EXCEEDED", "86400"), "ok"]), what="x",
                                      deadline=60.0, idempotent=True, sleep=t.sleep, clock=t.clock))
    assert t.waits == []


def test_transport_errors_are_retried_only_for_idempotent_calls() -> None:
    t = FakeTime()
    reset = aiohttp.ServerDisconnectedError()
    assert asyncio.run(call_with_retries(refusing([reset, TimeoutError(), "ok"]), what="x", deadline=100.0,
                                         idempotent=True, sleep=t.sleep, clock=t.clock)) == "ok"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(call_with_retries(refusing([reset, "ok"]), what="x", deadline=100.0, idempotent=False,
                                      sleep=t.sleep, clock=t.clock))


# ---------------------------------------------------------------------------------------------- a fake gateway


class FakeGateway:
    """The batch API's shape: uploads (pre-signed PUTs to itself), jobs keyed by Idempotency-Key, status, results.
    ``refuse[route]`` answers that route with 503 (or 429) that many times first."""

    def __init__(self) -> None:
        self.refuse: Counter[str] = Counter()
        self.refuse_status = 503
        self.retry_after = "0"
        self.seen: list[tuple[str, str, str | None]] = []  # (method, route, Idempotency-Key)
        self.jobs: dict[str, dict[str, Any]] = {}  # job id -> job
        self.by_key: dict[str, str] = {}
        self.objects: dict[str, bytes] = {}
        self.polls_until_done = 2
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.refusals])
        app.router.add_post("/v1/uploads", self.uploads)
        app.router.add_put("/put/{id}", self.put)
        app.router.add_post("/v1/jobs", self.create_job)
        app.router.add_get("/v1/jobs/{id}", self.get_job)
        app.router.add_get("/v1/jobs/{id}/results", self.results)
        return app

    @web.middleware
    async def refusals(self, request: web.Request, handler: Any) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
        self.seen.append((request.method, route, request.headers.get("Idempotency-Key")))
        if self.refuse[route] > 0:
            self.refuse[route] -= 1
            code = "OVERLOADED" if self.refuse_status == 503 else "RATE_LIMITED"
            return web.json_response({"code": code}, status=self.refuse_status,
                                     headers={"Retry-After": self.retry_after})
        return await handler(request)

    async def uploads(self, request: web.Request) -> web.Response:
        files = (await request.json())["files"]
        out = []
        for _ in files:
            upload_id = uuid.uuid4().hex
            out.append({"upload_id": upload_id, "url": f"{self.url}/put/{upload_id}", "headers": {}})
        return web.json_response({"uploads": out}, status=201)

    async def put(self, request: web.Request) -> web.Response:
        self.objects[request.match_info["id"]] = await request.read()
        return web.Response(status=200)

    async def create_job(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        items = (await request.json())["items"]
        job_id = self.by_key.get(key) if key else None
        if job_id is None:
            job_id = str(uuid.uuid4())
            self.jobs[job_id] = {"total": len(items), "polls": 0}
            if key:
                self.by_key[key] = job_id
        total = self.jobs[job_id]["total"]
        return web.json_response({"job_id": job_id, "status": "RUNNING", "total": total,
                                  "request_ids": [f"{job_id}/{i}" for i in range(total)]}, status=202)

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.jobs[request.match_info["id"]]
        job["polls"] += 1
        done = job["total"] if job["polls"] >= self.polls_until_done else 0
        return web.json_response({"job_id": request.match_info["id"], "total": job["total"], "done": done,
                                  "status": "COMPLETED" if done == job["total"] else "RUNNING",
                                  "counts": {"OK": done, "REJECTED": 0, "FAILED": 0}})

    async def results(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        start = int(request.query.get("page_token") or 0)
        size = int(request.query["page_size"])
        total = self.jobs[job_id]["total"]
        items = [{"request_id": f"{job_id}/{i}", "status": "OK", "detections": []}
                 for i in range(start, min(total, start + size))]
        more = start + size < total
        return web.json_response({"job_id": job_id, "items": items,
                                  "next_page_token": str(start + size) if more else None})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(gateway: FakeGateway, port: int) -> web.AppRunner:
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def running(gateway: FakeGateway) -> AsyncIterator[str]:
    port = free_port()
    gateway.url = f"http://127.0.0.1:{port}"
    runner = await serve(gateway, port)
    try:
        yield gateway.url
    finally:
        await runner.cleanup()


def with_gateway(gateway: FakeGateway, body: Callable[[JobsClient], Awaitable[Any]], **client: Any) -> Any:
    async def main() -> Any:
        async for url in running(gateway):
            async with aiohttp.ClientSession() as session:
                return await body(JobsClient(session, url, "t", policy=FAST, **client))
        raise AssertionError("unreachable")
    return asyncio.run(main())


def test_a_refused_job_creation_is_retried_under_one_key_and_makes_one_job() -> None:
    gw = FakeGateway()
    gw.refuse["/v1/jobs"] = 3
    job = with_gateway(gw, lambda c: c.submit_job(["u1", "u2"]))
    posts = [key for method, route, key in gw.seen if (method, route) == ("POST", "/v1/jobs")]
    assert len(posts) == 4 and posts[0] is not None and len(set(posts)) == 1
    assert list(gw.jobs) == [job["job_id"]]


def test_rate_limited_calls_wait_and_succeed() -> None:
    gw = FakeGateway()
    gw.refuse_status, gw.retry_after = 429, "0"
    gw.refuse["/v1/uploads"] = 2
    ids = with_gateway(gw, lambda c: c.upload([(b"a", "image/jpeg"), (b"b", "image/png")]))
    assert len(ids) == 2 and sorted(gw.objects.values()) == [b"a", b"b"]


def test_polling_and_paging_ride_out_503s() -> None:
    gw = FakeGateway()

    async def body(c: JobsClient) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        job = await c.submit_job(["u"] * 5)
        gw.refuse["/v1/jobs/{id}"] = 2
        gw.refuse["/v1/jobs/{id}/results"] = 2
        status = await c.wait_job(job["job_id"], 10.0)
        return status, await c.results(job["job_id"], page_size=2)

    status, results = with_gateway(gw, body)
    assert status["status"] == "COMPLETED" and len(results) == 5
    refused_then_served = [r for m, r, _ in gw.seen if r.startswith("/v1/jobs/{id}")]
    assert len(refused_then_served) == 2 + gw.polls_until_done + 2 + 3


def test_a_gateway_that_stays_overloaded_ends_at_the_deadline() -> None:
    gw = FakeGateway()
    gw.refuse["/v1/jobs"] = 10**6
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"POST /v1/jobs: HTTP 503"):
        with_gateway(gw, lambda c: c.submit_job(["u"]), retry_s=0.5)
    assert time.monotonic() - t0 < 3.0
    assert sum(1 for m, r, _ in gw.seen if r == "/v1/jobs") > 1


def test_a_restarting_gateway_is_retried_for_idempotent_calls_only() -> None:
    """Connection refused until the gateway comes up: a GET (and a keyed POST) wait for it; an unkeyed POST
    fails at once (it may have been done)."""
    gw = FakeGateway()
    port = free_port()
    gw.url = f"http://127.0.0.1:{port}"

    async def main() -> tuple[dict[str, Any], float]:
        async with aiohttp.ClientSession() as session:
            client = JobsClient(session, gw.url, "t", policy=FAST, retry_s=20.0)
            with pytest.raises(aiohttp.ClientConnectionError):
                await client.call("POST", "/v1/uploads", json_body={"files": []})
            t0 = time.monotonic()

            async def late_start() -> web.AppRunner:
                await asyncio.sleep(0.4)  # the "restart": nothing listens on the port until then
                return await serve(gw, port)

            starter = asyncio.create_task(late_start())
            job = await client.submit_job(["u"])  # keyed: retried through connection refused
            runner = await starter
            try:
                status = await client.call("GET", f"/v1/jobs/{job['job_id']}")
            finally:
                await runner.cleanup()
            return status, time.monotonic() - t0

    status, took = asyncio.run(main())
    assert status["total"] == 1 and took >= 0.4
    assert len(gw.jobs) == 1


def test_jobs_submit_wait_survives_503s_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`detectflow jobs submit DIR --wait`: it used to exit 1 on the gateway's first 503."""
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(name.encode())
    gw = FakeGateway()
    for route in ("/v1/uploads", "/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/results"):
        gw.refuse[route] = 1

    async def main() -> int:
        async for url in running(gw):
            return await jobs_cmd._submit([tmp_path], url=url, bearer="t", tls=ssl.create_default_context(),
                                          wait=True, as_json=False, score=None, timeout_s=30.0)
        raise AssertionError("unreachable")

    assert asyncio.run(main()) == 0
    out = capsys.readouterr().out
    assert "2 images, OK 2" in out and len(gw.jobs) == 1


def test_the_sync_bench_client_retries_refusals_and_reports_the_last_status() -> None:
    from infra.bench_sync import DETECT_ROUTE, Target, _post

    gw = FakeGateway()

    async def detect(request: web.Request) -> web.Response:
        return web.json_response({"status": "OK", "cache_hit": False})

    async def main() -> tuple[tuple[float, int], tuple[float, int]]:
        port = free_port()
        app = gw.app()
        app.router.add_post(DETECT_ROUTE, detect)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                target = Target(f"http://127.0.0.1:{port}", "t", 1000, retry_s=5.0)
                gw.refuse[DETECT_ROUTE] = 2
                served = await _post(session, target, b"img")
                gw.refuse[DETECT_ROUTE], gw.retry_after = 10**6, "0"
                refused = await _post(session, Target(target.base_url, "t", 1000, retry_s=0.3), b"img")
                return served, refused
        finally:
            await runner.cleanup()

    (_, served), (_, refused) = asyncio.run(main())
    assert served == 200 and refused == 503
    assert sum(1 for m, r, _ in gw.seen if r == DETECT_ROUTE) > 3
