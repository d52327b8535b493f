"""Planted defects: the bad input ingest must quarantine, with the reason it must give."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from dermaray.config import CorruptionPlan
from dermaray.data.synthetic import lesion_rng

EXPECTED_REASON = {
    "truncated_image": "truncated_image",
    "not_an_image": "not_an_image",
    "decompression_bomb": "decompression_bomb",
    "empty_image": "empty_image",
    "image_missing": "image_missing",
    "nan_attribute": "invalid_value",
    "negative_attribute": "invalid_value",
    "wrong_dtype": "invalid_value",
    "duplicate_id": "duplicate_id",
}
IMAGE_DEFECTS = ("truncated_image", "not_an_image", "decompression_bomb", "empty_image", "image_missing")


def plan_defects(n_lesions: int, plan: CorruptionPlan, seed: int) -> dict[int, str]:
    """Lesion index -> defect, one defect per lesion, chosen reproducibly."""
    kinds = [kind for kind, count in plan.model_dump().items() for _ in range(count)]
    if len(kinds) > n_lesions:
        raise ValueError(f"cannot plant {len(kinds)} defects in {n_lesions} lesions")
    chosen = lesion_rng(seed, 0, "defects").choice(n_lesions, size=len(kinds), replace=False)
    return {int(i): kind for i, kind in zip(chosen, kinds, strict=True)}


@lru_cache(maxsize=1)
def decompression_bomb_png() -> bytes:
    """A ~20 kB PNG that declares 12000 x 12000 pixels (144 MP; 432 MB decoded as RGB)."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def corrupt_image(kind: str, blob: bytes) -> bytes | None:
    """The stored image for a lesion with an image defect (None: leave it out of the store)."""
    if kind == "truncated_image":
        return blob[: len(blob) // 2]
    if kind == "not_an_image":
        return b"%PDF-1.4 this is a clinic letter, not an image\n" + bytes(np.arange(200, dtype=np.uint8))
    if kind == "decompression_bomb":
        return decompression_bomb_png()
    if kind == "empty_image":
        return b""
    if kind == "image_missing":
        return None
    return blob


def corrupt_row(kind: str, row: dict) -> dict:
    """The metadata row for a lesion with a metadata defect."""
    row = dict(row)
    if kind == "nan_attribute":
        row["tbp_lv_areaMM2"] = "NaN"
    elif kind == "negative_attribute":
        row["tbp_lv_perimeterMM"] = -abs(float(row["tbp_lv_perimeterMM"]))
    elif kind == "wrong_dtype":
        row["age_approx"] = "forty-five"
    return row
