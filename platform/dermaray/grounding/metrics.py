"""Evaluation metrics for grounded embeddings: scikit-learn's where it has them, numpy for the rest.

Three things are measured:

* Attribute regression (a head predicting e.g. lesion area in mm^2): MAE, RMSE,
  Spearman rank correlation and R^2, in the attribute's native units.
* Attribute-specific content-based image retrieval (CBIR): for each query the
  k nearest gallery items by cosine similarity are retrieved, and a neighbour
  is *relevant* when its attribute value is close to the query's, either
  within a tolerance ``tau`` (|a_q - a_n| <= tau) or in the same quantile bin.
  Reported: hit-rate R@k, P@K, mAP@K, nDCG@K and the mean attribute gap of the
  neighbours next to the gap of a random gallery item (the chance reference).
* Classification (accuracy, balanced accuracy, macro F1, confusion matrix; for a
  binary task the ISIC 2024 challenge's partial AUC above 80% TPR) and
  class-based cross-modal retrieval (image -> text), where relevance is
  "same class": P@k and mAP over the full gallery ranking.

scikit-learn computes the regression scores, the ROC curve and its area; written here are
the retrieval scores it lacks (R@k, P@k, mAP@K, nDCG@K over attribute relevance, class P@k
and mAP over the full ranking) and the classification scores, which the classifier job
bootstraps 1,000 times per score and head: from one bincount they take microseconds a call,
scikit-learn's checked functions a few milliseconds (the tests compare the two). Every input
is validated here first, so a bad array gets an error naming it. Rankings break similarity
ties by the lower gallery index, so every result is deterministic. All scores are fractions
in [0, 1], never percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

_DEFAULT_CHUNK = 1024  # query rows per similarity block: 1024 x 20,000 float64 = 160 MB


# ----------------------------------------------------------------------------- validation


def _as_1d(x: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-d [n, d], got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    # Keep float32 as float32 (half the memory and time on 20k x 20k); promote the rest.
    a = a.astype(np.result_type(a.dtype, np.float32), copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _as_labels(x: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
        if not (a == np.round(a)).all():
            raise ValueError(f"{name} must hold integer class labels")
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if (a < 0).any():
        raise ValueError(f"{name} has negative labels; labels are 0..C-1")
    return a


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"shape mismatch: {name_a} has {len(a)} rows, {name_b} has {len(b)}")


def _check_ks(ks: Sequence[int], available: int, what: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty")
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    if max(ks) > available:
        raise ValueError(f"k={max(ks)} is larger than {what} ({available})")
    return ks


def _self_rows(
    exclude_self: bool,
    self_rows: np.ndarray | Sequence[int] | None,
    queries: np.ndarray,
    gallery: np.ndarray,
    names: tuple[str, str],
) -> np.ndarray | None:
    """The gallery row each query is (None: the queries are not in the gallery), checked against the data.
    exclude_self=True: the queries are the whole gallery, query i being row i; `self_rows`: a sample of the
    gallery's rows as queries. `names`: what the queries and the gallery are called in errors."""
    query_name, gallery_name = names
    if exclude_self and self_rows is not None:
        raise ValueError("give exclude_self or self_rows, not both")
    if exclude_self:
        if queries.shape != gallery.shape or not np.array_equal(queries, gallery):
            raise ValueError(f"exclude_self=True needs {query_name} to be {gallery_name} (same array)")
        return np.arange(len(gallery))
    if self_rows is None:
        return None
    rows = np.asarray(self_rows)
    if rows.ndim != 1 or len(rows) != len(queries) or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"self_rows must be {len(queries)} integer gallery rows, one per query, got shape {rows.shape}")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(gallery) or len(np.unique(rows)) != len(rows)):
        raise ValueError(f"self_rows must be distinct rows of the gallery [0, {len(gallery)})")
    if not np.array_equal(queries, gallery[rows]):
        raise ValueError(f"self_rows: {query_name} must be those rows of {gallery_name}")
    return rows.astype(np.int64)


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


# ----------------------------------------------------------------------------- regression


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Spearman rho and R^2 of predictions, in native units.

    Spearman is the Pearson correlation of average-tie ranks; it is NaN when
    either side is constant. R^2 = 1 - SS_res / SS_tot is NaN when y_true is
    constant (SS_tot = 0), rather than an arbitrary 0 or 1.
    """
    t = _as_1d(y_true, "y_true")
    p = _as_1d(y_pred, "y_pred")
    _same_length(t, p, "y_true", "y_pred")
    return {
        "mae": float(skm.mean_absolute_error(t, p)),
        "rmse": float(skm.root_mean_squared_error(t, p)),
        "spearman": spearman(t, p),
        # scikit-learn scores a constant y_true 1 or 0 (force_finite); undefined is NaN here
        "r2": float(skm.r2_score(t, p)) if np.ptp(t) > 0 else float("nan"),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of average-tie ranks (NaN when a side is constant)."""
    return _pearson(rankdata(a), rankdata(b))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    # A constant side has no ordering to correlate with: NaN, not a crash or a warning.
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


# ----------------------------------------------------------------------------- nearest neighbours


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Zero vectors stay zero (similarity 0 to everything) instead of dividing 0 by 0.
    return x / np.where(norms > 0, norms, 1)


def _ranked_top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Top-k column indices of each row, by descending value, ties by lower index."""
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, top, axis=1).min(axis=1)
    # argpartition picks arbitrarily among values tied with the k-th; redo those rows exactly.
    for r in np.flatnonzero((sims >= kth[:, None]).sum(axis=1) > k):
        above = np.flatnonzero(sims[r] > kth[r])
        tied = np.flatnonzero(sims[r] == kth[r])[: k - len(above)]
        top[r] = np.concatenate([above, tied])
    vals = np.take_along_axis(sims, top, axis=1)
    order = np.lexsort((top, -vals), axis=1)  # primary: similarity desc; secondary: index asc
    return np.take_along_axis(top, order, axis=1)


def cosine_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude_self: bool = False,
    *,
    self_rows: np.ndarray | Sequence[int] | None = None,
    chunk_size: int = _DEFAULT_CHUNK,
) -> np.ndarray:
    """Indices [Q, k] of each query's k most cosine-similar gallery rows, best first.

    Both sides are L2-normalised here (zero vectors get similarity 0). With
    ``exclude_self`` the queries are the gallery (Q == G, row i is item i) and
    item i is never returned for query i (leave-one-out); with ``self_rows`` the
    queries are those gallery rows (a sample of it), each never its own neighbour.
    Queries are processed ``chunk_size`` rows at a time so memory stays O(chunk_size * G).
    """
    q = _as_2d(queries, "queries")
    g = _as_2d(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"shape mismatch: queries have dim {q.shape[1]}, gallery has dim {g.shape[1]}")
    own = _self_rows(exclude_self, self_rows, q, g, ("queries", "the gallery"))
    available = g.shape[0] - 1 if own is not None else g.shape[0]
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > available:
        raise ValueError(f"k={k} is larger than the gallery ({available} candidates per query)")
    chunk = _check_chunk(chunk_size)
    q, g = _l2_normalise(q), _l2_normalise(g)
    out = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], chunk):
        sims = q[start : start + chunk] @ g.T
        if own is not None:
            sims[np.arange(sims.shape[0]), own[start : start + len(sims)]] = -np.inf
        out[start : start + len(sims)] = _ranked_top_k(sims, k)
    return out


# ----------------------------------------------------------------------------- attribute relevance


def quantile_bin_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """n_bins + 1 edges at evenly spaced quantiles of ``values`` (min and max included).

    Heavily repeated values can give repeated edges, i.e. empty bins; that is harmless.
    """
    v = _as_1d(values, "values")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.quantile(v, np.linspace(0.0, 1.0, int(n_bins) + 1))


def _check_relevance_rule(tau: float | None, bin_edges: np.ndarray | None) -> np.ndarray | None:
    if (tau is None) == (bin_edges is None):
        raise ValueError("give exactly one of tau or bin_edges")
    if tau is not None:
        if not np.isfinite(tau) or tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {tau}")
        return None
    edges = _as_1d(bin_edges, "bin_edges")
    if len(edges) < 2:
        raise ValueError("bin_edges needs at least 2 edges (one bin)")
    if (np.diff(edges) < 0).any():
        raise ValueError("bin_edges must be non-decreasing")
    return edges


def _bin_of(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Inner edges only: values below the first or above the last edge land in the end bins.
    return np.digitize(values, edges[1:-1])


def _check_neighbours(neighbours: np.ndarray, n_queries: int, n_gallery: int) -> np.ndarray:
    nb = np.asarray(neighbours)
    if nb.ndim != 2:
        raise ValueError(f"neighbours must be 2-d [Q, k], got shape {nb.shape}")
    if nb.size == 0:
        raise ValueError(f"neighbours is empty (shape {nb.shape})")
    if not np.issubdtype(nb.dtype, np.integer):
        raise ValueError(f"neighbours must hold integer gallery indices, got dtype {nb.dtype}")
    if nb.shape[0] != n_queries:
        raise ValueError(f"shape mismatch: neighbours has {nb.shape[0]} rows, query_values has {n_queries}")
    if nb.min() < 0 or nb.max() >= n_gallery:
        raise ValueError(f"neighbours has indices outside the gallery [0, {n_gallery})")
    return nb


def relevance(
    query_values: np.ndarray,
    gallery_values: np.ndarray,
    neighbours: np.ndarray,
    *,
    tau: float | None = None,
    bin_edges: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean [Q, k]: is neighbours[i, j] relevant to query i for this attribute?

    Relevant means |a_q - a_n| <= tau, or (with ``bin_edges``) a_q and a_n
    falling in the same bin, bins being ``np.digitize(values, bin_edges[1:-1])``.
    """
    edges = _check_relevance_rule(tau, bin_edges)
    qv = _as_1d(query_values, "query_values")
    gv = _as_1d(gallery_values, "gallery_values")
    nb = _check_neighbours(neighbours, len(qv), len(gv))
    if edges is None:
        return np.abs(qv[:, None] - gv[nb]) <= tau
    return _bin_of(qv, edges)[:, None] == _bin_of(gv, edges)[nb]


def _first_true(pred: Callable[[np.ndarray], np.ndarray], n_queries: int, n: int) -> np.ndarray:
    """Per query, the first index in [0, n] where a monotone (False..True) predicate holds."""
    lo = np.zeros(n_queries, dtype=np.int64)
    hi = np.full(n_queries, n, dtype=np.int64)
    while (active := lo < hi).any():
        mid = (lo + hi) // 2
        ok = pred(np.minimum(mid, n - 1))
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid + 1, lo)
    return lo


def relevant_counts(
    query_values: np.ndarray,
    gallery_values: np.ndarray,
    *,
    tau: float | None = None,
    bin_edges: np.ndarray | None = None,
    exclude_self: bool = False,
    self_rows: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Per query, how many gallery items are relevant (see :func:`relevance`).

    Needed to normalise AP and nDCG. With ``exclude_self`` the queries are the
    gallery (with ``self_rows``: those rows of it) and the query itself (always
    relevant to itself) is not counted.
    Runs in O((Q + G) log G) memory-light time: no dense Q x G matrix.
    """
    edges = _check_relevance_rule(tau, bin_edges)
    qv = _as_1d(query_values, "query_values")
    gv = _as_1d(gallery_values, "gallery_values")
    own = _self_rows(exclude_self, self_rows, qv, gv, ("query_values", "gallery_values"))
    return _relevant_counts(qv, gv, tau, edges, own is not None)


def _relevant_counts(qv: np.ndarray, gv: np.ndarray, tau: float | None, edges: np.ndarray | None, self_in: bool) -> np.ndarray:
    """`relevant_counts` of checked arrays; `self_in`: each query is one of the gallery's rows (not counted)."""
    if edges is None:
        s = np.sort(gv)
        # Bisection with the very comparison relevance() uses (|q - x| <= tau), rather than
        # searchsorted on q -/+ tau whose rounding can disagree at the boundary: counts then
        # always match the retrieved relevance exactly. In sorted order the relevant items
        # form one contiguous run [lo, hi), because fl(q - x) is monotone in x.
        lo = _first_true(lambda i: (s[i] >= qv) | (np.abs(qv - s[i]) <= tau), len(qv), len(s))
        hi = _first_true(lambda i: (s[i] > qv) & (np.abs(qv - s[i]) > tau), len(qv), len(s))
        counts = hi - lo
    else:
        per_bin = np.bincount(_bin_of(gv, edges), minlength=len(edges) - 1)
        counts = per_bin[_bin_of(qv, edges)]
    return counts - 1 if self_in else counts


# ----------------------------------------------------------------------------- retrieval scores


def _mean_abs_delta_random(qv: np.ndarray, gv: np.ndarray, exclude_self: bool) -> float:
    """Exact E|a_q - a_n| for n drawn uniformly from the gallery, averaged over queries."""
    s = np.sort(gv)
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    n_below = np.searchsorted(s, qv, side="right")
    sum_below = prefix[n_below]
    sum_above = prefix[-1] - sum_below
    total = (qv * n_below - sum_below) + (sum_above - qv * (len(s) - n_below))
    # The query's own term |a_q - a_q| is 0, so leaving it out only changes the divisor.
    denom = len(s) - 1 if exclude_self else len(s)
    return float((total / denom).mean())


def _dcg_discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def retrieval_metrics(
    query_values: np.ndarray,
    gallery_values: np.ndarray,
    neighbours: np.ndarray,
    *,
    tau: float | None = None,
    bin_edges: np.ndarray | None = None,
    exclude_self: bool = False,
    self_rows: np.ndarray | Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Attribute-specific CBIR scores of ranked neighbours (e.g. from :func:`cosine_knn`).

    With K = max(ks) (10 by default) the keys are:

    * ``R@k`` for each k in ks: share of queries with at least one relevant item
      in the top k. This is the CBIR "recall@k" hit rate, not the share of all
      relevant items retrieved.
    * ``P@K``: mean share of relevant items in the top K.
    * ``mAP@K``: mean over queries of AP@K = sum_{j<=K} rel_j * P@j / min(K, n_rel),
      n_rel being the relevant items in the whole gallery (:func:`relevant_counts`).
    * ``nDCG@K``: binary gains, 1 / log2(rank + 1) discount, ideal DCG from
      min(K, n_rel) relevant items at the top.
    * ``queries_without_relevant``: count (as a float) of queries with n_rel = 0;
      they score 0 in mAP and nDCG (and necessarily in R and P).
    * ``mean_abs_delta@K``: mean |a_q - a_n| over the top-K neighbours, native units.
    * ``mean_abs_delta_random``: the exact expected |a_q - a_n| for a uniformly
      random gallery item (the chance reference for the line above).

    ``neighbours`` may have more than K columns; only the first K are scored. With
    ``exclude_self`` the queries are the gallery, with ``self_rows`` those rows of it
    (a query sample), and no query may appear among its own neighbours.
    """
    qv = _as_1d(query_values, "query_values")
    gv = _as_1d(gallery_values, "gallery_values")
    nb = _check_neighbours(neighbours, len(qv), len(gv))
    ks = _check_ks(ks, nb.shape[1], "the neighbours per query (neighbours.shape[1])")
    k_max = max(ks)
    nb = nb[:, :k_max]
    if exclude_self:
        _same_length(qv, gv, "query_values", "gallery_values (exclude_self)")
    own = _self_rows(exclude_self, self_rows, qv, gv, ("query_values", "gallery_values"))
    if own is not None and (nb == own[:, None]).any():
        raise ValueError("some query has itself among its neighbours (exclude_self / self_rows)")

    rel = relevance(qv, gv, nb, tau=tau, bin_edges=bin_edges)
    n_rel = _relevant_counts(qv, gv, tau, _check_relevance_rule(tau, bin_edges), own is not None)
    has_rel = n_rel > 0
    ideal_hits = np.minimum(n_rel, k_max)

    relf = rel.astype(np.float64)
    precision_at_j = np.cumsum(relf, axis=1) / np.arange(1, k_max + 1)
    ap = np.where(has_rel, (relf * precision_at_j).sum(axis=1) / np.maximum(ideal_hits, 1), 0.0)

    discounts = _dcg_discounts(k_max)
    dcg = relf @ discounts
    ideal_dcg = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_hits]
    ndcg = np.where(has_rel, dcg / np.where(has_rel, ideal_dcg, 1.0), 0.0)

    out = {f"R@{k}": float(rel[:, :k].any(axis=1).mean()) for k in ks}
    out[f"P@{k_max}"] = float(relf.mean(axis=1).mean())
    out[f"mAP@{k_max}"] = float(ap.mean())
    out[f"nDCG@{k_max}"] = float(ndcg.mean())
    out["queries_without_relevant"] = float((~has_rel).sum())
    out[f"mean_abs_delta@{k_max}"] = float(np.abs(qv[:, None] - gv[nb]).mean())
    out["mean_abs_delta_random"] = _mean_abs_delta_random(qv, gv, own is not None)
    return out


# ----------------------------------------------------------------------------- classification


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None
) -> dict[str, float | list[list[int]]]:
    """Accuracy, balanced accuracy, macro F1 and the confusion matrix of integer labels.

    * ``balanced_accuracy``: mean recall over the classes present in y_true.
    * ``macro_f1``: mean F1 = 2TP / (2TP + FP + FN) over classes present in y_true
      or y_pred (classes absent from both are not averaged in).
    * ``confusion[i][j]``: count of true class i predicted as j, C x C with
      C = n_classes, or max label + 1 when n_classes is None.
    """
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    _same_length(t, p, "y_true", "y_pred")
    top = int(max(t.max(), p.max()))
    if n_classes is None:
        n_classes = top + 1
    elif top >= int(n_classes):
        raise ValueError(f"label {top} is out of range for n_classes={n_classes}")
    c = int(n_classes)
    confusion = np.bincount(t * c + p, minlength=c * c).reshape(c, c)

    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)  # true counts per class
    predicted = confusion.sum(axis=0)
    in_true = support > 0
    in_either = in_true | (predicted > 0)
    recall = tp[in_true] / support[in_true]
    # Over classes in either array the F1 denominator 2TP + FP + FN = support + predicted > 0.
    f1 = 2 * tp[in_either] / (support[in_either] + predicted[in_either])
    return {
        "accuracy": float(tp.sum() / len(t)),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "confusion": confusion.astype(int).tolist(),
    }


def roc_curve(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score threshold, from (0, 0) to (1, 1); label 1 is positive.

    Tied scores form one step (a diagonal segment), so the curve does not depend on row order.
    """
    t = _as_labels(y_true, "y_true")
    s = _as_1d(scores, "scores")
    _same_length(t, s, "y_true", "scores")
    if t.max() > 1:
        raise ValueError("y_true must hold binary labels (0 negative, 1 positive)")
    if int(t.sum()) in (0, len(t)):
        raise ValueError("y_true must hold both classes for a ROC curve")
    fpr, tpr, _ = skm.roc_curve(t, s, drop_intermediate=False)  # a point per distinct score, collinear ones too
    return fpr, tpr


def partial_auc_above_tpr(
    y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float], min_tpr: float = 0.8
) -> float:
    """The ISIC 2024 challenge metric: the area under the ROC curve above TPR = `min_tpr`.

    In [0, 1 - min_tpr]: 0.2 for a perfect ranking and 0.02 for a random one at min_tpr 0.8. As the
    challenge computes it: swap the classes and negate the scores, so TPR >= min_tpr becomes
    FPR <= 1 - min_tpr, and integrate that ROC curve (trapezoids) from FPR 0 to 1 - min_tpr,
    interpolating linearly at the cut.
    """
    if not 0 < min_tpr < 1:
        raise ValueError(f"min_tpr must be in (0, 1), got {min_tpr}")
    t = _as_labels(y_true, "y_true")
    if t.max() > 1:
        raise ValueError("y_true must hold binary labels (0 negative, 1 positive)")
    fpr, tpr = roc_curve(1 - t, -_as_1d(scores, "scores"))
    max_fpr = 1 - min_tpr
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[stop - 1] <= max_fpr < fpr[stop] (the curve ends at 1)
    cut = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
    return float(skm.auc(np.r_[fpr[:stop], max_fpr], np.r_[tpr[:stop], cut]))


def class_retrieval_metrics(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = _DEFAULT_CHUNK,
) -> dict[str, float]:
    """Cross-modal retrieval scored by class: a gallery item is relevant if it shares the query's class.

    Ranks the whole gallery per query by cosine similarity (ties by lower index),
    ``chunk_size`` queries at a time. Nothing is excluded: queries and gallery are
    different sets (e.g. image queries, note gallery). Keys:

    * ``P@k`` for each k in ks: mean share of the top k with the query's class.
    * ``mAP``: mean average precision over the full ranking,
      AP = sum_j rel_j * P@j / n_rel. Queries whose class is absent from the
      gallery score AP = 0 and are counted in ``queries_without_relevant``.
    """
    q = _as_2d(query_emb, "query_emb")
    g = _as_2d(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"shape mismatch: query_emb has dim {q.shape[1]}, gallery_emb has dim {g.shape[1]}")
    ql = _as_labels(query_labels, "query_labels")
    gl = _as_labels(gallery_labels, "gallery_labels")
    _same_length(q, ql, "query_emb", "query_labels")
    _same_length(g, gl, "gallery_emb", "gallery_labels")
    ks = _check_ks(ks, len(g), "the gallery")
    chunk = _check_chunk(chunk_size)

    q, g = _l2_normalise(q), _l2_normalise(g)
    n_rel = np.bincount(gl, minlength=int(max(ql.max(), gl.max())) + 1)[ql]
    ranks = np.arange(1, len(g) + 1)
    hits_at = {k: np.empty(len(q)) for k in ks}
    ap = np.empty(len(q))
    for start in range(0, len(q), chunk):
        stop = start + chunk
        sims = q[start:stop] @ g.T
        order = np.argsort(-sims, axis=1, kind="stable")  # stable: ties keep the lower index first
        rel = gl[order] == ql[start:stop, None]
        cum = np.cumsum(rel, axis=1)
        for k in ks:
            hits_at[k][start:stop] = cum[:, k - 1]
        rel_n = n_rel[start:stop]
        ap[start:stop] = np.where(rel_n > 0, (rel * (cum / ranks)).sum(axis=1) / np.maximum(rel_n, 1), 0.0)
    out = {f"P@{k}": float((hits_at[k] / k).mean()) for k in ks}
    out["mAP"] = float(ap.mean())
    out["queries_without_relevant"] = float((n_rel == 0).sum())
    return out
