"""`detectflow bench pipeline`: the real pipeline against a same-run, single-process baseline.

1. Start every role (supervised processes, as `detectflow run all`) on a fresh topic prefix.
2. Baseline, measured while the pipeline idles: one process looping decode -> letterbox -> ONNX
   Runtime (batch 1) -> decode -> NMS over the same images: ms per image and images per second.
3. Online lane: requests one at a time (each waits for its reply): end-to-end P50/P95/P99.
4. Batch lane: every image submitted at once, results awaited: throughput, P50/P95/P99 and the mean
   inference batch size (from the inference role's metrics).
Then the ratios against the targets, time per stage, each role's peak resident memory, and for the batch
lane the CPU-ms per image of every process, the tax (that CPU minus the model's forward pass and the image
decode, measured here at batch 1: infra/bench_cost.py) and what the tax would cost beside a GPU.
Every request has its own tenant, so the result cache never answers (each image runs the model), and its
own bytes (a unique JPEG comment), so clamd never answers from its cache of verdicts either.
``--int8``: the pipeline serves the static INT8 version of the default model, and the baseline and the model
cost load it too (infra/bench_model.py); the header names the model measured.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import statistics
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from config import PipelineSettings, StackSettings
from infra.procstats import peak_rss_mib
from infra.stack import manager
from infra.stack.kafka_access import deprovision, provision
from model_store.serving.boxes import nms
from stream.kafka import kafka_connection


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def free_port_block(n: int) -> int:
    """A base port with n free ports after it (best effort: checked, then used at once)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports for the roles' metrics")


def scrape(port: int, tls: ssl.SSLContext | None = None) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (enough for sums and counts); over HTTPS with ``tls`` (the
    gateway's /metrics), plain HTTP otherwise (the roles' metrics servers, on loopback)."""
    scheme = "https" if tls is not None else "http"
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/metrics", timeout=5, context=tls) as resp:  # noqa: S310 - loopback URL we built
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in metrics.items():
        m = re.fullmatch(rf"{name}(\{{.*\}})?", key)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += value
    return total


def service_pids(stack: StackSettings) -> dict[str, int]:
    return {h.name: h.pid for h in manager.status(stack) if h.running and h.pid}


def baseline(images: list[bytes], model_dir: Path, repeats: int, threads: int = 0) -> dict[str, float]:
    """ms per image and images per second of one process looping over ``images``; ``threads``: ONNX Runtime's
    intra-op threads, as the inference role's session (settings.intra_op_threads; 0: its default)."""
    # The model's stack (ONNX Runtime, OpenCV) loads when a bench runs: cli.py imports this module for its parser.
    from imaging.decode import decode, prepare
    from imaging.letterbox import letterbox, to_model_input
    from imaging.limits import ImageLimits
    from model_store.serving.detector import Detector
    from model_store.serving.session import SessionSettings

    det = Detector.from_model_dir(model_dir, SessionSettings(intra_op_threads=threads), conf_threshold=0.25,
                                  iou_threshold=0.45, max_detections=100)
    spec = det.config.input

    def one(data: bytes) -> None:
        img = prepare(data, ImageLimits()).image
        tensor, _, _ = letterbox(img, (spec.width, spec.height), spec.pad_value)
        out = det.infer(to_model_input([tensor], spec.scale))
        nms(decode(out, det.config, 0.25)[0], 0.45, 100)

    one(images[0])
    times = []
    t_all = time.perf_counter()
    for _ in range(repeats):
        for data in images:
            t0 = time.perf_counter()
            one(data)
            times.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - t_all
    return {"ms_mean": statistics.fmean(times), "ms_p50": percentile(times, 50), "img_s": len(times) / wall}


def run_bench(stack: StackSettings, *, n_batch: int, n_online: int, baseline_repeats: int, int8: bool = False) -> int:
    """``int8``: the pipeline, the baseline and the model cost all use the static INT8 version of the default model
    (infra/bench_model.py)."""
    # The pipeline's runtime (clients, roles, the model) loads when the bench runs: cli.py imports this module for
    # its parser, and `detectflow --help` stays fast.
    from infra.bench_bodies import distinct_bodies, reencode_jpeg
    from infra.bench_cost import (
        BENCH_CLIENT,
        cpu_ms_per_image,
        cpu_snapshot,
        format_cpu,
        format_projection,
        format_tax,
        measure_model_cost,
        tax_of,
    )
    from infra.bench_model import describe, format_runs, label, runs_by_version, serve
    from infra.detect_cmd import make_client
    from infra.roles import ROLES
    from infra.supervisor import Supervisor
    from model_store.tools.convert import convert
    from model_store.tools.samples import ensure_samples

    run_id = uuid.uuid4().hex[:6]
    prefix = f"bench{run_id}."
    base_port = free_port_block(len(ROLES))
    env = {**os.environ, "DETECTFLOW_TOPIC_PREFIX": prefix, "DETECTFLOW_METRICS_PORT": str(base_port)}
    settings = PipelineSettings.from_env(env)
    settings = settings.replace(stream=settings.stream.replace(topic_prefix=prefix))
    convert(settings.models_dir / settings.default_model / "1")
    paths = ensure_samples(stack.samples_dir, stack.cache_dir)
    datas = [reencode_jpeg(p.read_bytes()) for p in paths]
    # Every request its own bytes, made before any timing: clamd caches the verdicts of identical bytes.
    bodies = iter(distinct_bodies(datas, 3 + n_online + n_batch, run_id))
    threads = settings.intra_op_threads
    provision(kafka_connection(settings.stream), prefix)
    try:
        served = serve(settings, stack, int8=int8)  # production on the bench's prefix
    except BaseException:
        deprovision(kafka_connection(settings.stream), prefix)
        raise
    model_dir = served.model_dir
    env["DETECTFLOW_DEFAULT_MODEL"] = served.name  # what the roles serve by default
    sup = Supervisor(ROLES, stack.log_dir, env=env, metrics_base_port=base_port)
    ports = {role: base_port + i for i, role in enumerate(ROLES)}
    sup.start_monitor()
    try:
        with make_client(settings, "bench") as client:
            # Warm-up: every role up, schemas registered, the model warm.
            for _ in range(3):
                r = _detect(client, next(bodies), "online", 180, served.name)
                if r["status"] != "OK":
                    raise RuntimeError(f"warm-up failed: {r.get('error_code')} {r.get('error_message')}")
            bases = [baseline(datas, model_dir, baseline_repeats, threads)]
            cost = measure_model_cost(datas, model_dir, threads, baseline_repeats)  # the pipeline idles

            online = []
            stage_ms: dict[str, list[float]] = {}
            for _ in range(n_online):
                t0 = time.perf_counter()
                r = _detect(client, next(bodies), "online", 60, served.name)
                online.append((time.perf_counter() - t0) * 1000)
                if r["status"] == "OK":
                    for k, v in r["timings_ms"].items():
                        stage_ms.setdefault(k, []).append(v)

            before = scrape(ports["inference"])
            cpu_pids = {**sup.pids(), **service_pids(stack), BENCH_CLIENT: os.getpid()}
            cpu0 = cpu_snapshot(cpu_pids)
            t0 = time.perf_counter()
            subs, arrived = [], {}
            for i in range(n_batch):
                client.tenant = f"bench-{uuid.uuid4().hex[:12]}"
                t_sub = time.perf_counter()
                sub = client.submit(next(bodies), lane="batch", timeout_s=600, model=served.name)
                # Latency is taken when the reply lands (the router's thread), not when we get to it.
                sub.future.add_done_callback(lambda _f, i=i: arrived.__setitem__(i, time.perf_counter()))
                subs.append((t_sub, sub))
            client.flush()
            statuses = [client.wait(sub)["status"] for _, sub in subs]
            wall = max(arrived.values()) - t0
            batch_lat = [(arrived[i] - t_sub) * 1000 for i, (t_sub, _) in enumerate(subs)]
            cpu = cpu_ms_per_image(cpu0, cpu_snapshot(cpu_pids), statuses.count("OK"))
            client_ms = cpu.pop(BENCH_CLIENT)
            after = scrape(ports["inference"])
            # Again once the pipeline is idle: this host's speed drifts (a shared vCPU, the stack's
            # own background work after start), so the baseline is the better of two passes.
            bases.append(baseline(datas, model_dir, baseline_repeats, threads))
        rss = {role: peak_rss_mib(pid) for role, pid in sup.pids().items()}
    finally:
        sup.stop()
        deprovision(kafka_connection(settings.stream), prefix)

    n_runs = metric_sum(after, "detectflow_inference_batch_size_count") - metric_sum(
        before, "detectflow_inference_batch_size_count")
    n_imgs = metric_sum(after, "detectflow_inference_batch_size_sum") - metric_sum(
        before, "detectflow_inference_batch_size_sum")
    thr = n_batch / wall
    print(f"detectflow bench pipeline: {len(datas)} sample images (as JPEG), every request's bytes distinct; "
          f"batch N={n_batch}, online N={n_online}; model {label(served)}")
    print(describe(served, prefix))
    print(f"\nbaseline (one process: decode -> letterbox -> ORT batch 1 -> decode -> NMS, x{baseline_repeats}; "
          f"before the online lane and after the batch lane, the better pass counts):")
    for when, b in zip(("before", "after"), bases, strict=True):
        print(f"  {when}: {b['ms_mean']:.1f} ms/img mean, P50 {b['ms_p50']:.1f} ms, {b['img_s']:.2f} img/s")
    base = {"ms_p50": min(b["ms_p50"] for b in bases), "img_s": max(b["img_s"] for b in bases)}
    print("\nonline lane (one request at a time, client round trip):")
    print(f"  P50 {percentile(online, 50):.1f} ms  P95 {percentile(online, 95):.1f} ms  "
          f"P99 {percentile(online, 99):.1f} ms")
    print("  time per stage (mean ms): " + ", ".join(
        f"{k} {statistics.fmean(v):.1f}" for k, v in stage_ms.items() if k != "inference_batch"))
    print("\nbatch lane (all submitted at once):")
    print(f"  {thr:.2f} img/s over {wall:.1f}s; end-to-end P50 {percentile(batch_lat, 50):.0f} ms  "
          f"P95 {percentile(batch_lat, 95):.0f} ms  P99 {percentile(batch_lat, 99):.0f} ms; "
          f"{statuses.count('OK')}/{n_batch} OK")
    print(f"  CPU ms per image, by process: {format_cpu(cpu)}  (total {sum(cpu.values()):.0f}; the cores give "
          f"{2000 / thr if thr else 0:.0f} ms per image; the bench client {client_ms:.1f}, not counted)")
    tax = tax_of(cpu, cost)
    print(f"  model {cost.model_ms:.1f} and decode {cost.decode_ms:.1f} CPU-ms/img, measured in this process at "
          f"batch 1 ({cost.images} images, process CPU time, the pipeline idle); the model taken off inference, "
          f"the decode off preprocess")
    print(f"  {format_tax(tax)}")
    print(f"  {format_projection(tax.tax_ms)}")
    print(f"  mean inference batch size {n_imgs / n_runs if n_runs else float('nan'):.2f} over {n_runs:.0f} model runs")
    print(f"  {format_runs(runs_by_version(before, after), served)}")
    print("\nratios and targets:")
    ratio = thr / base["img_s"]
    over = percentile(online, 50) - base["ms_p50"]
    print(f"  batch throughput / baseline  = {ratio:.2f}x   (target >= 0.95x: {'met' if ratio >= 0.95 else 'MISSED'})")
    print(f"  online P50 - baseline P50    = {over:+.1f} ms (target <= +25 ms: {'met' if over <= 25 else 'MISSED'})")
    print(f"  batch lane tax               = {tax.tax_ms:.0f} CPU-ms/img (target <= 25: "
          f"{'met' if tax.tax_ms <= 25 else 'MISSED'})")
    worst = max(rss.values()) if rss else float("nan")
    print("  peak RSS per role (MiB): " + ", ".join(f"{r} {v:.0f}" for r, v in rss.items())
          + f"   (target each <= 400: {'met' if worst <= 400 else 'MISSED'})")
    return 0 if statuses.count("OK") == n_batch else 1


def _detect(client: Any, data: bytes, lane: str, timeout_s: float, model: str) -> dict[str, Any]:
    client.tenant = f"bench-{uuid.uuid4().hex[:12]}"  # a fresh tenant: never a cache hit
    # The client names its model (it does not read the roles' default): the one the bench serves.
    return client.wait(client.submit(data, lane=lane, timeout_s=timeout_s, model=model))

