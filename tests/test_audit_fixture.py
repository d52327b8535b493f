"""The audit against hand-labelled real notes (tests/data, whose README has the labelling rules).

Notes written by SmolLM2-135M (strategies P1, P2, LF and a few template notes) on synthetic
lesions, each labelled by reading it: every fact it states about the lesion and whether that fact
contradicts the lesion's metadata. Two fixtures: the dev notes, whose disagreements with the audit
the rules were extended on, and the test notes, on other lesions, labelled after the rules were
last changed: they measure the rules.
"""

from collections import Counter
from pathlib import Path

import pytest

from dermaray.notes.audit import FLAG_CODES
from dermaray.notes.study import FIXTURE_PARTS, agreement_by_part, labeller_agreement, load_labelled, markdown

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", params=[name for names in FIXTURE_PARTS.values() for name in names])
def labelled(request):
    return request.param, load_labelled(DATA / request.param)


def test_each_fixture_is_what_it_says(labelled):
    _, items = labelled
    assert len(items) >= 80 and len({item["id"] for item in items}) == len(items)
    assert {"P1", "P2", "LF"} <= Counter(item["strategy"] for item in items).keys()
    assert all(fact["kind"] in FLAG_CODES and isinstance(fact["contradicts"], bool) for item in items for fact in item["labels"])
    contradicting = Counter(fact["kind"] for item in items for fact in item["labels"] if fact["contradicts"])
    assert len(contradicting) >= 8, contradicting  # most kinds occur in real notes
    assert not any(fact["contradicts"] for item in items if item["strategy"] == "M" for fact in item["labels"])


def test_the_test_notes_are_on_other_lesions_than_the_dev_notes():
    lesions = {
        part: {item["row"]["lesion_id"] for name in names for item in load_labelled(DATA / name)}
        for part, names in FIXTURE_PARTS.items()
    }
    assert not lesions["test"] & lesions["dev"]


def test_audit_precision_and_recall_against_the_hand_labels():
    result = agreement_by_part(DATA)
    test, dev = result["test"]["all"], result["dev"]["all"]
    # The goal is precision >= 0.9 and recall >= 0.8 on notes the rules were not written on; measured
    # on the test notes: 0.906 / 0.895 (tests/data/README.md). The bounds are the measured figures less a
    # small margin: a change to the audit that loses agreement fails here.
    assert test["precision"] >= 0.89 and test["recall"] >= 0.88, test
    assert dev["precision"] >= 0.89 and dev["recall"] >= 0.87, dev
    assert test["precision_ci"][1] < test["precision"] < test["precision_ci"][2]
    assert test["tp"] + test["fn"] >= 500 and dev["tp"] + dev["fn"] >= 1200  # labelled contradictions measured
    table = markdown({"model": "smollm2-135m", "lesions": 60, "max_tokens": 128, "strategies": {}, "audit_agreement": result})
    assert "| all flags |" in table and f"{result['test']['notes']} test notes" in table


def test_two_labellers_of_the_same_notes_agree():
    # A second helper labelled 59 notes of the fifth sample blind: how far the labels agree bounds the audit.
    first = load_labelled(DATA / "audit_labels_5.jsonl")
    second = load_labelled(DATA / "audit_labels_5_second_labeller.jsonl")
    agreement = labeller_agreement(first, second)
    assert agreement["notes"] == len(second) == 59
    assert agreement["precision"] >= 0.95 and agreement["recall"] >= 0.95, agreement  # measured 0.99 / 0.99
