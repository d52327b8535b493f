"""Canonical lesion rows -> model inputs: decoded, processed pixels and z-scored attribute targets.

`Preprocessor` is a batch function (dict of numpy columns in, dict out), so Ray Data maps it
over the lesion table and a test calls it on a handful of rows.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from dermaray.grounding.model import AttributeScaler
from dermaray.schema import DIAGNOSES

CLASS_CODES: tuple[str, ...] = tuple(d.code for d in DIAGNOSES)
CLASS_INDEX: dict[str, int] = {code: i for i, code in enumerate(CLASS_CODES)}

PIXELS = "pixel_values"
TARGETS = "targets"
LABEL = "label"


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class Preprocessor:
    """Decodes `image_bytes` with the model's own image processor; adds z-scored targets and class labels."""

    def __init__(self, model_path: str, scaler: AttributeScaler | None = None, keep: Sequence[str] = ("lesion_id",)):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self.scaler = scaler
        self.keep = tuple(keep)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = [decode_rgb(b) for b in batch["image_bytes"]]
        out: dict[str, Any] = {k: batch[k] for k in self.keep if k in batch}
        if images:
            out[PIXELS] = self.processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
        else:  # a batch a filter emptied
            size = self.processor.crop_size if getattr(self.processor, "do_center_crop", False) else self.processor.size
            side = size.get("height") or size.get("shortest_edge")
            out[PIXELS] = np.zeros((0, 3, side, side), np.float32)
        if self.scaler is not None:
            out[TARGETS] = self.scaler.transform(np.stack([batch[a] for a in self.scaler.names], axis=1))
        if "diagnosis" in batch:
            out[LABEL] = np.array([CLASS_INDEX.get(d, -1) for d in batch["diagnosis"]], dtype=np.int64)
        return out
