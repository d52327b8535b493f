"""The notes study: per prompt strategy, how often real notes contradict their lesion (per flag
kind, with 95% bootstrap intervals), how long they are and how fast they come; and how well the
audit's flags agree with hand labels (precision and recall per flag kind).

Pure functions of note tables; `benchmarks/notes_study.py` runs the notes job per strategy and
writes `notes_study.json` / `.md`, which the HTML report shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermaray.notes.audit import FLAG_CODES, audit_note
from dermaray.stats import bootstrap_ci, format_ci, mean_ci

# Columns of a lesion row that the audit reads: what a hand-labelled note keeps of its lesion.
AUDITED_COLUMNS: tuple[str, ...] = (
    "lesion_id", "diagnosis", "diagnosis_superclass", "diagnosis_full", "malignant", "age_approx", "sex", "anatom_site",
    "long_diam_mm", "area_mm2", "symm_2axis", "norm_border", "norm_color", "lesion_L", "lesion_A", "lesion_B",
    "delta_lb_norm",
)  # fmt: skip


def flag_codes_of(flags: Iterable[str] | None) -> set[str]:
    """The codes of a note row's `audit_flags` strings ("sex_mismatch:stated=...")."""
    return {f.split(":", 1)[0] for f in (() if flags is None else flags)}  # a list, or an array from pandas


def strategy_result(notes: Sequence[Mapping[str, Any]], generate_seconds: float | None) -> dict[str, Any]:
    """One strategy's figures from its note rows (NOTES_SCHEMA dicts) and the engine's generating time."""
    ok = [n for n in notes if n["error"] is None]
    codes = [flag_codes_of(n["audit_flags"]) for n in ok]
    words = [len((n["note"] or "").split()) for n in ok]
    tokens = sum(n["output_tokens"] or 0 for n in notes)
    return {
        "prompt_id": notes[0]["prompt_id"] if notes else None,
        "notes": len(ok),
        "errors": len(notes) - len(ok),
        "cut_at_max_tokens": sum(n["finish_reason"] == "length" for n in ok),
        "hallucinated": mean_ci([bool(c) for c in codes]),
        "per_flag": {code: mean_ci([code in c for c in codes]) for code in FLAG_CODES},
        "words": mean_ci(words),
        "output_tokens": tokens,
        "tokens_per_second": tokens / generate_seconds if generate_seconds else None,
        "notes_per_second": len(notes) / generate_seconds if generate_seconds else None,
    }


def audit_agreement(labelled: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Precision and recall of the audit's flags against hand labels, per flag code and over all codes.

    Each labelled note: {"note", "row" (AUDITED_COLUMNS), "labels": [{"kind": flag code,
    "stated", "contradicts": bool}, ...]}. A (note, code) pair is a true positive when the audit
    flags the code and the labeller marked a contradicting fact of that kind.
    """
    counts = {code: {"tp": 0, "fp": 0, "fn": 0} for code in FLAG_CODES}
    per_note = np.zeros((len(labelled), 3))  # tp, fp, fn of each note: the intervals resample notes
    misses = []
    for n, item in enumerate(labelled):
        truth = contradicted(item)
        found = set(audit_note(item["note"], item["row"]).codes)
        unknown = truth - set(FLAG_CODES)
        if unknown:
            raise ValueError(f"note {item.get('id')}: unknown label kinds {sorted(unknown)}; known: {list(FLAG_CODES)}")
        for code in FLAG_CODES:
            key = "tp" if code in truth and code in found else "fp" if code in found else "fn" if code in truth else None
            if key:
                counts[code][key] += 1
                per_note[n, ("tp", "fp", "fn").index(key)] += 1
        if truth != found:
            misses.append({"id": item.get("id"), "missed": sorted(truth - found), "false": sorted(found - truth)})
    per_code = {code: _precision_recall(**c) for code, c in counts.items() if any(c.values())}
    total = {k: sum(c[k] for c in counts.values()) for k in ("tp", "fp", "fn")}
    every = _precision_recall(**total)
    every["precision_ci"] = bootstrap_ci(lambda i: _ratio(per_note[i, 0].sum(), per_note[i, :2].sum()), len(labelled))
    every["recall_ci"] = bootstrap_ci(lambda i: _ratio(per_note[i, 0].sum(), per_note[i, ::2].sum()), len(labelled))
    return {"notes": len(labelled), "per_flag": per_code, "all": every, "disagreements": misses}


def contradicted(item: Mapping[str, Any]) -> set[str]:
    """The flag codes a labeller marked as contradicting the lesion in one labelled note."""
    return {fact["kind"] for fact in item["labels"] if fact["contradicts"]}


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


# The hand-labelled fixtures (tests/data/README.md): the audit's rules were extended reading the dev
# notes' disagreements; the test notes were labelled after that, and no rule was changed after reading them.
FIXTURE_PARTS: dict[str, tuple[str, ...]] = {
    "test": ("audit_labels_test.jsonl", "audit_labels_test_2.jsonl"),
    "dev": tuple(f"audit_labels{suffix}.jsonl" for suffix in ("", "_2", "_3", "_4", "_5")),
}


def agreement_by_part(folder: str | Path) -> dict[str, Any]:
    """audit_agreement on the notes of each part of FIXTURE_PARTS, from `folder` (tests/data)."""
    return {
        part: audit_agreement([item for name in names for item in load_labelled(Path(folder, name))])
        for part, names in FIXTURE_PARTS.items()
    }


def labeller_agreement(reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Precision and recall of one labeller's contradicting (note, kind) pairs against another's, on the notes
    both labelled: how far the labels themselves agree, which bounds what the audit can reach."""
    theirs = {item["id"]: item for item in other}
    counts = {"tp": 0, "fp": 0, "fn": 0}
    for item in reference:
        if item["id"] not in theirs:
            continue
        truth, found = contradicted(item), contradicted(theirs[item["id"]])
        counts["tp"] += len(truth & found)
        counts["fp"] += len(found - truth)
        counts["fn"] += len(truth - found)
    return {"notes": sum(item["id"] in theirs for item in reference), **_precision_recall(**counts)}


def _precision_recall(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }


def load_labelled(path: str | Path) -> list[dict[str, Any]]:
    """A hand-labelled fixture: one JSON object per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def markdown(results: Mapping[str, Any]) -> str:
    """The study's tables: strategies side by side, flag kinds per strategy, the audit against hand labels."""
    strategies: Mapping[str, Any] = results["strategies"]
    lines = [
        f"Notes by {results['model']} on {results['lesions']} lesions per strategy "
        f"(max_tokens {results['max_tokens']}, dtype {results.get('dtype')}); 95% bootstrap intervals over notes.",
        "",
        "| strategy | prompt | notes | errors | cut at max_tokens | hallucinated | words | output tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in strategies.items():
        rate = f"{s['tokens_per_second']:.0f}" if s.get("tokens_per_second") else "-"
        lines.append(
            f"| {name} | {s['prompt_id']} | {s['notes']} | {s['errors']} | {s['cut_at_max_tokens']} | "
            f"{format_ci(s['hallucinated'], percent=True)} | {format_ci(s['words'], digits=1)} | {rate} |"
        )
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name} | - | - | - | - | not run: {reason} | - | - |")
    codes = [c for c in FLAG_CODES if any(s["per_flag"][c][0] > 0 for s in strategies.values())]
    if codes:
        lines += [
            "",
            "Notes with each flag, per strategy:",
            "",
            "| flag | " + " | ".join(strategies) + " |",
            "|---|" + "---|" * len(strategies),
        ]
        for code in codes:
            lines.append(
                f"| {code} | " + " | ".join(format_ci(s["per_flag"][code], percent=True) for s in strategies.values()) + " |"
            )
    by_part = results.get("audit_agreement")
    if by_part:
        test, dev = by_part["test"], by_part["dev"]
        lines += [
            "",
            f"The audit against hand-labelled notes (tests/data): precision and recall over (note, flag) pairs on "
            f"{test['notes']} test notes, labelled after the rules were last changed, and on {dev['notes']} dev notes, "
            "whose disagreements the rules were extended on:",
            "",
            "| flag | test: labelled contradictions | flagged | precision | recall | dev: labelled | precision | recall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        empty = _precision_recall(0, 0, 0)  # a flag no note of that part was labelled or flagged with
        codes = [c for c in FLAG_CODES if c in test["per_flag"] or c in dev["per_flag"]]
        for code, t, d in [
            *((c, test["per_flag"].get(c, empty), dev["per_flag"].get(c, empty)) for c in codes),
            ("all flags", test["all"], dev["all"]),
        ]:
            lines.append(
                f"| {code} | {t['tp'] + t['fn']} | {t['tp'] + t['fp']} | {_fraction(t['precision'])} | "
                f"{_fraction(t['recall'])} | {d['tp'] + d['fn']} | {_fraction(d['precision'])} | {_fraction(d['recall'])} |"
            )
        lines += [
            "",
            f"All flags on the test notes, 95% bootstrap intervals over notes: precision "
            f"{format_ci(test['all']['precision_ci'], digits=2)}, recall {format_ci(test['all']['recall_ci'], digits=2)}.",
        ]
    return "\n".join(lines) + "\n"


def _fraction(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.2f}"


def classifier_markdown(results: Mapping[str, Any]) -> str:
    """Image only vs image + template note vs image + LLM note, per evaluation set (benchmarks/classifier_notes_study.py)."""
    runs: Mapping[str, Mapping[str, Any]] = results["results"]  # note kind -> classifier eval (set -> metrics)
    lines = [
        f"{results['lesions']} clinic lesions (80/10/10 train/val/test by patient) and {results['shifted']} lesions "
        f"of the shifted clinic; label-free notes for every lesion; {results['epochs']} epochs; 95% bootstrap "
        "intervals over the evaluated lesions.",
        "",
        "| set | lesions | input | accuracy | balanced accuracy | macro F1 |",
        "|---|---|---|---|---|---|",
    ]
    sets = list(next(iter(runs.values())))
    for name in sets:
        rows = [("image only (template-note run)", runs["template"][name].get("image"))]
        rows += [(f"image + {kind} note", runs[kind][name].get("fused")) for kind in runs]
        for title, m in rows:
            cells = [format_ci(m[f"{k}_ci"]) if m else "-" for k in ("accuracy", "balanced_accuracy", "macro_f1")]
            lines.append(f"| {name} | {runs['template'][name]['lesions']} | {title} | " + " | ".join(cells) + " |")
    lines += ["", "| set | notes | direction | P@1 | P@5 | P@10 | mAP |", "|---|---|---|---|---|---|---|"]
    for name in sets:
        for kind in runs:
            for key, title in (("image_to_note", "image → note"), ("note_to_image", "note → image")):
                m = runs[kind][name].get(key, {})
                lines.append(
                    f"| {name} | {kind} | {title} | "
                    + " | ".join(_fraction(m.get(k)) for k in ("P@1", "P@5", "P@10", "mAP"))
                    + " |"
                )
    return "\n".join(lines) + "\n"
