"""What the classifier learns to predict (`classifier.label`), and which lesions carry it.

- `diagnosis`: the class code (MEL, NEV, ...), the finest level; null for most ISIC 2024 lesions.
- `superclass`: ISIC's iddx_1 (Benign / Indeterminate / Malignant).
- `malignant`: ISIC's `target` (benign / malignant), the ISIC 2024 challenge's task.

A lesion without the chosen label has no class index (`index` gives None): the classifier job
leaves it out of training and evaluation and counts it, never trains on a placeholder class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dermaray.schema import DIAGNOSES, SUPERCLASSES

LabelKind = Literal["diagnosis", "superclass", "malignant"]
MALIGNANT_CLASSES = ("benign", "malignant")  # index 1 (malignant, ISIC's target = 1) is the positive class


@dataclass(frozen=True)
class LabelSpec:
    kind: str
    column: str  # the lesion table's column (LESION_SCHEMA)
    classes: tuple[str, ...]

    def index(self, value: Any) -> int | None:
        """The class index of a column value; None when the lesion does not carry this label."""
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        if self.kind == "malignant":
            return int(bool(value))
        try:
            return self.classes.index(value)
        except ValueError:
            return None

    def indices(self, values: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(class indices of the labelled values, mask of which values are labelled)."""
        found = [self.index(v) for v in values]
        mask = np.array([i is not None for i in found], dtype=bool)
        return np.array([i for i in found if i is not None], dtype=np.int64), mask


LABELS: dict[str, LabelSpec] = {
    "diagnosis": LabelSpec("diagnosis", "diagnosis", tuple(d.code for d in DIAGNOSES)),
    "superclass": LabelSpec("superclass", "diagnosis_superclass", SUPERCLASSES),
    "malignant": LabelSpec("malignant", "malignant", MALIGNANT_CLASSES),
}


def label_spec(kind: str) -> LabelSpec:
    if kind not in LABELS:
        raise ValueError(f"unknown classifier label {kind!r}; valid: {', '.join(LABELS)}")
    return LABELS[kind]


def balanced_class_weights(counts: Iterable[int]) -> list[float]:
    """n / (classes x n_c) per class (scikit-learn's "balanced"), over the classes present; 0 for an absent class."""
    counts = np.asarray(list(counts), dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("no labelled training lesions to weight classes by")
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.tolist()


def tally(spec: LabelSpec, splits: Iterable[str | None], values: Iterable[Any], usable: Iterable[bool]) -> dict[str, Any]:
    """Which lesions a classifier run uses, per split: `used` (labelled and usable, e.g. with a note),
    `excluded_unlabelled` (without the label), `unusable` (labelled but not usable), and the used
    lesions per class (`class_counts`). Every lesion is in exactly one of the first three."""
    out: dict[str, Any] = {"used": {}, "excluded_unlabelled": {}, "unusable": {}, "class_counts": {}}
    for split, value, ok in zip(splits, values, usable, strict=True):
        split = split or "none"
        for key in ("used", "excluded_unlabelled", "unusable"):
            out[key].setdefault(split, 0)
        counts = out["class_counts"].setdefault(split, [0] * len(spec.classes))
        index = spec.index(value)
        if index is None:
            out["excluded_unlabelled"][split] += 1
        elif not ok:
            out["unusable"][split] += 1
        else:
            out["used"][split] += 1
            counts[index] += 1
    return out
