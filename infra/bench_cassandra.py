"""`detectflow bench cassandra`: what Cassandra costs per image, path by path, on the running stack.

Each path runs the real store code of its role, logged in as that role, against the stack's keyspace, for
fresh images of one throwaway tenant (the result cache never answers, as in `bench sync`):

- gateway: what `POST /v1/detect` does in Cassandra (gateway/handlers.py `detect`: the daily quota, the
  request row, the audit event — audit through gateway/audit.py with a bus that drops the Kafka copy);
- scan: the cache lookup per image, then the batch's image index and tombstone check (processors/scan.py);
- postprocess: `PostprocessStage._store` (policy, cache row, results, tombstone check);
- recorder: `RecorderStage.process` over the batch's OK results (stored by postprocess already);
- "a quota LWT per call": the gateway path with quota leases of one image (a compare-and-set of the tenant's
  row per call, as before the leases), for a same-run comparison;
- "as before issue 14": the gateway's and postprocess's statements as they were (quota read per charge,
  one audit INSERT per call; postprocess's own image_requests rows, its cache rows in a round trip of
  their own), for a same-run comparison;
- job items: postprocess then the recorder over each batch of one job's items (the job tracker counts the
  job after each batch), images-per-pass items.

Statements are counted on the client (a request-init listener on each role's session: table, kind); the
Cassandra process's CPU (utime + stime) is read around each pass, less its idle rate measured just before,
and the node's own per-table coordinator counts (system_views, as the admin role) are printed beside the
client's count as a check (they include whatever else uses the stack meanwhile).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from config import GatewaySettings, PipelineSettings, StackSettings
from gateway.audit import AuditLog
from gateway.limits import DailyQuota
from gateway.store import GatewayStore
from infra.bench import service_pids
from infra.procstats import cpu_seconds
from infra.stack.cassandra_access import admin_credentials
from processors.governance import Governance, store_unless_deleted
from processors.jobs import CassandraJobs, JobTracker
from processors.params import CacheKey
from processors.postprocess import PostprocessStage
from processors.recorder import RecorderStage
from processors.results import ResultStore
from schemas import events
from stream.cassandra import connect, open_session, utc_day
from stream.records import Record, now_ms

_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+([A-Za-z_][A-Za-z0-9_.]*)", re.IGNORECASE)


def statement_kind(query: str) -> tuple[str, str]:
    """(table, kind) of one CQL statement: kind is read, write, LWT or counter."""
    match = _TABLE.search(query)
    table = match.group(1).split(".")[-1] if match else "?"
    verb = query.split(None, 1)[0].upper()
    if verb == "SELECT":
        return table, "read"
    if re.search(r"\bIF\b", query, re.IGNORECASE):
        return table, "LWT"
    if re.search(r"\bSET\s+(\w+)\s*=\s*\1\s*[+-]", query, re.IGNORECASE):
        return table, "counter"
    return table, "write"


class StatementCounter:
    """Counts what a session sends, by (table, kind); an UNLOGGED BATCH counts once (kind "batch")."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, future: Any) -> None:
        stmt = future.query
        inner = getattr(stmt, "_statements_and_parameters", None)
        if inner is not None:  # (prepared?, query id or text, values)
            known = future.session.cluster._prepared_statements
            queries = [known[q].query_string if prepared and q in known else str(q) for prepared, q, _ in inner]
            tables = sorted({statement_kind(q)[0] for q in queries})
            self.counts[("+".join(tables), "batch")] += 1
            return
        prepared = getattr(stmt, "prepared_statement", None)
        query = prepared.query_string if prepared is not None else getattr(stmt, "query_string", str(stmt))
        self.counts[statement_kind(query)] += 1

    def take(self) -> Counter[tuple[str, str]]:
        out, self.counts = self.counts, Counter()
        return out


class _NoBus:
    """The audit log's Kafka side, dropped: this bench measures Cassandra."""

    async def produce(self, *_: Any, **__: Any) -> None:
        return None


def _server_counts(admin: Any, keyspace: str) -> Counter[tuple[str, str]]:
    from stream.cassandra import fetch_all  # the Cassandra driver: only when the bench runs

    counts: Counter[tuple[str, str]] = Counter()
    if admin is None:
        return counts
    for view, kind in (("coordinator_read_latency", "read"), ("coordinator_write_latency", "write")):
        for row in fetch_all(admin, f"SELECT keyspace_name, table_name, count FROM system_views.{view}",  # noqa: S608
                             timeout_s=10.0):
            if row.keyspace_name == keyspace and row.count:
                counts[(row.table_name, kind)] += row.count
    return counts


def run_bench_cassandra(stack: StackSettings, *, images: int = 112, batch: int = 8, passes: int = 5) -> int:
    settings = PipelineSettings.from_env()
    gws = GatewaySettings.from_env()
    pid = service_pids(stack).get("cassandra")
    if pid is None:
        print("cassandra is not running (detectflow stack up)")
        return 1
    counters: dict[str, StatementCounter] = {}
    sessions: dict[str, Any] = {}
    for role in ("gateway", "scan", "postprocess", "recorder"):
        sessions[role] = connect(settings.stream, role)
        counters[role] = StatementCounter()
        sessions[role].add_request_init_listener(counters[role])
    try:
        admin = open_session([stack.host], stack.cassandra_port, admin_credentials(stack), stack.tls_ca_file)
    except Exception as exc:
        print(f"(no server-side counts: {type(exc).__name__})")
        admin = None

    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(_make(lambda: GatewayStore(
        sessions["gateway"], result_ttl_s=settings.result_ttl_s, idempotency_ttl_s=gws.idempotency_ttl_s,
        audit_ttl_s=gws.audit_ttl_s)))
    quota = DailyQuota(gws.daily_quota, store.quota_used, store.quota_compare_and_set,
                       lease_max=gws.quota_lease_max, lease_idle_s=gws.quota_lease_idle_s)
    # As before the leases: one compare-and-set of the quota row per call (a lease of exactly one image).
    quota_per_call = DailyQuota(gws.daily_quota, store.quota_used, store.quota_compare_and_set, lease_max=1)
    audit = loop.run_until_complete(_make(lambda: AuditLog(_NoBus(), store, "bench.audit")))  # type: ignore[arg-type]
    scan_results = ResultStore(sessions["scan"], result_ttl_s=settings.result_ttl_s, cache_ttl_s=settings.cache_ttl_s)
    scan_gov = Governance(sessions["scan"], policy_cache_s=settings.policy_cache_s)
    post_results = ResultStore(sessions["postprocess"], result_ttl_s=settings.result_ttl_s,
                               cache_ttl_s=settings.cache_ttl_s)
    post = PostprocessStage(None, post_results, settings,  # type: ignore[arg-type]
                            Governance(sessions["postprocess"], policy_cache_s=settings.policy_cache_s))
    rec_results = ResultStore(sessions["recorder"], result_ttl_s=settings.result_ttl_s,
                              cache_ttl_s=settings.cache_ttl_s)
    recorder = RecorderStage(rec_results, "", JobTracker(CassandraJobs(sessions["recorder"])),
                             Governance(sessions["recorder"], policy_cache_s=settings.policy_cache_s))
    run = uuid.uuid4().hex[:8]
    tenant = f"bench-cql-{run}"

    def images_of(n: int, tag: str, job_id: str | None = None) -> list[dict[str, Any]]:
        at = now_ms()
        return [events.detection_result(request_id=f"{run}-{tag}-{i}", tenant=tenant, status="OK", image_width=640,
                                        image_height=480, image_sha256=uuid.uuid4().hex * 2, model_name="yolov4-tiny",
                                        model_version=1, job_id=job_id, lane="ONLINE", submitted_at=at,
                                        completed_at=at) for i in range(n)]

    def key_of(r: dict[str, Any]) -> CacheKey:
        return CacheKey(tenant, r["image_sha256"], "yolov4-tiny", 1, "bench")

    def record(r: dict[str, Any]) -> Record:
        return Record("detections", 0, 0, r["request_id"], r, {}, "online")

    def gateway(rs: list[dict[str, Any]], q: DailyQuota = quota) -> None:
        async def one(r: dict[str, Any]) -> None:
            await q.charge(tenant, 1, lease=True)
            await store.put_request(tenant, r["request_id"], lane="ONLINE", image_sha256=r["image_sha256"],
                                    source=f"uploads/{tenant}/{r['image_sha256']}", model_name="yolov4-tiny",
                                    submitted_at=r["submitted_at"])
            audit.record(tenant=tenant, subject="bench", action="detect", status=200, request_id=r["request_id"])

        async def all_of() -> None:
            for r in rs:  # one caller at a time, as `bench sync` at concurrency 1
                await one(r)
            await audit.drain()

        loop.run_until_complete(all_of())

    quota_every_time = DailyQuota(gws.daily_quota, store.quota_used, store.quota_compare_and_set, read_cache_s=0.0)

    def gateway_before(rs: list[dict[str, Any]]) -> None:
        """As before issue 14: the quota read on every charge, one audit INSERT per call."""
        async def all_of() -> None:
            for r in rs:
                await quota_every_time.charge(tenant, 1)
                await store.put_request(tenant, r["request_id"], lane="ONLINE", image_sha256=r["image_sha256"],
                                        source=f"uploads/{tenant}/{r['image_sha256']}", model_name="yolov4-tiny",
                                        submitted_at=r["submitted_at"])
                event = events.audit_event(event_id=str(uuid.uuid4()), tenant=tenant, subject="bench",
                                           action="detect", outcome="success", status=200,
                                           request_id=r["request_id"], event_time=now_ms())
                await store.audit(event, utc_day())

        loop.run_until_complete(all_of())

    def postprocess_before(rs: list[dict[str, Any]]) -> None:
        """As before issue 14: the cache rows first, then the results with their own image_requests rows."""
        assert post.governance is not None
        for i in range(0, len(rs), batch):
            chunk = rs[i:i + batch]
            post.governance.policies({tenant})
            post_results.cache_put([(key_of(r), r) for r in chunk])
            store_unless_deleted(post_results, post.governance, chunk)

    def scan(rs: list[dict[str, Any]]) -> None:
        for i in range(0, len(rs), batch):
            chunk = rs[i:i + batch]
            for r in chunk:
                scan_results.cache_get(key_of(r))
            scan_results.index_images([(tenant, r["image_sha256"], r["request_id"], r["submitted_at"]) for r in chunk])
            scan_gov.tombstones([(tenant, r["image_sha256"]) for r in chunk])

    def postprocess(rs: list[dict[str, Any]]) -> None:
        for i in range(0, len(rs), batch):
            chunk = rs[i:i + batch]
            post._store([record(r) for r in chunk], [(j, dict(r), key_of(r)) for j, r in enumerate(chunk)])

    def recorder_ok(rs: list[dict[str, Any]]) -> None:
        for i in range(0, len(rs), batch):
            recorder.process([record(r) for r in rs[i:i + batch]])

    def job_items(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """As many items as one job (its row written outside the measurement), with this run's job id."""
        job_id = str(uuid.uuid4())
        loop.run_until_complete(store.put_job(tenant, job_id, total=len(rs), model_name="yolov4-tiny",
                                              params={}, created_at=now_ms(), subject="bench"))
        return images_of(len(rs), f"job{job_id[:8]}", job_id)

    def job(rs: list[dict[str, Any]]) -> None:
        """Each batch stored by postprocess, then seen by the recorder (its job tracker counts the job)."""
        for i in range(0, len(rs), batch):
            chunk = rs[i:i + batch]
            postprocess(chunk)
            recorder_ok(chunk)

    same: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = lambda rs: rs  # noqa: E731
    paths: list[tuple[str, str, Callable[[list[dict[str, Any]]], None], Callable[..., list[dict[str, Any]]]]] = [
        ("gateway (detect)", "gateway", gateway, same),
        ("gateway, a quota LWT per call (lease of 1)", "gateway-lwt", lambda rs: gateway(rs, quota_per_call), same),
        ("gateway, as before issue 14", "gateway-before", gateway_before, same), ("scan", "scan", scan, same),
        ("postprocess", "postprocess", postprocess, same),
        ("postprocess, as before issue 14", "postprocess-before", postprocess_before, same),
        ("recorder (OK results)", "recorder", recorder_ok, same),
        ("job items (postprocess + recorder)", "*", job, job_items)]
    print(f"Cassandra per image: {images} images per pass, batches of {batch}, {passes} passes, tenant {tenant}")
    gateway(images_of(4, "warm"))  # prepared statements and connections warm, the policy cache filled
    postprocess(images_of(batch, "warm"))
    for c in counters.values():
        c.take()
    auth0 = sum(v for (t, k), v in _server_counts(admin, "system_auth").items() if k == "read")
    started = time.monotonic()
    total_stmts = 0.0
    total_ms = 0.0
    for label, role, fn, setup in paths:
        cpu: list[float] = []
        counted: Counter[tuple[str, str]] = Counter()
        seen: Counter[tuple[str, str]] = Counter()
        for p in range(passes):
            rs = setup(images_of(images, f"{role}{p}"))
            for c in counters.values():
                c.take()
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(1.0)
            idle = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
            before = _server_counts(admin, settings.stream.keyspace)
            c1, t1 = cpu_seconds(pid), time.monotonic()
            fn(rs)
            c2, t2 = cpu_seconds(pid), time.monotonic()
            seen += _server_counts(admin, settings.stream.keyspace) - before
            counted += sum((c.take() for r, c in counters.items() if role.split("-")[0] in (r, "*")), Counter())
            cpu.append(max(0.0, (c2 - c1) - idle * (t2 - t1)) * 1000 / images)
        n = sum(counted.values()) / passes / images
        ms = statistics.median(cpu)
        if role in counters:
            total_stmts += n
            total_ms += ms
        print(f"\n{label}: {n:.2f} statements per image, Cassandra {ms:.2f} CPU-ms per image "
              f"(passes: {', '.join(f'{c:.2f}' for c in cpu)})")
        for (table, kind), k in sorted(counted.items()):
            print(f"  {table:28s} {kind:12s} {k / passes / images:6.3f} per image")
        if admin is not None:
            print("  node's coordinator counts (all clients): " + ", ".join(
                f"{t} {k} {v / passes / images:.2f}" for (t, k), v in sorted(seen.items()) if v > 0))
    print(f"\nsync path (gateway + scan + postprocess + recorder): {total_stmts:.2f} statements, "
          f"{total_ms:.2f} Cassandra CPU-ms per image")
    if admin is not None:
        auth = sum(v for (t, k), v in _server_counts(admin, "system_auth").items() if k == "read")
        print(f"system_auth reads (permission, role and login cache loads) during the bench: "
              f"{(auth - auth0) / (time.monotonic() - started):.2f} per second")
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    for s in sessions.values():
        s.cluster.shutdown()
    if admin is not None:
        admin.cluster.shutdown()
    return 0


async def _make(factory: Callable[[], Any]) -> Any:
    """Build an object that needs a running event loop (the gateway's store and audit log)."""
    return factory()
