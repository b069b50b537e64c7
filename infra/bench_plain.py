"""The plain server `detectflow bench sync` compares the pipeline with: what a user writes in an afternoon.

One aiohttp process: POST /v1/detect (raw image body) -> decode -> letterbox -> ONNX Runtime batch 1 -> decode
-> NMS -> JSON. One image per call, no batching, no queue, no storage, no scan, no cache; the model runs in
the loop's default thread executor so the loop keeps accepting calls. Same model folder and session
settings as the inference role; HTTPS with the gateway's certificate when given one, so both sides pay TLS.

    python -m infra.bench_plain --port P --model-dir D [--threads N] [--cert C --key K]
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from imaging.decode import prepare
from imaging.letterbox import LetterboxError
from imaging.limits import ImageLimits, ImageRejected
from infra.cli.base import CONTEXT_SETTINGS, invoke
from model_store.serving.boxes import DetectError
from model_store.serving.detector import Detector
from model_store.serving.session import SessionSettings

DETECT_ROUTE = "/v1/detect"


def build_app(detector: Any) -> web.Application:
    limits = ImageLimits()

    def detect_one(body: bytes) -> list[dict[str, Any]]:
        image = prepare(body, limits).image
        return [{"class_id": d.class_id, "class_name": d.class_name, "score": d.score, "box": list(d.box)}
                for d in detector.detect([image])[0]]

    async def detect(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            detections = await asyncio.get_running_loop().run_in_executor(None, detect_one, body)
        except (ImageRejected, LetterboxError, DetectError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"detections": detections})

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application(client_max_size=20 * 1024 * 1024)
    app.router.add_post(DETECT_ROUTE, detect)
    app.router.add_get("/readyz", ready)
    return app


def server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The same context the gateway serves with (TLS 1.2 or later), or None for plain HTTP."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def command(port: int, model_dir: Path, threads: int, cert: Path | None, key: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "infra.bench_plain", "--port", str(port), "--model-dir", str(model_dir),
            "--threads", str(threads)]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    return argv


def start(port: int, model_dir: Path, threads: int, cert: Path | None, key: Path | None,
          log_path: Path) -> subprocess.Popen[bytes]:
    """The plain server in its own process, its output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(command(port, model_dir, threads, cert, key), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


@click.command(help=(__doc__ or "").splitlines()[0], context_settings=CONTEXT_SETTINGS)
@click.option("--port", type=int, required=True)
@click.option("--host", default="127.0.0.1")
@click.option("--model-dir", type=click.Path(path_type=Path), required=True)
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
@click.option("--cert", type=click.Path(path_type=Path), default=None, help="PEM certificate chain: serve HTTPS")
@click.option("--key", type=click.Path(path_type=Path), default=None)
def serve(port: int, host: str, model_dir: Path, threads: int, cert: Path | None, key: Path | None) -> int:

    detector = Detector.from_model_dir(model_dir, SessionSettings(intra_op_threads=threads),
                                       conf_threshold=0.25, iou_threshold=0.45, max_detections=100)
    web.run_app(build_app(detector), host=host, port=port, access_log=None,
                ssl_context=server_tls(cert, key), handle_signals=True, print=None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return invoke(serve, argv, prog_name="python -m infra.bench_plain")


if __name__ == "__main__":
    sys.exit(main())
