"""The HTTPS gateway as its own process (beside a pipeline, or alone on a prefix), and calls to it."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests
from confluent_kafka import TopicPartition
from pipeline_kit import Pipeline, start_pipeline
from stream_kit import kafka_admin

from config import StackSettings
from gateway.devkeys import DevKeys, ensure_dev_keys, mint
from infra.roles import SERVICES
from stream.kafka import kafka_consumer, kafka_producer
from stream.topics import lane_topic

# Test gateways: dev auth mode (the tests mint dev tokens), generous limits (tests of the limits start their
# own gateway), long sync deadlines.
GATEWAY_ENV = {"DETECTFLOW_AUTH_DEV": "true", "DETECTFLOW_RATE_PER_S": "100000", "DETECTFLOW_RATE_BURST": "100000",
               "DETECTFLOW_SYNC_TIMEOUT_MAX_S": "180", "DETECTFLOW_SYNC_TIMEOUT_S": "60",
               "DETECTFLOW_MAX_INFLIGHT": "512", "DETECTFLOW_MAX_ONLINE_LAG": "100000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    url: str
    keys: DevKeys
    # The project CA: the gateway's HTTPS certificate and MinIO's (pre-signed URLs) are verified against it.
    ca_file: Path
    pipeline: Pipeline | None = None

    @property
    def verify(self) -> str:
        """``requests``' verify= for this gateway and its pre-signed URLs."""
        return str(self.ca_file)

    @property
    def tls(self) -> ssl.SSLContext:
        """The client context (aiohttp's ssl=) for this gateway and its pre-signed URLs."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def token(self, tenant: str, scopes: Iterable[str] = ("detect:write", "results:read"), **kwargs: Any) -> str:
        return mint(self.keys, tenant=tenant, scopes=list(scopes), **kwargs)

    def auth(self, tenant: str, scopes: Iterable[str] = ("detect:write", "results:read"),
             **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(tenant, scopes, **kwargs)}"}

    def call(self, method: str, path: str, tenant: str | None = None, *, headers: Mapping[str, str] | None = None,
             timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        hdrs = {**(self.auth(tenant) if tenant else {}), **(headers or {})}
        return requests.request(method, self.url + path, headers=hdrs, timeout=timeout,
                                **{"verify": self.verify, **kwargs})

    def detect(self, tenant: str, data: bytes, *, params: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None, content_type: str = "image/jpeg") -> requests.Response:
        return self.call("POST", "/v1/detect", tenant, params=params, data=data,
                         headers={"Content-Type": content_type, **(headers or {})})


def wait_ready(url: str, ca_file: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(url + "/readyz", timeout=3, verify=str(ca_file))
            if last.status_code == 200:
                return
        except requests.ConnectionError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"gateway at {url} not ready: {last}")


def start_stack_with_gateway(stack: StackSettings, prefix: str, log_dir: Path,
                             extra_env: Mapping[str, str] | None = None,
                             roles: Iterable[str] = SERVICES) -> Iterator[Gateway]:
    """The pipeline roles (or only the gateway, with roles=("gateway",)) on ``prefix``; yields the gateway."""
    port = free_port()
    env = {**GATEWAY_ENV, **(extra_env or {}), "DETECTFLOW_GATEWAY_PORT": str(port)}
    keys = ensure_dev_keys(stack.secrets_dir)
    running = start_pipeline(stack, prefix, log_dir, roles=tuple(roles), extra_env=env)
    pipeline = next(running)
    try:
        url = f"https://127.0.0.1:{port}"
        wait_ready(url, stack.tls_ca_file)
        yield Gateway(url, keys, stack.tls_ca_file, pipeline)
    finally:
        running.close()  # stops the processes, deletes the prefix's topics


def variants(data: bytes, n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs of the same picture (one pixel differs), so no two share a cache entry."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    out = []
    for i in range(n):
        copy = image.copy()
        copy[(i + seed) // image.shape[1] % image.shape[0], (i + seed) % image.shape[1]] = (i * 37 % 256, 0, 255)
        ok, buf = cv2.imencode(".jpg", copy, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    assert len({hashlib.sha256(b).digest() for b in out}) == n
    return out


def online_backlog(stack: StackSettings, prefix: str, records: int) -> None:
    """``records`` records on the prefix's online `submitted` topic (partition 0) that the scan stage's group has
    not read: its committed offset is set to 0, so the gateway sees them all as online lag."""
    topic = lane_topic(prefix, "online", "submitted")
    producer = kafka_producer(kafka_admin(stack), linger_ms=0)
    for i in range(records):
        producer.produce(topic, key=str(i), value=b"backlog", partition=0)
    assert producer.flush(10) == 0
    consumer = kafka_consumer(kafka_admin(stack), f"{prefix}detectflow.scan")
    consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
    consumer.close()
