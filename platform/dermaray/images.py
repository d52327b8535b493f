"""Encoded images (JPEG, PNG, WebP bytes as the lesion table and uploads hold them) as the models read them."""

from __future__ import annotations

import io

from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    """The image decoded to RGB pixels (the file is closed: nothing is read lazily later)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
