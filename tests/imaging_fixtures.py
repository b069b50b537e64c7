"""Encoded-image fixtures for the image-preparation tests (unit and integration): real bytes, built by hand.

Nothing here needs Pillow: EXIF blocks, PNG chunks and the PDF are written byte by byte, and JPEGs come from
cv2.imencode.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

_ORIENTATION_TAG = 0x0112
_SHORT = 3


def exif_block(orientation: int, *, byte_order: str = "MM") -> bytes:
    """A minimal EXIF TIFF structure (no "Exif" prefix): IFD0 with only the orientation tag (SHORT)."""
    e = {"MM": ">", "II": "<"}[byte_order]
    header = byte_order.encode() + struct.pack(e + "HI", 42, 8)
    # SHORT values are left-justified in the 4-byte value field whatever the byte order.
    entry = struct.pack(e + "HHIH", _ORIENTATION_TAG, _SHORT, 1, orientation) + b"\x00\x00"
    return header + struct.pack(e + "H", 1) + entry + struct.pack(e + "I", 0)


def insert_app1(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP1 segment carrying ``payload``, after SOI (and after a JFIF APP0 if there is one).

    Existing EXIF APP1 segments are removed; the compressed pixels are kept byte for byte.
    """
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG")
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("APP1 payload too long")
    pos, head, kept = 2, b"\xff\xd8", []
    while jpeg[pos] == 0xFF and jpeg[pos + 1] != 0xDA:  # copy the segments before the first scan
        marker = jpeg[pos + 1]
        (length,) = struct.unpack_from(">H", jpeg, pos + 2)
        segment = jpeg[pos : pos + 2 + length]
        if marker == 0xE0 and not kept and segment[4:9] == b"JFIF\x00":
            head += segment
        elif not (marker == 0xE1 and segment[4:9] == b"Exif\x00"):
            kept.append(segment)
        pos += 2 + length
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return head + app1 + b"".join(kept) + jpeg[pos:]


def exif_jpeg(jpeg_or_bgr: bytes | np.ndarray, orientation: int, *, byte_order: str = "MM") -> bytes:
    """A JPEG carrying EXIF ``orientation``; given bytes, their compressed pixels are kept unchanged."""
    if isinstance(jpeg_or_bgr, np.ndarray):
        ok, encoded = cv2.imencode(".jpg", jpeg_or_bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise ValueError("cv2.imencode failed")
        jpeg = encoded.tobytes()
    else:
        jpeg = bytes(jpeg_or_bgr)
    return insert_app1(jpeg, b"Exif\x00\x00" + exif_block(orientation, byte_order=byte_order))


def truncated_jpeg(data: bytes) -> bytes:
    """The first half of ``data``: cut in the middle of the entropy-coded scan, as an interrupted upload."""
    return data[: len(data) // 2]


def png_chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def png_header_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A well-formed PNG whose IHDR (valid CRC) claims ``width`` x ``height`` RGB pixels, with a tiny IDAT.

    Decoding it for real would allocate width * height * 3 bytes (7.5 GB for the default).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # a few zero rows' worth: the file is ~100 bytes
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def minimal_pdf() -> bytes:
    """A small, valid one-page PDF (a classic upload mistake)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
