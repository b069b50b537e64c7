"""The gateway's overload and bad-input gates (no services): JSON depth, body size and the in-flight byte budget,
per-tenant fair shares of the sync lane, Idempotency-Key release on refusals, results pages bounded in bytes,
readiness from memory, Retry-After on every 429/503."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from config import GatewaySettings
from gateway import handlers as h
from gateway.app import body_budget_middleware, problems_middleware
from gateway.auth import Principal
from gateway.inputs import json_too_deep, page_token, parse_json
from gateway.limits import ByteBudget, DailyQuota, FairShares, RateDecision
from gateway.problems import CODES, Problem
from gateway.state import BODIES, GATEWAY, SETTINGS, Health

DEEP = b"[" * 100_000 + b"]" * 100_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------------------- JSON depth


def nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)


def test_json_depth_is_checked_before_parsing() -> None:
    assert json_too_deep(DEEP, 32)
    assert not json_too_deep(nested(32), 32) and json_too_deep(nested(33), 32)
    assert json.loads(nested(32))  # the bound is the real depth, not an estimate
    # Brackets inside strings (escaped quotes included) are not nesting.
    assert not json_too_deep(json.dumps({"s": "[[[[" * 100, "t": 'a\\"[[[[' * 50}).encode(), 4)
    assert not json_too_deep(b"[" * 50, 4)  # unbalanced: not JSON, left to the parser
    with pytest.raises(Problem) as info:
        parse_json(DEEP, 32)
    assert info.value.code == "JSON_TOO_DEEP" and info.value.status == 400
    with pytest.raises(Problem) as info:
        parse_json(b"[" * 50, 32)
    assert info.value.code == "INVALID_REQUEST"
    assert parse_json(b'{"items": [{"key": "t/a"}]}', 32) == {"items": [{"key": "t/a"}]}


# ---------------------------------------------------------------------------------------------- gates


def test_byte_budget_reserves_and_releases() -> None:
    budget = ByteBudget(100)
    assert budget.reserve(60) and not budget.reserve(41) and budget.reserve(40)
    assert budget.reserved == 100 and budget.reserve(0)
    budget.release(60)
    assert budget.reserved == 40 and budget.reserve(60)
    budget.release(1000)
    assert budget.reserved == 0


def test_a_tenants_burst_leaves_room_for_the_others() -> None:
    clock = Clock()
    shares = FairShares(16, floor=2, window_s=5.0, clock=clock)
    admitted = 0
    with pytest.raises(Problem) as info:
        for _ in range(100):  # tenant A bursts, alone
            shares.admit("a")
            admitted += 1
    assert info.value.code == "FAIR_SHARE_EXCEEDED" and info.value.status == 429
    assert info.value.headers["Retry-After"] == "1"
    assert admitted == 14  # alone it may use all but `floor` seats (work-conserving), kept for a newcomer
    shares.admit("b")  # tenant B finds the kept seats at once ...
    shares.admit("b")
    with pytest.raises(Problem) as full:
        shares.admit("b")
    assert full.value.code == "OVERLOADED"  # ... and then the instance is full
    for _ in range(3):
        shares.release("a")
    with pytest.raises(Problem) as again:
        shares.admit("a")  # over its share (16 // 3 = 5): the seats A's calls free are kept for the others
    assert again.value.code == "FAIR_SHARE_EXCEEDED"
    for _ in range(3):
        shares.admit("b")  # they go to B, under its share
    assert shares.inflight == {"a": 11, "b": 5} and shares.share() == 5
    clock.t += 10  # both go quiet: the window forgets them
    assert shares.active() == 0


def test_the_hard_cap_holds_whatever_the_shares() -> None:
    shares = FairShares(3, floor=2, clock=Clock())
    shares.admit("a")
    shares.admit("a")
    shares.admit("b")
    with pytest.raises(Problem) as info:
        shares.admit("c")
    assert info.value.code == "OVERLOADED" and info.value.status == 503 and info.value.headers["Retry-After"] == "1"
    shares.release("b")
    shares.admit("c")
    assert shares.total == 3


def test_while_the_lane_lags_only_the_heavy_tenant_is_refused() -> None:
    clock = Clock()
    shares = FairShares(1000, floor=2, clock=clock)
    for _ in range(20):
        shares.admit("a")
        shares.release("a")
    shares.admit("b")
    shares.release("b")
    with pytest.raises(Problem) as info:
        shares.admit("a", lagging=True)
    assert info.value.code == "FAIR_SHARE_EXCEEDED" and "backlog" in info.value.detail
    shares.admit("b", lagging=True)  # B sent 1 of the window's 21 calls: admitted though the lane lags
    shares.admit("c", lagging=True)  # so is a tenant not seen before
    shares.admit("a")  # without the lag, A is within its in-flight share again
    assert shares.inflight == {"a": 1, "b": 1, "c": 1}


def test_while_the_lane_lags_tenants_sending_alike_are_all_admitted() -> None:
    shares = FairShares(1000, floor=2, clock=Clock())
    for _ in range(10):
        for t in ("a", "b"):
            shares.admit(t)
            shares.release(t)
    shares.admit("a", lagging=True)  # neither sends more than its part: the backlog is nobody's burst
    shares.admit("b", lagging=True)
    assert shares.total == 2


def test_every_429_and_503_carries_retry_after() -> None:
    for code, (status, _title) in CODES.items():
        if status in (429, 503):
            p = Problem(code, "x")
            assert int(p.response().headers["Retry-After"]) >= 1, code
    assert Problem("QUOTA_EXCEEDED", headers={"Retry-After": "60"}).headers["Retry-After"] == "60"
    assert "Retry-After" not in Problem("NOT_FOUND").headers


def test_readiness_is_answered_from_the_last_probe() -> None:
    clock = Clock()
    health = Health(clock)
    assert health.ready() == (False, {"probe": "not run yet"})
    health.record({"kafka": "ok", "minio": "ok", "cassandra": "ok"})
    assert health.ready()[0]
    health.record({"kafka": "ok", "minio": "ok", "cassandra": "unavailable: TimeoutError"})
    assert not health.ready()[0]
    health.record({"kafka": "ok", "minio": "ok", "cassandra": "ok"})
    clock.t += 3 * Health.INTERVAL_S + Health.PROBE_TIMEOUT_S + 1  # the probe hangs: stale is not ready
    ready, checks = health.ready()
    assert not ready and checks["probe"].startswith("stale")


# ---------------------------------------------------------------------------------------------- HTTP


class FakeStore:
    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], tuple[str, str]] = {}
        self.released: list[str] = []
        self.jobs: dict[str, Any] = {}
        self.quota: dict[tuple[str, str], int] = {}
        self.results: list[tuple[str, str | None]] = []

    async def claim_idempotency_key(self, tenant: str, key: str, fp: str, resource: str,
                                    now_ms: int) -> tuple[bool, str, str]:
        if (tenant, key) in self.keys:
            return False, *self.keys[(tenant, key)]
        self.keys[(tenant, key)] = (fp, resource)
        return True, fp, resource

    async def release_idempotency_key(self, tenant: str, key: str) -> None:
        self.released.append(key)
        self.keys.pop((tenant, key), None)

    async def quota_used(self, tenant: str, day: str) -> int | None:
        return self.quota.get((tenant, day))

    async def quota_compare_and_set(self, tenant: str, day: str, expected: int | None,
                                    new: int) -> tuple[bool, int | None]:
        if self.quota.get((tenant, day)) != expected:
            return False, self.quota.get((tenant, day))
        self.quota[(tenant, day)] = new
        return True, new

    async def get_job(self, tenant: str, job_id: str) -> Any:
        return self.jobs.get(job_id)

    async def put_job(self, tenant: str, job_id: str, **kw: Any) -> None:
        self.jobs[job_id] = SimpleNamespace(published=False, created_at=kw["created_at"], total=kw["total"])

    async def put_requests(self, tenant: str, rows: Any) -> None:
        pass

    async def mark_job_published(self, tenant: str, job_id: str) -> None:
        self.jobs[job_id].published = True

    async def put_request(self, *a: Any, **kw: Any) -> None:
        pass

    async def job_results_raw(self, tenant: str, job_id: str, after: str | None,
                              limit: int) -> list[tuple[str, str | None]]:
        rows = [r for r in self.results if after is None or r[0] > after]
        return rows[:limit]

    async def deleted_at_many(self, tenant: str, shas: Any) -> dict[str, int]:
        return {}


class FakeBus:
    online_lag = 0
    prefix = "t."

    def __init__(self) -> None:
        self.produced = 0

    def produce(self, *a: Any, **kw: Any) -> asyncio.Future[None]:
        self.produced += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def delivered(self, futures: list[asyncio.Future[None]], timeout_s: float) -> None:
        await asyncio.gather(*futures)


class FakeAuth:
    async def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise Problem("UNAUTHENTICATED")
        return Principal(tenant=header.split()[-1], subject="s", scopes=frozenset({"detect:write", "results:read"}))


class AllowAll:
    rate = 1000.0

    def take(self, tenant: str, n: int = 1) -> RateDecision:
        return RateDecision(True, 100, 99, 0, 0)


class FakeObjects:
    bucket = "uploads"

    async def size(self, key: str) -> int:
        return 1000


def fake_gateway(settings: GatewaySettings, store: FakeStore, quota: int) -> Any:
    return SimpleNamespace(
        settings=settings, auth=FakeAuth(), bus=FakeBus(), store=store, objects=FakeObjects(), buckets=AllowAll(),
        quota=DailyQuota(quota, store.quota_used, store.quota_compare_and_set),
        audit=SimpleNamespace(record=lambda **kw: None), catalog=None,
        shares=FairShares(settings.max_inflight, floor=settings.sync_share_floor), health=Health())


def app_of(settings: GatewaySettings, gw: Any, extra: dict[str, Callable[[web.Request], Awaitable[Any]]]
           | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes + 256 * 1024,
                          middlewares=[problems_middleware, body_budget_middleware])
    app[SETTINGS] = settings
    app[GATEWAY] = gw
    app[BODIES] = ByteBudget(settings.max_inflight_body_bytes)
    app.router.add_post("/v1/jobs", h.create_job)
    app.router.add_post("/v1/detect", h.detect)
    app.router.add_get("/v1/jobs/{id}/results", h.job_results)
    app.router.add_get("/readyz", h.readyz)
    for path, handler in (extra or {}).items():
        app.router.add_post(path, handler)
    return app


def run_with(app: web.Application, calls: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(app)) as client:
            return await calls(client)
    return asyncio.run(main())


def settings_of(**env: str) -> GatewaySettings:
    return GatewaySettings.from_env({f"DETECTFLOW_{k}": v for k, v in env.items()})


def test_bodies_past_the_limit_are_refused_before_they_are_read() -> None:
    settings = settings_of(MAX_JSON_BYTES="2048", MAX_INFLIGHT_BODY_BYTES=str(1024 * 1024))
    reached: list[int] = []

    async def sink(request: web.Request) -> web.Response:
        reached.append(1)
        await h.read_json(request, settings)
        return web.json_response({})

    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield b" " * 1024

    async def calls(client: TestClient) -> list[tuple[int, str, str]]:
        out = []
        for kwargs in ({"data": b"{}" + b" " * 5000}, {"data": chunks(10)}, {"data": DEEP}):
            r = await client.post("/sink", headers={"Content-Type": "application/json"}, **kwargs)
            out.append((r.status, r.content_type, (await r.json())["code"]))
        return out

    app = app_of(settings, fake_gateway(settings, FakeStore(), 10), {"/sink": sink})
    declared, chunked, deep = run_with(app, calls)
    assert declared == (413, "application/problem+json", "BODY_TOO_LARGE")
    assert chunked == (413, "application/problem+json", "BODY_TOO_LARGE")  # stopped while reading
    assert deep == (413, "application/problem+json", "BODY_TOO_LARGE")  # 200 kB past the 2 kB JSON limit
    assert reached == [1]  # only the chunked body (no declared length) reached the handler
    assert app[BODIES].reserved == 0


def test_a_deep_json_body_is_a_400_not_a_500() -> None:
    settings = settings_of()
    store = FakeStore()
    app = app_of(settings, fake_gateway(settings, store, 10))

    async def calls(client: TestClient) -> tuple[int, dict[str, Any]]:
        r = await client.post("/v1/jobs", data=DEEP, headers={"Content-Type": "application/json",
                                                              "Authorization": "Bearer t1"})
        return r.status, await r.json()

    status, body = run_with(app, calls)
    assert status == 400 and body["code"] == "JSON_TOO_DEEP"


def test_the_byte_budget_refuses_with_503_and_is_released_in_every_path() -> None:
    settings = settings_of(MAX_INFLIGHT_BODY_BYTES=str(1024 * 1024), MAX_JSON_BYTES=str(1024 * 1024))
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.wait_for(gate.wait(), 10)
        await request.read()
        return web.json_response({})

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = app_of(settings, fake_gateway(settings, FakeStore(), 10), {"/slow": slow, "/broken": broken})

    async def calls(client: TestClient) -> tuple[int, int, str, int, int, int]:
        held = asyncio.create_task(client.post("/slow", data=b"x" * 700_000,
                                               headers={"Content-Type": "application/json"}))
        await asyncio.wait_for(entered.wait(), 10)
        reserved = app[BODIES].reserved
        refused = await client.post("/slow", data=b"x" * 400_000, headers={"Content-Type": "application/json"})
        body = await refused.json()
        gate.set()
        assert (await held).status == 200
        failed = await client.post("/broken", data=b"x" * 1000, headers={"Content-Type": "application/json"})
        return reserved, refused.status, body["code"] + "/" + refused.headers["Retry-After"], failed.status, \
            app[BODIES].reserved, len(body)

    reserved, status, code, failed, after, _ = run_with(app, calls)
    assert reserved == 700_000  # the declared length, reserved before the body was read
    assert status == 503 and code == "OVERLOADED/1"
    assert failed == 500 and after == 0  # released after success, refusal and failure alike


def job_body(n: int) -> bytes:
    return json.dumps({"items": [{"key": f"t1/img{i}.jpg"} for i in range(n)]}).encode()


def test_an_idempotency_key_is_released_when_the_call_is_refused() -> None:
    settings = settings_of()
    store = FakeStore()
    gw = fake_gateway(settings, store, quota=3)
    app = app_of(settings, gw)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer t1", "Idempotency-Key": "k1"}

    async def calls(client: TestClient) -> list[tuple[int, str | None]]:
        out = []
        r = await client.post("/v1/jobs", data=job_body(5), headers=headers)  # 5 > the quota of 3
        out.append((r.status, (await r.json()).get("code")))
        gw.quota.limit = 10  # the quota is raised (or the next day came): the same key is processed
        r = await client.post("/v1/jobs", data=job_body(5), headers=headers)
        out.append((r.status, (await r.json()).get("job_id")))
        r = await client.post("/v1/jobs", data=job_body(5), headers=headers)  # a replay now: the same job
        out.append((r.status, (await r.json()).get("job_id")))
        gw.quota.limit = 5
        detect_headers = {**headers, "Idempotency-Key": "k2"}
        ref = json.dumps({"image": {"key": "t1/img.jpg"}}).encode()
        r = await client.post("/v1/detect", data=ref, headers=detect_headers)  # 6th image: over the quota
        out.append((r.status, (await r.json()).get("code")))
        return out

    refused, created, replayed, detect_refused = run_with(app, calls)
    assert refused == (429, "QUOTA_EXCEEDED")
    assert created[0] == 202 and replayed == created
    assert gw.bus.produced == 5  # the job once, the replay published nothing
    assert detect_refused == (429, "QUOTA_EXCEEDED")
    assert store.released == ["k1", "k2"] and ("t1", "k2") not in store.keys


def result_of(i: int, detections: int) -> dict[str, Any]:
    box = {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}
    return {"request_id": str(uuid.UUID(int=i)), "status": "OK", "image_sha256": None, "model_name": "m",
            "detections": [{"class_id": 1, "class_name": "person", "score": 0.5, "box": box, "box_norm": box}
                           for _ in range(detections)], "timings_ms": {}}


def test_results_pages_are_bounded_in_bytes_and_lose_nothing() -> None:
    settings = settings_of(PAGE_MAX_BYTES=str(64 * 1024))
    store = FakeStore()
    store.results = [(str(uuid.UUID(int=i)), json.dumps(result_of(i, 60))) for i in range(40)]
    store.results.insert(5, (str(uuid.UUID(int=5)) + "x", None))  # an item without its result yet
    store.jobs["j1"] = SimpleNamespace(published=True)
    app = app_of(settings, fake_gateway(settings, store, 10))

    async def calls(client: TestClient) -> list[tuple[int, int, dict[str, Any]]]:
        pages = []
        token = None
        for _ in range(50):
            params = {"page_size": "1000", **({"page_token": token} if token else {})}
            r = await client.get("/v1/jobs/j1/results", params=params, headers={"Authorization": "Bearer t1"})
            raw = await r.read()
            body = json.loads(raw)
            pages.append((r.status, len(raw), body))
            token = body["next_page_token"]
            if token is None:
                break
        return pages

    pages = run_with(app, calls)
    assert all(status == 200 and size <= 64 * 1024 for status, size, _ in pages)
    assert len(pages) > 3  # 40 results of ~7 kB: not one page, though page_size allows 1000
    ids = [item["request_id"] for _, _, body in pages for item in body["items"]]
    assert ids == [str(uuid.UUID(int=i)) for i in range(40)]  # in order, none twice, none lost
    assert pages[0][2]["next_page_token"] == page_token(ids[len(pages[0][2]["items"]) - 1])


def test_page_size_stays_the_maximum() -> None:
    settings = settings_of()
    store = FakeStore()
    store.results = [(str(uuid.UUID(int=i)), json.dumps(result_of(i, 1))) for i in range(7)]
    store.jobs["j1"] = SimpleNamespace(published=True)
    app = app_of(settings, fake_gateway(settings, store, 10))

    async def calls(client: TestClient) -> list[dict[str, Any]]:
        out = []
        for params in ({"page_size": "3"}, {"page_size": "7"}, {"page_size": "3", "format": "coco"}):
            r = await client.get("/v1/jobs/j1/results", params=params, headers={"Authorization": "Bearer t1"})
            out.append(await r.json())
        return out

    three, seven, coco = run_with(app, calls)
    assert len(three["items"]) == 3 and three["next_page_token"] == page_token(str(uuid.UUID(int=2)))
    assert len(seven["items"]) == 7 and seven["next_page_token"] is None
    assert len(coco["items"]) == 3 and coco["items"][0][0]["bbox"] == [1.0, 2.0, 2.0, 2.0]


def test_readyz_answers_from_memory_at_once() -> None:
    settings = settings_of()
    gw = fake_gateway(settings, FakeStore(), 10)
    app = app_of(settings, gw)

    async def calls(client: TestClient) -> list[tuple[int, float, str | None]]:
        out = []
        for checks in (None, {"kafka": "ok", "minio": "ok", "cassandra": "ok"}):
            if checks:
                gw.health.record(checks)
            t0 = time.perf_counter()
            r = await client.get("/readyz")
            out.append((r.status, time.perf_counter() - t0, r.headers.get("Retry-After")))
        return out

    (before, t_before, retry), (after, t_after, _) = run_with(app, calls)
    assert before == 503 and retry == "5" and after == 200
    assert max(t_before, t_after) < 1.0  # nothing behind it to wait for (a generous bound for a slow machine)


def test_heartbeats_divide_the_rate_among_the_live_instances() -> None:
    from gateway.app import _heartbeat_loop
    from gateway.limits import TokenBuckets

    beats: list[tuple[str, str, int]] = []

    class Store:
        async def heartbeat(self, deployment: str, instance_id: str, at_ms: int, ttl_s: int) -> None:
            beats.append((deployment, instance_id, ttl_s))

        async def live_instances(self, deployment: str) -> int:
            return 4

    gw = SimpleNamespace(settings=settings_of(INSTANCE_HEARTBEAT_S="5"), store=Store(),
                         buckets=TokenBuckets(rate=100.0, burst=10))

    async def main() -> None:
        task = asyncio.create_task(_heartbeat_loop(gw, "p.", "i1"))  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while gw.buckets.instances != 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert beats == [("p.", "i1", 15)]  # one write per period, a TTL of three periods
    assert (gw.buckets.rate, gw.buckets.burst) == (25.0, 3)
