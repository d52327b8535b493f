"""Captions for diffusion training and sampling, built from the diagnosis and lesion attributes.

One template for every lesion, so the diagnosis word and the attribute words are the only
things that differ between captions: the adapter can only learn the condition from them, and a
prompt pair such as "large melanoma" / "small melanoma" tests attribute faithfulness directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dermaray.schema import DIAGNOSES_BY_CODE

# Area cut-offs (mm²) at about the quartiles of the synthetic lesions (median ~9 mm²,
# quartiles ~6 and ~14): "small" is the lowest quarter, "large" the top quarter, and the two
# extremes differ by more than 2x in area, so a generator that ignores the word is visible.
SMALL_BELOW_MM2 = 6.0
LARGE_FROM_MM2 = 14.0
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")
# The subject of a caption without a diagnosis: what a general base model knows of these images
# ("a skin lesion") and no more, so that telling diagnoses apart is left to the adapters.
GENERIC_SUBJECT = "lesion"


def condition_name(diagnosis_code: str) -> str:
    """The diagnosis as a prompt word: lower case, without the ", NOS" (not otherwise specified) tag."""
    if diagnosis_code not in DIAGNOSES_BY_CODE:
        raise ValueError(f"unknown diagnosis code {diagnosis_code!r}; valid codes: {', '.join(DIAGNOSES_BY_CODE)}")
    return DIAGNOSES_BY_CODE[diagnosis_code].name.removesuffix(", NOS").lower()


def size_word(area_mm2: float) -> str:
    """"small" below 6 mm², "large" from 14 mm², "medium" in between."""
    if not math.isfinite(area_mm2) or area_mm2 < 0:
        raise ValueError(f"area_mm2 must be a finite, non-negative number, got {area_mm2!r}")
    if area_mm2 < SMALL_BELOW_MM2:
        return "small"
    return "large" if area_mm2 >= LARGE_FROM_MM2 else "medium"


def caption(diagnosis_code: str | None, size_word: str | None = None, extra: str | Sequence[str] | None = None) -> str:
    """E.g. "a dermoscopic photo of large melanoma, skin lesion, irregular border".

    `diagnosis_code` None gives the diagnosis-free caption ("a dermoscopic photo of large lesion,
    skin lesion"). `extra` holds further attribute words (one string or several), appended after
    a comma each.
    """
    if size_word is not None and size_word not in SIZE_WORDS:
        raise ValueError(f"size_word must be one of {', '.join(SIZE_WORDS)} or None, got {size_word!r}")
    words = [extra] if isinstance(extra, str) else list(extra or ())
    if any(not isinstance(w, str) or not w.strip() for w in words):
        raise ValueError(f"extra must hold non-empty strings, got {extra!r}")
    name = GENERIC_SUBJECT if diagnosis_code is None else condition_name(diagnosis_code)
    subject = f"{size_word} {name}" if size_word else name
    return ", ".join([f"a dermoscopic photo of {subject}", "skin lesion", *(w.strip() for w in words)])
