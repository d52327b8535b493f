"""The notes study's pure parts: per-strategy figures, bootstrap intervals, the tables."""

import numpy as np

from dermaray.notes.audit import FLAG_CODES
from dermaray.notes.study import classifier_markdown, markdown, strategy_result
from dermaray.stats import bootstrap_ci, format_ci, mean_ci


def _row(note, flags=(), error=None, reason="stop", tokens=10):
    return {
        "prompt_id": "LF+demo+attr",
        "note": note,
        "error": error,
        "finish_reason": reason,
        "audit_flags": list(flags),
        "output_tokens": tokens,
    }


def test_bootstrap_intervals_hold_the_value_and_shrink_with_more_items():
    value, low, high = mean_ci([1.0] * 50)
    assert (value, low, high) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    small, large = mean_ci(rng.random(40) < 0.3), mean_ci(rng.random(4000) < 0.3)
    assert small[1] <= small[0] <= small[2] and large[1] <= large[0] <= large[2]
    assert large[2] - large[1] < (small[2] - small[1]) / 4  # ~1/sqrt(100) as wide
    assert np.isnan(bootstrap_ci(lambda i: 0.0, 0)[0])
    assert format_ci((0.5, 0.25, 0.75), percent=True) == "50.0% [25.0, 75.0]"


def test_strategy_result_counts_notes_flags_errors_and_speed():
    rows = [
        _row("A small pink papule.", ["sex_mismatch:stated=male,true=female", "sex_mismatch:stated=he,true=female"]),
        _row("A note.", reason="length"),
        _row(None, error="empty_note: 3 tokens of whitespace only", tokens=3),
        _row("Another note here.", ["invented_history:stated=bleeding,true=not in the metadata"]),
    ]
    result = strategy_result(rows, generate_seconds=2.0)
    assert result["notes"] == 3 and result["errors"] == 1 and result["cut_at_max_tokens"] == 1
    assert result["hallucinated"][0] == 2 / 3 and result["per_flag"]["sex_mismatch"][0] == 1 / 3
    assert set(result["per_flag"]) == set(FLAG_CODES)
    assert result["tokens_per_second"] == 33 / 2.0 and result["words"][0] == (4 + 2 + 3) / 3
    table = markdown(
        {"model": "m", "lesions": 4, "max_tokens": 8, "strategies": {"LF": result}, "skipped": {"P3": "text-only model"}}
    )
    assert "| LF | LF+demo+attr | 3 | 1 | 1 | 66.7% [" in table and "not run: text-only model" in table
    assert "| sex_mismatch | 33.3% [" in table


def test_classifier_table_puts_the_three_inputs_side_by_side():
    metrics = {k: 0.5 for k in ("accuracy", "balanced_accuracy", "macro_f1")} | {
        f"{k}_ci": (0.5, 0.4, 0.6) for k in ("accuracy", "balanced_accuracy", "macro_f1")
    }
    run = {"in-domain": {"lesions": 10, "image": metrics, "fused": metrics, "image_to_note": {"P@1": 0.3, "mAP": 0.4}}}
    table = classifier_markdown({"lesions": 100, "shifted": 20, "epochs": 2, "results": {"template": run, "llm": run}})
    assert "| in-domain | 10 | image only (template-note run) | 0.500 [0.400, 0.600] |" in table
    assert "image + template note" in table and "image + llm note" in table
    assert "| in-domain | llm | image → note | 0.30 | - | - | 0.40 |" in table
