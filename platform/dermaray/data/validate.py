"""Checks that turn a raw value into a canonical one or a quarantine reason."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image

from dermaray.schema import ATTRIBUTES_BY_NAME


class RowRejected(Exception):
    """A row cannot enter the canonical table; `reason` is a QUARANTINE_REASONS code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(blob: bytes | None, max_pixels: int, max_bytes: int) -> ImageInfo:
    """Decode all of `blob`'s image data (truncation only shows on decode) or raise RowRejected."""
    if blob is None:
        raise RowRejected("image_missing", "no image bytes")
    if len(blob) == 0:
        raise RowRejected("empty_image", "zero bytes")
    if len(blob) > max_bytes:
        raise RowRejected("image_too_large", f"{len(blob)} bytes > max_image_bytes {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise RowRejected("decompression_bomb", str(exc)) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, but also others on garbage
        raise RowRejected("not_an_image", f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RowRejected("decompression_bomb", f"declared {width}x{height} > max_image_pixels {max_pixels}")
    # A JPEG decodes at 1/8 scale: the decoder still reads every byte of its entropy-coded data, so a
    # truncated file fails as it would at full scale, and skips most of the inverse DCT, whose pixels
    # ingest would throw away. Other formats ignore the draft and decode whole.
    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    try:
        image.load()
    except Exception as exc:
        raise RowRejected("truncated_image", f"{type(exc).__name__}: {exc}") from None
    return ImageInfo(image.format or "unknown", width, height)


def is_blank(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def parse_text(value) -> str | None:
    return None if is_blank(value) else str(value).strip()


def parse_number(field: str, value, required: bool = False) -> float | None:
    """A finite float, None for a blank optional value; RowRejected otherwise."""
    if is_blank(value):
        if required:
            raise RowRejected("missing_value", f"{field} is empty")
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RowRejected("invalid_value", f"{field}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise RowRejected("invalid_value", f"{field}={value!r} is not finite")
    return number


def parse_attribute(name: str, value, required: bool) -> float | None:
    number = parse_number(name, value, required)
    if number is not None:
        bounds = ATTRIBUTES_BY_NAME[name]
        if not bounds.lower <= number <= bounds.upper:
            raise RowRejected("invalid_value", f"{name}={number} outside [{bounds.lower}, {bounds.upper}]")
    return number


def parse_age(value) -> float | None:
    age = parse_number("age", value)
    if age is not None and not 0 <= age <= 120:
        raise RowRejected("invalid_value", f"age={age} outside [0, 120]")
    return age
