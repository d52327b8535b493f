"""The chain's choice of diagnosis (upload -> similar cases -> references), kept light for the ingress replica."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from dermaray.schema import DIAGNOSES_BY_CODE


def chain_diagnosis(query: dict[str, Any], similar: Sequence[dict[str, Any]]) -> dict[str, str] | None:
    """The diagnosis the chain generates references of: the classifier's, else the one most similar cases
    share (ties: the more similar first); None when neither exists, e.g. a classifier of malignancy over a
    gallery whose similar lesions carry no diagnosis (most ISIC 2024 lesions)."""
    predicted = query.get("diagnosis")
    if predicted is not None:
        return {"code": predicted["code"], "name": predicted["name"], "source": "classifier"}
    shared = Counter(r["diagnosis"] for r in similar if r.get("diagnosis") in DIAGNOSES_BY_CODE).most_common(1)
    if not shared:
        return None
    code = shared[0][0]
    return {"code": code, "name": DIAGNOSES_BY_CODE[code].name, "source": "similar cases"}
