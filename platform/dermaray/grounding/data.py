"""Canonical lesion rows -> model inputs: decoded, processed pixels and z-scored attribute targets.

`Preprocessor` is a batch function (dict of numpy columns in, dict out), so Ray Data maps it
over the lesion table and a test calls it on a handful of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dermaray.config import ModelsConfig
from dermaray.grounding.labels import LABELS
from dermaray.grounding.model import AttributeScaler
from dermaray.images import decode_rgb

CLASS_CODES: tuple[str, ...] = LABELS["diagnosis"].classes

PIXELS = "pixel_values"
TARGETS = "targets"
LABEL = "label"


def image_processor(model_path: str, image_size: int | None = None) -> Any:
    """The model's own image processor; with `image_size`, resizing and cropping to that side instead."""
    from transformers import AutoImageProcessor

    if image_size is None:
        return AutoImageProcessor.from_pretrained(model_path)
    size = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return AutoImageProcessor.from_pretrained(model_path, **size)


class Preprocessor:
    """Decodes `image_bytes` with the model's own image processor; adds z-scored targets."""

    def __init__(
        self,
        model: str,
        models: ModelsConfig,
        scaler: AttributeScaler | None = None,
        keep: Sequence[str] = ("lesion_id",),
        image_size: int | None = None,
    ):
        """`model`: the grounding MLLM (a preset or folder), resolved on the node this runs on; `image_size`:
        the side the tower sees (None: its processor's)."""
        from dermaray.models.registry import resolve_model

        self.processor = image_processor(resolve_model("grounding_mllm", model, models), image_size)
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
        return out
