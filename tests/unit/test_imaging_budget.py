"""The decode budget of processors.imaging: what an image costs once decoded, charged from its header alone."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from PIL import Image

from config import PipelineSettings, SettingsError
from processors.imaging import (
    DECODE_BUDGET_EXCEEDED,
    REJECTION_CODES,
    ImageLimits,
    ImageRejected,
    prepare,
    read_header,
)

UNLIMITED = ImageLimits(max_decoded_bytes=10**15)


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int, depth: int, colour: int, *extra: bytes) -> bytes:
    """A PNG that is only its IHDR (plus ``extra`` chunks) and IEND: nothing to decode, all a header reader sees."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(extra) + chunk(b"IEND", b"")


def test_a_16_bit_rgba_png_of_6300_square_is_refused_from_its_header() -> None:
    data = png_header_only(6300, 6300, 16, 6)  # 40 M pixels would pass the pixel limit; 303 MiB decoded
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        prepare(data)
    assert time.perf_counter() - t0 < 0.5  # refused before any decoding (decoding it costs seconds)
    assert info.value.code == DECODE_BUDGET_EXCEEDED and DECODE_BUDGET_EXCEEDED in REJECTION_CODES
    assert str(6300 * 6300 * 4 * 2) in info.value.message
    assert read_header(data, UNLIMITED).decoded_bytes == 6300 * 6300 * 8


def test_the_default_budget_admits_any_8_bit_rgb_image_under_the_pixel_limit() -> None:
    header = read_header(png_header_only(6300, 6300, 8, 2))
    assert header.decoded_bytes == 6300 * 6300 * 3 <= ImageLimits().max_decoded_bytes


@pytest.mark.parametrize(
    ("depth", "colour", "extra", "channels", "sample_bytes"),
    [
        (1, 0, (), 1, 1),  # sub-byte grey is expanded to 8 bits
        (16, 0, (), 1, 2),
        (8, 2, (), 3, 1),
        (16, 2, (), 3, 2),
        (8, 2, (chunk(b"tRNS", b"\x00\x01\x00\x02\x00\x03"),), 4, 1),  # a transparent colour adds alpha
        (4, 3, (chunk(b"PLTE", bytes(48)),), 3, 1),  # palette entries are 8-bit BGR
        (8, 3, (chunk(b"PLTE", bytes(48)), chunk(b"tRNS", b"\x00")), 4, 1),
        (8, 4, (), 4, 1),  # grey + alpha decodes to BGRA
        (16, 4, (), 4, 2),
        (8, 6, (), 4, 1),
    ],
)
def test_png_charge_follows_bit_depth_colour_type_and_transparency(
    depth: int, colour: int, extra: tuple[bytes, ...], channels: int, sample_bytes: int
) -> None:
    data = png_header_only(1000, 700, depth, colour, *extra)
    assert read_header(data, UNLIMITED).decoded_bytes == 1000 * 700 * channels * sample_bytes


def test_the_budget_boundary_is_inclusive() -> None:
    data = png_header_only(1000, 700, 16, 6)
    cost = 1000 * 700 * 8
    assert read_header(data, ImageLimits(max_decoded_bytes=cost)).decoded_bytes == cost
    with pytest.raises(ImageRejected, match=f"^{DECODE_BUDGET_EXCEEDED}: "):
        read_header(data, ImageLimits(max_decoded_bytes=cost - 1))


def test_jpeg_charge_counts_components_and_precision() -> None:
    rgb = pil_bytes(Image.new("RGB", (64, 48)), "JPEG")
    sof = rgb.find(b"\xff\xc0") + 4
    assert read_header(rgb, UNLIMITED).decoded_bytes == 64 * 48 * 3
    twelve_bit = bytearray(rgb)
    twelve_bit[sof] = 12  # the frame header's sample precision
    assert read_header(bytes(twelve_bit), UNLIMITED).decoded_bytes == 64 * 48 * 3 * 2
    cmyk = pil_bytes(Image.new("CMYK", (64, 48)), "JPEG")
    assert read_header(cmyk, UNLIMITED).decoded_bytes == 64 * 48 * 4


def test_tiff_charge_reads_samples_per_pixel_and_bits_per_sample() -> None:
    rgba16 = encode(".tiff", np.zeros((48, 64, 4), np.uint16))
    assert read_header(rgba16, UNLIMITED).decoded_bytes == 64 * 48 * 4 * 2
    with pytest.raises(ImageRejected, match=f"^{DECODE_BUDGET_EXCEEDED}: "):
        read_header(rgba16, ImageLimits(max_decoded_bytes=64 * 48 * 4 * 2 - 1))


def pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(ext, image)
    assert ok
    return encoded.tobytes()


_RGB = np.random.default_rng(1).integers(0, 255, (40, 50, 3), np.uint8)
_RGBA = np.dstack([_RGB, _RGB[:, :, 0]])
_PALETTE = Image.fromarray(_RGB).convert("P")
ENCODINGS: dict[str, Callable[[], bytes]] = {
    "png-grey": lambda: pil_bytes(Image.fromarray(_RGB[:, :, 0]), "PNG"),
    "png-grey16": lambda: encode(".png", _RGB[:, :, 0].astype(np.uint16) * 257),
    "png-1bit": lambda: pil_bytes(Image.fromarray(_RGB[:, :, 0] > 128), "PNG"),
    "png-rgb": lambda: encode(".png", _RGB),
    "png-rgb16": lambda: encode(".png", _RGB.astype(np.uint16) * 257),
    "png-rgb-trns": lambda: pil_bytes(Image.fromarray(_RGB), "PNG", transparency=(1, 2, 3)),
    "png-rgba": lambda: encode(".png", _RGBA),
    "png-rgba16": lambda: encode(".png", _RGBA.astype(np.uint16) * 257),
    "png-palette": lambda: pil_bytes(_PALETTE, "PNG"),
    "png-palette-trns": lambda: pil_bytes(_PALETTE, "PNG", transparency=0),
    "png-grey-alpha": lambda: pil_bytes(Image.fromarray(_RGB[:, :, :2].copy(), "LA"), "PNG"),
    "jpeg-grey": lambda: pil_bytes(Image.fromarray(_RGB[:, :, 0]), "JPEG"),
    "jpeg-rgb": lambda: pil_bytes(Image.fromarray(_RGB), "JPEG"),
    "jpeg-progressive": lambda: pil_bytes(Image.fromarray(_RGB), "JPEG", progressive=True),
    "jpeg-cmyk": lambda: pil_bytes(Image.fromarray(_RGB).convert("CMYK"), "JPEG"),
    "webp-lossy": lambda: encode(".webp", _RGB),
    "webp-lossy-alpha": lambda: pil_bytes(Image.fromarray(_RGBA, "RGBA"), "WEBP"),
    "webp-lossless": lambda: pil_bytes(Image.fromarray(_RGB), "WEBP", lossless=True),
    "webp-lossless-alpha": lambda: pil_bytes(Image.fromarray(_RGBA, "RGBA"), "WEBP", lossless=True),
    "bmp-palette": lambda: pil_bytes(_PALETTE, "BMP"),
    "bmp-24": lambda: encode(".bmp", _RGB),
    "bmp-32": lambda: pil_bytes(Image.fromarray(_RGBA, "RGBA"), "BMP"),
    "tiff-grey": lambda: encode(".tiff", _RGB[:, :, 0]),
    "tiff-rgb": lambda: encode(".tiff", _RGB),
    "tiff-rgb16": lambda: encode(".tiff", _RGB.astype(np.uint16) * 257),
    "tiff-rgba": lambda: encode(".tiff", _RGBA),
}
# Charged more than OpenCV allocates, on purpose: the header cannot tell what the decoder converts them to.
CONSERVATIVE = {"jpeg-cmyk", "bmp-32"}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_the_charge_is_what_the_decoder_returns(name: str) -> None:
    """Oracle: the header's charge against the array cv2.imdecode (IMREAD_UNCHANGED) really allocates."""
    data = ENCODINGS[name]()
    charged = read_header(data, UNLIMITED).decoded_bytes
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    assert raw is not None
    if name in CONSERVATIVE:
        assert charged > raw.nbytes
    else:
        assert charged == raw.nbytes


def test_the_budget_is_a_setting() -> None:
    env = {"DETECTFLOW_IMAGE_MAX_DECODED_BYTES": str(64 * 1024 * 1024)}
    assert PipelineSettings.from_env(env).image_max_decoded_bytes == 64 * 1024 * 1024
    assert PipelineSettings.from_env({}).image_max_decoded_bytes == ImageLimits().max_decoded_bytes
    with pytest.raises(SettingsError, match="DETECTFLOW_IMAGE_MAX_DECODED_BYTES"):
        PipelineSettings.from_env({"DETECTFLOW_IMAGE_MAX_DECODED_BYTES": "0"})
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_decoded_bytes=0)
