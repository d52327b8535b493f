"""Frozen vs grounded embeddings, side by side: attribute prediction and attribute-specific retrieval;
and the image + note classifier's evaluation table.

Inputs are embeddings tables (jobs.embeddings) as pandas frames; the output is plain dicts and
a Markdown table. Retrieval is leave-one-out within the evaluation set (held-out lesions, or the
shifted domain): every lesion queries all the others.

Three ways to retrieve, per attribute:
- frozen:            cosine over the untuned model's embedding;
- grounded:          cosine over the grounded embedding (one index serves every attribute);
- grounded, by head: neighbours by the attribute head's prediction (attribute-conditioned search).
The frozen model's attribute predictions come from a ridge probe fitted on its training-split
embeddings, so both columns of the prediction table are read out the same way (linearly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import Ridge

from dermaray.grounding.embed import PREDICTED_PREFIX
from dermaray.grounding.metrics import cosine_knn, regression_metrics, relevance, retrieval_metrics, spearman
from dermaray.grounding.model import AttributeScaler
from dermaray.schema import ATTRIBUTES_BY_NAME
from dermaray.stats import bootstrap_ci, format_ci, mean_ci

K = 10


def matrix(frame: pd.DataFrame, column: str = "embedding") -> np.ndarray:
    return np.stack(frame[column].to_numpy()).astype(np.float32)


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: (weights [D, A], intercept [A])."""
    ridge = Ridge(alpha=alpha).fit(train_x, train_y)
    return ridge.coef_.T, ridge.intercept_


def probe_predictions(train: pd.DataFrame, evaluated: pd.DataFrame, attributes: Sequence[str]) -> np.ndarray:
    """Frozen-embedding attribute predictions (native units), probed on the same scale the heads learn."""
    scaler = AttributeScaler.fit(attributes, train[list(attributes)].to_numpy())
    weights, intercept = ridge_probe(matrix(train), scaler.transform(train[list(attributes)].to_numpy()))
    return scaler.inverse(matrix(evaluated) @ weights + intercept)


def value_knn(values: np.ndarray, k: int, query_rows: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """Leave-one-out neighbours by |v_i - v_j| (ties by lower index) of every row, or of `query_rows`."""
    values = np.asarray(values, np.float64)
    rows = np.arange(len(values)) if query_rows is None else np.asarray(query_rows, np.int64)
    out = np.empty((len(rows), k), np.int64)
    for start in range(0, len(rows), chunk):
        queries = rows[start : start + chunk]
        gap = np.abs(values[queries, None] - values[None, :])
        gap[np.arange(len(queries)), queries] = np.inf
        out[start : start + len(queries)] = np.argsort(gap, axis=1, kind="stable")[:, :k]
    return out


def query_rows(count: int, max_queries: int | None, seed: int = 0) -> np.ndarray:
    """The rows of an evaluation set that query it: all of them, or a seeded sample of `max_queries` (in row order)."""
    if max_queries is None or max_queries >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, max_queries, replace=False))


def spearman_ci(truth: np.ndarray, predicted: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho with its 95% bootstrap interval over the lesions."""
    return bootstrap_ci(lambda i: spearman(truth[i], predicted[i]), len(truth), seed=seed)


def tau_of(values: np.ndarray, tau_std: float) -> float:
    """Relevance tolerance in native units: a fixed fraction of the attribute's spread."""
    return float(tau_std * np.std(values))


def evaluate_set(
    frozen: pd.DataFrame,
    grounded: pd.DataFrame,
    frozen_train: pd.DataFrame,
    attributes: Sequence[str],
    tau_std: float = 0.1,
    max_queries: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics on one evaluation set; `frozen` and `grounded` hold the same lesions.

    Prediction is scored on every lesion; retrieval from `max_queries` of them (a seeded sample, or all)
    against the whole set, each query leaving itself out."""
    # In lesion-id order: the seeded query sample and bootstrap draw rows by position, and an embeddings table's rows
    # come in the order its blocks were written, which differs between runs.
    grounded = grounded.sort_values("lesion_id", kind="stable", ignore_index=True)
    frozen = frozen.set_index("lesion_id").loc[grounded.lesion_id].reset_index()
    if len(grounded) <= K:
        raise ValueError(f"an evaluation set needs more than {K} lesions, got {len(grounded)}")
    probe = probe_predictions(frozen_train, frozen, attributes)
    rows = query_rows(len(grounded), max_queries, seed)
    neighbours = {}
    for kind, frame in (("frozen", frozen), ("grounded", grounded)):
        vectors = matrix(frame)
        neighbours[kind] = cosine_knn(vectors[rows], vectors, K, self_rows=rows)
    result: dict[str, Any] = {"lesions": len(grounded), "queries": len(rows), "tau_std": tau_std, "attributes": {}}
    for i, name in enumerate(attributes):
        truth = grounded[name].to_numpy(np.float64)
        tau = tau_of(truth, tau_std)
        by_head = value_knn(grounded[PREDICTED_PREFIX + name].to_numpy(), K, rows)
        found_by = {**neighbours, "grounded_head": by_head}
        retrieval = {
            kind: retrieval_metrics(truth[rows], truth, found, tau=tau, self_rows=rows) for kind, found in found_by.items()
        }
        hit = {kind: relevance(truth[rows], truth, found[:, :1], tau=tau)[:, 0].astype(float) for kind, found in found_by.items()}
        for kind in found_by:
            retrieval[kind]["R@1_ci"] = mean_ci(hit[kind], seed=seed)
        retrieval["grounded"]["R@1_gain_ci"] = mean_ci(hit["grounded"] - hit["frozen"], seed=seed)  # paired, per query
        predictions = {"frozen_probe": probe[:, i], "grounded": grounded[PREDICTED_PREFIX + name].to_numpy(np.float64)}
        prediction = {kind: regression_metrics(truth, p) for kind, p in predictions.items()}
        for kind, p in predictions.items():
            prediction[kind]["spearman_ci"] = spearman_ci(truth, p, seed=seed)
        result["attributes"][name] = {
            "unit": ATTRIBUTES_BY_NAME[name].unit,
            "tau": tau,
            "prediction": prediction,
            "retrieval": retrieval,
        }
    return result


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One table per evaluation set: prediction then retrieval, frozen and grounded side by side."""
    lines = []
    for set_name, res in results.items():
        queries = res.get("queries", res["lesions"])
        sampled = f", retrieval from {queries} sampled queries against all of them" if queries < res["lesions"] else ""
        lines += [
            f"### {set_name}: {res['lesions']} lesions{sampled} (relevance: |Δ| ≤ {res['tau_std']} sd)",
            "",
            "| attribute | MAE frozen probe | MAE grounded | Spearman frozen | Spearman grounded | R² grounded "
            "| R@1 frozen | R@1 grounded | R@1 by head | mAP@10 frozen | mAP@10 grounded "
            "| mean abs Δ@10 frozen | mean abs Δ@10 grounded |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, a in res["attributes"].items():
            p, r, unit = a["prediction"], a["retrieval"], f" {a['unit']}" if a["unit"] else ""
            lines.append(
                f"| {name} | {p['frozen_probe']['mae']:.3g}{unit} | {p['grounded']['mae']:.3g}{unit} "
                f"| {p['frozen_probe']['spearman']:.3f} | {p['grounded']['spearman']:.3f} | {p['grounded']['r2']:.3f} "
                f"| {r['frozen']['R@1']:.3f} | {r['grounded']['R@1']:.3f} | {r['grounded_head']['R@1']:.3f} "
                f"| {r['frozen']['mAP@10']:.3f} | {r['grounded']['mAP@10']:.3f} "
                f"| {r['frozen']['mean_abs_delta@10']:.3g} | {r['grounded']['mean_abs_delta@10']:.3g} |"
            )
        lines.append("")
    return "\n".join(lines)


def _score(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "-"
    return format_ci(ci) if ci is not None else f"{value:.3f}"


def classifier_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The classifier's evaluation (jobs.classifier): per set, image only vs image + note, then cross-modal retrieval."""
    label = next(iter(results.values()), {}).get("label", "diagnosis")  # summaries before classifier.label: diagnosis
    pauc = label == "malignant"
    lines = [
        f"Label: {label}. Brackets: 95% bootstrap intervals over the lesions."
        + (" pAUC: the ISIC 2024 challenge's partial AUC above 80% TPR (0.2 perfect, 0.02 chance)." if pauc else ""),
        "",
    ]
    lines += [
        "| set | lesions | excluded (no label) | head | accuracy | balanced accuracy | macro F1 |" + (" pAUC |" if pauc else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if pauc else ""),
    ]
    for name, r in results.items():
        for head, title in (("image", "image only"), ("fused", "image + note")):
            m = r.get(head)  # absent when the set had no labelled lesion
            keys = ("accuracy", "balanced_accuracy", "macro_f1")
            cells = [_score(m[k], m.get(f"{k}_ci")) for k in keys] if m else ["-"] * 3
            cells += [_score(m and m.get("pauc"))] if pauc else []
            lines.append(f"| {name} | {r['lesions']} | {r.get('excluded_unlabelled', 0)} | {title} | " + " | ".join(cells) + " |")
    lines += ["", "| set | direction | P@1 | P@5 | P@10 | mAP |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for key, title in (("image_to_note", "image → note"), ("note_to_image", "note → image")):
            m = r.get(key, {})
            lines.append(f"| {name} | {title} | " + " | ".join(_score(m.get(k)) for k in ("P@1", "P@5", "P@10", "mAP")) + " |")
    return "\n".join(lines) + "\n"
