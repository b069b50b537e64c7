"""The HTTPS gateway as its own process (beside a pipeline, or alone on a prefix), and calls to it."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pipeline_kit import Pipeline, start_pipeline

from config import StackSettings
from gateway.devkeys import DevKeys, ensure_dev_keys, mint
from infra.roles import SERVICES

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
