"""`detectflow bench sync`: POST /v1/detect through the real gateway and pipeline at fixed concurrency levels.

1. Start every pipeline role and a gateway (supervised processes, as `detectflow run all`) on a fresh
   topic prefix, the gateway on a free port with its rate limit out of the way; wait for /readyz. Start
   the plain server too (infra/bench_plain.py: one aiohttp process, the model at batch 1), its own process.
2. Warm up until a few calls in a row answer 200, then, while the pipeline idles: the baseline (one process
   looping decode -> letterbox -> ONNX Runtime (batch 1) -> decode -> NMS, infra/bench.py), the CPU-ms of the
   decode and of the model's forward pass (infra/bench_cost.py), and the plain server at every level.
3. For each concurrency level, exactly that many callers drive POST /v1/detect (raw JPEG body) for a fixed
   number of requests: P50/P95/P99, throughput and errors by status, beside the pipeline's own figures
   for the same interval (inference batches from the roles' /metrics, /v1/detect time from the gateway's),
   the CPU-ms per image of every process (roles, services; the bench client apart), the tax (that CPU
   minus the model and the decode) and the records and bytes written per image to each topic.
4. Cache hits, apart: bodies already answered, sent again at 1 and 16 callers (the result cache answers).
Every body of steps 2-3 is distinct (a unique JPEG comment), so the result cache, keyed by the image's
sha256, never answers: each call runs the model. The images stay in the uploads bucket under the run's
own tenant.
``--int8``: the pipeline serves the static INT8 version of the default model, and the baseline, the model cost
and the plain server load it too (infra/bench_model.py); the header names the model measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from config import GatewaySettings, PipelineSettings, StackSettings
from gateway.devkeys import ensure_dev_keys, mint
from infra import bench_plain
from infra.bench import baseline, free_port_block, metric_sum, peak_rss_mib, percentile, scrape, service_pids
from infra.bench_bodies import BenchError, distinct_bodies, reencode_jpeg
from infra.bench_cost import (
    BENCH_CLIENT,
    HopMeter,
    cpu_ms_per_image,
    cpu_snapshot,
    format_cpu,
    format_hops,
    format_projection,
    format_tax,
    measure_model_cost,
    per_image,
    tax_of,
)
from infra.bench_model import ServedModel, describe, format_runs, label, runs_by_version, serve
from infra.http_retry import DEFAULT_POLICY, RETRY_STATUSES, RefusedError, call_with_retries
from infra.jobs_cmd import client_tls
from infra.roles import SERVICES
from infra.stack.kafka_access import deprovision, provision
from infra.supervisor import Supervisor
from model_store.tools.convert import convert
from model_store.tools.samples import ensure_samples
from stream import topics as T
from stream.kafka import kafka_connection

DEFAULT_LEVELS = (1, 4, 16)
CACHE_LEVELS = (1, 16)  # callers of the cache-hit replay
IDLE_WINDOW_S = 5.0  # the processes' CPU with the pipeline up and no calls: what every level carries anyway
DEFAULT_REQUESTS = 40
MIN_PER_CALLER = 4  # below this a level measures its ramp-up more than its steady state
DETECT_ROUTE = "/v1/detect"
NO_RESPONSE = 0  # status recorded when the client got no HTTP answer (connection error, client timeout)
Result = tuple[float, int]  # (latency ms, HTTP status or NO_RESPONSE) of one call


# ---------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LevelStats:
    """What the callers saw at one concurrency level. Latencies are over 200 answers only."""

    concurrency: int
    requests: int
    wall_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    ok_per_s: float
    error_rate: float
    statuses: dict[int, int] = field(default_factory=dict)


def summarize(concurrency: int, results: Sequence[Result], wall_s: float) -> LevelStats:
    ok = [ms for ms, status in results if status == 200]
    n = len(results)
    return LevelStats(concurrency=concurrency, requests=n, wall_s=wall_s, p50_ms=percentile(ok, 50),
                      p95_ms=percentile(ok, 95), p99_ms=percentile(ok, 99),
                      mean_ms=float(np.mean(ok)) if ok else float("nan"),
                      ok_per_s=len(ok) / wall_s if wall_s > 0 else float("nan"),
                      error_rate=(n - len(ok)) / n if n else float("nan"),
                      statuses=dict(sorted(Counter(status for _, status in results).items())))


def histogram_quantile(before: Mapping[str, float], after: Mapping[str, float], name: str, q: float,
                       **labels: str) -> float:
    """The q-th percentile of a Prometheus histogram over the interval between two scrapes
    (linear within a bucket, as PromQL's histogram_quantile; NaN when nothing was observed)."""
    buckets: dict[float, float] = {}
    for key, value in after.items():
        m = re.fullmatch(rf"{name}_bucket\{{(.*)\}}", key)
        if not m or not all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            continue
        le = re.search(r'le="([^"]+)"', m.group(1))
        if le is not None:
            bound = float(le.group(1))
            buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    rank = q / 100 * total
    prev_le, prev_count = 0.0, 0.0
    for le_value, count in sorted(buckets.items()):
        if count >= rank:
            if le_value == float("inf"):
                return prev_le  # beyond the last finite bound: that bound is all we know
            if count == prev_count:
                return le_value
            return prev_le + (le_value - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le_value, count
    return prev_le


def _delta(before: Mapping[str, float], after: Mapping[str, float], name: str, **labels: str) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def _ratio(num: float, den: float, scale: float = 1.0) -> float:
    return num / den * scale if den else float("nan")


def server_figures(inf_before: Mapping[str, float], inf_after: Mapping[str, float],
                   gw_before: Mapping[str, float], gw_after: Mapping[str, float]) -> dict[str, float]:
    """The pipeline's and the gateway's own view of one level, from scrapes taken before and after it."""
    def inf(name: str, **labels: str) -> float:
        return _delta(inf_before, inf_after, name, **labels)

    def gw(name: str, **labels: str) -> float:
        return _delta(gw_before, gw_after, name, **labels)

    batches = inf("detectflow_batch_size_count", stage="inference")
    runs = inf("detectflow_inference_batch_size_count")
    gw_n = gw("detectflow_http_request_seconds_count", route=DETECT_ROUTE)
    return {
        "batches": batches,
        "mean_batch": _ratio(inf("detectflow_batch_size_sum", stage="inference"), batches),
        "process_ms_per_batch": _ratio(inf("detectflow_process_seconds_sum", stage="inference"), batches, 1000),
        "model_runs": runs,
        "images_per_run": _ratio(inf("detectflow_inference_batch_size_sum"), runs),
        "model_ms_per_run": _ratio(inf("detectflow_inference_seconds_sum"), runs, 1000),
        "gw_calls": gw_n,
        "gw_mean_ms": _ratio(gw("detectflow_http_request_seconds_sum", route=DETECT_ROUTE), gw_n, 1000),
        # Bucket-interpolated, so only as fine as the histogram's buckets (coarse past a few seconds).
        "gw_p50_ms": histogram_quantile(gw_before, gw_after, "detectflow_http_request_seconds", 50,
                                        route=DETECT_ROUTE) * 1000,
    }


def hop_latency(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
                ) -> dict[str, float]:
    """Mean ms from produce (the record's CreateTime) to the stage's poll, online lane, by stage (the runtime's
    detectflow_hop_seconds): what each hop adds to a sync call beyond the stages' own work."""
    out = {}
    for role, b in before.items():
        a = after.get(role, {})
        n = _delta(b, a, "detectflow_hop_seconds_count", lane="online")
        if n > 0:
            out[role] = _delta(b, a, "detectflow_hop_seconds_sum", lane="online") / n * 1000
    return out


def format_targets(m: Measured) -> str:
    """The sync path's targets (docs/performance.md): 16 callers >= 0.9x the plain server's img/s, the P50 at one
    caller <= the plain server's + 25 ms, the tax at the highest level <= 40 CPU-ms per image."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = []
    by_level = {lv.stats.concurrency: lv for lv in m.levels}
    plain = {lv.stats.concurrency: lv for lv in m.plain}
    if 16 in by_level and 16 in plain:
        r = _ratio(by_level[16].stats.ok_per_s, plain[16].stats.ok_per_s)
        out.append(f"  16 callers / plain server     = {_fmt(r, '.2f')}x (target >= 0.90x: {verdict(r >= 0.9)})")
    if 1 in by_level and 1 in plain:
        d = by_level[1].stats.p50_ms - plain[1].stats.p50_ms
        out.append(f"  P50 at 1 caller - plain's     = {d:+.1f} ms (target <= +25 ms: {verdict(d <= 25)})")
    if m.levels:
        top = m.levels[-1]
        t = tax_of({k: v for k, v in top.cpu_ms.items() if k != BENCH_CLIENT}, m.cost).tax_ms
        out.append(f"  tax at {top.stats.concurrency} callers             = {t:.0f} CPU-ms/img (target <= 40: "
                   f"{verdict(t <= 40)})")
    return "targets:\n" + "\n".join(out) if out else "targets: -"


def requests_for(level: int, requests: int) -> int:
    return max(requests, MIN_PER_CALLER * level)


def parse_levels(raw: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError as exc:
        raise ValueError(f"--levels must be comma-separated integers, not {raw!r}") from exc
    if not levels or any(level < 1 for level in levels):
        raise ValueError(f"--levels must name concurrency levels of at least 1, not {raw!r}")
    return levels


# ---------------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Target:
    base_url: str
    token: str
    timeout_ms: int
    # A 429/503 answer is retried after its Retry-After (capped, jittered) until this long after the call began,
    # as the project's clients do (infra/http_retry.py); the latency counts the waits. A POST without an
    # Idempotency-Key (these calls: a key would add a claim per request to what is measured) is not retried
    # after a transport error: it may have been done.
    retry_s: float = 30.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "image/jpeg"}


async def _post(session: Any, target: Target, body: bytes, hits: Counter[bool] | None = None,
                stages: dict[str, list[float]] | None = None) -> Result:
    """One call; with ``hits``, count the answers' ``cache_hit`` flags (a 200 answer's JSON); with ``stages``,
    collect the answers' per-stage ``timings_ms``."""
    async def attempt() -> tuple[int, bytes]:
        async with session.post(f"{target.base_url}{DETECT_ROUTE}", data=body, headers=target.headers(),
                                params={"timeout_ms": str(target.timeout_ms)}) as resp:
            payload = await resp.read()
            if resp.status in RETRY_STATUSES:
                raise RefusedError(resp.status, payload[:200], resp.headers.get("Retry-After"))
            return resp.status, payload

    t0 = time.perf_counter()
    payload = b""
    try:
        status, payload = await call_with_retries(attempt, what="POST detect", idempotent=False,
                                                  deadline=time.monotonic() + target.retry_s, policy=DEFAULT_POLICY)
    except TimeoutError as exc:  # DeadlineExceeded (still refused at the deadline) or the client's own timeout
        cause = exc.__cause__
        status = cause.status if isinstance(cause, RefusedError) else NO_RESPONSE
    except aiohttp.ClientError:
        status = NO_RESPONSE
    ms = (time.perf_counter() - t0) * 1000
    if hits is not None and status == 200:
        try:
            hits[bool(json.loads(payload).get("cache_hit"))] += 1
        except (ValueError, AttributeError):
            hits[False] += 1
    if stages is not None and status == 200:
        try:
            for name, value in (json.loads(payload).get("timings_ms") or {}).items():
                stages.setdefault(name, []).append(float(value))
        except (ValueError, AttributeError, TypeError):
            pass  # an answer without timings adds nothing to the breakdown
    return ms, status


async def drive(session: Any, target: Target, bodies: Sequence[bytes], concurrency: int,
                hits: Counter[bool] | None = None, stages: dict[str, list[float]] | None = None
                ) -> tuple[list[Result], float]:
    """Send every body with exactly ``concurrency`` callers, each taking the next body when its call returns."""
    results: list[Result] = [(float("nan"), NO_RESPONSE)] * len(bodies)
    next_index = iter(range(len(bodies)))  # shared: single-threaded event loop, no lock needed

    async def caller() -> None:
        for i in next_index:
            results[i] = await _post(session, target, bodies[i], hits, stages)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def wait_ready(session: Any, base_url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base_url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = type(exc).__name__
        await asyncio.sleep(0.5)  # poll interval; readiness itself is the 200 above
    raise BenchError(f"the gateway was not ready within {deadline_s:.0f}s ({last})")


async def warm_up(session: Any, target: Target, bodies: Sequence[bytes], in_a_row: int, deadline_s: float) -> int:
    """Call until ``in_a_row`` calls in a row answer 200 (roles joining their groups, the model warming)."""
    deadline = time.monotonic() + deadline_s
    streak, used, statuses = 0, 0, Counter[int]()
    while streak < in_a_row:
        if time.monotonic() >= deadline or used >= len(bodies):
            raise BenchError(f"warm-up: no {in_a_row} answers in a row within {deadline_s:.0f}s "
                             f"(statuses so far: {dict(statuses)})")
        _, status = await _post(session, target, bodies[used])
        used += 1
        statuses[status] += 1
        streak = streak + 1 if status == 200 else 0
    return used


# ---------------------------------------------------------------------------------------------- comparisons


def against_plain(flow: Sequence[LevelStats], plain: Sequence[LevelStats]) -> list[tuple[int, float, float]]:
    """Per concurrency level both ran: (level, detectflow img/s / plain img/s, detectflow P50 - plain P50 ms)."""
    by_level = {s.concurrency: s for s in plain}
    return [(s.concurrency, _ratio(s.ok_per_s, by_level[s.concurrency].ok_per_s),
             s.p50_ms - by_level[s.concurrency].p50_ms) for s in flow if s.concurrency in by_level]


def replay_bodies(answered: Sequence[bytes], n: int) -> list[bytes]:
    """n bodies cycling over bodies already answered 200: each one a cache hit when sent again."""
    if not answered:
        raise BenchError("no call was answered: nothing to replay from the result cache")
    return [answered[i % len(answered)] for i in range(n)]


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Level:
    """One measured interval: what the callers saw, the servers' own figures, CPU-ms per image by process."""

    stats: LevelStats
    server: dict[str, float]
    cpu_ms: dict[str, float]  # per 200 answer, by process; the bench client under BENCH_CLIENT
    answered: int  # 200 answers
    hits: dict[bool, int] = field(default_factory=dict)  # cache_hit flags of the 200 answers (cache replays)
    hop_ms: dict[str, float] = field(default_factory=dict)  # mean produce -> poll ms of the online lane, by stage
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean of the answers' timings_ms, by stage
    runs: dict[str, float] = field(default_factory=dict)  # the inference role's model runs, by model version


@dataclass
class Measured:
    base: dict[str, float]
    cost: Any  # bench_cost.ModelCost
    levels: list[Level]
    plain: list[Level]
    cache: list[Level]
    warm_calls: int
    rss: dict[str, float]
    hop_offsets: list[tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]]
    idle_ms_per_s: dict[str, float] = field(default_factory=dict)  # CPU-ms per second, pipeline up, no calls
    hops: list[dict[str, tuple[float, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Everything the measuring coroutine needs: the systems under test and the bodies it sends."""

    sup: Any
    stack: StackSettings
    inference_port: int
    gw_port: int
    target: Target
    plain_target: Target
    plain_pid: int
    warm_bodies: list[bytes]
    level_bodies: list[list[bytes]]
    plain_bodies: list[list[bytes]]
    levels: Sequence[int]
    requests: int
    bases: list[bytes]
    model_dir: Any
    threads: int
    baseline_repeats: int
    ready_deadline_s: float
    tls: ssl.SSLContext
    hop_meter: Any
    role_ports: dict[str, int] = field(default_factory=dict)  # the pipeline roles' metrics ports


def run_bench_sync(stack: StackSettings, *, levels: Sequence[int] = DEFAULT_LEVELS,
                   requests: int = DEFAULT_REQUESTS, baseline_repeats: int = 2, timeout_ms: int = 30_000,
                   ready_deadline_s: float = 180.0, int8: bool = False) -> int:
    """``int8``: the pipeline, the baseline, the model cost and the plain server all use the static INT8 version of
    the default model (infra/bench_model.py)."""
    run_id = uuid.uuid4().hex[:6]
    prefix = f"bench{run_id}."
    # The roles' metrics ports, the gateway's HTTPS port (its own metrics port goes unused), the plain server's.
    base_port = free_port_block(len(SERVICES) + 2)
    gw_port = base_port + len(SERVICES)
    plain_port = gw_port + 1
    env = {**os.environ, "DETECTFLOW_TOPIC_PREFIX": prefix, "DETECTFLOW_METRICS_PORT": str(base_port),
           "DETECTFLOW_GATEWAY_PORT": str(gw_port), "DETECTFLOW_RATE_PER_S": "100000",
           # The benchmark's own gateway trusts the dev keys it mints its token with.
           "DETECTFLOW_AUTH_DEV": "true",
           "DETECTFLOW_RATE_BURST": "100000", "DETECTFLOW_MAX_INFLIGHT": str(max(256, 4 * max(levels)))}
    settings = PipelineSettings.from_env(env)
    settings = settings.replace(stream=settings.stream.replace(topic_prefix=prefix))
    gw = GatewaySettings.from_env(env)
    convert(settings.models_dir / settings.default_model / "1")
    bases = [reencode_jpeg(p.read_bytes()) for p in ensure_samples(stack.samples_dir, stack.cache_dir)]
    counts = [requests_for(level, requests) for level in levels]
    warm_budget = 40
    # Every body before any timing: the JPEG work never lands inside a measured interval.
    bodies = distinct_bodies(bases, 2 * warm_budget + 2 * sum(counts), run_id)
    warm_bodies, level_bodies, plain_bodies = bodies[:2 * warm_budget], [], []
    at = 2 * warm_budget
    for n in counts:
        level_bodies.append(bodies[at:at + n])
        plain_bodies.append(bodies[at + n:at + 2 * n])
        at += 2 * n
    tenant = f"bench-{run_id}"
    token = mint(ensure_dev_keys(stack.secrets_dir), tenant=tenant, scopes=["detect:write", "results:read"],
                 issuer=gw.issuer, audience=gw.audience, tenant_claim=gw.tenant_claim, ttl_s=3600)
    target = Target(gw.base_url, token, timeout_ms)
    plain_target = Target(f"{'http' if gw.insecure_http else 'https'}://{gw.host}:{plain_port}", token, timeout_ms)
    tls = client_tls(gw.pipeline.stream.tls_ca_file)  # the gateway's HTTPS, verified against the project CA
    log_dir = stack.log_dir / "bench-sync"

    kafka = kafka_connection(settings.stream)
    provision(kafka, prefix, T.all_topics(prefix, max_message_bytes=settings.stream.max_message_bytes))
    try:
        served = serve(settings, stack, int8=int8)  # production on the bench's prefix
    except BaseException:
        deprovision(kafka, prefix)
        raise
    model_dir = served.model_dir
    env["DETECTFLOW_DEFAULT_MODEL"] = served.name  # what the roles and the gateway serve by default
    sup = Supervisor(SERVICES, log_dir, env=env, metrics_base_port=base_port)
    ports = {role: base_port + i for i, role in enumerate(SERVICES)}
    sup.start_monitor()
    plain = bench_plain.start(plain_port, model_dir, settings.intra_op_threads, gw.tls_cert, gw.tls_key,
                              log_dir / "plain-server.log")
    hop_meter = HopMeter(kafka, prefix)
    try:
        plan = Plan(sup=sup, stack=stack, inference_port=ports["inference"], gw_port=gw_port, target=target,
                    plain_target=plain_target, plain_pid=plain.pid, warm_bodies=warm_bodies,
                    level_bodies=level_bodies, plain_bodies=plain_bodies, levels=levels, requests=requests,
                    bases=bases, model_dir=model_dir, threads=settings.intra_op_threads,
                    baseline_repeats=baseline_repeats, ready_deadline_s=ready_deadline_s, tls=tls,
                    hop_meter=hop_meter, role_ports={r: p for r, p in ports.items() if r != "gateway"})
        measured = asyncio.run(_measure(plan))
        # Read back what each level wrote (after the timing: the consumer's work lands outside every interval).
        measured.hops = [per_image(t, lv.answered, prefix)
                         for t, lv in zip(hop_meter.tally(measured.hop_offsets), measured.levels, strict=True)]
    finally:
        hop_meter.close()
        bench_plain.stop(plain)
        sup.stop()
        deprovision(kafka, prefix)

    _report(measured, len(bases), baseline_repeats, timeout_ms, tenant, log_dir, tls=not gw.insecure_http,
            served=served, prefix=prefix)
    return 0 if all(lv.stats.error_rate == 0 for lv in measured.levels) else 1


async def _measure(plan: Plan) -> Measured:
    loop = asyncio.get_running_loop()
    levels = plan.levels
    timeout = aiohttp.ClientTimeout(total=plan.target.timeout_ms / 1000 + 30)  # past the gateway's own deadline
    connector = aiohttp.TCPConnector(limit=max(*levels, *CACHE_LEVELS) + 4, ssl=plan.tls)
    services = service_pids(plan.stack)

    async def scrapes() -> tuple[dict[str, float], dict[str, float]]:
        return (await loop.run_in_executor(None, scrape, plan.inference_port),
                await loop.run_in_executor(None, scrape, plan.gw_port, plan.tls))

    async def role_scrapes() -> dict[str, dict[str, float]]:
        return {role: await loop.run_in_executor(None, scrape, port) for role, port in plan.role_ports.items()}

    async def measured_level(target: Target, bodies: list[bytes], level: int, pids: dict[str, int],
                             hits: Counter[bool] | None = None, pipeline: bool = True) -> tuple[Level, list[Result]]:
        before = await scrapes() if pipeline else ({}, {})
        roles0 = await role_scrapes() if pipeline else {}
        cpu0 = cpu_snapshot({**pids, BENCH_CLIENT: os.getpid()})
        stages: dict[str, list[float]] = {}
        results, wall = await drive(session, target, bodies, level, hits, stages if pipeline else None)
        cpu1 = cpu_snapshot({**pids, BENCH_CLIENT: os.getpid()})
        roles1 = await role_scrapes() if pipeline else {}
        after = await scrapes() if pipeline else ({}, {})
        stats = summarize(level, results, wall)
        n_ok = sum(1 for _, status in results if status == 200)
        server = server_figures(before[0], after[0], before[1], after[1]) if pipeline else {}
        return Level(stats, server, cpu_ms_per_image(cpu0, cpu1, n_ok), n_ok, dict(hits or {}),
                     hop_latency(roles0, roles1),
                     {name: float(np.mean(v)) for name, v in stages.items() if name != "inference_batch"},
                     runs_by_version(before[0], after[0]) if pipeline else {}), results

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await wait_ready(session, plan.target.base_url, plan.ready_deadline_s)
        warm = plan.warm_bodies[:len(plan.warm_bodies) // 2]
        warm_calls = await warm_up(session, plan.target, warm, in_a_row=3, deadline_s=plan.ready_deadline_s)
        # While the pipeline idles, in this process (off the loop: nothing else is on it): the baseline, then
        # the CPU of the decode and of the model at batch 1, then the plain server in its own process.
        base = await loop.run_in_executor(None, baseline, plan.bases, plan.model_dir, plan.baseline_repeats,
                                          plan.threads)
        cost = await loop.run_in_executor(None, measure_model_cost, plan.bases, plan.model_dir, plan.threads,
                                          plan.baseline_repeats)
        # The background every level carries (idle polling; on a shared stack, other users' work too).
        idle_pids = {**plan.sup.pids(), **services}
        idle0 = cpu_snapshot(idle_pids)
        await asyncio.sleep(IDLE_WINDOW_S)  # a measured window, not a wait for something
        idle1 = cpu_snapshot(idle_pids)
        idle = {name: (idle1[name] - cpu0) * 1000 / IDLE_WINDOW_S for name, cpu0 in idle0.items()}
        await wait_ready(session, plan.plain_target.base_url, plan.ready_deadline_s)
        await warm_up(session, plan.plain_target, plan.warm_bodies[len(plan.warm_bodies) // 2:], in_a_row=3,
                      deadline_s=plan.ready_deadline_s)
        plain = [(await measured_level(plan.plain_target, bodies, level, {"plain server": plan.plain_pid},
                                       pipeline=False))[0]
                 for level, bodies in zip(levels, plan.plain_bodies, strict=True)]

        out, offsets, answered = [], [], []
        for level, bodies in zip(levels, plan.level_bodies, strict=True):
            off0 = plan.hop_meter.offsets()
            lv, results = await measured_level(plan.target, bodies, level, {**plan.sup.pids(), **services})
            offsets.append((off0, plan.hop_meter.offsets()))
            out.append(lv)
            answered += [body for body, (_, status) in zip(bodies, results, strict=True) if status == 200]

        # Bodies already answered, sent again: the result cache answers. Never mixed with the figures above.
        cache = []
        for level in CACHE_LEVELS:
            hits: Counter[bool] = Counter()
            lv, _ = await measured_level(plan.target, replay_bodies(answered, requests_for(level, plan.requests)),
                                         level, {**plan.sup.pids(), **services}, hits)
            cache.append(lv)
    rss = {role: peak_rss_mib(pid) for role, pid in plan.sup.pids().items()}
    return Measured(base=base, cost=cost, levels=out, plain=plain, cache=cache, warm_calls=warm_calls, rss=rss,
                    hop_offsets=offsets, idle_ms_per_s=idle)


def _fmt(value: float, spec: str = ".1f") -> str:
    return "-" if value != value else format(value, spec)  # NaN (nothing observed) prints as "-"


def _client_line(s: LevelStats) -> str:
    return (f"{s.concurrency:>4} {s.requests:>5} {_fmt(s.p50_ms):>8} {_fmt(s.p95_ms):>8} {_fmt(s.p99_ms):>8} "
            f"{_fmt(s.mean_ms):>8} {_fmt(s.ok_per_s, '.2f'):>7}")


def _report(m: Measured, n_images: int, baseline_repeats: int, timeout_ms: int, tenant: str, log_dir: Any, *,
            tls: bool, served: ServedModel, prefix: str) -> None:
    base = m.base
    scheme = "HTTPS (the project CA's gateway certificate)" if tls else "plain HTTP"
    print(f"detectflow bench sync: POST {DETECT_ROUTE} (raw JPEG, timeout_ms={timeout_ms}) through the gateway and "
          f"the pipeline; {n_images} sample images, every body distinct; tenant {tenant}; "
          f"{m.warm_calls} warm-up calls; logs in {log_dir}; model {label(served)}")
    print(describe(served, prefix))
    print(f"\nbaseline (one process: decode -> letterbox -> ORT batch 1 -> decode -> NMS, x{baseline_repeats}):")
    print(f"  {base['ms_mean']:.1f} ms/img mean, P50 {base['ms_p50']:.1f} ms, {base['img_s']:.2f} img/s")
    c = m.cost
    print(f"measured in this process, pipeline idle ({c.images} images, process CPU time, ORT batch 1 with the "
          f"inference role's session settings): model {c.model_ms:.1f} CPU-ms/img, decode {c.decode_ms:.1f} CPU-ms/img")

    head = f"{'conc':>4} {'reqs':>5} {'P50 ms':>8} {'P95 ms':>8} {'P99 ms':>8} {'mean':>8} {'req/s':>7}"
    print(f"\nplain server (one aiohttp process: decode -> letterbox -> ORT batch 1 -> decode -> NMS -> JSON, the "
          f"model in the loop's thread executor, no batching), {scheme} like the gateway, while the pipeline idles:")
    print(f"{head} {'errors':>6} | {'CPU-ms/img server':>17} {'client':>7}")
    for lv in m.plain:
        s = lv.stats
        print(f"{_client_line(s)} {s.error_rate:>6.1%} | {_fmt(lv.cpu_ms['plain server']):>17} "
              f"{_fmt(lv.cpu_ms[BENCH_CLIENT]):>7}")

    print(f"\ndetectflow (gateway over {scheme}; client side: latency over 200 answers, req/s counts 200 answers) "
          "| pipeline and gateway, same interval")
    print(f"{head} {'x base':>6} {'errors':>6}  {'statuses':<16}| {'gw calls':>8} {'gw mean':>8} {'gw P50~':>8} | "
          f"{'batches':>7} {'mean batch':>10} {'ms/batch':>8} {'img/run':>7} {'model ms/run':>12}")
    for lv in m.levels:
        s, f = lv.stats, lv.server
        statuses = " ".join(f"{'none' if k == NO_RESPONSE else k}:{v}" for k, v in s.statuses.items())
        print(f"{_client_line(s)} {_fmt(_ratio(s.ok_per_s, base['img_s']), '.2f'):>6} "
              f"{s.error_rate:>6.1%}  {statuses:<16}| {f['gw_calls']:>8.0f} {_fmt(f['gw_mean_ms']):>8} "
              f"{_fmt(f['gw_p50_ms']):>8} | {f['batches']:>7.0f} {_fmt(f['mean_batch'], '.2f'):>10} "
              f"{_fmt(f['process_ms_per_batch']):>8} {_fmt(f['images_per_run'], '.2f'):>7} "
              f"{_fmt(f['model_ms_per_run']):>12}")
    print("  (gw: the gateway's own /v1/detect timing; gw P50~ is interpolated within its histogram's buckets; "
          "ms/batch: the inference stage's process() time per batch; x base: req/s over the baseline's img/s)")
    runs: dict[str, float] = {}
    for lv in m.levels:
        for name, n in lv.runs.items():
            runs[name] = runs.get(name, 0.0) + n
    print(f"  {format_runs(runs, served)}")

    print("\ndetectflow / plain server: " + "; ".join(
        f"conc {level}: {_fmt(ratio, '.2f')}x img/s" + (f", P50 {delta:+.1f} ms" if level == 1 else "")
        for level, ratio, delta in against_plain([lv.stats for lv in m.levels], [lv.stats for lv in m.plain])))
    print(format_targets(m))
    first = next((lv.stats for lv in m.levels if lv.stats.concurrency == 1), None)
    if first is not None:
        print(f"concurrency-1 P50 / baseline P50 = {_ratio(first.p50_ms, base['ms_p50']):.2f}x "
              f"({first.p50_ms - base['ms_p50']:+.1f} ms of gateway, Kafka, scan, storage and reply overhead)")

    print("\nCPU-ms per image (per 200 answer) by process, each level; the tax is that total minus the model "
          "(taken off inference) and the decode (taken off preprocess); the bench client is not counted:")
    idle_total = sum(m.idle_ms_per_s.values())
    print(f"  idle, before the levels (pipeline up, no calls, {IDLE_WINDOW_S:.0f} s): {idle_total:.0f} CPU-ms per "
          f"second: {format_cpu(m.idle_ms_per_s)}\n    (the services are shared: their figures include any other "
          "user's work)")
    taxes = []
    for lv, plain in zip(m.levels, m.plain, strict=True):
        cpu = {k: v for k, v in lv.cpu_ms.items() if k != BENCH_CLIENT}
        tax = tax_of(cpu, m.cost)
        taxes.append(tax)
        ptax = tax_of({"plain server": plain.cpu_ms["plain server"]}, m.cost, model_in="plain server",
                      decode_in="plain server")
        print(f"  conc {lv.stats.concurrency}: {format_cpu(cpu)}  (total {tax.total_ms:.0f}, of which the idle "
              f"background at {lv.stats.ok_per_s:.2f} img/s ~{_ratio(idle_total, lv.stats.ok_per_s):.0f}; "
              f"bench client {lv.cpu_ms[BENCH_CLIENT]:.1f})")
        print(f"    detectflow {format_tax(tax)}")
        print(f"    plain server tax {ptax.tax_ms:.0f} CPU-ms/img = total {ptax.total_ms:.0f} - model "
              f"{ptax.model_ms:.0f} - decode {ptax.decode_ms:.0f} (HTTP, TLS, letterbox, NMS, JSON)")

    if m.hops:
        print("\nrecords and bytes written per image to each topic (key + value, read back after the run; records "
              "still in flight at a level's end count in the next one):")
        for lv, hops in zip(m.levels, m.hops, strict=True):
            print(f"  conc {lv.stats.concurrency}: {format_hops(hops) if hops else '-'}")

    if any(lv.hop_ms for lv in m.levels):
        print("\nhop latency, online lane (mean ms from a record's produce to its stage's poll; the reply hop to the "
              "gateway is not measured):")
        for lv in m.levels:
            hops_ms = ", ".join(f"{role} {ms:.1f}" for role, ms in lv.hop_ms.items())
            print(f"  conc {lv.stats.concurrency}: {hops_ms} (sum {sum(lv.hop_ms.values()):.1f})")
        print("time per stage, from the answers' timings_ms (mean ms; end_to_end: submit -> result stored):")
        for lv in m.levels:
            print(f"  conc {lv.stats.concurrency}: " + ", ".join(f"{k} {v:.1f}" for k, v in lv.stage_ms.items()))

    print("\ncache hits (bodies already answered, sent again under the same tenant: the result cache answers; "
          "not part of any figure above):")
    for lv in m.cache:
        s = lv.stats
        total = sum(v for k, v in lv.cpu_ms.items() if k != BENCH_CLIENT)
        print(f"  conc {s.concurrency:>2}: {s.requests} calls, P50 {_fmt(s.p50_ms)} ms, P95 {_fmt(s.p95_ms)} ms, "
              f"{_fmt(s.ok_per_s, '.2f')} req/s, errors {s.error_rate:.1%}, answered from the cache "
              f"{lv.hits.get(True, 0)}/{sum(lv.hits.values())}; {total:.0f} CPU-ms per call (roles + services)")

    if taxes:
        top = m.levels[-1].stats.concurrency
        print(f"\n{format_projection(taxes[-1].tax_ms)} (the tax at {top} callers)")
    gw_rss = m.rss.get("gateway", float("nan"))
    print(f"\npeak RSS of the gateway process: {gw_rss:.0f} MiB")
    print("peak RSS of the pipeline roles (MiB): " + ", ".join(
        f"{role} {v:.0f}" for role, v in m.rss.items() if role != "gateway"))
