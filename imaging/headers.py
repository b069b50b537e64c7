"""Image headers: the container format by magic bytes, then size and EXIF orientation from the container header.

    bytes -> sniff_format        magic bytes only
          -> read_header         size + EXIF orientation from the container header; limits enforced here (bytes,
                                 pixels, sides, and the decode budget: width x height x channels x bytes per
                                 sample), so a decompression bomb is refused before a single pixel is decoded

``check_complete`` tells a cut upload from a whole one before the decoder runs (cv2 grey-fills a cut JPEG).
Header parsers read only what they need with bounds checks (``struct.unpack_from`` / ``bytes.find`` on the
caller's buffer, no copies of the payload) and never trust an offset; a bad EXIF block means orientation 1.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np

from imaging.exif import ORIENTATION_TAG, IfdEntry, TiffError, TiffOutOfRange, TiffStructure, exif_orientation
from imaging.limits import (
    CORRUPT_IMAGE,
    DECODE_BUDGET_EXCEEDED,
    DEFAULT_LIMITS,
    EMPTY_IMAGE,
    IMAGE_TOO_LARGE,
    INVALID_DIMENSIONS,
    PIXEL_LIMIT_EXCEEDED,
    TRUNCATED_IMAGE,
    UNSUPPORTED_FORMAT,
    ImageLimits,
    ImageRejected,
)


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg" | "png" | "webp" | "bmp" | "tiff"
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int  # EXIF orientation 1..8; 1 when absent or invalid
    decoded_bytes: int = 0  # of the decoder's output: width x height x channels x bytes per sample

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) as a viewer shows the image: orientations 5..8 swap the sides."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


# --------------------------------------------------------------------------- sniff


_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_NOT_IMAGES: Final = (  # recognised only to say what was sent
    (b"%PDF-", "a PDF document"),
    (b"GIF8", "GIF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
)


def sniff_format(data: bytes) -> str:
    """The container format by magic bytes alone: "jpeg", "png", "webp", "bmp" or "tiff"."""
    if not data:
        raise ImageRejected(EMPTY_IMAGE, "the image has no bytes")
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    for magic, name in _NOT_IMAGES:
        if head.startswith(magic):
            raise ImageRejected(UNSUPPORTED_FORMAT, f"{name} is not a supported image format")
    if head[4:8] == b"ftyp":
        raise ImageRejected(UNSUPPORTED_FORMAT, "ISO-BMFF (HEIC/AVIF) is not a supported image format")
    raise ImageRejected(UNSUPPORTED_FORMAT, f"unrecognised leading bytes {head[:8].hex()}")


# --------------------------------------------------------------------------- header


def read_header(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> ImageHeader:
    """Size and EXIF orientation from the container header, without decoding pixels; enforces ``limits``."""
    if not data:
        raise ImageRejected(EMPTY_IMAGE, "the image has no bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected(IMAGE_TOO_LARGE, f"{len(data)} bytes is over the limit of {limits.max_bytes}")
    fmt = sniff_format(data)
    width, height, orientation, buffer_pixels, channels, sample_bytes = _HEADER_READERS[fmt](data)
    if width <= 0 or height <= 0:
        raise ImageRejected(INVALID_DIMENSIONS, f"{fmt} header gives {width}x{height} pixels")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise ImageRejected(
            PIXEL_LIMIT_EXCEEDED,
            f"{width}x{height} exceeds the limits of {limits.max_side} per side and {limits.max_pixels} pixels",
        )
    if buffer_pixels > limits.max_pixels:
        raise ImageRejected(
            PIXEL_LIMIT_EXCEEDED,
            f"decoding this {width}x{height} {fmt} needs a {buffer_pixels}-pixel buffer, over {limits.max_pixels}",
        )
    decoded = width * height * channels * sample_bytes
    if decoded > limits.max_decoded_bytes:
        raise ImageRejected(
            DECODE_BUDGET_EXCEEDED,
            f"this {width}x{height} {fmt} of {channels} channel(s) at {8 * sample_bytes} bits decodes to "
            f"{decoded} bytes, over the budget of {limits.max_decoded_bytes}",
        )
    return ImageHeader(fmt, width, height, orientation, decoded)


class _Parsed(NamedTuple):
    width: int
    height: int
    orientation: int
    buffer_pixels: int = 0  # a decoder work buffer larger than the image, sized by the header (TIFF tiles/strips)
    # What the decoder returns per pixel (IMREAD_UNCHANGED): the decode budget is charged from these.
    channels: int = 3
    sample_bytes: int = 1


def _need(data: bytes, end: int, what: str) -> None:
    if len(data) < end:
        raise ImageRejected(TRUNCATED_IMAGE, f"data ends at byte {len(data)}, inside the {what}")


# ---- JPEG

_JPEG_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB})
_JPEG_SOF_HIERARCHICAL: Final = frozenset({0xC5, 0xC6, 0xC7, 0xC8, 0xCD, 0xCE, 0xCF})  # libjpeg never decodes these
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
_JPEG_WITH_LENGTH: Final = frozenset(
    {*_JPEG_SOF, *_JPEG_SOF_HIERARCHICAL, 0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}
)
_JPEG_SOS: Final = 0xDA
_JPEG_APP1: Final = 0xE1
_JPEG_MAX_SEGMENTS: Final = 4096  # real files have tens before the first scan; bounds the Python loop
_NOT_FF: Final = re.compile(rb"[^\xff]")
_JPEG_MAX_SCANS: Final = 100  # libjpeg's default progression has 10 scans (6 for grey)
_TAIL: Final = 4096  # bytes examined for an end marker followed by zero padding


class _JpegSegment(NamedTuple):
    marker: int
    start: int  # payload, after the length field
    end: int


def _jpeg_segments(data: bytes) -> Iterator[_JpegSegment]:
    """Marker segments after SOI up to and including the first SOS, read like libjpeg reads them.

    Like libjpeg, bytes between segments that are not a marker are skipped; if the data then ends before the
    scan, that is CORRUPT_IMAGE (junk), else TRUNCATED_IMAGE (the file was cut).
    """
    n, pos, skipped = len(data), 2, 0
    for _ in range(_JPEG_MAX_SEGMENTS):
        ff = data.find(b"\xff", pos)
        fill = _NOT_FF.search(data, ff) if ff >= 0 else None  # 0xFF fill bytes may precede a marker
        if fill is None:
            code = CORRUPT_IMAGE if skipped else TRUNCATED_IMAGE
            raise ImageRejected(code, "JPEG data ends before the first scan")
        skipped += ff - pos
        marker, pos = data[fill.start()], fill.start() + 1
        if marker == 0x00:  # a stuffed 0xFF00 outside a scan: junk, skipped
            skipped += 2
            continue
        if marker in _JPEG_STANDALONE:
            continue
        if marker not in _JPEG_WITH_LENGTH:
            raise ImageRejected(CORRUPT_IMAGE, f"JPEG marker 0xFF{marker:02X} where a frame header is expected")
        if pos + 2 > n:
            raise ImageRejected(TRUNCATED_IMAGE, f"JPEG data ends inside segment 0xFF{marker:02X}")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ImageRejected(CORRUPT_IMAGE, f"JPEG segment 0xFF{marker:02X} has length {length}")
        if pos + length > n:
            raise ImageRejected(TRUNCATED_IMAGE, f"JPEG data ends inside segment 0xFF{marker:02X}")
        yield _JpegSegment(marker, pos + 2, pos + length)
        if marker == _JPEG_SOS:
            return
        pos += length
    raise ImageRejected(CORRUPT_IMAGE, f"more than {_JPEG_MAX_SEGMENTS} JPEG segments before the first scan")


def _jpeg_header(data: bytes) -> _Parsed:
    orientation, exif_seen = 1, False
    for seg in _jpeg_segments(data):
        if seg.marker == _JPEG_APP1 and not exif_seen and data.startswith(b"Exif\x00", seg.start):
            exif_seen = True  # the first EXIF block counts, as in every viewer
            orientation = exif_orientation(data, seg.start, seg.end)
        elif seg.marker in _JPEG_SOF:
            if seg.end - seg.start < 6:
                raise ImageRejected(CORRUPT_IMAGE, "JPEG frame header is too short")
            precision, height, width, components = struct.unpack_from(">BHHB", data, seg.start)  # height 0: DNL
            return _Parsed(width, height, orientation, channels=components, sample_bytes=2 if precision > 8 else 1)
        elif seg.marker in _JPEG_SOF_HIERARCHICAL:
            raise ImageRejected(UNSUPPORTED_FORMAT, f"JPEG process SOF{seg.marker - 0xC0} is not supported")
        elif seg.marker == _JPEG_SOS:
            raise ImageRejected(CORRUPT_IMAGE, "JPEG scan before any frame header")
    raise ImageRejected(CORRUPT_IMAGE, "JPEG without a frame header")  # unreachable: the walk ends at SOS


def _jpeg_complete(data: bytes) -> None:
    """EOI present (TRUNCATED_IMAGE if not), and not a progressive-scan bomb."""
    if data[-_TAIL:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        start, end = 2, len(data)  # the common case: no walk
    else:
        # EOI elsewhere: data after the image (motion photos append a video) or long padding. 0xFFD9 cannot
        # occur inside entropy-coded data, so the first one after the first SOS ends the primary image.
        start = end = -1
        for seg in _jpeg_segments(data):
            start, end = seg.start, data.find(b"\xff\xd9", seg.end)  # the walk ends at the first SOS
        if end < 0:
            raise ImageRejected(TRUNCATED_IMAGE, "JPEG data ends inside the scan (no EOI marker)")
    # Each scan is a full pass over the image: a 50 KB file of 2,000 tiny scans over 4 MP takes 6 s to decode.
    # 0xFFDA cannot occur in entropy-coded data either, so this counts scans (plus any in an EXIF thumbnail).
    scans = data.count(b"\xff\xda", start, end)
    if scans > _JPEG_MAX_SCANS:
        raise ImageRejected(CORRUPT_IMAGE, f"JPEG with {scans} scans (encoders write at most a few tens)")


# ---- PNG

_PNG_BIT_DEPTHS: Final = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_MAX_CHUNKS_BEFORE_IDAT: Final = 1024
_PNG_MAX_CHUNKS: Final = 65536  # libpng writes 8 KiB IDATs: a 20 MiB PNG has ~2,500 chunks


def _png_header(data: bytes) -> _Parsed:
    _need(data, 33, "PNG IHDR chunk")
    length, chunk_type = struct.unpack_from(">I4s", data, 8)
    if chunk_type != b"IHDR" or length != 13:
        raise ImageRejected(CORRUPT_IMAGE, "PNG does not start with a 13-byte IHDR chunk")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise ImageRejected(CORRUPT_IMAGE, "PNG IHDR chunk fails its CRC")
    width, height, depth, color, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth not in _PNG_BIT_DEPTHS.get(color, ()) or compression or filtering or interlace > 1:
        raise ImageRejected(CORRUPT_IMAGE, f"PNG IHDR: bit depth {depth}, colour type {color} is not valid")
    orientation, transparency = _png_ancillary(data)
    # OpenCV's PNG reader: grey stays one channel; palette and RGB give BGR, BGRA with a tRNS chunk; any alpha
    # (grey + alpha too) gives BGRA. Samples below 8 bits are expanded to 8; palette entries are 8-bit.
    channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}[color]
    if transparency and color in (2, 3):
        channels = 4
    return _Parsed(width, height, orientation, channels=channels, sample_bytes=2 if depth == 16 else 1)


def _png_ancillary(data: bytes) -> tuple[int, bool]:
    """Orientation from an eXIf chunk before the first IDAT (where the eXIf extension puts it), and whether a tRNS
    chunk precedes the first IDAT (where PNG puts it)."""
    n, pos = len(data), 33
    orientation, transparency, exif_seen = 1, False, False
    for _ in range(_PNG_MAX_CHUNKS_BEFORE_IDAT):
        if pos + 12 > n:
            break
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if chunk_type in (b"IDAT", b"IEND") or end > n:
            break
        if chunk_type == b"tRNS":
            transparency = True
        elif chunk_type == b"eXIf" and not exif_seen:
            exif_seen = True
            # libpng drops an ancillary chunk with a bad CRC, so viewers would not rotate: neither do we.
            (crc,) = struct.unpack_from(">I", data, end - 4)
            if zlib.crc32(data[pos + 4 : end - 4]) == crc:
                orientation = exif_orientation(data, pos + 8, end - 4)
        pos = end
    return orientation, transparency


def _png_complete(data: bytes) -> None:
    """Every chunk lies inside the data, up to IEND. Always walked (a few µs per 100 chunks): OpenCV allocates a
    chunk's declared length before reading it, so a 150-byte PNG declaring a 2 GB IDAT costs 2 GB and 5 s."""
    n, pos = len(data), 8
    for _ in range(_PNG_MAX_CHUNKS):
        if pos + 8 > n:
            raise ImageRejected(TRUNCATED_IMAGE, "PNG data ends before the IEND chunk")
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF:
            raise ImageRejected(CORRUPT_IMAGE, f"PNG chunk length {length} is out of range")
        pos += 12 + length
        if chunk_type == b"IEND" and pos <= n:
            return  # trailing bytes after IEND are ignored by libpng
        if pos > n:
            name = chunk_type.decode("latin-1")
            raise ImageRejected(TRUNCATED_IMAGE, f"PNG data ends inside a {name} chunk")
    raise ImageRejected(CORRUPT_IMAGE, f"PNG with more than {_PNG_MAX_CHUNKS} chunks")


# ---- WebP

_WEBP_MAX_CHUNKS: Final = 4096
_VP8X_ANIMATION: Final = 0x02
_VP8X_ALPHA: Final = 0x10


def _vp8_size(data: bytes, pos: int) -> tuple[int, int]:
    _need(data, pos + 10, "VP8 frame header")
    if data[pos] & 1:
        raise ImageRejected(CORRUPT_IMAGE, "VP8 bitstream does not start with a key frame")
    if data[pos + 3 : pos + 6] != b"\x9d\x01\x2a":
        raise ImageRejected(CORRUPT_IMAGE, "VP8 key frame start code missing")
    width, height = struct.unpack_from("<HH", data, pos + 6)
    return width & 0x3FFF, height & 0x3FFF  # the top two bits are upscaling hints


def _vp8l_size(data: bytes, pos: int) -> tuple[int, int]:
    _need(data, pos + 5, "VP8L header")
    if data[pos] != 0x2F:
        raise ImageRejected(CORRUPT_IMAGE, "VP8L signature byte missing")
    (bits,) = struct.unpack_from("<I", data, pos + 1)
    if bits >> 29:
        raise ImageRejected(CORRUPT_IMAGE, f"VP8L version {bits >> 29}")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _webp_header(data: bytes) -> _Parsed:
    _need(data, 20, "WebP header")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size < 12:
        raise ImageRejected(CORRUPT_IMAGE, f"RIFF size {riff_size} is too small for a WebP image")
    fourcc, size = struct.unpack_from("<4sI", data, 12)
    if fourcc == b"VP8 ":
        return _Parsed(*_vp8_size(data, 20), 1)  # lossy without an ALPH chunk: BGR
    if fourcc == b"VP8L":
        _need(data, 25, "VP8L header")
        alpha = (struct.unpack_from("<I", data, 21)[0] >> 28) & 1  # alpha_is_used
        return _Parsed(*_vp8l_size(data, 20), 1, channels=4 if alpha else 3)
    if fourcc != b"VP8X":
        raise ImageRejected(CORRUPT_IMAGE, f"WebP starts with an unknown chunk {fourcc!r}")
    if size < 10:
        raise ImageRejected(CORRUPT_IMAGE, "WebP VP8X chunk is too short")
    _need(data, 30, "WebP VP8X chunk")
    flags = data[20]
    channels = 4 if flags & _VP8X_ALPHA else 3
    width = 1 + int.from_bytes(data[24:27], "little")
    height = 1 + int.from_bytes(data[27:30], "little")
    # EXIF comes after the image data: walk the chunks (by their sizes, a handful of steps).
    orientation, end = 1, min(8 + riff_size, len(data))
    pos = 20 + size + (size & 1)
    for _ in range(_WEBP_MAX_CHUNKS):
        if pos + 8 > end:
            break
        fourcc, size = struct.unpack_from("<4sI", data, pos)
        chunk_end = pos + 8 + size
        _need(data, chunk_end, f"WebP {fourcc.decode('latin-1')} chunk")
        if fourcc == b"EXIF":
            orientation = exif_orientation(data, pos + 8, chunk_end)
        elif fourcc in (b"VP8 ", b"VP8L") and not flags & _VP8X_ANIMATION:
            # The decoder's size is the bitstream's; a canvas that disagrees would dodge the pixel limit.
            frame = _vp8_size(data, pos + 8) if fourcc == b"VP8 " else _vp8l_size(data, pos + 8)
            if frame != (width, height):
                raise ImageRejected(CORRUPT_IMAGE, f"WebP canvas {width}x{height} but bitstream {frame[0]}x{frame[1]}")
        pos = chunk_end + (size & 1)
    return _Parsed(width, height, orientation, channels=channels)


def _webp_complete(data: bytes) -> None:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if 8 + riff_size > len(data):
        raise ImageRejected(TRUNCATED_IMAGE, f"WebP data ends at byte {len(data)} of {8 + riff_size}")


# ---- BMP


class _BmpLayout(NamedTuple):
    width: int
    height: int  # absolute; negative in the file means rows run top-down
    bits: int
    compression: int
    pixel_offset: int
    image_size: int


_BMP_UNCOMPRESSED: Final = frozenset({0, 3, 6})  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
_BMP_RLE: Final = frozenset({1, 2})


def _bmp_layout(data: bytes) -> _BmpLayout:
    _need(data, 18, "BMP file header")
    pixel_offset, dib_size = struct.unpack_from("<II", data, 10)
    if dib_size == 12:  # BITMAPCOREHEADER (OS/2 1.x): unsigned 16-bit sides, bottom-up
        _need(data, 26, "BMP core header")
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
        compression, image_size = 0, 0
    elif 40 <= dib_size <= 124:  # BITMAPINFOHEADER and its V2..V5 / OS/2 2.x extensions
        _need(data, 38, "BMP info header")
        width, height, _planes, bits, compression, image_size = struct.unpack_from("<iiHHII", data, 18)
    else:
        raise ImageRejected(CORRUPT_IMAGE, f"BMP header size {dib_size} is not a known header")
    if width < 0:
        raise ImageRejected(CORRUPT_IMAGE, f"BMP width {width} is negative")
    if bits not in (1, 4, 8, 16, 24, 32):
        raise ImageRejected(CORRUPT_IMAGE, f"BMP with {bits} bits per pixel")
    return _BmpLayout(width, abs(height), bits, compression, pixel_offset, image_size)


def _bmp_header(data: bytes) -> _Parsed:
    layout = _bmp_layout(data)
    return _Parsed(layout.width, layout.height, 1, channels=4 if layout.bits == 32 else 3)  # palettes become BGR


def _bmp_complete(data: bytes) -> None:
    layout = _bmp_layout(data)
    if layout.compression in _BMP_UNCOMPRESSED:
        stride = (layout.width * layout.bits + 31) // 32 * 4  # rows are padded to 4 bytes
        end = layout.pixel_offset + stride * layout.height
    elif layout.compression in _BMP_RLE:
        end = layout.pixel_offset + layout.image_size
    else:
        return  # JPEG/PNG-in-BMP: the decoder refuses those
    if end > len(data):
        raise ImageRejected(TRUNCATED_IMAGE, f"BMP pixel data needs {end} bytes, the data has {len(data)}")


# ---- TIFF

_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_ROWS_PER_STRIP, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 256, 257, 278, 322, 323
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLES_PER_PIXEL = 258, 277
_TIFF_STRIPS, _TIFF_STRIP_BYTES, _TIFF_TILES, _TIFF_TILE_BYTES = 273, 279, 324, 325
_TIFF_TAGS: Final = frozenset(
    {
        _TIFF_WIDTH,
        _TIFF_HEIGHT,
        _TIFF_BITS_PER_SAMPLE,
        _TIFF_SAMPLES_PER_PIXEL,
        ORIENTATION_TAG,
        _TIFF_ROWS_PER_STRIP,
        _TIFF_TILE_WIDTH,
        _TIFF_TILE_LENGTH,
        _TIFF_STRIPS,
        _TIFF_STRIP_BYTES,
        _TIFF_TILES,
        _TIFF_TILE_BYTES,
    }
)


def _tiff_ifd0(data: bytes) -> tuple[TiffStructure, dict[int, IfdEntry]]:
    # libtiff writes IFD0 after the pixel data, so a cut TIFF usually loses it: out of range means truncated.
    try:
        tiff = TiffStructure(data, 0, len(data))
        return tiff, tiff.entries(tiff.ifd0, _TIFF_TAGS)
    except TiffOutOfRange as exc:
        raise ImageRejected(TRUNCATED_IMAGE, f"TIFF data ends inside its first directory: {exc}") from exc
    except (TiffError, struct.error) as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"TIFF first directory is unreadable: {exc}") from exc


def _tiff_header(data: bytes) -> _Parsed:
    tiff, entries = _tiff_ifd0(data)
    try:
        width = tiff.uint(entries[_TIFF_WIDTH])
        height = tiff.uint(entries[_TIFF_HEIGHT])
    except KeyError as exc:
        raise ImageRejected(CORRUPT_IMAGE, "TIFF without ImageWidth/ImageLength") from exc
    except TiffError as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"TIFF image size is unreadable: {exc}") from exc
    orientation = 1
    if ORIENTATION_TAG in entries:
        try:
            orientation = tiff.uint(entries[ORIENTATION_TAG])
        except TiffError:
            orientation = 1
    orientation = orientation if 1 <= orientation <= 8 else 1
    channels, sample_bytes = _tiff_sample_layout(tiff, entries)
    return _Parsed(width, height, orientation, _tiff_buffer_pixels(tiff, entries, width, height), channels,
                   sample_bytes)


def _tiff_sample_layout(tiff: TiffStructure, entries: dict[int, IfdEntry]) -> tuple[int, int]:
    """(samples per pixel, bytes per sample of the widest sample): TIFF's defaults are 1 and 1 bit."""
    try:
        samples = tiff.uint(entries[_TIFF_SAMPLES_PER_PIXEL]) if _TIFF_SAMPLES_PER_PIXEL in entries else 1
        bits = int(tiff.uints(entries[_TIFF_BITS_PER_SAMPLE]).max()) if _TIFF_BITS_PER_SAMPLE in entries else 1
    except TiffOutOfRange as exc:  # one value per sample, stored out of line: cut off with the data
        raise ImageRejected(TRUNCATED_IMAGE, f"TIFF data ends inside its sample layout: {exc}") from exc
    except TiffError as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"TIFF sample layout is unreadable: {exc}") from exc
    return max(1, samples), max(1, (bits + 7) // 8)


def _tiff_buffer_pixels(tiff: TiffStructure, entries: dict[int, IfdEntry], width: int, height: int) -> int:
    """Pixels in OpenCV's per-tile (or per-strip) buffer, which is sized from the tags, not from the image:
    a 1x1 TIFF declaring a 12000x12000 tile costs 600 MB (grfmt_tiff.cpp only refuses buffers of 1 GB)."""
    try:
        if _TIFF_TILE_WIDTH in entries:  # libtiff's TIFFIsTiled
            tile_length = tiff.uint(entries[_TIFF_TILE_LENGTH]) if _TIFF_TILE_LENGTH in entries else 0
            return tiff.uint(entries[_TIFF_TILE_WIDTH]) * tile_length
        if _TIFF_ROWS_PER_STRIP in entries:
            rows = tiff.uint(entries[_TIFF_ROWS_PER_STRIP])
            return width * (height if rows in (0, 0xFFFFFFFF) else rows)
    except TiffError as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"TIFF tile/strip size is unreadable: {exc}") from exc
    return 0


def _tiff_complete(data: bytes) -> None:
    tiff, entries = _tiff_ifd0(data)
    end = tiff.values_end(tiff.ifd0)
    if end > len(data):
        raise ImageRejected(TRUNCATED_IMAGE, f"TIFF directory values need {end} bytes, the data has {len(data)}")
    for offsets_tag, counts_tag in ((_TIFF_STRIPS, _TIFF_STRIP_BYTES), (_TIFF_TILES, _TIFF_TILE_BYTES)):
        if offsets_tag in entries and counts_tag in entries:
            try:
                offsets, counts = tiff.uints(entries[offsets_tag]), tiff.uints(entries[counts_tag])
            except TiffOutOfRange as exc:
                raise ImageRejected(TRUNCATED_IMAGE, "TIFF data ends inside its strip/tile table") from exc
            except TiffError as exc:
                raise ImageRejected(CORRUPT_IMAGE, f"TIFF strip/tile table is unreadable: {exc}") from exc
            if len(offsets) == len(counts):
                end = int((offsets.astype(np.uint64) + counts).max())
                if end > len(data):
                    raise ImageRejected(TRUNCATED_IMAGE, f"TIFF pixel data needs {end} bytes, the data has {len(data)}")
            return


_HEADER_READERS: Final = {
    "jpeg": _jpeg_header,
    "png": _png_header,
    "webp": _webp_header,
    "bmp": _bmp_header,
    "tiff": _tiff_header,
}
_COMPLETENESS_CHECKS: Final = {
    "jpeg": _jpeg_complete,
    "png": _png_complete,
    "webp": _webp_complete,
    "bmp": _bmp_complete,
    "tiff": _tiff_complete,
}


def check_complete(data: bytes, fmt: str) -> None:
    """Raise ``ImageRejected(TRUNCATED_IMAGE)`` unless the ``fmt`` container in ``data`` is whole."""
    _COMPLETENESS_CHECKS[fmt](data)
