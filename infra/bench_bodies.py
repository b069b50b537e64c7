"""What the benches and the chaos drill send: sample images as JPEG, each request body made distinct.

A body the pipeline has answered before is answered from the result cache, and bytes clamd has scanned before
from its cache of verdicts: a measurement of cached answers measures nothing. ``distinct_bodies`` gives each
request its own bytes (a unique JPEG comment) and the same pixels.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import cv2
import numpy as np


class BenchError(RuntimeError):
    """The benchmark could not bring its system up or warm it."""


def reencode_jpeg(data: bytes, quality: int = 90) -> bytes:
    """Any sample (PNG, JPEG...) as a baseline JPEG, so every request has one content type."""
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
