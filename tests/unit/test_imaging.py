"""imaging on real encoded images (cv2.imencode / Pillow / hand-built bytes) and the sample photos."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from imaging_fixtures import (
    exif_block,
    exif_jpeg,
    insert_app1,
    minimal_pdf,
    png_chunk,
    png_header_bomb,
    truncated_jpeg,
)
from PIL import Image, ImageOps

from imaging.decode import ALPHA_BACKGROUND, apply_orientation, decode, prepare
from imaging.headers import ImageHeader, read_header, sniff_format
from imaging.limits import (
    CORRUPT_IMAGE,
    EMPTY_IMAGE,
    IMAGE_TOO_LARGE,
    INVALID_DIMENSIONS,
    PIXEL_LIMIT_EXCEEDED,
    REJECTION_CODES,
    TRUNCATED_IMAGE,
    UNSUPPORTED_FORMAT,
    ImageLimits,
    ImageRejected,
)

W, H = 64, 48  # stored size of the synthetic images: multiples of 16, so JPEG blocks do not blur the corners
RED, GREEN, GREY = (0, 0, 255), (0, 255, 0), (90, 90, 90)


def marked_image(width: int = W, height: int = H) -> np.ndarray:
    """Grey BGR image, red block in the stored top-left corner, green block in the stored top-right corner."""
    image = np.full((height, width, 3), GREY, np.uint8)
    image[:16, :16] = RED
    image[:16, -16:] = GREEN
    return image


def encode(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, encoded = cv2.imencode(ext, image, list(params))
    assert ok
    return encoded.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pil_from_bgr(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))


def corners(image: np.ndarray) -> dict[str, str]:
    """Which marker colour sits in which corner (8x8 patches inside the 16x16 blocks)."""
    patches = {
        "tl": image[4:12, 4:12],
        "tr": image[4:12, -12:-4],
        "bl": image[-12:-4, 4:12],
        "br": image[-12:-4, -12:-4],
    }
    names = {}
    for corner, patch in patches.items():
        _b, g, r = patch.reshape(-1, 3).mean(axis=0)
        names[corner] = "red" if r > 200 and g < 60 else "green" if g > 200 and r < 60 else "grey"
    return names


def rejected(code: str):
    return pytest.raises(ImageRejected, match=f"^{code}: ")


def exif_oriented_pil(data: bytes) -> np.ndarray:
    """Pillow's rendering of ``data`` with its EXIF orientation applied, as BGR: an independent oracle."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[:, :, ::-1]


def with_transparent_pixel(image: np.ndarray) -> Image.Image:
    """RGBA copy of a BGR image, opaque except its bottom-right pixel (so encoders keep the alpha)."""
    rgba = np.dstack([image[:, :, ::-1], np.full(image.shape[:2], 255, np.uint8)])
    rgba[-1, -1, 3] = 0
    return Image.fromarray(rgba)


def bmp_top_down(image: np.ndarray) -> bytes:
    """A 24-bit BMP whose height is negative (rows stored top row first)."""
    data = bytearray(encode(".bmp", image))
    offset = struct.unpack_from("<I", data, 10)[0]
    height, width = image.shape[:2]
    stride = (width * 24 + 31) // 32 * 4
    rows = [bytes(data[offset + i * stride : offset + (i + 1) * stride]) for i in range(height)]
    struct.pack_into("<i", data, 22, -height)
    data[offset : offset + stride * height] = b"".join(reversed(rows))
    return bytes(data)


def tiff_by_hand(rgb: np.ndarray, byte_order: str, size_type: int, rows_per_strip: int | None = None) -> bytes:
    """Uncompressed single-strip RGB TIFF; ImageWidth/ImageLength as SHORT (3) or LONG (4)."""
    e = "<" if byte_order == "II" else ">"
    height, width = rgb.shape[:2]
    pixels = rgb.tobytes()
    bits_at, strip_at = 8, 16
    ifd_at = strip_at + len(pixels)

    def entry(tag: int, typ: int, count: int, value: int) -> bytes:
        if typ == 3 and count == 1:
            return struct.pack(e + "HHIHH", tag, typ, count, value, 0)
        return struct.pack(e + "HHII", tag, typ, count, value)

    entries = [
        entry(256, size_type, 1, width),
        entry(257, size_type, 1, height),
        entry(258, 3, 3, bits_at),
        entry(259, 3, 1, 1),
        entry(262, 3, 1, 2),
        entry(273, 4, 1, strip_at),
        entry(277, 3, 1, 3),
        entry(278, 4, 1, height if rows_per_strip is None else rows_per_strip),
        entry(279, 4, 1, len(pixels)),
    ]
    head = byte_order.encode() + struct.pack(e + "HI", 42, ifd_at) + struct.pack(e + "HHHH", 8, 8, 8, 0)
    ifd = struct.pack(e + "H", len(entries)) + b"".join(entries) + struct.pack(e + "I", 0)
    return head + pixels + ifd


def tiff_tiled_by_hand(rgb: np.ndarray, tile: int, declared_tile: int | None = None) -> bytes:
    """Uncompressed little-endian RGB TIFF in ``tile`` x ``tile`` tiles (edge tiles padded, as the spec says).

    ``declared_tile`` overrides the TileWidth/TileLength written, to lie about the buffer a decoder needs.
    """
    height, width = rgb.shape[:2]
    across, down = -(-width // tile), -(-height // tile)
    padded = np.zeros((down * tile, across * tile, 3), np.uint8)
    padded[:height, :width] = rgb
    tiles = [
        padded[y : y + tile, x : x + tile].tobytes()
        for y in range(0, down * tile, tile)
        for x in range(0, across * tile, tile)
    ]
    bits_at = 8
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * len(tiles)
    data_at = counts_at + 4 * len(tiles)
    offsets = [data_at + i * len(tiles[0]) for i in range(len(tiles))]
    ifd_at = data_at + sum(map(len, tiles))
    declared = declared_tile or tile
    entries = [
        struct.pack("<HHII", 256, 4, 1, width),
        struct.pack("<HHII", 257, 4, 1, height),
        struct.pack("<HHII", 258, 3, 3, bits_at),
        struct.pack("<HHIHH", 259, 3, 1, 1, 0),
        struct.pack("<HHIHH", 262, 3, 1, 2, 0),
        struct.pack("<HHIHH", 277, 3, 1, 3, 0),
        struct.pack("<HHII", 322, 4, 1, declared),
        struct.pack("<HHII", 323, 4, 1, declared),
        struct.pack("<HHII", 324, 4, len(tiles), offsets_at),
        struct.pack("<HHII", 325, 4, len(tiles), counts_at),
    ]
    return (
        b"II"
        + struct.pack("<HI", 42, ifd_at)
        + struct.pack("<HHH", 8, 8, 8)
        + struct.pack(f"<{len(tiles)}I", *offsets)
        + struct.pack(f"<{len(tiles)}I", *[len(t) for t in tiles])
        + b"".join(tiles)
        + struct.pack("<H", len(entries))
        + b"".join(entries)
        + struct.pack("<I", 0)
    )


# --------------------------------------------------------------------------- sniffing and formats

ENCODINGS = {
    "jpeg": lambda img: encode(".jpg", img, cv2.IMWRITE_JPEG_QUALITY, 95),
    "jpeg-progressive": lambda img: encode(".jpg", img, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    "png": lambda img: encode(".png", img),
    "webp-lossy": lambda img: encode(".webp", img, cv2.IMWRITE_WEBP_QUALITY, 95),
    "webp-lossless": lambda img: encode(".webp", img, cv2.IMWRITE_WEBP_QUALITY, 101),
    "webp-alpha": lambda img: pil_bytes(with_transparent_pixel(img), "WEBP", quality=95),  # VP8X+ALPH+VP8
    "webp-lossless-alpha": lambda img: pil_bytes(pil_from_bgr(img).convert("RGBA"), "WEBP", lossless=True),
    "webp-extended": lambda img: pil_bytes(pil_from_bgr(img), "WEBP", lossless=True, exif=Image.Exif()),  # VP8X+VP8L
    "bmp": lambda img: encode(".bmp", img),
    "bmp-top-down": bmp_top_down,
    "bmp-rgba": lambda img: pil_bytes(pil_from_bgr(img).convert("RGBA"), "BMP"),
    "bmp-palette": lambda img: pil_bytes(pil_from_bgr(img).convert("P"), "BMP"),
    "tiff": lambda img: encode(".tiff", img),
    "tiff-lzw": lambda img: pil_bytes(pil_from_bgr(img), "TIFF", compression="tiff_lzw"),
    "tiff-jpeg": lambda img: pil_bytes(pil_from_bgr(img), "TIFF", compression="jpeg"),
    "tiff-le-short": lambda img: tiff_by_hand(img[:, :, ::-1], "II", 3),
    "tiff-be-long": lambda img: tiff_by_hand(img[:, :, ::-1], "MM", 4),
    # 32x32x3 bytes: libtiff 4.7 refuses uncompressed tiles whose size is not a multiple of 1 KiB
    "tiff-tiled": lambda img: tiff_tiled_by_hand(img[:, :, ::-1], 32),
}
LOSSY = {"jpeg", "jpeg-progressive", "webp-lossy", "webp-alpha", "bmp-palette", "tiff-jpeg"}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_format_decodes_to_its_header_size_as_bgr_uint8(encoding: str) -> None:
    source = marked_image(61, 35)  # odd sizes: row padding, chroma subsampling
    source[20:, 30:] = (200, 120, 40)
    data = ENCODINGS[encoding](source)
    header = read_header(data, ImageLimits())
    assert header.format == encoding.split("-")[0]
    assert sniff_format(data) == header.format
    assert (header.width, header.height, header.orientation) == (61, 35, 1)

    prepared = prepare(data, ImageLimits())
    assert prepared.image.shape == (35, 61, 3)
    assert prepared.image.dtype == np.uint8 and prepared.image.flags.c_contiguous
    assert (prepared.width, prepared.height, prepared.stored_width, prepared.stored_height) == (61, 35, 61, 35)
    assert set(prepared.timings_ms) == {"sniff", "decode", "orient"}
    if encoding not in LOSSY:
        np.testing.assert_array_equal(prepared.image, source)
    elif encoding != "bmp-palette":
        assert np.abs(prepared.image.astype(int) - source).mean() < 4


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (minimal_pdf(), "PDF"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "GIF"),
        (b"hello, this is text", "unrecognised"),
        (b"II+\x00\x08\x00\x00\x00" + bytes(16), "BigTIFF"),
        (b"\x00\x00\x00\x1cftypheic" + bytes(20), "HEIC"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "unrecognised"),
    ],
)
def test_other_formats_are_unsupported(data: bytes, what: str) -> None:
    with pytest.raises(ImageRejected) as info:
        sniff_format(data)
    assert info.value.code == UNSUPPORTED_FORMAT and what in info.value.message
    with rejected(UNSUPPORTED_FORMAT):
        prepare(data, ImageLimits())


def test_empty_bytes_are_empty_image() -> None:
    for call in (sniff_format, lambda d: read_header(d, ImageLimits()), lambda d: prepare(d, ImageLimits())):
        with rejected(EMPTY_IMAGE):
            call(b"")


def test_header_matches_the_decoder_on_the_sample_photos(sample_images: dict[str, Path]) -> None:
    for name, path in sample_images.items():
        data = path.read_bytes()
        header = read_header(data, ImageLimits())
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert (header.height, header.width) == decoded.shape[:2], name
        assert prepare(data, ImageLimits()).image.shape == (*decoded.shape[:2], 3), name


def test_prepare_bus_jpeg(sample_jpeg: bytes) -> None:
    prepared = prepare(sample_jpeg, ImageLimits())
    assert prepared.format == "jpeg" and prepared.orientation == 1
    assert prepared.image.shape == (1080, 810, 3) and (prepared.width, prepared.height) == (810, 1080)
    np.testing.assert_array_equal(prepared.image, cv2.imdecode(np.frombuffer(sample_jpeg, np.uint8), cv2.IMREAD_COLOR))
    assert all(ms >= 0 for ms in prepared.timings_ms.values())


# --------------------------------------------------------------------------- pixel normalisation


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
def test_grayscale_becomes_bgr(ext: str) -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (H, 1))[:, :W]
    image = prepare(encode(ext, grey), ImageLimits()).image
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[:, :, 0], image[:, :, 1])
    np.testing.assert_array_equal(image[:, :, 1], image[:, :, 2])
    if ext in (".png", ".bmp", ".tiff"):
        np.testing.assert_array_equal(image[:, :, 0], grey)


def test_bgra_png_is_composited_on_the_letterbox_grey() -> None:
    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[:, :, :3] = (10, 100, 250)
    bgra[:, :, 3] = [[0, 255, 128], [64, 200, 1]]
    data = encode(".png", bgra)
    image = prepare(data, ImageLimits()).image
    alpha = bgra[:, :, 3:].astype(float) / 255
    expected = np.round(bgra[:, :, :3] * alpha + ALPHA_BACKGROUND * (1 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)
    assert image[0, 0].tolist() == [ALPHA_BACKGROUND] * 3 and image[0, 1].tolist() == [10, 100, 250]
    black = decode(data, read_header(data, ImageLimits()), alpha_background=0)
    assert black[0, 0].tolist() == [0, 0, 0]


def test_opaque_bgra_and_grey_alpha_pngs() -> None:
    bgra = np.dstack([marked_image(), np.full((H, W), 255, np.uint8)])
    np.testing.assert_array_equal(prepare(encode(".png", bgra), ImageLimits()).image, marked_image())
    grey_alpha = pil_bytes(Image.new("LA", (5, 4), (200, 0)), "PNG")  # fully transparent grey
    assert (prepare(grey_alpha, ImageLimits()).image == ALPHA_BACKGROUND).all()


@pytest.mark.parametrize("ext", [".png", ".tiff"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_is_scaled_by_a_shift(ext: str, channels: int) -> None:
    rng = np.random.default_rng(7)
    deep = rng.integers(0, 65536, size=(H, W, channels), dtype=np.uint16).squeeze()
    image = prepare(encode(ext, deep), ImageLimits()).image
    expected = (deep >> 8).astype(np.uint8)
    if channels == 1:
        expected = np.dstack([expected] * 3)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, expected)


def test_cmyk_jpeg_decodes_to_bgr() -> None:
    data = pil_bytes(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = prepare(data, ImageLimits()).image
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    b, g, r = image.reshape(-1, 3).mean(axis=0)
    assert r > 235 and b < 20 and g < 20


def test_float_tiff_is_unsupported() -> None:
    data = pil_bytes(Image.new("F", (8, 6), 0.5), "TIFF")
    with rejected(UNSUPPORTED_FORMAT):
        prepare(data, ImageLimits())


# --------------------------------------------------------------------------- orientation

# Where the stored top-left (red) and top-right (green) markers end up as a viewer shows the image.
EXPECTED_CORNERS = {
    1: ("tl", "tr"),
    2: ("tr", "tl"),
    3: ("br", "bl"),
    4: ("bl", "br"),
    5: ("tl", "bl"),
    6: ("tr", "br"),
    7: ("br", "tr"),
    8: ("bl", "tl"),
}


def assert_oriented(image: np.ndarray, orientation: int) -> None:
    expected_shape = (W, H, 3) if orientation >= 5 else (H, W, 3)
    assert image.shape == expected_shape
    red, green = EXPECTED_CORNERS[orientation]
    found = corners(image)
    assert found[red] == "red" and found[green] == "green", (orientation, found)
    assert sorted(found.values()) == ["green", "grey", "grey", "red"]


@pytest.mark.parametrize("byte_order", ["MM", "II"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_a_jpeg(orientation: int, byte_order: str) -> None:
    data = exif_jpeg(marked_image(), orientation, byte_order=byte_order)
    header = read_header(data, ImageLimits())
    assert (header.width, header.height, header.orientation) == (W, H, orientation)
    prepared = prepare(data, ImageLimits())
    assert prepared.orientation == orientation
    assert (prepared.stored_width, prepared.stored_height) == (W, H)
    assert (prepared.width, prepared.height) == header.oriented_size
    assert_oriented(prepared.image, orientation)
    assert np.abs(prepared.image.astype(int) - exif_oriented_pil(data)).mean() < 2
    assert decode(data, header).shape == (H, W, 3)  # decode itself leaves the pixels as stored


def test_exif_jpeg_keeps_the_compressed_pixels() -> None:
    plain = encode(".jpg", marked_image())
    tagged = exif_jpeg(plain, 6)
    np.testing.assert_array_equal(
        decode(tagged, read_header(tagged, ImageLimits())), decode(plain, read_header(plain, ImageLimits()))
    )


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_other_containers(fmt: str, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(pil_from_bgr(marked_image()), fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    header = read_header(data, ImageLimits())
    assert (header.format, header.width, header.height, header.orientation) == (fmt.lower(), W, H, orientation)
    prepared = prepare(data, ImageLimits())
    assert_oriented(prepared.image, orientation)
    np.testing.assert_array_equal(prepared.image, exif_oriented_pil(data))
    # OpenCV orients TIFFs itself; decode() must still mean "as stored" for every format.
    np.testing.assert_array_equal(decode(data, header), marked_image())


def test_png_exif_with_a_bad_crc_is_ignored() -> None:
    png = encode(".png", marked_image())
    chunk = bytearray(png_chunk(b"eXIf", exif_block(6)))
    chunk[-1] ^= 0xFF
    data = png[:33] + bytes(chunk) + png[33:]
    assert read_header(data, ImageLimits()).orientation == 1


def test_apply_orientation_against_numpy() -> None:
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    expected = {
        1: stored,
        2: stored[:, ::-1],
        3: stored[::-1, ::-1],
        4: stored[::-1],
        5: stored.transpose(1, 0, 2),
        6: np.rot90(stored, k=-1),
        7: np.rot90(stored, k=-1)[::-1],
        8: np.rot90(stored, k=1),
    }
    for orientation, want in expected.items():
        np.testing.assert_array_equal(apply_orientation(stored, orientation), want, err_msg=str(orientation))
    assert apply_orientation(stored, 1) is stored
    with pytest.raises(ValueError, match=r"1\.\.8"):
        apply_orientation(stored, 9)


def _malformed_exif_payloads() -> dict[str, bytes]:
    good = exif_block(6)
    return {
        "ifd-offset-past-end": good[:4] + struct.pack(">I", 0xFFFFFFF0) + good[8:],
        "entry-count-past-end": good[:8] + struct.pack(">H", 0xFFFF) + good[10:],
        "bad-byte-order": b"XX" + good[2:],
        "bad-magic": good[:2] + struct.pack(">H", 43) + good[4:],
        "orientation-9": exif_block(9),
        "orientation-0": exif_block(0),
        "orientation-as-ascii": good[:12] + struct.pack(">H", 2) + good[14:],
        "value-offset-past-end": good[:12] + struct.pack(">HII", 3, 4, 0x7FFFFFFF) + good[22:],
        "cut-short": good[:11],
        "empty": b"",
    }


@pytest.mark.parametrize(("name", "payload"), sorted(_malformed_exif_payloads().items()))
def test_malformed_exif_does_not_fail_the_image(name: str, payload: bytes) -> None:
    data = insert_app1(encode(".jpg", marked_image()), b"Exif\x00\x00" + payload)
    assert read_header(data, ImageLimits()).orientation == 1
    assert_oriented(prepare(data, ImageLimits()).image, 1)


# --------------------------------------------------------------------------- limits


def test_png_header_bomb_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_decoding(monkeypatch)
    bomb = png_header_bomb()
    assert len(bomb) < 200
    with pytest.raises(ImageRejected) as info:
        prepare(bomb, ImageLimits())
    assert info.value.code == PIXEL_LIMIT_EXCEEDED and "50000x50000" in info.value.message


def test_jpeg_frame_header_bomb() -> None:
    data = bytearray(encode(".jpg", marked_image()))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    with rejected(PIXEL_LIMIT_EXCEEDED):
        prepare(bytes(data), ImageLimits())


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_limits_come_from_every_header(encoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ENCODINGS[encoding](marked_image(61, 35))
    forbid_decoding(monkeypatch)
    for limits in (ImageLimits(max_pixels=61 * 35 - 1), ImageLimits(max_side=60)):
        with rejected(PIXEL_LIMIT_EXCEEDED):
            prepare(data, limits)
    with rejected(IMAGE_TOO_LARGE):
        prepare(data, ImageLimits(max_bytes=len(data) - 1))


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*_: object) -> None:
        raise AssertionError("cv2.imdecode must not run")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)  # the decoder imaging.decode calls


def test_a_png_chunk_longer_than_the_data_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenCV would allocate the declared 2 GB (and spend seconds) for this ~150-byte file; IEND still ends it.
    data = bytearray(encode(".png", marked_image()))
    assert data[37:41] == b"IDAT"
    struct.pack_into(">I", data, 33, 0x7F000000)
    forbid_decoding(monkeypatch)
    with rejected(TRUNCATED_IMAGE):
        prepare(bytes(data), ImageLimits())


def test_tiff_decode_buffers_count_against_the_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    huge_tile = tiff_tiled_by_hand(rgb, 16, declared_tile=12_000)  # OpenCV would allocate a 576 MB tile buffer
    huge_strip = tiff_by_hand(rgb, "II", 4, rows_per_strip=30_000_000)  # 2 x 30M-row strip buffer
    forbid_decoding(monkeypatch)
    for data in (huge_tile, huge_strip):
        assert (read_header(data, ImageLimits(max_pixels=10**9)).width, 2) == (2, 2)
        with rejected(PIXEL_LIMIT_EXCEEDED):
            read_header(data, ImageLimits())
    monkeypatch.undo()
    for rows in (H, 0xFFFFFFFF):  # the default 2**32 - 1 means "all rows in one strip"
        data = tiff_by_hand(marked_image()[:, :, ::-1], "II", 4, rows_per_strip=rows)
        np.testing.assert_array_equal(prepare(data, ImageLimits()).image, marked_image())


def test_a_progressive_jpeg_with_too_many_scans_is_refused() -> None:
    data = encode(".jpg", np.full((256, 256, 3), 128, np.uint8), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2], strict=True)]
    smallest = min(scans, key=len)  # a refinement scan of a few bytes; each copy is a full pass over the image
    assert prepare(data[:-2] + smallest * 50 + b"\xff\xd9", ImageLimits()).image.shape == (256, 256, 3)
    with rejected(CORRUPT_IMAGE):
        prepare(data[:-2] + smallest * 200 + b"\xff\xd9", ImageLimits())


def test_limits_at_the_boundary_are_accepted() -> None:
    data = encode(".png", marked_image(61, 35))
    assert prepare(data, ImageLimits(max_bytes=len(data), max_pixels=61 * 35, max_side=61)).image.shape == (35, 61, 3)


def test_zero_dimensions_are_invalid() -> None:
    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    with rejected(INVALID_DIMENSIONS):
        prepare(png, ImageLimits())
    jpeg = bytearray(encode(".jpg", marked_image()))
    struct.pack_into(">H", jpeg, jpeg.find(b"\xff\xc0") + 5, 0)  # height 0: "defined later by DNL"
    with rejected(INVALID_DIMENSIONS):
        prepare(bytes(jpeg), ImageLimits())


# --------------------------------------------------------------------------- truncated and corrupt data


@pytest.mark.parametrize("encoding", ["jpeg", "jpeg-progressive"])
def test_truncated_jpeg(encoding: str, sample_jpeg: bytes) -> None:
    for data in (sample_jpeg, ENCODINGS[encoding](np.random.default_rng(1).integers(0, 256, (H, W, 3), np.uint8))):
        with rejected(TRUNCATED_IMAGE):
            prepare(truncated_jpeg(data), ImageLimits())
        with rejected(TRUNCATED_IMAGE):
            prepare(data[:-2], ImageLimits())  # only the EOI marker missing
        with rejected(TRUNCATED_IMAGE):
            prepare(data[:20], ImageLimits())  # cut before the frame header
        with rejected(TRUNCATED_IMAGE):
            prepare(data[: len(data) // 2] + bytes(len(data) // 2), ImageLimits())  # zero-filled tail


def test_jpeg_with_padding_or_trailing_data_is_complete(sample_jpeg: bytes) -> None:
    expected = prepare(sample_jpeg, ImageLimits()).image
    motion_photo = sample_jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40  # a video after EOI
    for data in (sample_jpeg + bytes(7), sample_jpeg + bytes(100_000), motion_photo):
        np.testing.assert_array_equal(prepare(data, ImageLimits()).image, expected)


def test_truncated_png() -> None:
    noisy = np.random.default_rng(2).integers(0, 256, (H, W, 3), np.uint8)
    data = encode(".png", noisy)
    assert data.endswith(b"IEND\xaeB`\x82")
    for cut in (data[: len(data) // 2], data[:-12], data[:-3], data[:20]):
        with rejected(TRUNCATED_IMAGE):
            prepare(cut, ImageLimits())
    np.testing.assert_array_equal(prepare(data + b"trailing", ImageLimits()).image, noisy)


@pytest.mark.parametrize(
    "encoding", ["webp-lossy", "webp-alpha", "webp-extended", "bmp", "bmp-top-down", "tiff", "tiff-lzw", "tiff-tiled"]
)
def test_truncated_other_formats(encoding: str) -> None:
    data = ENCODINGS[encoding](np.random.default_rng(3).integers(0, 256, (H, W, 3), np.uint8))
    for cut in (data[: len(data) // 2], data[:-1]):
        with rejected(TRUNCATED_IMAGE):
            prepare(cut, ImageLimits())


def test_png_ihdr_with_a_bad_crc_is_corrupt() -> None:
    data = bytearray(encode(".png", marked_image()))
    data[17] ^= 0x01  # a width byte: the CRC no longer matches
    with rejected(CORRUPT_IMAGE):
        prepare(bytes(data), ImageLimits())


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff" + b"this is not a jpeg" * 100,
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8,
        b"\xff\xd8\xff\xd9",
    ],
)
def test_garbage_after_a_jpeg_magic_is_corrupt(data: bytes) -> None:
    with rejected(CORRUPT_IMAGE):
        prepare(data, ImageLimits())


def test_undecodable_pixels_are_corrupt() -> None:
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"not zlib") + png_chunk(b"IEND", b"")
    with rejected(CORRUPT_IMAGE):
        prepare(data, ImageLimits())


def test_decoded_size_must_match_the_header() -> None:
    data = encode(".png", marked_image())
    with rejected(CORRUPT_IMAGE):
        decode(data, ImageHeader("png", W + 1, H, 1))


def test_webp_canvas_that_disagrees_with_its_bitstream_is_corrupt() -> None:
    for encoding in ("webp-alpha", "webp-extended"):
        data = bytearray(ENCODINGS[encoding](marked_image()))
        assert data[12:16] == b"VP8X"
        data[24:27] = (4999).to_bytes(3, "little")  # canvas 5000 wide, bitstream 64
        with rejected(CORRUPT_IMAGE):
            prepare(bytes(data), ImageLimits())


def test_hierarchical_jpeg_is_unsupported() -> None:
    data = bytearray(encode(".jpg", marked_image()))
    data[data.find(b"\xff\xc0") + 1] = 0xC5
    with rejected(UNSUPPORTED_FORMAT):
        prepare(bytes(data), ImageLimits())


def test_image_rejected_carries_a_stable_code() -> None:
    error = ImageRejected(TRUNCATED_IMAGE, "cut")
    assert str(error) == "TRUNCATED_IMAGE: cut" and isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object
    assert (copy.code, copy.message) == (TRUNCATED_IMAGE, "cut")
    assert len(REJECTION_CODES) == 8
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_side=0)


@pytest.mark.parametrize("encoding", ["jpeg", "jpeg-progressive", "png", "webp-alpha", "bmp", "tiff-lzw"])
def test_mutated_bytes_give_an_image_or_a_rejection(encoding: str) -> None:
    """Damaged headers (bytes flipped in the first 256, or cut anywhere) never escape as another exception."""
    rng = np.random.default_rng(5)
    source = np.frombuffer(
        exif_jpeg(marked_image(), 6) if encoding == "jpeg" else ENCODINGS[encoding](marked_image()), np.uint8
    )
    for _ in range(80):
        mutated = source.copy()
        positions = rng.integers(0, min(len(source), 256), size=int(rng.integers(1, 5)))
        mutated[positions] = rng.integers(0, 256, size=len(positions))
        if rng.random() < 0.3:
            mutated = mutated[: int(rng.integers(1, len(mutated)))]
        try:
            prepared = prepare(mutated.tobytes(), ImageLimits())
        except ImageRejected as exc:
            assert exc.code in REJECTION_CODES
        else:
            assert prepared.image.dtype == np.uint8 and prepared.image.shape[2] == 3
