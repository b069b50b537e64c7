"""EXIF and TIFF structure: a bounds-checked IFD reader and the EXIF orientation tag.

The same structure is a TIFF file's header and the EXIF block inside JPEG, PNG and WebP files. Offsets are never
trusted: a read past the data is ``TiffOutOfRange``, any other malformation ``TiffError``; a broken EXIF block
means orientation 1 (metadata damage is not a reason to refuse the pixels).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

import numpy as np

ORIENTATION_TAG: Final = 0x0112


class TiffError(Exception):
    """A TIFF structure (a TIFF file, or an EXIF block) is malformed."""


class TiffOutOfRange(TiffError):
    """An offset or count in a TIFF structure points past the end of its data."""


class IfdEntry(NamedTuple):
    type: int
    count: int
    value_pos: int  # absolute position of the 4-byte value/offset field


_TIFF_UINT_TYPES: Final = {1: "u1", 3: "u2", 4: "u4"}  # BYTE, SHORT, LONG: the unsigned integers we read
_IFD_ENTRY_DTYPES: Final = {  # one 12-byte IFD entry; "v" is the value itself or the offset of the values
    e: np.dtype([("tag", e + "u2"), ("type", e + "u2"), ("count", e + "u4"), ("v", e + "u4")]) for e in "<>"
}
# Bytes per value of each TIFF field type (index = type code); unknown types count 0, as libtiff skips them.
_TIFF_TYPE_SIZES: Final = np.array([0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 8, 8], dtype=np.uint64)


class TiffStructure:
    """Bounds-checked reader of the TIFF structure at ``data[base:end]``; offsets in it are relative to ``base``."""

    def __init__(self, data: bytes, base: int, end: int) -> None:
        if base < 0 or end > len(data) or end - base < 8:
            raise TiffOutOfRange("shorter than a TIFF header")
        order = data[base : base + 2]
        if order == b"II":
            self._endian = "<"
        elif order == b"MM":
            self._endian = ">"
        else:
            raise TiffError(f"byte order mark {order!r}")
        magic, self.ifd0 = struct.unpack_from(self._endian + "HI", data, base + 2)
        if magic != 42:
            raise TiffError(f"TIFF magic {magic}")
        self._data, self._base, self._end = data, base, end
        self._table_dtype = _IFD_ENTRY_DTYPES[self._endian]

    def _table(self, ifd_offset: int) -> tuple[np.ndarray, int]:
        """The IFD's entry table (a view) and the absolute position of the table."""
        pos = self._base + ifd_offset
        if ifd_offset < 8 or pos + 2 > self._end:
            raise TiffOutOfRange(f"IFD at offset {ifd_offset} is outside the data")
        (count,) = struct.unpack_from(self._endian + "H", self._data, pos)
        if count == 0:
            raise TiffError("empty IFD")
        if pos + 2 + 12 * count > self._end:
            raise TiffOutOfRange(f"IFD of {count} entries runs past the data")
        # Vectorised: a hostile IFD may hold 65535 entries; a Python loop over them would cost ~30 ms.
        return np.frombuffer(self._data, dtype=self._table_dtype, count=count, offset=pos + 2), pos + 2

    def entries(self, ifd_offset: int, wanted: frozenset[int]) -> dict[int, IfdEntry]:
        """The ``wanted`` tags of the IFD at ``ifd_offset`` (first occurrence wins)."""
        table, pos = self._table(ifd_offset)
        tags, found = table["tag"], {}
        for tag in wanted:  # a few tags: one vectorised comparison each (np.isin costs ~20x more here)
            hits = np.flatnonzero(tags == tag)
            if hits.size:
                i = int(hits[0])
                found[tag] = IfdEntry(int(table["type"][i]), int(table["count"][i]), pos + 12 * i + 8)
        return found

    def values_end(self, ifd_offset: int) -> int:
        """Absolute end of the IFD and of every value it stores out of line (all must be in the data)."""
        table, pos = self._table(ifd_offset)
        sizes = _TIFF_TYPE_SIZES[np.minimum(table["type"], len(_TIFF_TYPE_SIZES) - 1)] * table["count"]
        out_of_line = sizes > 4
        end = pos + 12 * len(table) + 4  # the table, then the next-IFD offset
        if out_of_line.any():
            end = max(end, self._base + int((table["v"][out_of_line] + sizes[out_of_line]).max()))
        return end

    def uints(self, entry: IfdEntry) -> np.ndarray:
        """The entry's values, which must be BYTE, SHORT or LONG (a view on the data, not a copy)."""
        code = _TIFF_UINT_TYPES.get(entry.type)
        if code is None:
            raise TiffError(f"field type {entry.type} where an unsigned integer is expected")
        if entry.count == 0:
            raise TiffError("field with no values")
        dtype = np.dtype(self._endian + code)
        nbytes = dtype.itemsize * entry.count
        if nbytes <= 4:
            pos = entry.value_pos  # small values sit in the entry itself
        else:
            (offset,) = struct.unpack_from(self._endian + "I", self._data, entry.value_pos)
            pos = self._base + offset
        if pos + nbytes > self._end:
            raise TiffOutOfRange("field values run past the data")
        return np.frombuffer(self._data, dtype=dtype, count=entry.count, offset=pos)

    def uint(self, entry: IfdEntry) -> int:
        return int(self.uints(entry)[0])


def exif_orientation(data: bytes, start: int, end: int) -> int:
    """Tag 0x0112 of IFD0 of the EXIF block at ``data[start:end]``; 1 when absent, invalid or unreadable."""
    if data.startswith(b"Exif\x00", start):
        start += 6  # JPEG APP1 framing; some PNG/WebP writers copy it into their chunk too
    try:
        tiff = TiffStructure(data, start, end)
        entry = tiff.entries(tiff.ifd0, frozenset({ORIENTATION_TAG})).get(ORIENTATION_TAG)
        value = tiff.uint(entry) if entry is not None else 1
    except (TiffError, struct.error):
        return 1  # a broken EXIF block is metadata damage, not a reason to refuse the pixels
    return value if 1 <= value <= 8 else 1
