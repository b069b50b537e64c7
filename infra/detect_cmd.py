"""`detectflow detect IMAGE... [--json] [--draw DIR]`: submit through Kafka, await results, print them."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config import PipelineSettings
from processors.objects import ObjectStore
from stream.client import DetectClient, InlineLimitExceeded
from stream.errors import TransientError
from stream.objectstore import minio_client
from stream.reply import ReplyTimeout

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def make_client(settings: PipelineSettings, tenant: str, *, as_tenant: bool = False) -> DetectClient:
    """An operator's client (the settings' principal, any tenant; images over the inline limit uploaded to MinIO
    as the `client` role), or with ``as_tenant`` the tenant's own (its principal and ingest topic; it has no MinIO
    user, so images over the inline limit are refused)."""
    if as_tenant:
        return DetectClient(settings.stream, default_model=settings.default_model, tenant=tenant, as_tenant=True,
                            inline_max_bytes=settings.inline_max_bytes)
    store: ObjectStore | None = None

    def upload(key: str, data: bytes, content_type: str | None) -> tuple[str, str]:
        nonlocal store
        if store is None:
            store = ObjectStore(minio_client(settings, "client"))
        # Marked as submitted, so the MinIO bridge does not turn this upload into a second request.
        store.put(settings.uploads_bucket, key, data, content_type, metadata={"detectflow-submitted": "true"})
        return settings.uploads_bucket, key

    return DetectClient(settings.stream, default_model=settings.default_model, tenant=tenant, upload=upload,
                        inline_max_bytes=settings.inline_max_bytes)


def detect_files(client: DetectClient, paths: Sequence[Path], *, lane: str, timeout_s: float,
                 params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Submit every file first (they pipeline through the stages together), then collect the results."""
    subs = [client.submit(p.read_bytes(), lane=lane, timeout_s=timeout_s, params=params,
                          content_type=CONTENT_TYPES.get(p.suffix.lower())) for p in paths]
    client.flush()
    results = []
    for path, sub in zip(paths, subs, strict=True):
        try:
            results.append(client.wait(sub))
        except ReplyTimeout:
            results.append({"request_id": sub.request_id, "status": "TIMEOUT", "detections": [],
                            "error_code": "NO_REPLY", "error_message": f"no result within {timeout_s:.0f}s",
                            "image": str(path)})
    return results


def format_results(names: Sequence[str], results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'IMAGE':<22} {'STATUS':<9} {'CLASS':<14} {'SCORE':>6}  BOX (x1, y1, x2, y2 px)       MS"]
    for name, r in zip(names, results, strict=True):
        ms = (r.get("timings_ms") or {}).get("end_to_end")
        ms_text = f"{ms:6.0f}" if ms is not None else "     -"
        if r["status"] != "OK":
            lines.append(f"{name:<22} {r['status']:<9} {r.get('error_code') or '':<14} {'':>6}  "
                         f"{(r.get('error_message') or '')[:60]}")
            continue
        if not r["detections"]:
            lines.append(f"{name:<22} {'OK':<9} {'-':<14} {'':>6}  {'':<28} {ms_text}")
        for i, d in enumerate(r["detections"]):
            b = d["box"]
            box = f"({b['x1']:.0f}, {b['y1']:.0f}, {b['x2']:.0f}, {b['y2']:.0f})"
            cached = " cached" if r.get("cache_hit") and i == 0 else ""
            lines.append(f"{name if i == 0 else '':<22} {'OK' if i == 0 else '':<9} {d['class_name']:<14} "
                         f"{d['score']:6.3f}  {box:<28} {ms_text if i == 0 else ''}{cached}")
    return "\n".join(lines)


def draw(path: Path, result: dict[str, Any], out_dir: Path) -> Path:
    """An annotated copy, drawn on the EXIF-oriented image (the frame the boxes are in)."""
    import cv2  # only with --draw: detecting needs no OpenCV in this process

    # only with --draw (OpenCV)
    from imaging.decode import prepare
    from imaging.limits import ImageLimits

    image = prepare(path.read_bytes(), ImageLimits()).image.copy()
    for d in result.get("detections", []):
        b = d["box"]
        p1, p2 = (round(b["x1"]), round(b["y1"])), (round(b["x2"]), round(b["y2"]))
        cv2.rectangle(image, p1, p2, (0, 200, 255), 2)
        cv2.putText(image, f"{d['class_name']} {d['score']:.2f}", (p1[0], max(12, p1[1] - 4)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 200, 255), 1, cv2.LINE_AA)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}.detections.jpg"
    cv2.imwrite(str(out), image)
    return out


def run_detect(paths: Sequence[Path], *, as_json: bool, draw_dir: Path | None, lane: str, timeout_s: float,
               tenant: str, score_threshold: float | None = None, as_tenant: bool = False) -> int:
    settings = PipelineSettings.from_env()
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"detectflow: no such file: {missing[0]}", file=sys.stderr)
        return 2
    params = {"score_threshold": score_threshold} if score_threshold is not None else None
    large = [p for p in paths if p.stat().st_size > settings.inline_max_bytes]
    if as_tenant and large:
        print(f"detectflow: {large[0]} has {large[0].stat().st_size} bytes, over the inline limit of "
              f"{settings.inline_max_bytes} (DETECTFLOW_INLINE_MAX_BYTES); a tenant principal has no MinIO upload "
              "right to send it by reference: use the HTTP API (`detectflow jobs submit`) or --operator",
              file=sys.stderr)
        return 2
    try:
        with make_client(settings, tenant, as_tenant=as_tenant) as client:
            results = detect_files(client, paths, lane=lane, timeout_s=timeout_s, params=params)
    except (InlineLimitExceeded, TransientError) as exc:
        print(f"detectflow: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps([{"image": str(p), **r} for p, r in zip(paths, results, strict=True)], indent=2,
                         default=str))
    else:
        print(format_results([p.name for p in paths], results))
    if draw_dir is not None:
        for p, r in zip(paths, results, strict=True):
            if r["status"] == "OK":
                print(f"drew {draw(p, r, draw_dir)}", file=sys.stderr)
    return 0 if all(r["status"] == "OK" for r in results) else 1
