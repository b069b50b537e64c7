"""What an image may be, and how one is refused: the rejection codes, ``ImageRejected`` and ``ImageLimits``.

Every refusal of the image library is an ``ImageRejected`` whose ``code`` is one of ``REJECTION_CODES``: stable
strings the preprocess stage puts on its dead-letter records and the gateway returns to clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# --------------------------------------------------------------------------- errors

EMPTY_IMAGE: Final = "EMPTY_IMAGE"
UNSUPPORTED_FORMAT: Final = "UNSUPPORTED_FORMAT"
IMAGE_TOO_LARGE: Final = "IMAGE_TOO_LARGE"
PIXEL_LIMIT_EXCEEDED: Final = "PIXEL_LIMIT_EXCEEDED"
DECODE_BUDGET_EXCEEDED: Final = "DECODE_BUDGET_EXCEEDED"
TRUNCATED_IMAGE: Final = "TRUNCATED_IMAGE"
CORRUPT_IMAGE: Final = "CORRUPT_IMAGE"
INVALID_DIMENSIONS: Final = "INVALID_DIMENSIONS"
REJECTION_CODES: Final = frozenset(
    {
        EMPTY_IMAGE,
        UNSUPPORTED_FORMAT,
        IMAGE_TOO_LARGE,
        PIXEL_LIMIT_EXCEEDED,
        DECODE_BUDGET_EXCEEDED,
        TRUNCATED_IMAGE,
        CORRUPT_IMAGE,
        INVALID_DIMENSIONS,
    }
)


class ImageRejected(ValueError):
    """The bytes are not an image this stage can use; ``code`` is one of ``REJECTION_CODES``."""

    def __init__(self, code: str, message: str) -> None:
        # args = (code, message) so the exception pickles and re-raises across processes unchanged.
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"



@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 20_000
    # What the decoder's output may cost (width x height x channels x bytes per sample, from the header): a
    # 315 KiB 16-bit RGBA PNG of 6300x6300 is under the pixel limit but decodes to 303 MiB (~900 MiB and 7 s of
    # CPU with the normalisation). 128 MiB admits any 8-bit RGB image under the pixel limit.
    max_decoded_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_side, self.max_decoded_bytes) <= 0:
            raise ValueError(f"image limits must be positive: {self}")


DEFAULT_LIMITS: Final = ImageLimits()
