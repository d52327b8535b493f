"""The chain's choice of diagnosis (upload -> similar cases -> references), kept light for the ingress replica."""

from __future__ import annotations

import base64
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


def chain_guide(mode: str, upload: bytes, similar: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, bytes | None]:
    """(what the references were generated from, the guiding image's bytes) for /chain's `guide` mode.

    "upload": the uploaded lesion; "similar": the best-matching case's thumbnail (a data URL in the
    search results); "none": no guide. A "similar" guide without a thumbnail (serve.thumbnails unset)
    falls back to no guide, and the answer says so rather than failing the whole chain."""
    if mode == "none":
        return None, None
    if mode == "upload":
        return {"source": "upload"}, upload
    if mode != "similar":
        raise ValueError(f"guide must be none, upload or similar, got {mode!r}")
    top = similar[0] if similar else {}
    thumbnail = top.get("thumbnail")
    if not thumbnail:
        return {"source": None, "reason": "the best-matching case has no thumbnail (serve.thumbnails)"}, None
    return {"source": "similar", "lesion_id": top["lesion_id"]}, base64.b64decode(thumbnail.split(",", 1)[1])
