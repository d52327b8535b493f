"""Captions for diffusion training and sampling, built from the diagnosis and lesion attributes.

One template for every lesion, so the diagnosis word and the attribute words are the only
things that differ between captions: the adapter can only learn the condition from them, and a
prompt pair such as "large melanoma" / "small melanoma" tests attribute faithfulness directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dermaray.notes.prompts import SIZE_CATEGORIES, lesion_diameter_mm, size_category
from dermaray.schema import DIAGNOSES_BY_CODE

# The size words are the notes' size categories (dermaray.notes.prompts: long diameter under 3 mm,
# over 6 mm), so a caption and the note that follows it (diffusion.notes) name the same size. The
# extremes differ by more than 2x in diameter, so a generator that ignores the word is visible.
SIZE_WORDS: tuple[str, ...] = SIZE_CATEGORIES
# The subject of a caption without a diagnosis: what a general base model knows of these images
# ("a skin lesion") and no more, so that telling diagnoses apart is left to the adapters.
GENERIC_SUBJECT = "lesion"


def condition_name(diagnosis_code: str) -> str:
    """The diagnosis as a prompt word: lower case, without the ", NOS" (not otherwise specified) tag."""
    if diagnosis_code not in DIAGNOSES_BY_CODE:
        raise ValueError(f"unknown diagnosis code {diagnosis_code!r}; valid codes: {', '.join(DIAGNOSES_BY_CODE)}")
    return DIAGNOSES_BY_CODE[diagnosis_code].name.removesuffix(", NOS").lower()


def size_word(diameter_mm: float) -> str:
    """The caption's size word for a long diameter: "small" below 3 mm, "large" above 6 mm, "medium" in between."""
    return size_category(diameter_mm)


def lesion_size_word(row: Mapping[str, Any]) -> str | None:
    """The size word of a lesion row (long_diam_mm, else the disc-equivalent diameter of area_mm2), None when unknown."""
    diameter = lesion_diameter_mm(row)
    return None if diameter is None else size_category(diameter)


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
