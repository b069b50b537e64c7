"""`detectflow bench tensor`: what the preprocessed-tensor hop costs per image, per encoding of the tensor.

1. In process, over the sample images letterboxed to 416x416: bytes per image and CPU-ms to encode
   (preprocess: region -> value bytes, compression included) and to decode (inference: bytes -> padded
   model input) for the padded tensor (``raw``, what preprocess shipped before), the content region
   (``region``, what it ships now), and the region compressed with zlib level 1 in CHW and HWC order
   (and lz4 when the package is importable; it is not a dependency).
2. On the stack's broker (SASL_SSL, as every client): the same values produced (acks=all, idempotent)
   and consumed once, with the producer's compression lz4 (``DETECTFLOW_COMPRESSION``'s default) and
   none: bytes on the wire per image (librdkafka's ``txbytes``), client CPU-ms (this process: producer
   and consumer threads) and broker CPU-ms (its process CPU time; other users of the broker add noise,
   so passes alternate and the median counts).
Then CPU-ms per image end to end: encode + decode x fetches (inference and shadow each fetch the
record) + client + broker, against ``raw``.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka.admin import NewTopic

from config import StackSettings, StreamSettings
from imaging.decode import prepare
from imaging.letterbox import letterbox_region, place
from imaging.limits import ImageLimits
from infra.bench import service_pids
from infra.procstats import cpu_seconds
from model_store.tools.samples import ensure_samples
from stream.kafka import kafka_admin, kafka_connection, kafka_consumer, kafka_producer

SIZE = (416, 416)
PAD = 128
FETCHES = 2  # inference and the shadow role read every preprocessed record
Image = tuple[str, np.ndarray, tuple[int, int]]  # name, RGB CHW region, its (left, top) in the input


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[np.ndarray, tuple[int, int]], bytes]  # (RGB CHW region, (left, top)) -> value bytes
    decode: Callable[[bytes, tuple[int, int, int], tuple[int, int]], np.ndarray]  # -> padded CHW input


def _place(region: np.ndarray, at: tuple[int, int]) -> np.ndarray:
    return place(region, SIZE, PAD, at)


def codecs() -> list[Codec]:
    def chw(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        return np.frombuffer(data, np.uint8).reshape(shape)

    def hwc(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        return np.frombuffer(data, np.uint8).reshape(shape[1], shape[2], 3).transpose(2, 0, 1)

    out = [
        Codec("raw (padded)", lambda r, at: _place(r, at).tobytes(),
              lambda d, s, at: chw(d, (3, SIZE[1], SIZE[0]))),
        Codec("region", lambda r, at: r.tobytes(), lambda d, s, at: _place(chw(d, s), at)),
        Codec("region zlib-1 CHW", lambda r, at: zlib.compress(r.tobytes(), 1),
              lambda d, s, at: _place(chw(zlib.decompress(d), s), at)),
        Codec("region zlib-1 HWC", lambda r, at: zlib.compress(r.transpose(1, 2, 0).tobytes(), 1),
              lambda d, s, at: _place(hwc(zlib.decompress(d), s), at)),
    ]
    try:
        import lz4.block as lz4b  # type: ignore[import-not-found,import-untyped]  # optional, not a dependency
    except ImportError:
        return out
    out.append(Codec("region lz4 CHW", lambda r, at: lz4b.compress(r.tobytes(), store_size=False),
                     lambda d, s, at: _place(chw(lz4b.decompress(d, uncompressed_size=3 * s[1] * s[2]), s), at)))
    return out


def regions(stack: StackSettings) -> list[Image]:
    out = []
    for path in ensure_samples(stack.samples_dir, stack.cache_dir):
        region, _, at = letterbox_region(prepare(path.read_bytes(), ImageLimits()).image, SIZE)
        out.append((path.name, region, at))
    return out


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1000


def measure_codecs(images: list[Image], repeats: int = 15) -> dict[str, dict[str, float]]:
    figures = {}
    for codec in codecs():
        nbytes, enc, dec = [], [], []
        for _, region, at in images:
            data = codec.encode(region, at)
            shape = tuple(region.shape)
            want = _place(region, at)
            if not np.array_equal(codec.decode(data, shape, at), want):  # type: ignore[arg-type]
                raise RuntimeError(f"{codec.name} does not round-trip")
            nbytes.append(len(data))
            enc.append(_median_ms(lambda c=codec, r=region, a=at: c.encode(r, a), repeats))
            dec.append(_median_ms(lambda c=codec, d=data, s=shape, a=at: c.decode(d, s, a), repeats))
        figures[codec.name] = {"bytes": statistics.mean(nbytes), "encode_ms": statistics.mean(enc),
                               "decode_ms": statistics.mean(dec)}
    return figures


def _cpu_ms(pid: int) -> float:
    return cpu_seconds(pid) * 1000


def measure_broker(stack: StackSettings, values: dict[str, list[bytes]], passes: int = 4,
                   rounds: int = 3) -> dict[tuple[str, str], dict[str, float]]:
    """Per (codec, producer compression): wire bytes, client and broker CPU-ms per record (medians of passes)."""
    kafka = kafka_connection(StreamSettings.from_env(), "admin")  # SASL_SSL, as every client of the stack
    broker_pid = service_pids(stack).get("kafka")
    admin = kafka_admin(kafka)
    topic = f"bench-tensor-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                  config={"max.message.bytes": str(2 * 1024 * 1024)})])[topic].result(timeout=30)
    consumer = kafka_consumer(kafka, topic, offset_reset="earliest", extra={"fetch.max.bytes": 64 * 1024 * 1024})
    consumer.subscribe([topic])
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    try:
        for _ in range(passes):
            for compression in ("lz4", "none"):
                stats: list[dict[str, Any]] = []
                producer = kafka_producer(kafka, linger_ms=1, compression=compression, extra={
                    "message.max.bytes": 2 * 1024 * 1024, "statistics.interval.ms": 100,
                    "stats_cb": lambda s, into=stats: into.append(json.loads(s))})
                producer.produce(topic, b"warm-up")
                producer.flush(30)
                _consume(consumer, 1)
                for name, vals in values.items():
                    records = vals * rounds
                    time.sleep(0.25)
                    producer.poll(0)
                    tx0 = _txbytes(stats)
                    cpu0, broker0 = time.process_time(), _cpu_ms(broker_pid) if broker_pid else 0.0
                    for v in records:
                        producer.produce(topic, v)
                        producer.poll(0)
                    if producer.flush(60):
                        raise RuntimeError("produce not acknowledged within 60 s")
                    _consume(consumer, len(records))
                    cpu1, broker1 = time.process_time(), _cpu_ms(broker_pid) if broker_pid else float("nan")
                    time.sleep(0.25)
                    producer.poll(0)
                    s = samples.setdefault((name, compression), {"wire": [], "client": [], "broker": []})
                    s["wire"].append((_txbytes(stats) - tx0) / len(records))
                    s["client"].append((cpu1 - cpu0) * 1000 / len(records))
                    s["broker"].append((broker1 - broker0) / len(records))
                producer.flush(10)
    finally:
        consumer.close()
        admin.delete_topics([topic])
    return {k: {m: statistics.median(v) for m, v in s.items()} for k, s in samples.items()}


def _txbytes(stats: list[dict[str, Any]]) -> float:
    if not stats:
        return 0.0
    return float(sum(b.get("txbytes", 0) for b in stats[-1].get("brokers", {}).values()))


def _consume(consumer: Any, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    got = 0
    while got < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumed {got} of {n} records within {timeout_s:.0f} s")
        for msg in consumer.consume(num_messages=n - got, timeout=1.0):
            if msg.error() is None:
                got += 1


def run_bench_tensor(stack: StackSettings, *, broker: bool = True) -> int:
    images = regions(stack)
    print(f"detectflow bench tensor: {len(images)} sample images letterboxed to {SIZE[0]}x{SIZE[1]}, "
          f"CPU-ms = process time, median of repeats, mean over images")
    figures = measure_codecs(images)
    raw = figures["raw (padded)"]
    print(f"{'encoding':<20} {'bytes/img':>10} {'x raw':>6} {'encode ms':>10} {'decode ms':>10}")
    for name, f in figures.items():
        print(f"{name:<20} {f['bytes']:>10.0f} {f['bytes'] / raw['bytes']:>6.2f} {f['encode_ms']:>10.2f} "
              f"{f['decode_ms']:>10.2f}")
    if not broker:
        return 0
    chosen = ["raw (padded)", "region", "region zlib-1 CHW"]
    values = {c.name: [c.encode(r, at) for _, r, at in images] for c in codecs() if c.name in chosen}
    hop = measure_broker(stack, values)
    print(f"\nbroker hop (produce acks=all + one fetch, SASL_SSL), {len(images) * 3} records per pass, medians; "
          f"end to end = encode + {FETCHES} x decode + client + broker (+ one more fetch not measured)")
    print(f"{'encoding':<20} {'producer':>8} {'wire B/img':>11} {'client ms':>10} {'broker ms':>10} "
          f"{'end to end ms':>14} {'vs raw':>7}")
    base = {}
    for compression in ("lz4", "none"):
        for name in chosen:
            h, f = hop[(name, compression)], figures[name]
            total = f["encode_ms"] + FETCHES * f["decode_ms"] + h["client"] + h["broker"]
            base.setdefault(compression, total)
            print(f"{name:<20} {compression:>8} {h['wire']:>11.0f} {h['client']:>10.2f} {h['broker']:>10.2f} "
                  f"{total:>14.2f} {total - base[compression]:>+7.2f}")
    return 0
