"""The gateway under overload and bad input, on the real stack (a gateway alone on its prefix: no pipeline, so a
sync call waits out its deadline and answers 202, which is how a call "meets its deadline" here).

Bad input: a 100,000-deep JSON body is a 400 problem, a 50 MB body a 413 before it is read. Overload: concurrent
jobs never charge past the daily quota; a results page is bounded in bytes; one tenant's burst, a large page
being rendered, or an online backlog do not push another tenant's sync call into a refusal or past its deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from gateway_kit import Gateway, start_stack_with_gateway
from stream_kit import kafka_admin

from config import PipelineSettings, StackSettings
from stream.topics import lane_topic

QUOTA = 20
LEASE_IDLE_S = 3.0
PAGE_MAX_BYTES = 2 * 1024 * 1024
ENV = {"DETECTFLOW_DAILY_QUOTA": str(QUOTA), "DETECTFLOW_PAGE_MAX_BYTES": str(PAGE_MAX_BYTES),
       "DETECTFLOW_MAX_INFLIGHT": "8", "DETECTFLOW_SYNC_SHARE_FLOOR": "2", "DETECTFLOW_ACTIVE_TENANT_WINDOW_S": "60",
       "DETECTFLOW_MAX_ONLINE_LAG": "5", "DETECTFLOW_MAX_ONLINE_LAG_HARD": "100000",
       "DETECTFLOW_LAG_CHECK_INTERVAL_S": "0.2", "DETECTFLOW_QUOTA_LEASE_IDLE_S": str(LEASE_IDLE_S)}
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def gw(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    prefix = f"go{uuid.uuid4().hex[:6]}."
    yield from start_stack_with_gateway(stack, prefix, tmp_path_factory.mktemp("overload-logs"), ENV,
                                        roles=("gateway",))


@pytest.fixture(scope="module")
def cql() -> Iterator[Any]:
    from stream.cassandra import connect

    session = connect(PipelineSettings.from_env().stream, "gateway")
    yield session
    session.cluster.shutdown()


def tenant() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


def metric(gw: Gateway, name: str) -> float:
    for line in gw.call("GET", "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------- bad input


def test_a_100000_deep_json_body_is_a_400_problem(gw: Gateway) -> None:
    t = tenant()
    for path in ("/v1/jobs", "/v1/uploads"):
        r = gw.call("POST", path, t, data=DEEP, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["code"] == "JSON_TOO_DEEP"
    assert gw.call("GET", "/livez").status_code == 200  # and the gateway is none the worse


def early_answer(sock: ssl.SSLSocket) -> bytes:
    """Application data the gateway has sent already, without waiting (a readable socket may only hold TLS
    session tickets, so readiness alone does not say it answered)."""
    sock.settimeout(0.0)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    finally:
        sock.settimeout(30)


def raw_post(gw: Gateway, path: str, headers: dict[str, str], body: Iterable[bytes]) -> tuple[int, int, bytes]:
    """POST over a raw TLS socket, sending the body only while the gateway has not answered (a client that
    stops at the answer, as curl does). (status, body bytes sent before the answer, the answer's body)."""
    url = urlsplit(gw.url)
    context = ssl.create_default_context(cafile=gw.verify)
    sock = context.wrap_socket(socket.create_connection((url.hostname, url.port), timeout=30),
                               server_hostname=url.hostname)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nConnection: close\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        sent = 0
        answer = b""
        for chunk in body:
            answer = early_answer(sock)
            if answer:
                break  # answered: stop sending
            try:
                sock.sendall(chunk)
            except OSError:  # the gateway closed its side (or stopped reading): its answer is waiting
                break
            sent += len(chunk)
        while True:  # the head, then Content-Length bytes of body
            if b"\r\n\r\n" in answer:
                head_part, rest = answer.split(b"\r\n\r\n", 1)
                length = next(int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                if len(rest) >= length:
                    return int(head_part.split(b" ", 2)[1]), sent, rest[:length]
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"the connection closed before a whole answer: {answer[:200]!r}")
            answer += data
    finally:
        sock.close()


def test_a_50_mb_json_body_is_a_413_before_it_is_read(gw: Gateway) -> None:
    auth = gw.auth(tenant())
    megabyte = b" " * (1024 * 1024)
    declared = {**auth, "Content-Type": "application/json", "Content-Length": str(50 * 1024 * 1024)}
    status, sent, body = raw_post(gw, "/v1/jobs", declared, (megabyte[:65536] for _ in range(800)))
    assert status == 413 and b"BODY_TOO_LARGE" in body
    assert sent < 50 * 1024 * 1024  # answered on the declared length, before the body was sent

    def chunked() -> Iterator[bytes]:
        for _ in range(50):
            yield b"%x\r\n%s\r\n" % (len(megabyte), megabyte)
        yield b"0\r\n\r\n"

    streamed = {**auth, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    status, sent, body = raw_post(gw, "/v1/jobs", streamed, chunked())
    assert status == 413 and b"BODY_TOO_LARGE" in body
    assert sent < 50 * 1024 * 1024  # refused once past the limit, not after the whole body
    # Every reservation was given back.
    wait_for(lambda: metric(gw, "detectflow_gateway_body_bytes_reserved") == 0, 10, "the body budget released")


# ---------------------------------------------------------------------------------------------- quota


def test_concurrent_jobs_never_charge_past_the_daily_quota(gw: Gateway, cql: Any) -> None:
    t = tenant()
    headers = {**gw.auth(t), "Content-Type": "application/json"}
    body = json.dumps({"items": [{"key": f"{t}/img{i}.jpg"} for i in range(3)]})
    barrier = threading.Barrier(50)

    def submit(_: int) -> Any:
        barrier.wait(30)
        return gw.call("POST", "/v1/jobs", data=body, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(submit, range(50)))
    statuses = [r.status_code for r in responses]
    accepted = [r for r in responses if r.status_code == 202]
    assert all(s in (202, 429) for s in statuses), statuses
    assert len(accepted) * 3 <= QUOTA
    assert len(accepted) == QUOTA // 3, statuses  # one instance: its charges take turns, nothing lost either
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.json()["code"] == "QUOTA_EXCEEDED" and 0 < int(r.headers["Retry-After"]) <= 86400
               for r in refused)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    row = cql.execute("SELECT images FROM quota_daily WHERE tenant = %s AND day = %s", (t, day)).one()
    assert row.images == len(accepted) * 3


def test_a_sync_calls_unused_quota_lease_is_given_back_when_idle(gw: Gateway, cql: Any, sample_jpeg: bytes) -> None:
    t = tenant()
    day = time.strftime("%Y-%m-%d", time.gmtime())

    def charged() -> int:
        return cql.execute("SELECT images FROM quota_daily WHERE tenant = %s AND day = %s", (t, day)).one().images

    assert gw.detect(t, sample_jpeg, params={"timeout_ms": 1}).status_code == 202
    assert charged() == 3  # a lease of ceil(20 / 8) images, one of them spent
    wait_for(lambda: charged() == 1, 5 * LEASE_IDLE_S, "the idle lease given back")


# ---------------------------------------------------------------------------------------------- pages


def big_result(request_id: str, detections: int) -> str:
    box = {"x1": 10.123456, "y1": 20.123456, "x2": 30.123456, "y2": 40.123456}
    norm = {k: v / 1000 for k, v in box.items()}
    return json.dumps({"request_id": request_id, "status": "OK", "image_sha256": None, "image_width": 640,
                       "image_height": 480, "model_name": "yolov4-tiny", "model_version": 1,
                       "detections": [{"class_id": 0, "class_name": "person", "score": 0.87654321, "box": box,
                                       "box_norm": norm} for _ in range(detections)],
                       "timings_ms": {"detect": 1.0}, "cache_hit": False, "review": False, "job_id": None,
                       "error_code": None, "error_message": None, "completed_at": 1_700_000_000_000})


@pytest.fixture(scope="module")
def big_job(cql: Any) -> tuple[str, str, list[str]]:
    """A job of 150 results x 300 detections (~8 MB as the API renders it), written as the recorder would."""
    t, job_id = tenant(), str(uuid.uuid4())
    cql.execute("INSERT INTO jobs (tenant, job_id, total, model_name, params, created_at, subject, status, published) "
                "VALUES (%s, %s, 150, 'yolov4-tiny', '{}', toTimestamp(now()), 'tests', 'RUNNING', true)",
                (t, job_id))
    insert = cql.prepare("INSERT INTO job_results (tenant, job_id, request_id, status, result, completed_at) "
                         "VALUES (?, ?, ?, 'OK', ?, toTimestamp(now()))")
    ids = sorted(str(uuid.uuid4()) for _ in range(150))
    futures = [cql.execute_async(insert, (t, job_id, rid, big_result(rid, 300))) for rid in ids]
    for f in futures:
        f.result()
    return t, job_id, ids


def pages_of(gw: Gateway, t: str, job_id: str) -> list[tuple[int, int, dict[str, Any]]]:
    out, token = [], None
    for _ in range(100):
        params = {"page_size": "1000", **({"page_token": token} if token else {})}
        r = gw.call("GET", f"/v1/jobs/{job_id}/results", t, params=params)
        body = r.json() if r.status_code == 200 else {"next_page_token": None, "items": []}
        out.append((r.status_code, len(r.content), body))
        token = body["next_page_token"]
        if token is None:
            return out
    raise AssertionError("no last page")


def test_a_large_results_page_is_bounded_in_bytes_with_a_cursor(gw: Gateway, big_job: tuple[str, str, list[str]]
                                                                ) -> None:
    t, job_id, ids = big_job
    pages = pages_of(gw, t, job_id)
    assert [status for status, _, _ in pages] == [200] * len(pages)
    assert len(pages) >= 3  # ~8 MB in pages of at most 2 MiB, though page_size allows all 150
    assert all(size <= PAGE_MAX_BYTES for _, size, _ in pages), [size for _, size, _ in pages]
    assert [item["request_id"] for _, _, body in pages for item in body["items"]] == ids
    assert all(len(item["detections"]) == 300 for _, _, body in pages for item in body["items"])


def timed_detect(gw: Gateway, t: str, jpeg: bytes, timeout_ms: int) -> tuple[int, float, Any]:
    t0 = time.monotonic()
    r = gw.detect(t, jpeg, params={"timeout_ms": timeout_ms})
    return r.status_code, time.monotonic() - t0, r


def test_a_sync_call_meets_its_deadline_while_large_pages_render(gw: Gateway, big_job: tuple[str, str, list[str]],
                                                                 sample_jpeg: bytes) -> None:
    t, job_id, _ = big_job
    stop = threading.Event()
    rendered = []

    def reader() -> None:
        while not stop.is_set():
            rendered.append(len(pages_of(gw, t, job_id)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        try:
            wait_for(lambda: len(rendered) >= 1, 60, "a first full read of the job")
            outcomes = [timed_detect(gw, tenant(), sample_jpeg, 1000) for _ in range(3)]
        finally:
            stop.set()
        for f in readers:
            f.result()
    for status, elapsed, r in outcomes:
        assert status == 202, r.text  # admitted and answered at its deadline (no pipeline behind this gateway)
        assert elapsed < 1.0 + 1.5, elapsed  # the deadline plus the call's own work, on a 2-core machine


# ---------------------------------------------------------------------------------------------- fairness


def test_one_tenants_burst_does_not_refuse_another_tenants_sync_call(gw: Gateway, sample_jpeg: bytes) -> None:
    a, b = tenant(), tenant()
    inflight_before = metric(gw, "detectflow_sync_inflight")
    assert inflight_before == 0
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        burst = [pool.submit(timed_detect, gw, a, sample_jpeg, 4000) for _ in range(20)]
        # Until A holds what it may: some of its calls in flight, the rest refused fast.
        wait_for(lambda: sum(1 for f in burst if f.done()) >= 1 and metric(gw, "detectflow_sync_inflight") >= 1,
                 20, "tenant A's burst in flight")
        t0 = time.monotonic()
        ready = gw.call("GET", "/readyz")
        ready_s = time.monotonic() - t0
        status, elapsed, r = timed_detect(gw, b, sample_jpeg, 1000)
        outcomes = [f.result() for f in burst]
    assert status == 202 and elapsed < 1.0 + 1.5, (status, elapsed, r.text)
    a_admitted = [o for o in outcomes if o[0] == 202]
    a_refused = [o for o in outcomes if o[0] != 202]
    assert a_admitted and a_refused
    assert len(a_admitted) < 8  # never the whole lane
    for code, took, resp in a_refused:
        assert code == 429 and resp.json()["code"] == "FAIR_SHARE_EXCEEDED", (code, resp.text)
        assert int(resp.headers["Retry-After"]) >= 1 and took < 2.0  # refused fast, before its body mattered
    assert ready.status_code == 200 and ready_s < 0.5, ready_s  # health never waits behind the gates


def test_an_online_backlog_refuses_the_heavy_tenant_only(gw: Gateway, stack: StackSettings,
                                                         sample_jpeg: bytes) -> None:
    """Last in the module: it leaves the online lane with a backlog."""
    a, b = tenant(), tenant()
    for _ in range(10):  # tenant A sends most of the recent sync calls
        assert gw.detect(a, sample_jpeg, params={"timeout_ms": 1}).status_code == 202
    assert gw.pipeline is not None
    prefix = gw.pipeline.prefix
    topic = lane_topic(prefix, "online", "submitted")
    producer = Producer({**kafka_admin(stack)})
    for i in range(12):
        producer.produce(topic, key=str(i), value=b"backlog", partition=0)
    assert producer.flush(10) == 0
    consumer = Consumer({**kafka_admin(stack), "group.id": f"{prefix}detectflow.scan", "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)  # the scan group has read nothing
    consumer.close()
    wait_for(lambda: metric(gw, "detectflow_gateway_online_lag") > 5, 30, "the backlog seen by the gateway")
    refused = gw.detect(a, sample_jpeg, params={"timeout_ms": 1})
    assert refused.status_code == 429 and refused.json()["code"] == "FAIR_SHARE_EXCEEDED", refused.text
    assert "backlog" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1
    status, elapsed, r = timed_detect(gw, b, sample_jpeg, 1000)
    assert status == 202 and elapsed < 1.0 + 1.5, (status, elapsed, r.text)
