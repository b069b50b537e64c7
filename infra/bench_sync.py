"""`detectflow bench sync`: POST /v1/detect through the real gateway and pipeline at fixed concurrency levels.

1. Start every pipeline role and a gateway (supervised processes, as `detectflow run all`) on a fresh
   topic prefix, the gateway on a free port with its rate limit out of the way; wait for /readyz.
2. Warm up until a few calls in a row answer 200, then measure the baseline while the pipeline idles:
   one process looping decode -> letterbox -> ONNX Runtime (batch 1) -> decode -> NMS (infra/bench.py).
3. For each concurrency level, exactly that many callers drive POST /v1/detect (raw JPEG body) for a fixed
   number of requests: P50/P95/P99, throughput and errors by status, beside the pipeline's own figures
   for the same interval (inference batches from the roles' /metrics, /v1/detect time from the gateway's).
Every body is distinct (a unique JPEG comment), so the result cache, keyed by the image's sha256, never
answers: each call runs the model. The images stay in the uploads bucket under the run's own tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import ssl
import struct
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from infra.bench import baseline, free_port_block, metric_sum, peak_rss_mib, percentile, scrape
from infra.jobs_cmd import client_tls
from infra.settings import GatewaySettings, PipelineSettings, StackSettings, kafka_client
from infra.stack.kafka_access import deprovision, provision

DEFAULT_LEVELS = (1, 4, 16, 64)
DEFAULT_REQUESTS = 40
MIN_PER_CALLER = 4  # below this a level measures its ramp-up more than its steady state
DETECT_ROUTE = "/v1/detect"
NO_RESPONSE = 0  # status recorded when the client got no HTTP answer (connection error, client timeout)
Result = tuple[float, int]  # (latency ms, HTTP status or NO_RESPONSE) of one call


class BenchError(RuntimeError):
    """The benchmark could not bring its system up or warm it."""


# ---------------------------------------------------------------------------------------------- bodies


def reencode_jpeg(data: bytes, quality: int = 90) -> bytes:
    """Any sample (PNG, JPEG...) as a baseline JPEG, so every request has one content type."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BenchError("a sample image does not decode")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BenchError("cv2 could not encode a sample as JPEG")
    return buf.tobytes()


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """The same JPEG with a COM segment right after SOI: other bytes (so another sha256), same pixels."""
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG (no SOI marker)")
    if len(comment) > 65533:
        raise ValueError("a JPEG comment segment holds at most 65533 bytes")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def distinct_bodies(bases: Sequence[bytes], n: int, tag: str) -> list[bytes]:
    """n request bodies cycling over ``bases``, each made unique by a comment naming ``tag`` and its index."""
    if not bases:
        raise ValueError("no base images")
    bodies = [with_comment(bases[i % len(bases)], f"detectflow-bench {tag} {i}".encode()) for i in range(n)]
    if len({hashlib.sha256(b).digest() for b in bodies}) != n:  # a cache hit would void the measurement
        raise AssertionError("request bodies are not distinct")
    return bodies


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

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "image/jpeg"}


async def _post(session: Any, target: Target, body: bytes) -> Result:
    import aiohttp

    t0 = time.perf_counter()
    try:
        async with session.post(f"{target.base_url}{DETECT_ROUTE}", data=body, headers=target.headers(),
                                params={"timeout_ms": str(target.timeout_ms)}) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError):
        status = NO_RESPONSE
    return (time.perf_counter() - t0) * 1000, status


async def drive(session: Any, target: Target, bodies: Sequence[bytes], concurrency: int) -> tuple[list[Result], float]:
    """Send every body with exactly ``concurrency`` callers, each taking the next body when its call returns."""
    results: list[Result] = [(float("nan"), NO_RESPONSE)] * len(bodies)
    next_index = iter(range(len(bodies)))  # shared: single-threaded event loop, no lock needed

    async def caller() -> None:
        for i in next_index:
            results[i] = await _post(session, target, bodies[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def wait_ready(session: Any, base_url: str, deadline_s: float) -> None:
    import aiohttp

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


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Measured:
    base: dict[str, float]
    levels: list[tuple[LevelStats, dict[str, float]]]
    warm_calls: int
    rss: dict[str, float]


def run_bench_sync(stack: StackSettings, *, levels: Sequence[int] = DEFAULT_LEVELS,
                   requests: int = DEFAULT_REQUESTS, baseline_repeats: int = 2, timeout_ms: int = 30_000,
                   ready_deadline_s: float = 180.0) -> int:
    from gateway.devkeys import ensure_dev_keys, mint
    from infra.roles import SERVICES
    from infra.supervisor import Supervisor
    from model_store.convert import convert
    from model_store.samples import ensure_samples
    from stream import topics as T

    run_id = uuid.uuid4().hex[:6]
    prefix = f"bench{run_id}."
    # The roles' metrics ports, then the gateway's HTTPS port (the gateway's own metrics port goes unused).
    base_port = free_port_block(len(SERVICES) + 1)
    gw_port = base_port + len(SERVICES)
    env = {**os.environ, "DETECTFLOW_TOPIC_PREFIX": prefix, "DETECTFLOW_METRICS_PORT": str(base_port),
           "DETECTFLOW_GATEWAY_PORT": str(gw_port), "DETECTFLOW_RATE_PER_S": "100000",
           # The benchmark's own gateway trusts the dev keys it mints its token with.
           "DETECTFLOW_AUTH_DEV": "true",
           "DETECTFLOW_RATE_BURST": "100000", "DETECTFLOW_MAX_INFLIGHT": str(max(256, 4 * max(levels)))}
    settings = PipelineSettings.from_env(env)
    settings = replace(settings, stream=replace(settings.stream, topic_prefix=prefix))
    gw = GatewaySettings.from_env(env)
    model_dir = settings.models_dir / settings.default_model / "1"
    convert(model_dir)
    bases = [reencode_jpeg(p.read_bytes()) for p in ensure_samples(stack.samples_dir, stack.cache_dir)]
    counts = [requests_for(level, requests) for level in levels]
    warm_budget = 40
    # Every body before any timing: the JPEG work never lands inside a measured interval.
    bodies = distinct_bodies(bases, warm_budget + sum(counts), run_id)
    warm_bodies, level_bodies = bodies[:warm_budget], []
    at = warm_budget
    for n in counts:
        level_bodies.append(bodies[at:at + n])
        at += n
    tenant = f"bench-{run_id}"
    token = mint(ensure_dev_keys(stack.secrets_dir), tenant=tenant, scopes=["detect:write", "results:read"],
                 issuer=gw.issuer, audience=gw.audience, tenant_claim=gw.tenant_claim, ttl_s=3600)
    target = Target(gw.base_url, token, timeout_ms)
    tls = client_tls(gw.pipeline.stream.tls_ca_file)  # the gateway's HTTPS, verified against the project CA
    log_dir = stack.log_dir / "bench-sync"

    provision(kafka_client(settings.stream), prefix,
              T.all_topics(prefix, max_message_bytes=settings.stream.max_message_bytes))
    from infra.demo import bootstrap_default_model

    bootstrap_default_model(settings, stack, quiet=True)  # the default model's routing on the bench's prefix
    sup = Supervisor(SERVICES, log_dir, env=env, metrics_base_port=base_port)
    ports = {role: base_port + i for i, role in enumerate(SERVICES)}
    sup.start_monitor()
    try:
        measured = asyncio.run(_measure(sup, ports["inference"], gw_port, target, warm_bodies, level_bodies,
                                        levels, bases, model_dir, baseline_repeats, ready_deadline_s, tls))
    finally:
        sup.stop()
        deprovision(kafka_client(settings.stream), prefix)

    _report(measured, len(bases), baseline_repeats, timeout_ms, tenant, log_dir)
    return 0 if all(stats.error_rate == 0 for stats, _ in measured.levels) else 1


async def _measure(sup: Any, inference_port: int, gw_port: int, target: Target, warm_bodies: list[bytes],
                   level_bodies: list[list[bytes]], levels: Sequence[int], bases: list[bytes], model_dir: Any,
                   baseline_repeats: int, ready_deadline_s: float, tls: ssl.SSLContext) -> Measured:
    import aiohttp

    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=target.timeout_ms / 1000 + 30)  # past the gateway's own deadline
    connector = aiohttp.TCPConnector(limit=max(levels) + 4, ssl=tls)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await wait_ready(session, target.base_url, ready_deadline_s)
        warm_calls = await warm_up(session, target, warm_bodies, in_a_row=3, deadline_s=ready_deadline_s)
        # The baseline runs while the pipeline idles, in this process (off the loop: nothing else is on it).
        base = await loop.run_in_executor(None, baseline, bases, model_dir, baseline_repeats)

        async def scrapes() -> tuple[dict[str, float], dict[str, float]]:
            return (await loop.run_in_executor(None, scrape, inference_port),
                    await loop.run_in_executor(None, scrape, gw_port, tls))

        out = []
        for level, bodies in zip(levels, level_bodies, strict=True):
            before = await scrapes()
            results, wall = await drive(session, target, bodies, level)
            after = await scrapes()
            out.append((summarize(level, results, wall), server_figures(before[0], after[0], before[1], after[1])))
    rss = {role: peak_rss_mib(pid) for role, pid in sup.pids().items()}
    return Measured(base=base, levels=out, warm_calls=warm_calls, rss=rss)


def _fmt(value: float, spec: str = ".1f") -> str:
    return "-" if value != value else format(value, spec)  # NaN (nothing observed) prints as "-"


def _report(m: Measured, n_images: int, baseline_repeats: int, timeout_ms: int, tenant: str, log_dir: Any) -> None:
    base = m.base
    print(f"detectflow bench sync: POST {DETECT_ROUTE} (raw JPEG, timeout_ms={timeout_ms}) through the gateway and "
          f"the pipeline; {n_images} sample images, every body distinct; tenant {tenant}; "
          f"{m.warm_calls} warm-up calls; logs in {log_dir}")
    print(f"\nbaseline (one process: decode -> letterbox -> ORT batch 1 -> decode -> NMS, x{baseline_repeats}):")
    print(f"  {base['ms_mean']:.1f} ms/img mean, P50 {base['ms_p50']:.1f} ms, {base['img_s']:.2f} img/s")
    print("\nclient side (latency over 200 answers; req/s counts 200 answers) | pipeline and gateway, same interval")
    print(f"{'conc':>4} {'reqs':>5} {'P50 ms':>8} {'P95 ms':>8} {'P99 ms':>8} {'mean':>8} {'req/s':>7} {'x base':>6} "
          f"{'errors':>6}  {'statuses':<16}| {'gw calls':>8} {'gw mean':>8} {'gw P50~':>8} | {'batches':>7} "
          f"{'mean batch':>10} {'ms/batch':>8} {'img/run':>7} {'model ms/run':>12}")
    for s, f in m.levels:
        statuses = " ".join(f"{'none' if k == NO_RESPONSE else k}:{v}" for k, v in s.statuses.items())
        print(f"{s.concurrency:>4} {s.requests:>5} {_fmt(s.p50_ms):>8} {_fmt(s.p95_ms):>8} {_fmt(s.p99_ms):>8} "
              f"{_fmt(s.mean_ms):>8} {_fmt(s.ok_per_s, '.2f'):>7} {_fmt(_ratio(s.ok_per_s, base['img_s']), '.2f'):>6} "
              f"{s.error_rate:>6.1%}  {statuses:<16}| {f['gw_calls']:>8.0f} {_fmt(f['gw_mean_ms']):>8} "
              f"{_fmt(f['gw_p50_ms']):>8} | {f['batches']:>7.0f} {_fmt(f['mean_batch'], '.2f'):>10} "
              f"{_fmt(f['process_ms_per_batch']):>8} {_fmt(f['images_per_run'], '.2f'):>7} "
              f"{_fmt(f['model_ms_per_run']):>12}")
    print("  (gw: the gateway's own /v1/detect timing; gw P50~ is interpolated within its histogram's buckets; "
          "ms/batch: the inference stage's process() time per batch; x base: req/s over the baseline's img/s)")
    first = next((s for s, _ in m.levels if s.concurrency == 1), None)
    if first is not None:
        print(f"\nconcurrency-1 P50 / baseline P50 = {_ratio(first.p50_ms, base['ms_p50']):.2f}x "
              f"({first.p50_ms - base['ms_p50']:+.1f} ms of gateway, Kafka, scan, storage and reply overhead)")
    gw_rss = m.rss.get("gateway", float("nan"))
    print(f"\npeak RSS of the gateway process: {gw_rss:.0f} MiB")
    print("peak RSS of the pipeline roles (MiB): " + ", ".join(
        f"{role} {v:.0f}" for role, v in m.rss.items() if role != "gateway"))
