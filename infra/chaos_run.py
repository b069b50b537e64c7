"""The chaos drill and the soak on the real local stack (the pure parts: infra/chaos_drill.py).

The drill starts its own pipeline and gateway (every role its own supervised process, as `detectflow run all`)
on a fresh topic prefix with its own tenants, so it never reads or writes anyone else's requests. It runs a
mixed load (sync calls from several tenants, one batch job, a tenant producing straight into its ingest
topic), injects the planned faults one at a time, waits for every request to reach a terminal result, then
reconciles. A watchdog enforces a hard deadline: past it every process the drill started is killed and every
paused service continued. On the way out the stack is brought back to what it was (each service that was
running is running and healthy) and the prefix's topics, ACLs and the ingest tenant are removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import socket
import ssl
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from confluent_kafka import (
    OFFSET_BEGINNING,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec

from config import GatewaySettings, Login, PipelineSettings, StackSettings
from gateway.devkeys import ensure_dev_keys, mint
from infra.bench_bodies import reencode_jpeg, with_comment
from infra.bench_sync import BenchError
from infra.bench_sync import wait_ready as bench_wait_ready
from infra.chaos_drill import (
    DOWN,
    KILL_ROLE,
    PAUSE,
    RESTART,
    ChaosError,
    FaultWindow,
    PlannedFault,
    ResultCopy,
    Sent,
    Summary,
    SyncCall,
    describe_losses,
    format_summary,
    longest_stall,
    non_loopback,
    parse_fault,
    percentile,
    plan_faults,
    reconcile,
    recovery_times,
    result_copy,
    result_times,
    rss_growth,
    rss_late_growth,
    split_latencies,
)
from infra.demo import bootstrap_default_model
from infra.jobs_cmd import ApiError, JobsClient, client_tls
from infra.procstats import rss_bytes
from infra.roles import LIFECYCLE_ROLES, ROLES, SERVICES
from infra.stack import manager
from infra.stack.kafka_access import deprovision, provision, provision_tenant, revoke_tenant
from infra.supervisor import Supervisor
from model_store.tools.convert import convert
from model_store.tools.samples import ensure_samples
from schemas import events
from stream import topics as T
from stream.ingest import principal
from stream.kafka import kafka_admin, kafka_connection, kafka_consumer, kafka_producer
from stream.records import now_ms
from stream.serde import AvroSerde
from stream.topics import ingest_topic, tenant_topics

SYNC_TIMEOUT_MS = 30_000  # the gateway's wait per call; past it a 202 and the result is read back later
REQUEST_DEADLINE_S = 120.0  # a sync request's whole budget, 503/429 retries included


def in_flight_cap(rate: float) -> int:
    """The most sync calls the load keeps open at once: 32, or 10 s of calls at ``rate``. A cap the gateway's own
    limits never reach would make an overload run (``--soak --load-factor 4``) a closed loop that waits on the
    pipeline instead of offering 4x its capacity: a 32 cap gave 24 calls/s and not one 503 at "4x" (68/s)."""
    return max(32, int(rate * 10))


@dataclass
class ChaosOptions:
    duration_s: float = 180.0
    seed: int = 0
    job_images: int = 60
    sync_tenants: int = 3
    sync_rate: float = 2.0  # sync calls per second, all tenants together
    ingest_rate: float = 1.0  # ImageSubmitted per second onto the ingest topic
    drain_s: float | None = None  # how long to wait for the last results (default: by form)
    setup_s: float = 300.0  # pipeline start, model warm-up, the job's uploads
    faults: bool = True
    chosen_faults: tuple[str, ...] = ()  # `--fault` specs (parse_fault): these instead of the planned schedule
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))

    @property
    def drain_deadline_s(self) -> float:
        if self.drain_s is not None:
            return self.drain_s
        # Long form: a request may retry through its retry topic for the runtime's retry budget (15 min).
        return 180.0 if self.duration_s <= 300 else 1200.0

    @property
    def hard_deadline_s(self) -> float:
        return self.setup_s + self.duration_s + self.drain_deadline_s + 180.0


def check_loopback(stack: StackSettings, pipeline: PipelineSettings) -> None:
    stream = pipeline.stream
    bad = non_loopback({"kafka": stream.bootstrap, "registry": stream.registry_url,
                        "cassandra": ",".join(stream.cassandra_hosts), "minio": pipeline.minio_endpoint,
                        "clamd": pipeline.clamd_host, "stack": stack.host})
    if bad:
        raise ChaosError("the chaos drill kills processes and stops services: it runs only against a loopback "
                         f"stack, and these are not: {', '.join(bad)}")


class _ResultReader:
    """Reads `detections` (read_committed) from the start in a thread; keeps each record's key and value."""

    def __init__(self, kafka: dict[str, Any], topic: str):
        self.consumer = kafka_consumer(kafka, f"chaos-read-{secrets.token_hex(6)}")
        parts = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.records: list[tuple[str, bytes]] = []
        self.keys: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-results", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in self.consumer.consume(500, 0.2):
                if m.error() is None and m.key() is not None:
                    key = m.key().decode()
                    self.records.append((key, m.value()))
                    self.keys.add(key)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()


def consumer_lag(kafka: dict[str, Any], prefix: str, timeout_s: float = 10.0) -> dict[str, int]:
    """Records each of the prefix's stage groups has yet to commit: per partition, the records a read_committed
    reader finds between the group's committed offset and the end. (End minus committed alone would count a
    transaction's commit marker, which takes an offset, as a record.)"""
    admin = kafka_admin(kafka)
    listed = admin.list_consumer_groups(request_timeout=timeout_s).result(timeout=timeout_s)
    groups = [g.group_id for g in listed.valid if g.group_id.startswith(f"{prefix}detectflow.")]
    lag: dict[str, int] = {}
    behind: list[tuple[str, TopicPartition, int]] = []  # (group, from its committed offset, end offset)
    for group in groups:
        lag[group.removeprefix(prefix)] = 0
        got = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s)
        parts = [tp for tp in got[group].result(timeout=timeout_s).topic_partitions if tp.offset >= 0]
        if not parts:
            continue
        ends = admin.list_offsets({TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in parts},
                                  request_timeout=timeout_s)
        committed = {(tp.topic, tp.partition): tp.offset for tp in parts}
        for tp, f in ends.items():
            pos, end = committed[(tp.topic, tp.partition)], f.result(timeout=timeout_s).offset
            if end > pos:
                behind.append((group, TopicPartition(tp.topic, tp.partition, pos), end))
    if not behind:
        return lag
    reader = kafka_consumer(kafka, f"chaos-lag-{secrets.token_hex(6)}", extra={"enable.partition.eof": True})
    try:
        for group, tp, end in behind:
            reader.assign([tp])
            deadline = time.monotonic() + timeout_s
            done = False
            while not done and time.monotonic() < deadline:
                for m in reader.consume(100, 0.5):
                    if m.error() is not None or m.offset() >= end - 1:
                        done = True  # the partition's end (or the last record before it)
                    if m.error() is None and m.offset() < end:
                        lag[group.removeprefix(prefix)] += 1
    finally:
        reader.close()
    return lag


def _keys_on(kafka: dict[str, Any], topics: list[str], timeout_s: float = 15.0) -> dict[str, list[str]]:
    """request id (record key) -> the topics (DLQs) holding a record of it."""
    found: dict[str, list[str]] = defaultdict(list)
    if not topics:
        return found
    consumer = kafka_consumer(kafka, f"chaos-dlq-{secrets.token_hex(6)}", extra={"enable.partition.eof": True})
    try:
        meta = consumer.list_topics(timeout=10).topics
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics if t in meta for p in meta[t].partitions]
        consumer.assign(parts)
        open_parts = {(tp.topic, tp.partition) for tp in parts}
        deadline = time.monotonic() + timeout_s
        while open_parts and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.2):
                if m.error() is not None:
                    open_parts.discard((m.topic(), m.partition()))  # end of partition
                elif m.key() is not None:
                    found[m.key().decode(errors="replace")].append(m.topic())
    finally:
        consumer.close()
    return found


class Drill:
    """One drill (or soak): its pipeline, gateway, tenants, load and faults; a context manager that cleans up."""

    def __init__(self, stack: StackSettings, opts: ChaosOptions):
        self.stack = stack
        self.opts = opts
        self.run_id = secrets.token_hex(3)
        self.prefix = f"chaos{self.run_id}."
        port = _free_port()
        self.env = {**os.environ, "DETECTFLOW_TOPIC_PREFIX": self.prefix, "DETECTFLOW_GATEWAY_PORT": str(port),
                    "DETECTFLOW_AUTH_DEV": "true", "DETECTFLOW_METRICS_PORT": "0",
                    "DETECTFLOW_SYNC_TIMEOUT_MAX_S": "60",
                    # A per-tenant rate limit far above the load: the overload gates (in-flight, lag) stay real.
                    "DETECTFLOW_RATE_PER_S": "1000", "DETECTFLOW_RATE_BURST": "1000"}
        settings = PipelineSettings.from_env(self.env)
        self.settings = settings.replace(stream=settings.stream.replace(topic_prefix=self.prefix))
        self.gw = GatewaySettings.from_env(self.env)
        check_loopback(stack, self.settings)
        self.admin = kafka_connection(self.settings.stream, "admin")
        self.log_dir = stack.log_dir / f"chaos-{self.run_id}"

        self.sup = Supervisor(SERVICES, self.log_dir, env=self.env)
        self.sync_tenants = [f"chaos-{self.run_id}-{i}" for i in range(opts.sync_tenants)]
        self.ingest_tenant = f"chaos{self.run_id}ingest"
        self.sent: list[Sent] = []
        self.calls: list[SyncCall] = []
        self.refused: dict[int, int] = defaultdict(int)
        self.health_ms: dict[str, list[float]] = defaultdict(list)  # /livez, /readyz -> answer times
        self.health_failed: dict[str, int] = defaultdict(int)  # probes that were not a 200 within 2 s
        self.sync_errors: dict[str, int] = defaultdict(int)
        self.windows: list[FaultWindow] = []
        self.jobs: list[dict[str, Any]] = []
        self.job_ids: list[str] = []
        self.paused: set[int] = set()
        self.abort = threading.Event()
        self.reader: _ResultReader | None = None
        self.running_before: list[str] = []
        self._tenant_made = False
        self._watchdog: threading.Timer | None = None
        self._counter = 0
        self.bases: list[bytes] = []

    # ---- set-up and clean-up ---------------------------------------------------------------------------
    def __enter__(self) -> Drill:
        rows = manager.status(self.stack)
        down = [h.name for h in rows if not h.healthy]
        if down:
            raise ChaosError(f"the stack is not healthy ({', '.join(down)}): `detectflow stack up` first")
        self.running_before = [h.name for h in rows]
        self._watchdog = threading.Timer(self.opts.hard_deadline_s, self._hard_stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        log = self.opts.log
        self.bases = [reencode_jpeg(p.read_bytes()) for p in ensure_samples(self.stack.samples_dir,
                                                                            self.stack.cache_dir)]
        stream = self.settings.stream
        provision(self.admin, self.prefix, T.all_topics(self.prefix, max_message_bytes=stream.max_message_bytes,
                                                        raw_retention_hours=stream.raw_retention_hours))
        convert(self.settings.models_dir / self.settings.default_model / "1")
        bootstrap_default_model(self.settings, self.stack, quiet=True)  # production routed on this prefix only
        self._make_ingest_tenant()
        self.reader = _ResultReader(self.admin, T.detections_topic(self.prefix))
        self.sup.start_monitor()
        log(f"chaos {self.run_id}: pipeline and gateway starting on prefix {self.prefix} "
            f"(logs: {self.log_dir})")

    def _make_ingest_tenant(self) -> None:
        stream = self.settings.stream
        if stream.kafka_users_dir is None:
            raise ChaosError("no Kafka credentials directory (DETECTFLOW_KAFKA_USERS_DIR)")
        name = principal(self.ingest_tenant)
        login = Login.load_or_create(stream.kafka_users_dir / f"{name}.json", name)
        provision_tenant(self.admin, self.prefix, self.ingest_tenant, login.password,
                         tenant_topics(self.prefix, self.ingest_tenant, max_message_bytes=stream.max_message_bytes,
                                       raw_retention_hours=stream.raw_retention_hours))
        self._tenant_made = True

    def _hard_stop(self) -> None:
        """Past the hard deadline: every process the drill started is killed, every paused service continued."""
        self.opts.log(f"chaos {self.run_id}: hard deadline ({self.opts.hard_deadline_s:.0f}s) reached: "
                      "stopping everything it started")
        self.abort.set()
        self._continue_paused()
        self.sup.stop(timeout_s=5)

    def _continue_paused(self) -> None:
        for pid in list(self.paused):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.paused.discard(pid)

    def __exit__(self, *exc: object) -> None:
        self.abort.set()
        self._continue_paused()
        self.sup.stop(timeout_s=20)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.reader is not None:
            self.reader.close()
        try:  # the stack as it was found: every service that was up is up and healthy
            manager.up(self.stack, self.running_before, log=lambda _m: None)
        finally:
            if self._tenant_made:
                revoke_tenant(self.admin, self.prefix, self.ingest_tenant, delete_topics=True)
                users = self.settings.stream.kafka_users_dir
                if users is not None:
                    (users / f"{principal(self.ingest_tenant)}.json").unlink(missing_ok=True)
            deprovision(self.admin, self.prefix)

    # ---- bodies ------------------------------------------------------------------------------------------
    def body(self, kind: str) -> bytes:
        self._counter += 1
        base = self.bases[self._counter % len(self.bases)]
        return with_comment(base, f"detectflow-chaos {self.run_id} {kind} {self._counter}".encode())

    # ---- the load ----------------------------------------------------------------------------------------
    def token(self, tenant: str) -> str:
        return mint(ensure_dev_keys(self.stack.secrets_dir), tenant=tenant, scopes=["detect:write", "results:read"],
                    issuer=self.gw.issuer, audience=self.gw.audience, tenant_claim=self.gw.tenant_claim,
                    ttl_s=min(86400, int(self.opts.hard_deadline_s) + 600))

    def tls(self) -> ssl.SSLContext:
        return client_tls(self.settings.stream.tls_ca_file)

    async def sync_call(self, session: Any, tenant: str, token: str, body: bytes) -> int | None:
        """One sync request, retried after Retry-After on 503/429 (and on 5xx without a request id or a lost
        connection) within REQUEST_DEADLINE_S. Returns the final HTTP status (None: never answered)."""
        start = time.time()
        deadline = start + REQUEST_DEADLINE_S
        url = f"{self.gw.base_url}/v1/detect?timeout_ms={SYNC_TIMEOUT_MS}"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
        while time.time() < deadline and not self.abort.is_set():
            wait = 1.0
            attempt = time.time()  # the request exists from the attempt that got an id (stalls count from there)
            try:
                async with session.post(url, data=body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=SYNC_TIMEOUT_MS / 1000 + 30)) as resp:
                    await resp.read()
                    rid = resp.headers.get("X-Request-Id")
                    if resp.status in (503, 429):
                        self.refused[resp.status] += 1
                        wait = float(resp.headers.get("Retry-After", "1") or 1)
                    elif rid is not None:
                        self.sent.append(Sent(rid, "sync", "ONLINE", attempt))
                        self.calls.append(SyncCall(start, time.time(), resp.status))
                        return resp.status
                    else:
                        self.sync_errors[f"HTTP {resp.status}"] += 1
                        if resp.status < 500:
                            return resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.sync_errors[type(exc).__name__] += 1
            await asyncio.sleep(max(0.1, min(wait, 10.0, deadline - time.time())))
        self.sync_errors["deadline"] += 1
        return None

    async def sync_load(self, session: Any, stop_at: float, rate: float) -> None:
        """Sync calls at ``rate`` per second (open loop), round-robin over the tenants, at most
        ``in_flight_cap(rate)`` in flight."""
        tokens = {t: self.token(t) for t in self.sync_tenants}
        gate = asyncio.Semaphore(in_flight_cap(rate))
        tasks: set[asyncio.Task[Any]] = set()
        n = 0
        next_at = time.time()
        while time.time() < stop_at and not self.abort.is_set():
            await gate.acquire()
            tenant = self.sync_tenants[n % len(self.sync_tenants)]
            task = asyncio.create_task(self.sync_call(session, tenant, tokens[tenant], self.body("sync")))
            task.add_done_callback(lambda _t: gate.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.time()))
        if tasks:
            await asyncio.gather(*tasks)

    async def ingest_load(self, stop_at: float, rate: float) -> None:
        """ImageSubmitted straight onto the ingest tenant's topic, as its own principal; a request counts as sent
        once Kafka acknowledged it."""
        stream = self.settings.stream.replace(kafka_user=principal(self.ingest_tenant))
        serde = AvroSerde.from_url(stream.registry_url, stream.tls_ca_file)
        topic = ingest_topic(self.prefix, self.ingest_tenant)
        producer = kafka_producer(kafka_connection(stream), linger_ms=5, max_record_bytes=stream.max_message_bytes)

        def delivered(sent: Sent) -> Callable[[Any, Any], None]:
            def on_delivery(err: Any, _msg: Any) -> None:
                if err is None:
                    self.sent.append(sent)
                else:
                    self.sync_errors[f"ingest not delivered: {err}"] += 1
            return on_delivery

        next_at = time.time()
        while time.time() < stop_at and not self.abort.is_set():
            rid = str(uuid.uuid4())
            data = self.body("ingest")
            event = events.image_submitted(
                request_id=rid, tenant=self.ingest_tenant, lane="BATCH",
                image=events.inline_image(data=data, sha256=hashlib.sha256(data).hexdigest(),
                                          content_type="image/jpeg"),
                model=events.model_selector(name=self.settings.default_model), params=events.detect_params(),
                submitted_at=now_ms())
            producer.produce(topic, key=rid.encode(), value=serde.encode(topic, "ImageSubmitted", event),
                             on_delivery=delivered(Sent(rid, "ingest", "BATCH", time.time())))
            producer.poll(0)
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.time()))
        left = await asyncio.to_thread(producer.flush, 120)
        if left:
            self.sync_errors["ingest still queued at the end"] += left

    async def submit_job(self, session: Any, n: int) -> None:
        tenant = self.sync_tenants[0]
        client = JobsClient(session, self.gw.base_url, self.token(tenant), timeout_s=120)
        ids = await client.upload([(self.body("job"), "image/jpeg") for _ in range(n)])
        job = await client.submit_job(ids)
        now = time.time()
        self.job_ids.append(job["job_id"])
        self.sent.extend(Sent(rid, "job", "BATCH", now) for rid in job["request_ids"])

    # ---- faults ------------------------------------------------------------------------------------------
    def inject(self, fault: PlannedFault) -> FaultWindow:
        quiet: Callable[[str], None] = lambda _m: None  # noqa: E731
        start = time.time()
        if fault.kind == KILL_ROLE:
            role = fault.target
            old = self.sup.pids().get(role)
            if old is None:
                return FaultWindow(f"kill-role {role}", start, time.time(), "not running: skipped")
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 90
            new = None
            while time.monotonic() < deadline and not self.abort.is_set():
                new = self.sup.pids().get(role)
                if new is not None and new != old:
                    break
                time.sleep(0.1)
            return FaultWindow(f"kill-role {role}", start, time.time(), f"pid {old} -> {new}")
        if fault.kind == RESTART:
            manager.down(self.stack, [fault.target], log=quiet)
            manager.up(self.stack, self.running_before, log=quiet)  # dependents too, should one have fallen
            return FaultWindow(f"restart {fault.target}", start, time.time())
        if fault.kind == DOWN:
            manager.down(self.stack, [fault.target], log=quiet)
            self.abort.wait(fault.hold_s)
            manager.up(self.stack, self.running_before, log=quiet)
            return FaultWindow(f"down {fault.target}", start, time.time(), f"stopped {fault.hold_s:.0f}s")
        if fault.kind == PAUSE:
            pid = next(h.pid for h in manager.status(self.stack, [fault.target]) if h.name == fault.target)
            if pid is None:
                raise ChaosError(f"{fault.target} has no process to pause")
            self.paused.add(pid)
            os.kill(pid, signal.SIGSTOP)
            self.abort.wait(fault.hold_s)
            os.kill(pid, signal.SIGCONT)
            self.paused.discard(pid)
            return FaultWindow(f"pause {fault.target}", start, time.time(), f"SIGSTOP {fault.hold_s:.0f}s")
        raise ValueError(fault.kind)

    async def fault_loop(self, plan: list[PlannedFault], t0: float) -> None:
        for fault in plan:
            await asyncio.sleep(max(0.0, t0 + fault.at_s - time.time()))
            if self.abort.is_set():
                return
            self.opts.log(f"chaos {self.run_id}: +{time.time() - t0:.0f}s fault: {fault.label}")
            window = await asyncio.to_thread(self.inject, fault)
            self.windows.append(window)
            self.opts.log(f"chaos {self.run_id}: +{time.time() - t0:.0f}s fault over: {window.label} "
                          f"({window.end - window.start:.1f}s{'; ' + window.detail if window.detail else ''})")

    # ---- phases ------------------------------------------------------------------------------------------
    async def warm_up(self, session: Any, deadline_s: float = 240.0) -> None:
        """The gateway ready and one sync call per tenant answered (the model loaded) before the clock starts."""
        try:
            await bench_wait_ready(session, self.gw.base_url, deadline_s)
        except BenchError as exc:
            raise ChaosError(f"the drill's gateway did not become ready: {exc} (logs: {self.log_dir})") from exc
        end = time.monotonic() + deadline_s
        for tenant in self.sync_tenants:
            while await self.sync_call(session, tenant, self.token(tenant), self.body("warm")) != 200:
                if time.monotonic() > end:
                    raise ChaosError(f"no sync call answered 200 while warming up (logs: {self.log_dir})")

    async def load(self, plan: list[PlannedFault], *, sync_rate: float) -> float:
        """The warm-up, then the mixed load for the duration with the faults; returns the load's start."""
        connector = aiohttp.TCPConnector(limit=max(64, in_flight_cap(sync_rate)), ssl=self.tls())
        async with aiohttp.ClientSession(connector=connector) as session:
            await self.warm_up(session)
            if self.opts.job_images:
                await self.submit_job(session, self.opts.job_images)
            t0 = time.time()
            stop_at = t0 + self.opts.duration_s
            self.opts.log(f"chaos {self.run_id}: load for {self.opts.duration_s:.0f}s: sync {sync_rate:.2f}/s over "
                          f"{len(self.sync_tenants)} tenants, ingest {self.opts.ingest_rate}/s, a job of "
                          f"{self.opts.job_images}; faults: {', '.join(f.label for f in plan) or 'none'}")
            await asyncio.gather(self.sync_load(session, stop_at, sync_rate),
                                 self.ingest_load(stop_at, self.opts.ingest_rate),
                                 self.fault_loop(plan, t0),
                                 self.health_probe(stop_at))
            return t0

    async def health_probe(self, stop_at: float, every_s: float = 0.5) -> None:
        """/livez and /readyz every ``every_s`` through the load, on their own connection (as an orchestrator's
        probe would be): their answer times, and how many were not a 200 within 2 s."""
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2, ssl=self.tls()),
                                         timeout=timeout) as session:
            while time.time() < stop_at and not self.abort.is_set():
                for path in ("/livez", "/readyz"):
                    began = time.perf_counter()
                    try:
                        async with session.get(self.gw.base_url + path) as resp:
                            await resp.read()
                            ok = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False
                    if ok:
                        self.health_ms[path].append((time.perf_counter() - began) * 1000)
                    else:
                        self.health_failed[path] += 1
                await asyncio.sleep(every_s)

    def drain(self) -> None:
        """Wait (to the drain deadline) until every request sent has a result on `detections`."""
        assert self.reader is not None
        deadline = time.monotonic() + self.opts.drain_deadline_s
        started = next_report = time.monotonic()
        while time.monotonic() < deadline and not self.abort.is_set():
            missing = {s.request_id for s in self.sent} - self.reader.keys
            if not missing:
                return
            if time.monotonic() >= next_report:  # a long drain says what it waits for, by kind and age
                waiting = [s for s in self.sent if s.request_id in missing]
                kinds = Counter(s.kind for s in waiting)
                oldest = min(waiting, key=lambda s: s.sent_at)
                self.opts.log(f"drain {time.monotonic() - started:5.0f}s: {len(missing)} requests without a result "
                              f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); the oldest sent "
                              f"{time.time() - oldest.sent_at:.0f}s ago ({oldest.kind} {oldest.request_id})")
                next_report += 30.0
            time.sleep(0.5)

    async def check_jobs(self, deadline_s: float) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls())) as session:
            client = JobsClient(session, self.gw.base_url, self.token(self.sync_tenants[0]), timeout_s=60)
            for job_id in self.job_ids:
                row: dict[str, Any] = {"job_id": job_id}
                try:
                    status = await client.wait_job(job_id, deadline_s)
                except (TimeoutError, ApiError) as exc:
                    status = {"status": f"not complete: {exc}"}
                row.update(status=status.get("status"), total=status.get("total"), done=status.get("done"),
                           counts=status.get("counts"))
                items = await client.results(job_id)
                row["paged"] = len({i["request_id"] for i in items}) if len(items) == len(
                    {i["request_id"] for i in items}) else f"{len(items)} with repeats"
                self.jobs.append(row)

    async def api_status(self, request_ids: list[str]) -> dict[str, str]:
        """GET /v1/requests/{id} of sync requests: their stored status (or the HTTP status)."""
        by_tenant: dict[str, str] = {}
        out: dict[str, str] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls())) as session:
            for rid in request_ids:
                for tenant in self.sync_tenants:
                    token = by_tenant.setdefault(tenant, self.token(tenant))
                    async with session.get(f"{self.gw.base_url}/v1/requests/{rid}",
                                           headers={"Authorization": f"Bearer {token}"}) as resp:
                        if resp.status == 200:
                            out[rid] = str((await resp.json()).get("status"))
                            break
                        out[rid] = f"HTTP {resp.status}"
        return out

    def results(self) -> list[ResultCopy]:
        assert self.reader is not None
        serde = AvroSerde.from_url(self.settings.stream.registry_url, self.settings.stream.tls_ca_file)
        wanted = {s.request_id for s in self.sent}
        return [result_copy(serde.decode(value, "DetectionResult")) for key, value in list(self.reader.records)
                if key in wanted]

    def summarize(self, t0: float, started: float) -> Summary:
        rec = reconcile(self.sent, self.results())
        end = time.time()
        # Every request's send and first result, relative to the load's start: where a tail comes from.
        (self.log_dir / "requests.csv").write_text("request_id,kind,lane,sent_s,result_s\n" + "".join(
            f"{s.request_id},{s.kind},{s.lane},{s.sent_at - t0:.1f},"
            f"{'' if s.request_id not in rec.first_completion else f'{rec.first_completion[s.request_id] - t0:.1f}'}\n"
            for s in self.sent))
        stall, stall_at = longest_stall(self.sent, rec.first_completion, end)
        outside, during = split_latencies(self.calls, self.windows)
        summary = Summary(rec, self.windows, recovery_times(self.windows, rec.first_completion.values()), stall,
                          outside, during, dict(self.refused), dict(self.sync_errors), self.jobs, end - started,
                          stall_from_s=stall_at - t0, health_ms={k: list(v) for k, v in self.health_ms.items()},
                          health_failed=dict(self.health_failed),
                          result_s=result_times(self.sent, rec.first_completion))
        if rec.lost or rec.duplicated:
            every = [*T.all_topics(self.prefix), *T.tenant_topics(self.prefix, self.ingest_tenant)]
            on_dlq = _keys_on(self.admin, [t.name for t in every if t.name.endswith(".dlq")])
            kinds = {s.request_id: s.kind for s in self.sent}
            sync_lost = [r for r in rec.lost if kinds[r] == "sync"][:50]
            api = asyncio.run(self.api_status(sync_lost)) if sync_lost else {}
            summary.lost_detail = describe_losses(rec, self.sent, self.windows, t0, on_dlq, api)
        return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_drill(stack: StackSettings, opts: ChaosOptions) -> Summary:
    """The drill; prints and returns its summary."""
    started = time.time()
    roles = [*ROLES, *LIFECYCLE_ROLES]
    chosen = [parse_fault(f, roles) for f in opts.chosen_faults]
    plan = plan_faults(opts.duration_s, opts.seed, roles=roles, chosen=chosen) if opts.faults else []
    opts.log(f"chaos: seed {opts.seed}; {len(plan)} faults planned in {opts.duration_s:.0f}s; hard deadline "
             f"{opts.hard_deadline_s:.0f}s")
    with Drill(stack, opts) as drill:
        t0 = asyncio.run(drill.load(plan, sync_rate=opts.sync_rate))
        drill.drain()
        asyncio.run(drill.check_jobs(deadline_s=60.0))
        lag: dict[str, int] | None
        try:
            lag = consumer_lag(drill.admin, drill.prefix)
        except KafkaException as exc:  # a figure for the report; the verdict does not rest on it
            opts.log(f"chaos: consumer lag not measured: {exc}")
            lag = None
        summary = drill.summarize(t0, started)
        summary.lag_end = lag
    opts.log(format_summary(summary))
    return summary


# ---------------------------------------------------------------------------------------------- soak


def measure_capacity(drill: Drill, seconds: float = 20.0, callers: int = 4) -> float:
    """Sync calls per second answered 200 by ``callers`` closed-loop callers for ``seconds``."""
    async def run() -> float:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16, ssl=drill.tls())) as session:
            await drill.warm_up(session)
            end = time.time() + seconds
            ok = 0
            token = drill.token(drill.sync_tenants[0])

            async def caller() -> None:
                nonlocal ok
                while time.time() < end:
                    if await drill.sync_call(session, drill.sync_tenants[0], token, drill.body("capacity")) == 200:
                        ok += 1
            t = time.time()
            await asyncio.gather(*(caller() for _ in range(callers)))
            return ok / (time.time() - t)
    return asyncio.run(run())


def run_soak(stack: StackSettings, *, duration_s: float, seed: int, rate: float | None,
             load_factor: float = 0.7, sample_every_s: float = 5.0, log: Callable[[str], None] = print) -> int:
    """No faults, a steady load at ~70% of capacity; RSS of every role and the gateway sampled throughout.
    Fails when a process grew 10% or more (first vs last 5 minutes), on any lost request or error, or when
    the consumer lag does not return to 0 at the end."""
    opts = ChaosOptions(duration_s=duration_s, seed=seed, job_images=0, faults=False, ingest_rate=0.5,
                        drain_s=300.0, log=log)
    samples: dict[str, list[tuple[float, int]]] = defaultdict(list)
    restarts: dict[str, set[int]] = defaultdict(set)
    with Drill(stack, opts) as drill:
        capacity = None
        if rate is None:
            capacity = measure_capacity(drill)
            rate = max(0.2, load_factor * capacity - opts.ingest_rate)
        log(f"soak {drill.run_id}: capacity {'not measured' if capacity is None else f'{capacity:.1f}/s'}; sync "
            f"{rate:.2f}/s + ingest {opts.ingest_rate}/s for {duration_s:.0f}s; RSS every {sample_every_s:.0f}s")
        stop = threading.Event()

        def sampler() -> None:
            while not stop.wait(sample_every_s):
                for role, pid in drill.sup.pids().items():
                    restarts[role].add(pid)
                    rss = rss_bytes(pid)
                    if rss is not None:
                        samples[role].append((time.time(), rss))
        thread = threading.Thread(target=sampler, name="soak-rss", daemon=True)
        thread.start()
        started = time.time()
        try:
            t0 = asyncio.run(drill.load([], sync_rate=rate))
        finally:
            stop.set()
            thread.join(timeout=10)
        drill.drain()
        lag_deadline = time.monotonic() + 120
        lag = consumer_lag(drill.admin, drill.prefix)
        while any(lag.values()) and time.monotonic() < lag_deadline:
            time.sleep(2)  # poll interval; the condition is the lag itself
            lag = consumer_lag(drill.admin, drill.prefix)
        summary = drill.summarize(t0, started)
        summary.lag_end = lag
    growth = {role: rss_growth(s) for role, s in samples.items()}
    series = drill.log_dir / "soak-rss.csv"  # every sample, to see the shape of a growth (warm-up or leak)
    series.write_text("role,time,rss_bytes\n" + "".join(
        f"{role},{t:.1f},{b}\n" for role in sorted(samples) for t, b in samples[role]))
    log(format_summary(summary))
    grown = []
    for role in sorted(samples):
        g, late = growth[role], rss_late_growth(samples[role])
        mean_mib = sum(b for _t, b in samples[role]) / len(samples[role]) / 2**20
        log(f"RSS {role:<12} mean {mean_mib:7.1f}MiB growth {'-' if g is None else f'{g * 100:+.1f}%'} "
            f"(second half {'-' if late is None else f'{late * 100:+.1f}%'}; "
            f"{len(samples[role])} samples{', restarted' if len(restarts[role]) > 1 else ''})")
        if g is not None and g >= 0.10:
            grown.append(role)
    errors = sum(summary.sync_errors.values()) + sum(1 for c in drill.calls if c.status != 200)
    crashed = [r for r, pids in restarts.items() if len(pids) > 1]
    p99 = percentile(summary.latency_outside_ms, 0.99)
    log(f"soak: errors {errors}; restarted processes: {', '.join(crashed) or 'none'}; grown >= 10%: "
        f"{', '.join(grown) or 'none'}; consumer lag at the end {sum(lag.values())}; sync P99 "
        f"{'-' if p99 is None else f'{p99:.0f}ms'}")
    ok = summary.passed and not grown and not crashed and not any(lag.values()) and errors == 0
    log(f"soak verdict: {'PASS' if ok else 'FAIL'} (RSS samples: {series})")
    return 0 if ok else 1
