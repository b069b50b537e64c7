"""Deletion, retention and content policy on the real stack and pipeline (docs/security.md)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_kit import Gateway, start_stack_with_gateway
from object_kit import root_minio
from stream_kit import kafka_admin, read_all

from config import REVIEW_RETENTION_DAYS, PipelineSettings, StackSettings
from gateway.store import ERASABLE_TABLES
from infra.jobs_cmd import JobsClient
from infra.stack.minio import RETENTION_TAG
from processors.governance import ERASED
from stream import topics as T
from stream.serde import AvroSerde

ADMIN = ["admin"]


@pytest.fixture(scope="module")
def gw(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    prefix = f"gov{uuid.uuid4().hex[:6]}."
    yield from start_stack_with_gateway(stack, prefix, tmp_path_factory.mktemp("governance-logs"))


@pytest.fixture(scope="module")
def cql() -> Iterator[Any]:
    from stream.cassandra import connect

    session = connect(PipelineSettings.from_env().stream, "gateway")
    yield session
    session.cluster.shutdown()


def tenant() -> str:
    return f"g{uuid.uuid4().hex[:10]}"


def rows_of(cql: Any, tenant: str) -> dict[str, int]:
    out = {}
    for table, keys in ERASABLE_TABLES.items():
        cols = ", ".join(keys or ("tenant",))
        rows = list(cql.execute(f"SELECT {cols} FROM {table} WHERE tenant = %s ALLOW FILTERING", (tenant,)))  # noqa: S608
        out[table] = len([r for r in rows if not (table == "image_tombstones" and r.image_sha256 == ERASED)])
    return out


def objects_of(stack: StackSettings, tenant: str) -> list[str]:
    minio = root_minio(stack)
    return [f"{b}/{o.object_name}" for b in ("uploads", "quarantine", "review", "derived")
            for o in minio.list_objects(b, prefix=f"{tenant}/", recursive=True)]


def run_job(gw: Gateway, t: str, bodies: list[bytes], on_running: Any = None) -> tuple[dict[str, Any], Any]:
    client = JobsClient(None, gw.url, gw.token(t), timeout_s=120)  # type: ignore[arg-type]

    async def run() -> tuple[dict[str, Any], Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gw.tls)) as session:
            client.session = session
            ids = await client.upload([(b, "image/jpeg") for b in bodies])
            job = await client.submit_job(ids, params={"score_threshold": 0.3})
            if on_running is not None:
                await on_running(client, job)
            return job, await client.wait_job(job["job_id"], 900)

    return asyncio.run(run())


def test_buckets_have_lifecycle_rules(stack: StackSettings) -> None:
    minio = root_minio(stack)
    rules = {b: {r.rule_id: (r.expiration.days, r.rule_filter.tag.key if r.rule_filter.tag else None)
                 for r in minio.get_bucket_lifecycle(b).rules} for b in ("uploads", "quarantine", "review")}
    assert rules["uploads"] == {"detectflow-uploads-retention": (stack.uploads_retention_days, None),
                                "detectflow-unclaimed-uploads": (stack.unclaimed_upload_days, "detectflow-upload")}
    assert rules["quarantine"] == {"detectflow-quarantine-retention": (stack.quarantine_retention_days, None)}
    assert {d for d, tag in rules["review"].values() if tag == RETENTION_TAG} == set(REVIEW_RETENTION_DAYS)


def test_topics_apply_shortens_the_raw_topics_retention(stack: StackSettings) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    prefix = f"ret{uuid.uuid4().hex[:6]}."
    raw = [T.lane_topic(prefix, "batch", "preprocessed")]
    raw += [T.retry_topic(raw[0]), T.dlq_topic(raw[0])]
    kafka = kafka_admin(stack)
    try:
        T.apply(kafka, T.all_topics(prefix))  # the old topics, then `topics apply` with a shorter retention
        T.apply(kafka, T.all_topics(prefix, raw_retention_hours=3))
        admin = AdminClient(kafka)
        for name in raw:
            res = ConfigResource(ConfigResource.Type.TOPIC, name)
            config = admin.describe_configs([res])[res].result(timeout=30)
            assert config["retention.ms"].value == str(3 * 3600 * 1000), name
    finally:
        T.delete(kafka, [s.name for s in T.all_topics(prefix)])


def test_deleting_an_image_while_its_200_item_job_runs(gw: Gateway, stack: StackSettings, cql: Any,
                                                       sample_jpeg: bytes) -> None:
    t = tenant()
    sha = hashlib.sha256(sample_jpeg).hexdigest()
    assert gw.detect(t, sample_jpeg).json()["status"] == "OK"  # the content object, a cache row, a result
    deleted: dict[str, Any] = {}

    async def delete_midway(client: JobsClient, job: dict[str, Any]) -> None:
        deadline = time.monotonic() + 300
        while (await client.call("GET", f"/v1/jobs/{job['job_id']}"))["done"] < 5:
            assert time.monotonic() < deadline, "the job made no progress"
            await asyncio.sleep(0.05)
        # The job's items are cache hits and the pipeline is quick: scan is held (SIGSTOP) while the deletion
        # runs, so items are in flight when it answers (past scan, and not yet scanned), whatever the speed.
        assert gw.pipeline is not None
        scan = gw.pipeline.pid("scan")
        os.kill(scan, signal.SIGSTOP)
        try:
            r = await asyncio.to_thread(gw.call, "DELETE", f"/v1/images/{sha}", t)
            assert r.status_code == 200, r.text
            deleted.update(r.json(), answered_ms=int(time.time() * 1000))
            status = await client.call("GET", f"/v1/jobs/{job['job_id']}")
            deleted["pending_at_delete"] = status["pending"]
        finally:
            os.kill(scan, signal.SIGCONT)

    job, status = run_job(gw, t, [sample_jpeg] * 200, delete_midway)
    assert deleted["pending_at_delete"] > 0, "the job had ended before the deletion: nothing was in flight"
    assert status["status"] == "COMPLETED" and status["done"] == 200  # every item ended: no count stalls
    assert status["counts"]["OK"] == 0 and status["counts"]["REJECTED"] == 200, status
    items, token = [], None
    while True:
        page = gw.call("GET", f"/v1/jobs/{job['job_id']}/results?page_size=100"
                       + (f"&page_token={token}" if token else ""), t).json()
        items += page["items"]
        token = page["next_page_token"]
        if not token:
            break
    assert len(items) == 200
    assert all(i["detections"] == [] and i["image"]["id"] is None and i["status"] == "REJECTED" for i in items)
    assert {i["error"]["code"] for i in items} <= {"IMAGE_DELETED", "OBJECT_NOT_FOUND"}
    for rid in job["request_ids"]:
        r = gw.call("GET", f"/v1/requests/{rid}", t)
        assert r.status_code == 404 or (r.json()["status"] == "REJECTED" and r.json()["detections"] == []), r.text
    assert list(cql.execute("SELECT result FROM image_cache WHERE tenant = %s AND image_sha256 = %s", (t, sha))) == []
    assert objects_of(stack, t) == []
    # Nothing produced on `detections` after the deletion answered carries this image's results.
    serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
    records = read_all(stack, f"{gw.pipeline.prefix}detections", until=10**9, timeout_s=5)
    late = [serde.decode(m.value(), "DetectionResult") for m in records if m.timestamp()[1] > deleted["answered_ms"]]
    late = [r for r in late if r["tenant"] == t]
    assert late, "no result of the job was produced after the deletion"
    assert [r for r in late if r["image_sha256"] == sha or r["detections"]] == []


def test_erasing_a_tenant_leaves_no_row_and_no_object(gw: Gateway, stack: StackSettings, cql: Any,
                                                       sample_images: dict[str, Path]) -> None:
    t = tenant()
    bus = sample_images["bus.jpg"].read_bytes()
    assert gw.call("PUT", f"/v1/tenants/{t}/policy", headers=gw.auth(t, ADMIN),
                   json={"review_classes": ["bus"]}).status_code == 200
    assert gw.detect(t, bus, headers={"Idempotency-Key": "k1"}).json()["review"] is True  # a review copy too
    _job, status = run_job(gw, t, [sample_images["zidane.jpg"].read_bytes()])
    assert status["status"] == "COMPLETED"
    before = rows_of(cql, t)
    assert before["requests"] == 2 and before["jobs"] == 1 and before["tenant_policies"] == 1, before
    assert objects_of(stack, t)
    other = tenant()
    assert gw.call("DELETE", f"/v1/tenants/{t}/data", headers=gw.auth(other, ADMIN)).status_code == 404
    assert gw.call("DELETE", f"/v1/tenants/{t}/data", t).status_code == 403  # not admin
    r = gw.call("DELETE", f"/v1/tenants/{t}/data", headers=gw.auth(t, ADMIN))
    assert r.status_code == 200, r.text
    body = r.json()
    # Two keys: the sync call's "k1" and the one the jobs client sends with every job submission.
    assert body["rows_deleted"]["requests"] == 2 and body["rows_deleted"]["idempotency_keys"] == 2, body
    assert body["objects_deleted"]["uploads"] == 2 and body["objects_deleted"]["review"] == 1, body
    assert rows_of(cql, t) == {table: 0 for table in ERASABLE_TABLES}
    assert objects_of(stack, t) == []
    deadline = time.monotonic() + 30  # audit events are written off the request path (gateway/audit.py)
    erase: list[dict[str, Any]] = []
    while not erase and time.monotonic() < deadline:
        events = gw.call("GET", "/v1/audit", headers=gw.auth(t, ADMIN)).json()["events"]
        erase = [e for e in events if e["action"] == "tenants.erase" and e["outcome"] == "success"]
        time.sleep(0.2)
    assert erase and erase[0]["detail"].startswith("erased rows=")


def test_a_tenant_that_may_not_see_person_gets_the_bus_only(gw: Gateway, stack: StackSettings,
                                                            sample_images: dict[str, Path]) -> None:
    t = tenant()
    bus = sample_images["bus.jpg"].read_bytes()
    sha = hashlib.sha256(bus).hexdigest()
    policy = {"hidden_classes": ["person"], "review_classes": ["person"], "review_retention_days": 7}
    assert gw.call("PUT", f"/v1/tenants/{t}/policy", t, json=policy).status_code == 403
    assert gw.call("PUT", f"/v1/tenants/{t}/policy", headers=gw.auth(t, ADMIN),
                   json={"hidden_classes": ["unicorn"]}).status_code == 400
    r = gw.call("PUT", f"/v1/tenants/{t}/policy", headers=gw.auth(t, ADMIN), json=policy)
    assert r.status_code == 200 and r.json()["revision"] == 1, r.text
    got = gw.call("GET", f"/v1/tenants/{t}/policy", headers=gw.auth(t, ADMIN)).json()
    assert got["hidden_classes"] == ["person"] and got["review_retention_days"] == 7
    unfiltered = gw.detect(tenant(), bus).json()  # another tenant sees the people
    assert "person" in {d["class_name"] for d in unfiltered["detections"]}
    first = gw.detect(t, bus).json()
    again = gw.detect(t, bus).json()
    assert again["cache_hit"] is True and first["cache_hit"] is False
    for body in (first, again):
        assert {d["class_name"] for d in body["detections"]} == {"bus"} and body["review"] is True, body
    for rid in (first["request_id"], again["request_id"]):
        stored = gw.call("GET", f"/v1/requests/{rid}", t).json()
        assert {d["class_name"] for d in stored["detections"]} == {"bus"}
    copy = root_minio(stack).get_object_tags("review", f"{t}/{sha}")
    assert copy is not None and copy[RETENTION_TAG] == "7"
    serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
    deadline = time.monotonic() + 60
    mine: list[dict[str, Any]] = []
    while len(mine) < 2 and time.monotonic() < deadline:
        msgs = read_all(stack, f"{gw.pipeline.prefix}abuse", until=10**9, timeout_s=1)
        mine = [e for e in (serde.decode(m.value(), "AbuseEvent") for m in msgs) if e["tenant"] == t]
    assert sorted(e["request_id"] for e in mine) == sorted([first["request_id"], again["request_id"]])
    assert all(e["classes"] == ["person"] and e["review_object"] == f"review/{t}/{sha}" for e in mine)
