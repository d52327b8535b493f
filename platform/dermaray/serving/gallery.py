"""The searchable lesions as the service shows them: metadata, attributes, thumbnails, by row.

Rows follow the vector index's row order, so a search hit's row is a gallery row. Built from
the canonical lesion table's metadata (diagnosis, true attributes; not its images) and the
embeddings table (the grounded heads' predicted attributes, which attribute-conditioned search
ranks by); thumbnails are read from storage as responses show them (dermaray.serving.thumbnails).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dermaray.grounding.embed import PREDICTED_PREFIX
from dermaray.schema import ATTRIBUTE_NAMES, DIAGNOSES_BY_CODE
from dermaray.serving.thumbnails import Thumbnails

LESION_COLUMNS = ["lesion_id", "diagnosis", *ATTRIBUTE_NAMES]  # no images: thumbnails are read as shown


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def diagnosis_name(code: str | None) -> str | None:
    return DIAGNOSES_BY_CODE[code].name if code in DIAGNOSES_BY_CODE else None


def attribute_dict(names: Sequence[str], values: Sequence[float]) -> dict[str, float | None]:
    return {n: (round(float(v), 4) if np.isfinite(v) else None) for n, v in zip(names, values, strict=True)}


@dataclass
class Gallery:
    ids: list[str]
    diagnoses: list[str | None]
    attributes: np.ndarray  # [n, len(ATTRIBUTE_NAMES)] true values, NaN where unknown
    predicted_names: list[str]
    predicted: np.ndarray  # [n, len(predicted_names)] the grounded heads' predictions
    thumbnails: Thumbnails | None  # None: the embeddings job wrote none

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        lesions: pa.Table,
        embeddings: pa.Table,
        predicted_names: Sequence[str],
        thumbnails: Thumbnails | None = None,
    ) -> Gallery:
        """Rows in the order of `ids` (the index's); every id must be in both tables."""
        ids = list(ids)
        lesion_row = _rows_by_id(lesions, "lesion table")
        embedding_row = _rows_by_id(embeddings, "embeddings table")
        missing = [i for i in ids if i not in lesion_row or i not in embedding_row]
        if missing:
            raise ValueError(
                f"{len(missing)} indexed lesions are missing from the lesion or embeddings table, e.g. {missing[:3]}"
            )
        take_lesions = pa.array([lesion_row[i] for i in ids], pa.int64())
        lesions = lesions.take(take_lesions)
        embeddings = embeddings.take(pa.array([embedding_row[i] for i in ids], pa.int64()))
        attributes = (
            np.stack([_floats(lesions, name) for name in ATTRIBUTE_NAMES], axis=1) if ids else np.zeros((0, len(ATTRIBUTE_NAMES)))
        )
        names = [n for n in predicted_names if PREDICTED_PREFIX + n in embeddings.column_names]
        predicted = (
            np.stack([_floats(embeddings, PREDICTED_PREFIX + n) for n in names], axis=1)
            if names and ids
            else np.zeros((len(ids), len(names)))
        )
        return cls(ids, lesions["diagnosis"].to_pylist(), attributes, names, predicted, thumbnails)

    def __post_init__(self) -> None:
        self._row = {i: r for r, i in enumerate(self.ids)}
        # Each predicted attribute's rows in value order, sorted once: attribute search is then a
        # binary search, not a sort of the whole gallery per request. Rows without a value go last.
        self._by_value = []
        for column in self.predicted.T:
            known = np.flatnonzero(~np.isnan(column))
            order = known[np.argsort(column[known], kind="stable")]
            self._by_value.append((column[order], order, np.flatnonzero(np.isnan(column))))

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, lesion_id: str) -> int | None:
        return self._row.get(lesion_id)

    def thumbnail(self, row: int) -> bytes | None:
        """Row `row`'s JPEG thumbnail; None when the gallery has none or its lesion had no image."""
        return self.thumbnails.get(row) if self.thumbnails is not None else None

    def records(self, hits: Sequence[tuple[int, float | None]], inline_thumbnails: bool = False) -> list[dict[str, Any]]:
        """`record` of each (row, score), the thumbnails of them all read at once."""
        jpegs = (
            self.thumbnails.get_many([r for r, _ in hits])
            if inline_thumbnails and self.thumbnails is not None
            else [None] * len(hits)
        )
        return [self.record(r, s, inline_thumbnails, jpeg) for (r, s), jpeg in zip(hits, jpegs, strict=True)]

    def record(
        self, row: int, score: float | None = None, inline_thumbnail: bool = False, jpeg: bytes | None = None
    ) -> dict[str, Any]:
        """What a client sees of one lesion (`jpeg`: its thumbnail, when the caller has read it already)."""
        code = self.diagnoses[row]
        out: dict[str, Any] = {
            "lesion_id": self.ids[row],
            "diagnosis": code,
            "diagnosis_name": diagnosis_name(code),
            "attributes": attribute_dict(ATTRIBUTE_NAMES, self.attributes[row]),
        }
        if self.thumbnails is not None:
            out["thumbnail_url"] = f"/lesions/{self.ids[row]}/thumbnail"
        if score is not None:
            out["score"] = round(float(score), 6)
        if inline_thumbnail:
            jpeg = jpeg or self.thumbnail(row)
            out["thumbnail"] = data_url(jpeg, "image/jpeg") if jpeg else None
        return out

    def nearest_by_value(self, attribute: str, value: float, k: int) -> list[tuple[int, float]]:
        """Rows whose predicted `attribute` is closest to `value` (the grounding evaluation's
        "by head" retrieval), as (row, |difference|), closest first, ties by row."""
        values, order, unknown = self._by_value[self.predicted_names.index(attribute)]
        at = int(np.searchsorted(values, value))
        lo, hi = max(at - k, 0), min(at + k, len(values))  # the k closest lie within k places either side
        if lo < hi:  # widened over values equal to the window's ends: their gaps tie with the ends'
            lo = int(np.searchsorted(values, values[lo], side="left"))
            hi = int(np.searchsorted(values, values[hi - 1], side="right"))
        rows, gaps = order[lo:hi], np.abs(values[lo:hi] - value)
        closest = [(int(rows[i]), float(gaps[i])) for i in np.lexsort((rows, gaps))[:k]]
        return closest + [(int(r), float("nan")) for r in unknown[: k - len(closest)]]


def _rows_by_id(table: pa.Table, what: str) -> dict[str, int]:
    ids = table["lesion_id"].to_pylist()
    rows = {i: r for r, i in enumerate(ids)}
    if len(rows) != len(ids):
        raise ValueError(f"the {what} has duplicate lesion ids")
    return rows


def _floats(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.array([np.nan if v is None else v for v in table[column].to_pylist()], dtype=np.float64)
