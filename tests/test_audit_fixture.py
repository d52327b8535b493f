"""The audit against hand-labelled real notes (tests/data/audit_labels.jsonl).

157 notes written by SmolLM2-135M (strategies P1, P2, LF and a few template notes) on synthetic
lesions, each labelled by reading it: every fact it states about the lesion and whether that
fact contradicts the lesion's metadata (tests/data/README.md has the labelling rules). The
audit's rules were extended while reading the dev half only; the held-out half measures them.
"""

from collections import Counter
from pathlib import Path

import pytest

from dermaray.notes.audit import FLAG_CODES
from dermaray.notes.study import agreement_by_part, fixture_part, load_labelled, markdown

FIXTURE = Path(__file__).parent / "data" / "audit_labels.jsonl"


@pytest.fixture(scope="module")
def labelled():
    return load_labelled(FIXTURE)


def test_the_fixture_is_what_it_says(labelled):
    assert len(labelled) >= 150 and len({item["id"] for item in labelled}) == len(labelled)
    assert Counter(item["strategy"] for item in labelled).keys() == {"M", "P1", "P2", "LF"}
    assert all(
        fact["kind"] in FLAG_CODES and isinstance(fact["contradicts"], bool) for item in labelled for fact in item["labels"]
    )
    contradicting = Counter(fact["kind"] for item in labelled for fact in item["labels"] if fact["contradicts"])
    assert len(contradicting) >= 10  # nearly every kind occurs in real notes
    assert not any(fact["contradicts"] for item in labelled if item["strategy"] == "M" for fact in item["labels"])
    parts = Counter(fixture_part(item["id"]) for item in labelled)
    assert min(parts.values()) >= 60  # both halves are large enough to measure on


def test_audit_precision_and_recall_against_the_hand_labels(labelled):
    result = agreement_by_part(labelled)
    dev, held_out, overall = (result[p]["all"] for p in ("dev", "held_out", "all"))
    # The goal (precision >= 0.9, recall >= 0.8) on the half the rules were extended on ...
    assert dev["precision"] >= 0.9 and dev["recall"] >= 0.8, dev
    # ... and what the rules achieve on notes never looked at while writing them (measured: 0.81 / 0.81).
    assert held_out["precision"] >= 0.78 and held_out["recall"] >= 0.78, held_out
    assert overall["tp"] + overall["fn"] >= 200  # labelled contradictions measured
    table = markdown({"model": "smollm2-135m", "lesions": 60, "max_tokens": 128, "strategies": {}, "audit_agreement": result})
    assert "| held-out half, " in table and "| all flags |" in table
