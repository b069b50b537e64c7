"""Cassandra away for 90 s under a batch job and sync calls: when it is back every request ends with one terminal
result, the job completes by itself, and nothing went to a dead-letter topic.

The stages keep retrying what Cassandra refused (their retry budget is time: 10 minutes here, 15 by default), the
recorder retries only the records whose writes failed, and the job tracker counts again the jobs whose completion
check failed (processors/recorder.py, processors/jobs.py, docs/pipeline.md). It stops a stack service, so it runs
with the `restart` tests, last.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from gateway_kit import Gateway, start_stack_with_gateway, variants
from stream_kit import kafka_admin, read_all

from config import StackSettings
from infra.jobs_cmd import JobsClient
from infra.roles import SERVICES
from infra.stack import manager
from infra.stack.cassandra_access import admin_session
from stream import headers as H
from stream.serde import AvroSerde
from stream.topics import all_topics, detections_topic, lane_topic, retry_topic

JOB_IMAGES = 300
OUTAGE_S = 90.0
# Retries end only after 10 minutes (the default is 15); after the outage the retry topics are read again within 4 s.
OUTAGE_ENV = {"DETECTFLOW_RETRY_BUDGET_MS": "600000", "DETECTFLOW_RETRY_DELAY_MAX_MS": "4000",
              "DETECTFLOW_JOB_RECHECK_S": "5"}
TERMINAL = {"OK", "REJECTED", "FAILED"}


class SyncCallers:
    """Sync calls in a loop from a few threads; the request ids the gateway accepted (a result or a 202)."""

    def __init__(self, gw: Gateway, tenant: str, bodies: list[bytes], threads: int = 2):
        self.gw, self.tenant, self.bodies = gw, tenant, bodies
        self.accepted: list[str] = []
        self.answers: list[tuple[float, int]] = []  # (monotonic time, HTTP status; 0: no answer)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> SyncCallers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            data = self.bodies[n % len(self.bodies)]
            n += len(self._threads)
            try:
                r = self.gw.call("POST", "/v1/detect", self.tenant, params={"timeout_ms": 20000}, data=data,
                                 headers={"Content-Type": "image/jpeg"}, timeout=60)
                status, rid = r.status_code, r.headers.get("X-Request-Id")
            except requests.RequestException:
                status, rid = 0, None
            with self._lock:
                self.answers.append((time.monotonic(), status))
                if rid and status in (200, 202, 422, 502):
                    self.accepted.append(rid)
            if status != 200:
                self._stop.wait(0.5)  # refused while Cassandra is away: call again soon, not in a tight loop

    def answered_since(self, t0: float) -> int:
        with self._lock:
            return sum(1 for at, status in self.answers if at >= t0 and status == 200)


def dead_letters(stack: StackSettings, prefix: str) -> list[Any]:
    """Every record on the prefix's dead-letter topics (read_committed). Empty partitions are skipped by their
    watermarks, so the common answer (none) costs one metadata round trip per partition."""
    topics = [s.name for s in all_topics(prefix) if s.name.endswith(".dlq")]
    consumer = Consumer({**kafka_admin(stack), "group.id": f"it-dlq-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        meta = consumer.list_topics(timeout=10).topics
        used = []
        for topic in topics:
            for p in meta[topic].partitions if topic in meta else ():
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    used.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        if not used:
            return []
        consumer.assign(used)
        found: list[Any] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found += [m for m in consumer.consume(500, 0.5) if m.error() is None]
        return found
    finally:
        consumer.close()


def wait_for_rows(session: Any, tenant: str, request_ids: list[str], timeout_s: float) -> dict[str, str]:
    """request id -> stored status, once every request has a terminal row (or the deadline passes)."""
    query = session.prepare("SELECT status FROM requests WHERE tenant = ? AND request_id = ?")
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for rid in [r for r in request_ids if r not in found]:
            row = session.execute(query, (tenant, rid)).one()
            if row is not None and row.status in TERMINAL:
                found[rid] = row.status
        if len(found) == len(request_ids) or time.monotonic() >= deadline:
            return found
        time.sleep(1.0)


@pytest.mark.restart
def test_cassandra_away_for_90s_loses_no_result_and_stalls_no_job(stack: StackSettings,
                                                                  sample_images: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    t0 = time.monotonic()
    prefix = f"out{uuid.uuid4().hex[:6]}."
    names = sorted(n for n in sample_images if n.endswith(".jpg"))
    per = -(-JOB_IMAGES // len(names))
    bodies = [b for i, n in enumerate(names) for b in variants(sample_images[n].read_bytes(), per, 11 * i)]
    bodies = bodies[:JOB_IMAGES]
    sync_bodies = [sample_images[n].read_bytes() for n in names[:4]]  # repeated: scan's cache hits too
    job_tenant, sync_tenant = f"oj{uuid.uuid4().hex[:8]}", f"os{uuid.uuid4().hex[:8]}"
    # Not the bridge: it reads the stack's one `minio.events` topic from its start, every other test's uploads
    # included, and this job's items come from the gateway anyway.
    roles = [r for r in SERVICES if r != "bridge"]
    running = start_stack_with_gateway(stack, prefix, tmp_path / "logs", extra_env=OUTAGE_ENV, roles=roles)
    gw = next(running)
    assert gw.pipeline is not None
    # Where a batch record waits while Cassandra is away: scan (its tombstone and cache reads) and postprocess
    # (its writes) park what they cannot finish on their retry topics. Which of the two holds records depends
    # on where the job's records are when Cassandra goes, so either proves that records wait.
    parked_on = [retry_topic(lane_topic(prefix, "batch", step)) for step in ("submitted", "inferred")]
    for topic in parked_on:
        read_all(stack, topic, until=0, timeout_s=0)  # its reader, before anything is produced
    client = JobsClient(None, gw.url, gw.token(job_tenant), timeout_s=60, retry_s=600)  # type: ignore[arg-type]
    try:
        async def submit() -> dict[str, Any]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gw.tls)) as session:
                client.session = session
                return await client.submit_job(await client.upload([(b, "image/jpeg") for b in bodies]))

        job = asyncio.run(submit())
        t_submitted = time.monotonic()
        with SyncCallers(gw, sync_tenant, sync_bodies) as callers:
            # Cassandra goes while the job is in full flow (a tenth of it done).
            deadline = time.monotonic() + 300
            while gw.call("GET", f"/v1/jobs/{job['job_id']}", job_tenant).json()["done"] < JOB_IMAGES // 10:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.5)
            down_at = time.monotonic()
            manager.down(stack, ["cassandra"])
            try:
                # Proof that records wait: a stage parks what it could not finish on its retry topic.
                parked_by = time.monotonic() + OUTAGE_S - 10
                while not any(read_all(stack, topic, until=1, timeout_s=0.5) for topic in parked_on):
                    assert time.monotonic() < parked_by, f"nothing parked on {parked_on} while Cassandra was away"
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # the outage's length, by design
            finally:
                manager.up(stack, ["cassandra"])
            up_at = time.monotonic()
            # The sync path answers again (3 results after Cassandra is back), then the callers stop.
            deadline = time.monotonic() + 180
            while callers.answered_since(up_at) < 3:
                assert time.monotonic() < deadline, "no sync call answered after Cassandra came back"
                time.sleep(0.5)

        async def wait() -> dict[str, Any]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gw.tls)) as session:
                client.session = session
                return await client.wait_job(job["job_id"], 600)

        status = asyncio.run(wait())
        t_completed = time.monotonic()
        assert status["status"] == "COMPLETED" and status["total"] == status["done"] == JOB_IMAGES, status
        assert status["counts"].get("OK") == JOB_IMAGES, status  # the outage failed no item: it delayed them

        session = admin_session(stack)
        try:
            session.set_keyspace(gw.pipeline.settings.stream.keyspace)
            rows = session.execute("SELECT request_id, status FROM job_results WHERE tenant = %s AND job_id = %s",
                                   (job_tenant, job["job_id"])).all()
            assert sorted(r.request_id for r in rows) == sorted(job["request_ids"])
            assert {r.status for r in rows} == {"OK"}
            job_row = session.execute("SELECT status, ok, rejected, failed FROM jobs WHERE tenant = %s AND job_id = %s",
                                      (job_tenant, job["job_id"])).one()
            assert (job_row.status, job_row.ok, job_row.rejected, job_row.failed) == ("COMPLETED", JOB_IMAGES, 0, 0)
            jobs_stored = wait_for_rows(session, job_tenant, job["request_ids"], 60)
            assert set(jobs_stored.values()) == {"OK"} and len(jobs_stored) == JOB_IMAGES
            sync_ids = sorted(set(callers.accepted))
            assert sync_ids, "no sync call was accepted"
            sync_stored = wait_for_rows(session, sync_tenant, sync_ids, 300)
            assert sorted(sync_stored) == sync_ids, f"{len(sync_ids) - len(sync_stored)} sync requests have no result"
            assert set(sync_stored.values()) == {"OK"}, sync_stored
        finally:
            session.cluster.shutdown()

        # On `detections`, each request's results (redelivery may repeat one) all say the same.
        serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
        wanted = set(job["request_ids"]) | set(sync_ids)
        seen: dict[str, set[str]] = {}
        deadline = time.monotonic() + 120
        while not wanted <= set(seen) and time.monotonic() < deadline:
            msgs = read_all(stack, detections_topic(prefix), until=len(wanted), timeout_s=5)
            seen = {}
            for m in msgs:
                value = serde.decode(m.value(), "DetectionResult")
                seen.setdefault(value["request_id"], set()).add(value["status"])
        assert wanted <= set(seen), f"{len(wanted - set(seen))} requests have no result on detections"
        assert all(seen[rid] == {"OK"} for rid in wanted), {rid: seen[rid] for rid in wanted if seen[rid] != {"OK"}}

        letters = dead_letters(stack, prefix)
        assert letters == [], sorted({(m.topic(), dict(m.headers() or []).get(H.ERROR_CLASS, b"").decode(),
                                       dict(m.headers() or []).get(H.ERROR_MESSAGE, b"").decode()[:200])
                                      for m in letters})
        print(f"\noutage test: job submitted in {t_submitted - t0:.0f}s, Cassandra down {up_at - down_at:.0f}s, "
              f"job completed {t_completed - up_at:.0f}s after it was back; {len(sync_ids)} sync requests; "
              f"total {time.monotonic() - t0:.0f}s")
    finally:
        manager.up(stack, ["cassandra"])
        running.close()
