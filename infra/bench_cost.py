"""What an image costs, for the benches: CPU-ms per process, the pipeline tax, bytes per hop, a GPU projection.

The tax is the CPU an image costs beyond the work any server must do for it: every role's and service's
CPU per answered image, minus the model's forward pass and the image decode, both measured in the
bench's own process at batch 1 (``measure_model_cost``). The inference role is charged the model's
share and preprocess the decode's; a plain one-process server is charged both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from imaging.decode import prepare
from imaging.letterbox import letterbox, to_model_input
from imaging.limits import ImageLimits
from infra.procstats import cpu_seconds
from model_store.serving.detector import Detector
from model_store.serving.session import SessionSettings
from stream.kafka import kafka_consumer

# The model's time per image on a GPU, for the projection: replace with a figure measured on a device
# (e.g. `python -m model_store.tools.detect --bench` on a TensorRT host) when there is one.
GPU_MODEL_MS_PER_IMG = 0.40
GPU_MODEL_SOURCE = ("ONNX Runtime 1.31 CUDA provider, FP32, numpy in/out, batch 8, on an NVIDIA H200: the service as "
                    "written (measured 2026-11-30, docs/bench_gpu/)")
# The model alone, tuned: FP16, CUDA graph, IO binding, batch 32-64 on the same H200 (measured, same run).
GPU_TUNED_MS_PER_IMG = 0.09
# What a core costs, for the projection: on-demand list price of a general-purpose cloud vCPU.
USD_PER_CORE_HOUR = 0.045
USD_PER_CORE_HOUR_SOURCE = "on-demand general-purpose cloud vCPU list price, approx."

MODEL_ROLE = "inference"  # the role charged with the model's forward pass
DECODE_ROLE = "preprocess"  # the role charged with the image decode
BENCH_CLIENT = "bench client"


# ---------------------------------------------------------------------------------------------- CPU


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_ms_per_image(before: Mapping[str, float], after: Mapping[str, float], images: int) -> dict[str, float]:
    """CPU-ms per image of each process between two snapshots (NaN per process when no image was answered)."""
    return {name: ((after.get(name, 0.0) - cpu0) * 1000 / images if images else float("nan"))
            for name, cpu0 in before.items()}


@dataclass(frozen=True)
class ModelCost:
    """CPU-ms per image of the image decode (prepare()) and of the model's forward pass at batch 1."""

    decode_ms: float
    model_ms: float
    images: int


def measure_model_cost(bodies: Sequence[bytes], model_dir: Path, threads: int, repeats: int = 1) -> ModelCost:
    """Process CPU time (every thread: ONNX Runtime's intra-op pool works on its own threads) of prepare() and of
    session.run at batch 1 over ``bodies``, with the inference role's session settings. Run it while the
    pipeline idles; the process's other threads (an idle client) add a little noise."""
    det = Detector.from_model_dir(model_dir, SessionSettings(intra_op_threads=threads))
    spec = det.config.input
    limits = ImageLimits()

    def tensor_of(data: bytes) -> Any:
        return to_model_input([letterbox(prepare(data, limits).image, (spec.width, spec.height), spec.pad_value)[0]],
                              spec.scale)

    det.infer_all(tensor_of(bodies[0]))  # the first run plans and allocates
    decode_s = model_s = 0.0
    n = 0
    for _ in range(repeats):
        for data in bodies:
            c0 = time.process_time()
            image = prepare(data, limits).image
            decode_s += time.process_time() - c0
            tensor = to_model_input([letterbox(image, (spec.width, spec.height), spec.pad_value)[0]], spec.scale)
            c1 = time.process_time()
            det.infer_all(tensor)
            model_s += time.process_time() - c1
            n += 1
    return ModelCost(decode_ms=decode_s * 1000 / n, model_ms=model_s * 1000 / n, images=n)


# ---------------------------------------------------------------------------------------------- tax


@dataclass(frozen=True)
class Tax:
    """CPU-ms per image: the total over the processes, the measured model and decode, and what is left of
    each process once its share of the model and decode is taken off (``shares``)."""

    total_ms: float
    model_ms: float
    decode_ms: float
    shares: dict[str, float]

    @property
    def tax_ms(self) -> float:
        return self.total_ms - self.model_ms - self.decode_ms


def tax_of(cpu_ms: Mapping[str, float], cost: ModelCost, *, model_in: str = MODEL_ROLE,
           decode_in: str = DECODE_ROLE) -> Tax:
    """The tax of one interval's CPU per image, the model charged to ``model_in`` and the decode to
    ``decode_in`` (the same process for a one-process server)."""
    for name in (model_in, decode_in):
        if name not in cpu_ms:
            raise ValueError(f"no CPU figure for {name!r}, the process charged with the model or the decode")
    shares = dict(cpu_ms)
    shares[model_in] -= cost.model_ms
    shares[decode_in] -= cost.decode_ms
    return Tax(total_ms=sum(cpu_ms.values()), model_ms=cost.model_ms, decode_ms=cost.decode_ms, shares=shares)


def format_cpu(cpu_ms: Mapping[str, float]) -> str:
    """'inference 95.1, kafka 42.0, ...' largest first."""
    return ", ".join(f"{name} {v:.1f}" for name, v in sorted(cpu_ms.items(), key=lambda kv: -kv[1]))


def format_tax(tax: Tax) -> str:
    """'tax 182 CPU-ms/img = total 326 - model 139 - decode 5: kafka 42, cassandra 39, ...' (shares largest first)."""
    parts = ", ".join(f"{name} {v:.0f}" for name, v in sorted(tax.shares.items(), key=lambda kv: -kv[1]))
    return (f"tax {tax.tax_ms:.0f} CPU-ms/img = total {tax.total_ms:.0f} - model {tax.model_ms:.0f} "
            f"- decode {tax.decode_ms:.0f}: {parts}")


# ---------------------------------------------------------------------------------------------- GPU projection


@dataclass(frozen=True)
class Projection:
    cores_per_gpu: float  # CPU cores the tax needs to keep one GPU's model busy
    usd_per_gpu_hour: float  # those cores' cost per hour
    usd_per_million: float  # the tax's CPU cost per million images


def project(tax_ms: float, gpu_ms: float = GPU_MODEL_MS_PER_IMG,
            usd_per_core_hour: float = USD_PER_CORE_HOUR) -> Projection:
    if gpu_ms <= 0:
        raise ValueError("the GPU's model time per image must be positive")
    cores = tax_ms / gpu_ms
    return Projection(cores_per_gpu=cores, usd_per_gpu_hour=cores * usd_per_core_hour,
                      usd_per_million=tax_ms * 1e6 / 3.6e6 * usd_per_core_hour)


def format_projection(tax_ms: float, gpu_ms: float = GPU_MODEL_MS_PER_IMG, source: str = GPU_MODEL_SOURCE,
                      usd_per_core_hour: float = USD_PER_CORE_HOUR) -> str:
    p = project(tax_ms, gpu_ms, usd_per_core_hour)
    return (f"GPU projection: model {gpu_ms:.2f} ms/img on a GPU [{source}]; a tax of {tax_ms:.0f} CPU-ms/img needs "
            f"{p.cores_per_gpu:.0f} CPU cores to keep one GPU busy = ${p.usd_per_gpu_hour:.2f}/h of cores "
            f"(${p.usd_per_million:.2f} per million images) at ${usd_per_core_hour}/core-hour "
            f"[{USD_PER_CORE_HOUR_SOURCE}]; with the model tuned for the GPU ({GPU_TUNED_MS_PER_IMG} ms/img: FP16, "
            f"CUDA graph, IO binding, batch 32-64) {project(tax_ms, GPU_TUNED_MS_PER_IMG).cores_per_gpu:.0f} cores")


# ---------------------------------------------------------------------------------------------- bytes per hop

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> high watermark


def attribute(offset: int, intervals: Sequence[tuple[Offsets, Offsets]], tp: tuple[str, int]) -> int | None:
    """The index of the interval whose [before, after) offsets on ``tp`` hold ``offset``, or None."""
    for i, (before, after) in enumerate(intervals):
        if before.get(tp, 0) <= offset < after.get(tp, 0):
            return i
    return None


def per_image(tally: Mapping[str, tuple[int, int]], images: int, prefix: str = "") -> dict[str, tuple[float, float]]:
    """{topic: (records, bytes)} -> {topic without prefix: (records per image, bytes per image)}."""
    if not images:
        return {}
    return {topic.removeprefix(prefix): (n / images, b / images) for topic, (n, b) in sorted(tally.items()) if n}


def format_hops(hops: Mapping[str, tuple[float, float]]) -> str:
    total = sum(b for _, b in hops.values())
    return (", ".join(f"{topic} {n:.2f} rec {b / 1024:.0f} KiB" for topic, (n, b) in hops.items())
            + f"  (total {total / 1024:.0f} KiB/img written)")


class HopMeter:
    """Records and bytes written to a topic prefix's topics per interval: the high watermarks before and after
    each interval, then (``tally``) the records in between read back with a throwaway consumer (no group
    join, no commits; read_uncommitted, so aborted records count: the broker stored them too)."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str) -> None:
        self.prefix = prefix
        self._consumer = kafka_consumer(kafka, f"bench-hops-{uuid.uuid4().hex[:8]}", isolation="read_uncommitted",
                                        extra={"enable.partition.eof": True})
        meta = self._consumer.list_topics(timeout=30)
        self.partitions = [(t, p) for t, tm in meta.topics.items() if t.startswith(prefix) for p in tm.partitions]

    def offsets(self) -> Offsets:
        return {tp: self._consumer.get_watermark_offsets(TopicPartition(*tp), timeout=10, cached=False)[1]
                for tp in self.partitions}

    def tally(self, intervals: Sequence[tuple[Offsets, Offsets]], deadline_s: float = 120.0
              ) -> list[dict[str, tuple[int, int]]]:
        """Per interval, {topic: (records, bytes of key + value)}."""
        out: list[dict[str, tuple[int, int]]] = [{} for _ in intervals]
        spans = {tp: (min(b.get(tp, 0) for b, _ in intervals), max(a.get(tp, 0) for _, a in intervals))
                 for tp in self.partitions}
        todo = {tp for tp, (lo, hi) in spans.items() if hi > lo}
        if not todo:
            return out
        self._consumer.assign([TopicPartition(t, p, spans[(t, p)][0]) for t, p in todo])
        deadline = time.monotonic() + deadline_s
        while todo and time.monotonic() < deadline:
            for msg in self._consumer.consume(num_messages=500, timeout=1.0):
                tp = (msg.topic(), msg.partition())
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        todo.discard(tp)
                    continue
                i = attribute(msg.offset(), intervals, tp)
                if i is not None:
                    n, size = out[i].get(tp[0], (0, 0))
                    out[i][tp[0]] = (n + 1, size + len(msg.value() or b"") + len(msg.key() or b""))
                if msg.offset() >= spans[tp][1] - 1:
                    todo.discard(tp)
        return out

    def close(self) -> None:
        self._consumer.close()
