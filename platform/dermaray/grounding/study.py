"""The grounding study's figures, from each arm's grounding_eval results (benchmarks/study.py).

Pure: dicts in, dicts and Markdown out. Every figure carries its 95% bootstrap interval
(lesions for Spearman, queries for R@1, paired per query for a gain).
"""

from __future__ import annotations

from typing import Any

from dermaray.stats import format_ci

GAIN_ATTRIBUTES = ("area_mm2", "perimeter_mm", "minor_axis_mm", "delta_lb_norm")
GOALS = {  # the study's goals: figure -> the least value that meets it
    "r1_gain": 0.15,
    "spearman_in_domain": 0.70,
    "area_spearman_shifted": 0.85,
}


def _sets(evaluated: dict[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """(the held-out set's results, the shifted clinic's set name, its test split's set name), by grounding_eval's
    set names; the shifted clinic's set is every lesion, or its test split where the model trained on the rest."""
    home = next(v for k, v in evaluated.items() if "held-out" in k)
    shifted = [k for k in evaluated if "domain shift" in k]
    test = next((k for k in shifted if "test split" in k), None)
    return home, next((k for k in shifted if "all lesions" in k), test), test


def figures(evaluated: dict[str, Any]) -> dict[str, Any]:
    """One arm's figures: R@1 gains over its frozen base and Spearman per attribute, in-domain and shifted."""
    home, shifted_set, test_set = _sets(evaluated)
    shifted = None if shifted_set is None else evaluated[shifted_set]
    scored = home["attributes"]
    gained = [a for a in GAIN_ATTRIBUTES if a in scored]

    def spearman(result: dict[str, Any], kind: str = "grounded") -> dict[str, list[float]]:
        return {a: v["prediction"][kind]["spearman_ci"] for a, v in result["attributes"].items()}

    out: dict[str, Any] = {
        "lesions": home["lesions"],
        "r1_gain": {a: scored[a]["retrieval"]["grounded"]["R@1_gain_ci"] for a in gained},
        "r1": {a: {k: v["R@1_ci"] for k, v in scored[a]["retrieval"].items()} for a in gained},
        "spearman_in_domain": spearman(home),
        "frozen_probe_spearman_in_domain": spearman(home, "frozen_probe"),
    }
    if shifted is not None:
        out["shifted_lesions"] = shifted["lesions"]
        # A model that trained on the shifted clinic's other splits (mixed clinics) is scored on its test split only.
        out["shifted_scored"] = "test split" if "test split" in shifted_set else "all lesions"
        out["spearman_shifted"] = spearman(shifted)
    if test_set is not None:  # the same lesions for every arm, mixed or not
        out["shifted_test_lesions"] = evaluated[test_set]["lesions"]
        out["spearman_shifted_test_split"] = spearman(evaluated[test_set])
    return out


def summarize(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arm's settings and figures (its grounding_eval results replaced by the figures drawn from them)."""
    out = {}
    for name, arm in arms.items():
        settings = {k: v for k, v in arm.items() if k != "grounding_eval"}
        out[name] = {**settings, **figures(arm["grounding_eval"])}
    return out


def _gain(ci: list[float] | None) -> str:
    if ci is None:
        return "-"
    value, low, high = ci
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _ci(ci: list[float] | None) -> str:
    return "-" if ci is None else format_ci(tuple(ci))


def markdown(study: dict[str, Any]) -> str:
    """The study's table: one row per figure, one column per arm, the goal beside it."""
    arms = study["arms"]
    names = list(arms)
    attributes = list(next(iter(arms.values()))["spearman_in_domain"])
    gained = [a for a in GAIN_ATTRIBUTES if a in attributes]
    lines = [
        f"{study['lesions']:,} synthetic lesions (+{study['shifted']:,} from the shifted clinic), {study['epochs']} epochs. "
        "Each arm's frozen baseline is its own untuned base at the base's input size. Brackets: 95% bootstrap "
        "intervals (lesions for Spearman; queries for R@1, the gain paired per query). R@1: the top neighbour within "
        "0.1 sd of the query's value.",
        "",
        "| figure | goal | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]

    def row(label: str, goal: str, cell) -> None:
        lines.append(f"| {label} | {goal} | " + " | ".join(cell(arms[n]) for n in names) + " |")

    in_domain, in_goal = "spearman_in_domain", f">= {GOALS['spearman_in_domain']:.2f}"
    for a in gained:
        row(f"R@1 gain over frozen, {a}", f">= +{GOALS['r1_gain']:.2f}", lambda arm, a=a: _gain(arm["r1_gain"].get(a)))
    for a in gained:
        row(
            f"R@1 frozen → grounded, {a}",
            "",
            lambda arm, a=a: f"{arm['r1'][a]['frozen'][0]:.3f} → {arm['r1'][a]['grounded'][0]:.3f}",
        )

    def worst(arm: dict[str, Any]) -> str:
        name = min(arm[in_domain], key=lambda n: arm[in_domain][n][0])
        return f"{arm[in_domain][name][0]:.3f} ({name})"

    row("Spearman in-domain, worst attribute", in_goal, worst)
    for a in attributes:
        row(f"Spearman in-domain, {a}", in_goal, lambda arm, a=a: _ci(arm[in_domain][a]))
    if all("spearman_shifted" in arm for arm in arms.values()):
        row(
            "shifted clinic, lesions scored",
            "",
            lambda arm: f"{arm['shifted_lesions']:,} ({arm.get('shifted_scored', 'all lesions')})",
        )
        row(
            "Spearman shifted clinic, area_mm2",
            f">= {GOALS['area_spearman_shifted']:.2f}",
            lambda arm: _ci(arm["spearman_shifted"].get("area_mm2")),
        )
        for a in attributes:
            if a != "area_mm2":
                row(f"Spearman shifted clinic, {a}", "", lambda arm, a=a: _ci(arm["spearman_shifted"][a]))
    if all("spearman_shifted_test_split" in arm for arm in arms.values()):
        row("shifted clinic's test split (like for like), lesions", "", lambda arm: f"{arm['shifted_test_lesions']:,}")
        for a in attributes:
            row(f"Spearman shifted test split, {a}", "", lambda arm, a=a: _ci(arm["spearman_shifted_test_split"][a]))
    return "\n".join(lines) + "\n"
