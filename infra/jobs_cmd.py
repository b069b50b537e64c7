"""`detectflow jobs submit DIR|FILES [--wait]`: bulk detection through the HTTP API.

Asks the gateway for pre-signed PUT URLs, uploads the files straight to MinIO (several at a time),
creates one job naming the uploads, and with --wait follows its progress and pages its results. Every call
rides out an overloaded or restarting gateway until the command's deadline (infra/http_retry.py); the job is
created under one Idempotency-Key, so a retried creation never makes a second job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

from config import StackSettings
from infra.http_retry import (
    DEFAULT_POLICY,
    RETRY_STATUSES,
    RefusedError,
    RetryPolicy,
    call_with_retries,
    is_idempotent,
)

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                  ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def image_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(p)
    return out


def progress_bar(done: int, total: int, width: int = 30, label: str = "") -> str:
    filled = int(width * done / total) if total else width
    return f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


class JobsClient:
    """A small client of the gateway's batch API (what the CLI and the integration tests use).

    Each call is retried through 429/503 answers (and, when idempotent, transport errors) for at most
    ``retry_s``, and never past ``deadline`` (a time.monotonic() time; None: no overall deadline)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str, *, timeout_s: float = 60.0,
                 retry_s: float = 300.0, deadline: float | None = None, policy: RetryPolicy = DEFAULT_POLICY):
        self.session = session
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.deadline = deadline
        self.policy = policy

    def _deadline(self, deadline: float | None = None) -> float:
        candidates = [time.monotonic() + self.retry_s, *(d for d in (self.deadline, deadline) if d is not None)]
        return min(candidates)

    def _attempt_timeout(self, deadline: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=max(0.1, min(self.timeout_s, deadline - time.monotonic())))

    async def call(self, method: str, path: str, *, json_body: Any = None, headers: dict[str, str] | None = None,
                   deadline: float | None = None) -> Any:
        """One logical call: its JSON body, or ApiError for a refusal that is not retried."""
        all_headers = {**self.headers, **(headers or {})}
        end = self._deadline(deadline)

        async def attempt() -> Any:
            async with self.session.request(method, self.base + path, json=json_body, headers=all_headers,
                                            timeout=self._attempt_timeout(end)) as resp:
                body = await resp.json(content_type=None)
                if resp.status in RETRY_STATUSES:
                    raise RefusedError(resp.status, body, resp.headers.get("Retry-After"))
                if resp.status >= 400:
                    raise ApiError(resp.status, body)
                return body

        return await call_with_retries(attempt, what=f"{method} {path}", deadline=end, policy=self.policy,
                                       idempotent=is_idempotent(method, all_headers))

    async def upload(self, files: list[tuple[bytes, str]], *, concurrency: int = 8,
                     on_progress: Any = None) -> list[str]:
        """Upload (bytes, content type) pairs through pre-signed PUTs; returns their upload ids, in order."""
        ids: list[str] = []
        sem = asyncio.Semaphore(concurrency)
        uploaded = 0

        async def put(u: dict[str, Any], data: bytes) -> None:
            nonlocal uploaded
            end = self._deadline()

            async def attempt() -> None:
                async with self.session.put(u["url"], data=data, headers=u["headers"],
                                            timeout=self._attempt_timeout(end)) as resp:
                    if resp.status in RETRY_STATUSES:  # MinIO's SlowDown is a 503
                        raise RefusedError(resp.status, (await resp.text())[:300], resp.headers.get("Retry-After"))
                    if resp.status != 200:
                        raise ApiError(resp.status, (await resp.text())[:300])

            async with sem:  # a PUT of the same bytes to the same URL: idempotent
                await call_with_retries(attempt, what="PUT upload", deadline=end, idempotent=True,
                                        policy=self.policy)
            uploaded += 1
            if on_progress is not None:
                on_progress(uploaded, len(files))

        for start in range(0, len(files), 1000):
            chunk = files[start:start + 1000]
            grant = await self.call("POST", "/v1/uploads", json_body={
                "files": [{"content_type": ct, "content_length": len(data)} for data, ct in chunk]})
            ids += [u["upload_id"] for u in grant["uploads"]]
            await asyncio.gather(*(put(u, data) for u, (data, _ct) in zip(grant["uploads"], chunk, strict=True)))
        return ids

    async def submit_job(self, upload_ids: list[str], params: dict[str, Any] | None = None,
                         idempotency_key: str | None = None) -> dict[str, Any]:
        """Create one job; every attempt carries the same Idempotency-Key (a fresh one unless given), so the
        gateway answers a retry with the job the first attempt made."""
        return await self.call("POST", "/v1/jobs", json_body={
            "items": [{"upload_id": u} for u in upload_ids], "params": params or {}},
            headers={"Idempotency-Key": idempotency_key or str(uuid.uuid4())})

    async def wait_job(self, job_id: str, deadline_s: float, on_progress: Any = None) -> dict[str, Any]:
        end = time.monotonic() + deadline_s
        while True:
            status = await self.call("GET", f"/v1/jobs/{job_id}", deadline=end)
            if on_progress is not None:
                on_progress(status["done"], status["total"])
            if status["status"] == "COMPLETED":
                return status
            if time.monotonic() >= end:
                raise TimeoutError(f"job {job_id} not complete after {deadline_s:.0f}s: {status['done']}/"
                                   f"{status['total']}")
            await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))

    async def results(self, job_id: str, page_size: int = 500) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = None
        while True:
            q = f"?page_size={page_size}" + (f"&page_token={token}" if token else "")
            page = await self.call("GET", f"/v1/jobs/{job_id}/results{q}")
            items += page["items"]
            token = page["next_page_token"]
            if not token:
                return items


def _print_progress(label: str) -> Any:
    def show(done: int, total: int) -> None:
        print(progress_bar(done, total, label=label), end="", file=sys.stderr, flush=True)
    return show


def client_tls(ca_file: Path | None) -> ssl.SSLContext:
    """The context the CLI's HTTPS calls (the gateway, MinIO's pre-signed URLs) verify with: the system's trust
    store plus the project CA (DETECTFLOW_TLS_CA_FILE), hostnames checked."""
    context = ssl.create_default_context()
    if ca_file is not None and ca_file.is_file():
        context.load_verify_locations(cafile=str(ca_file))
    return context


async def _submit(args: argparse.Namespace, token: str, tls: ssl.SSLContext) -> int:
    files = image_files(args.paths)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    payload = [(f.read_bytes(), IMAGE_SUFFIXES.get(f.suffix.lower(), "image/jpeg")) for f in files]
    params = {"score_threshold": args.score} if args.score is not None else {}
    deadline = time.monotonic() + args.timeout
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        client = JobsClient(session, args.url, token, retry_s=args.timeout, deadline=deadline)
        ids = await client.upload(payload, on_progress=_print_progress("upload"))
        print(file=sys.stderr)
        job = await client.submit_job(ids, params)
        print(f"job {job['job_id']}: {job['total']} images", file=sys.stderr)
        if not args.wait:
            print(job["job_id"])
            return 0
        status = await client.wait_job(job["job_id"], max(0.0, deadline - time.monotonic()),
                                       on_progress=_print_progress("detect"))
        print(file=sys.stderr)
        results = await client.results(job["job_id"])
    by_request = {rid: f for rid, f in zip(job["request_ids"], files, strict=True)}
    if args.json:
        print(json.dumps({"job": status, "results": [{**r, "file": str(by_request.get(r["request_id"]))}
                                                     for r in results]}, indent=2))
        return 0
    for r in sorted(results, key=lambda r: str(by_request.get(r["request_id"]))):
        names = ", ".join(f"{d['class_name']} {d['score']:.2f}" for d in r["detections"][:6])
        extra = f" (+{len(r['detections']) - 6})" if len(r["detections"]) > 6 else ""
        detail = names + extra if r["status"] == "OK" else f"{r['status']} {r['error']['code']}"
        print(f"{by_request.get(r['request_id'], r['request_id'])!s:<60} {detail}")
    c = status["counts"]
    print(f"job {job['job_id']}: {status['total']} images, OK {c['OK']}, REJECTED {c['REJECTED']}, "
          f"FAILED {c['FAILED']}")
    return 0 if status["done"] == status["total"] else 1


def run_jobs(args: argparse.Namespace, settings: StackSettings) -> int:
    from config import GatewaySettings
    from gateway.devkeys import ensure_dev_keys, mint

    gw = GatewaySettings.from_env()
    if args.token is None and not gw.auth_dev:
        print("detectflow jobs: pass --token (or set DETECTFLOW_AUTH_DEV=true to sign one with the dev keys)",
              file=sys.stderr)
        return 2
    token = args.token or mint(ensure_dev_keys(settings.secrets_dir), tenant=args.tenant,
                               scopes=["detect:write", "results:read"], issuer=gw.issuer, audience=gw.audience,
                               tenant_claim=gw.tenant_claim)
    if args.url is None:
        args.url = gw.base_url
    try:
        return asyncio.run(_submit(args, token, client_tls(gw.pipeline.stream.tls_ca_file)))
    except (ApiError, aiohttp.ClientError, TimeoutError, FileNotFoundError) as exc:
        print(f"\ndetectflow jobs: {exc}", file=sys.stderr)
        return 1


def add_cli(sub: Any) -> argparse.ArgumentParser:
    jb = sub.add_parser("jobs", help="bulk detection through the HTTP API (uploads + a job)")
    jsub = jb.add_subparsers(dest="action", required=True)
    sm = jsub.add_parser("submit", help="upload images (files or directories) and submit them as one job")
    sm.add_argument("paths", nargs="+", type=Path)
    sm.add_argument("--wait", action="store_true", help="follow the job, then print its results")
    sm.add_argument("--json", action="store_true", help="with --wait: print the results as JSON")
    sm.add_argument("--url", default=None, help="gateway base URL (default: the local gateway)")
    sm.add_argument("--tenant", default="cli", help="tenant of the development token minted when no --token")
    sm.add_argument("--token", default=None, help="a bearer token (default: mint a development one)")
    sm.add_argument("--score", type=float, default=None, help="score threshold")
    sm.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds the whole command may take: uploads, the job's creation (each retried while the "
                         "gateway is overloaded or restarting) and with --wait the job itself")
    return jb
