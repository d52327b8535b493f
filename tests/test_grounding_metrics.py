"""Grounding evaluation metrics: hand-computed tiny cases, brute-force and sklearn/scipy cross-checks."""

import math
import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, f1_score

from dermaray.grounding.metrics import (
    class_retrieval_metrics,
    classification_metrics,
    cosine_knn,
    quantile_bin_edges,
    regression_metrics,
    relevance,
    relevant_counts,
    retrieval_metrics,
)

INV_LOG2_3 = 1 / math.log2(3)

# Shared tiny retrieval case: 3 queries, 5 gallery items, known neighbour lists (k = 3).
GALLERY = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
QUERIES = np.array([0.0, 2.5, 20.0])
NEIGHBOURS = np.array([[4, 1, 0], [2, 3, 0], [4, 3, 2]])


# ----------------------------------------------------------------------------- regression


def test_regression_known_values():
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 5])
    # errors 0, 0, 0, 1: MAE 1/4, RMSE sqrt(1/4); ranks identical; SS_tot = 5, SS_res = 1.
    assert m["mae"] == pytest.approx(0.25)
    assert m["rmse"] == pytest.approx(0.5)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(0.8)


def test_regression_matches_scipy_on_random_with_ties():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 8, 200).astype(float)
    p = t + rng.normal(0, 2, 200)
    m = regression_metrics(t, p)
    assert m["spearman"] == pytest.approx(spearmanr(t, p).statistic)
    assert m["mae"] == pytest.approx(np.mean(np.abs(t - p)))
    assert m["r2"] == pytest.approx(1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2))


def test_regression_constant_gives_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(m["spearman"]) and math.isnan(m["r2"])
    assert m["mae"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- cosine_knn


def _brute_knn(q, g, k, exclude_self=False):
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
    sims = qn @ gn.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    idx = np.arange(g.shape[0])
    return np.stack([np.lexsort((idx, -row))[:k] for row in sims])


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_cosine_knn_matches_brute_force(chunk_size):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(37, 16)), rng.normal(size=(53, 16))
    np.testing.assert_array_equal(cosine_knn(q, g, 6, chunk_size=chunk_size), _brute_knn(q, g, 6))
    np.testing.assert_array_equal(
        cosine_knn(g, g, 5, exclude_self=True, chunk_size=chunk_size), _brute_knn(g, g, 5, exclude_self=True)
    )


def test_cosine_knn_is_scale_invariant_and_handles_zero_vectors():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(20, 8))
    g[3] = 0.0
    q = np.vstack([g[:5] * 7.5, np.zeros((1, 8))])
    nn = cosine_knn(q, g, 4)
    assert nn.shape == (6, 4) and nn.dtype.kind == "i"
    np.testing.assert_array_equal(nn[[0, 1, 2, 4], 0], [0, 1, 2, 4])
    # A zero query has similarity 0 to everything: all tied, so lowest indices win.
    np.testing.assert_array_equal(nn[5], [0, 1, 2, 3])


def test_cosine_knn_ties_broken_by_lower_index():
    # One-hot vectors give exact similarities (1 or 0), hence exact ties.
    g = np.eye(3)[[1, 0, 2, 0, 0, 1, 0]]
    q = np.eye(3)[[0, 1]]
    nn = cosine_knn(q, g, 5, chunk_size=1)
    np.testing.assert_array_equal(nn[0], [1, 3, 4, 6, 0])  # the four e0 rows in order, then lowest tied 0-sim
    np.testing.assert_array_equal(nn[1], [0, 5, 1, 2, 3])


def test_cosine_knn_exclude_self_never_returns_query():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(10, 4))
    g = np.vstack([base, base, np.zeros((3, 4))])  # exact duplicates tie with self
    nn = cosine_knn(g, g, len(g) - 1, exclude_self=True, chunk_size=4)
    assert not (nn == np.arange(len(g))[:, None]).any()
    assert all(len(set(row)) == len(row) for row in nn)
    assert (nn[:10, 0] == np.arange(10, 20)).all() and (nn[10:20, 0] == np.arange(10)).all()


def test_cosine_knn_errors():
    g = np.ones((5, 3))
    with pytest.raises(ValueError, match="larger than the gallery"):
        cosine_knn(g, g, 6)
    with pytest.raises(ValueError, match="larger than the gallery"):
        cosine_knn(g, g, 5, exclude_self=True)
    with pytest.raises(ValueError, match="shape mismatch"):
        cosine_knn(np.ones((2, 4)), g, 1)
    with pytest.raises(ValueError, match="NaN"):
        cosine_knn(np.array([[np.nan, 1.0, 1.0]]), g, 1)
    with pytest.raises(ValueError, match="empty"):
        cosine_knn(np.ones((0, 3)), g, 1)
    with pytest.raises(ValueError, match="same array"):
        cosine_knn(np.ones((4, 3)), g, 1, exclude_self=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        cosine_knn(g, g, 0)


# ----------------------------------------------------------------------------- relevance


def test_relevance_tau_and_bins_by_hand():
    rel = relevance(QUERIES, GALLERY, NEIGHBOURS, tau=1.0)
    # q=0 vs 10, 1, 0; q=2.5 vs 2, 3, 0; q=20 vs 10, 3, 2.
    np.testing.assert_array_equal(rel, [[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(relevant_counts(QUERIES, GALLERY, tau=1.0), [2, 2, 0])

    edges = np.array([0.0, 2.0, 5.0, 10.0])  # inner edges 2, 5: gallery bins [0, 0, 1, 1, 2], queries [0, 1, 2]
    rel = relevance(QUERIES, GALLERY, NEIGHBOURS, bin_edges=edges)
    np.testing.assert_array_equal(rel, [[0, 1, 1], [1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(relevant_counts(QUERIES, GALLERY, bin_edges=edges), [2, 2, 1])


def test_quantile_bin_edges():
    np.testing.assert_allclose(quantile_bin_edges(np.arange(9.0), 4), [0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="n_bins"):
        quantile_bin_edges(np.arange(9.0), 0)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_relevant_counts_match_dense(exclude_self):
    rng = np.random.default_rng(4)
    # A 0.1 grid makes boundary cases |a_q - a_n| == tau (with float rounding) common.
    g = np.round(rng.uniform(0, 3, 300), 1)
    q = g if exclude_self else np.round(rng.uniform(-0.5, 3.5, 120), 1)
    for tau in (0.0, 0.1, 0.3, 0.7):
        dense = (np.abs(q[:, None] - g[None, :]) <= tau).sum(axis=1) - int(exclude_self)
        np.testing.assert_array_equal(relevant_counts(q, g, tau=tau, exclude_self=exclude_self), dense)
    edges = quantile_bin_edges(g, 5)

    def bins(v):
        return np.digitize(v, edges[1:-1])

    dense = (bins(q)[:, None] == bins(g)[None, :]).sum(axis=1) - int(exclude_self)
    np.testing.assert_array_equal(relevant_counts(q, g, bin_edges=edges, exclude_self=exclude_self), dense)


def test_relevance_errors():
    with pytest.raises(ValueError, match="exactly one of tau or bin_edges"):
        relevance(QUERIES, GALLERY, NEIGHBOURS)
    with pytest.raises(ValueError, match="exactly one of tau or bin_edges"):
        relevance(QUERIES, GALLERY, NEIGHBOURS, tau=1.0, bin_edges=[0, 1])
    with pytest.raises(ValueError, match="outside the gallery"):
        relevance(QUERIES, GALLERY, NEIGHBOURS + 1, tau=1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        relevance(QUERIES[:2], GALLERY, NEIGHBOURS, tau=1.0)
    with pytest.raises(ValueError, match="NaN"):
        relevant_counts(np.array([np.nan]), GALLERY, tau=1.0)
    with pytest.raises(ValueError, match="tau must be"):
        relevant_counts(QUERIES, GALLERY, tau=-1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        relevant_counts(QUERIES, GALLERY, bin_edges=[0, 5, 2])


# ----------------------------------------------------------------------------- retrieval_metrics


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(QUERIES, GALLERY, NEIGHBOURS, tau=1.0, ks=(1, 2, 3))
    # rel = [[0,1,1], [1,1,0], [0,0,0]], n_rel = [2, 2, 0].
    # R@1 = 1/3 (only q1 hits at rank 1); R@2 = R@3 = 2/3.
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@3"] == pytest.approx(2 / 3)
    # P@3 = (2/3 + 2/3 + 0) / 3.
    assert m["P@3"] == pytest.approx(4 / 9)
    # AP@3: q0 = (1/2 + 2/3) / min(3, 2) = 7/12; q1 = (1/1 + 2/2) / 2 = 1; q2 = 0 (no relevant item).
    assert m["mAP@3"] == pytest.approx((7 / 12 + 1 + 0) / 3)
    # nDCG@3: q0 = (1/log2 3 + 1/log2 4) / (1 + 1/log2 3); q1 = 1; q2 = 0.
    assert m["nDCG@3"] == pytest.approx(((INV_LOG2_3 + 0.5) / (1 + INV_LOG2_3) + 1 + 0) / 3)
    assert m["queries_without_relevant"] == 1.0
    # |a_q - a_n|: q0 10+1+0, q1 0.5+0.5+2.5, q2 10+17+18 -> 59.5 over 9 pairs.
    assert m["mean_abs_delta@3"] == pytest.approx(59.5 / 9)
    # Random item: q0 16/5, q1 12.5/5, q2 84/5 -> mean 7.5.
    assert m["mean_abs_delta_random"] == pytest.approx(7.5)


def test_retrieval_metrics_default_keys():
    rng = np.random.default_rng(5)
    g = rng.uniform(0, 1, 50)
    nn = cosine_knn(rng.normal(size=(50, 4)), rng.normal(size=(50, 4)), 10)
    m = retrieval_metrics(g, g, nn, tau=0.1)
    assert set(m) == {
        "R@1", "R@5", "R@10", "P@10", "mAP@10", "nDCG@10",
        "queries_without_relevant", "mean_abs_delta@10", "mean_abs_delta_random",
    }  # fmt: skip
    assert all(0.0 <= m[k] <= 1.0 for k in ("R@1", "R@5", "R@10", "P@10", "mAP@10", "nDCG@10"))


def test_retrieval_perfect_and_reversed():
    q = np.array([0.0])
    g = np.array([0.0, 0.0, 5.0, 5.0, 5.0])  # tau 0.5: items 0 and 1 relevant
    best = retrieval_metrics(q, g, np.array([[0, 1, 2, 3, 4]]), tau=0.5, ks=(1, 5))
    assert best["R@1"] == best["mAP@5"] == best["nDCG@5"] == 1.0
    assert best["P@5"] == pytest.approx(2 / 5)
    worst = retrieval_metrics(q, g, np.array([[2, 3, 4, 1, 0]]), tau=0.5, ks=(1, 5))
    assert worst["R@1"] == 0.0 and worst["R@5"] == 1.0
    assert worst["mAP@5"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert worst["nDCG@5"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(6)) / (1 + INV_LOG2_3))
    assert worst["mean_abs_delta@5"] == pytest.approx(3.0)
    assert worst["mean_abs_delta_random"] == pytest.approx(3.0)


def test_retrieval_leave_one_out_perfect_is_one():
    # Values sorted on a line: with exclude_self the nearest by embedding are the nearest by value.
    v = np.repeat(np.arange(10.0), 3)  # 30 items, each with 2 exact twins
    emb = np.stack([np.cos(v / 10), np.sin(v / 10)], axis=1)
    nn = cosine_knn(emb, emb, 2, exclude_self=True)
    m = retrieval_metrics(v, v, nn, tau=0.0, exclude_self=True, ks=(1, 2))
    assert m["R@1"] == m["P@2"] == m["mAP@2"] == m["nDCG@2"] == 1.0
    assert m["mean_abs_delta@2"] == 0.0
    # Chance: each item vs the 29 others, exactly.
    expected = np.mean([np.abs(x - np.delete(v, i)).mean() for i, x in enumerate(v)])
    assert m["mean_abs_delta_random"] == pytest.approx(expected)


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match="k=10 is larger than the neighbours"):
        retrieval_metrics(QUERIES, GALLERY, NEIGHBOURS, tau=1.0)
    with pytest.raises(ValueError, match="itself among its neighbours"):
        retrieval_metrics(GALLERY, GALLERY, np.array([[1], [0], [2], [0], [0]]), tau=1.0, exclude_self=True, ks=(1,))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.array([]), GALLERY, NEIGHBOURS, tau=1.0, ks=(1,))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(QUERIES, np.array([0, 1, 2, 3, np.nan]), NEIGHBOURS, tau=1.0, ks=(1,))


# ----------------------------------------------------------------------------- classification


def test_classification_by_hand():
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 1])
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # F1 per class: 2/(2+1), 2/(1+3), 0.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert classification_metrics([0, 1], [0, 1], n_classes=4)["confusion"][3] == [0, 0, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 5, 80)
    p = np.where(rng.random(80) < 0.5, t, rng.integers(0, 7, 80))  # class 5, 6 only predicted
    t[t == 3] = 4  # class 3 absent from y_true
    m = classification_metrics(t, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["accuracy"] == pytest.approx(accuracy_score(t, p))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p))
        assert m["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert np.asarray(m["confusion"]).sum() == 80


def test_classification_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="out of range"):
        classification_metrics([0, 3], [0, 1], n_classes=3)
    with pytest.raises(ValueError, match="integer class labels"):
        classification_metrics([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])


# ----------------------------------------------------------------------------- class retrieval


def test_class_retrieval_by_hand():
    q = np.array([[1.0, 0.0]])
    g = np.array([[2.0, 0.0], [0.8, 0.6], [0.0, 3.0]])  # cosine to q: 1, 0.8, 0
    m = class_retrieval_metrics(q, g, [0], [1, 0, 0], ks=(1, 2, 3))
    # Ranking [0, 1, 2], relevance [0, 1, 1].
    assert m["P@1"] == 0.0 and m["P@2"] == pytest.approx(0.5) and m["P@3"] == pytest.approx(2 / 3)
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["queries_without_relevant"] == 0.0


def test_class_retrieval_matches_sklearn_ap():
    rng = np.random.default_rng(6)
    q, g = rng.normal(size=(40, 8)), rng.normal(size=(60, 8))
    ql, gl = rng.integers(0, 4, 40), rng.integers(0, 4, 60)
    m = class_retrieval_metrics(q, g, ql, gl, ks=(1, 5, 10), chunk_size=7)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = qn @ gn.T
    aps = [average_precision_score(gl == ql[i], sims[i]) for i in range(40)]
    assert m["mAP"] == pytest.approx(np.mean(aps))
    for k in (1, 5, 10):
        top = np.argsort(-sims, axis=1)[:, :k]
        assert m[f"P@{k}"] == pytest.approx((gl[top] == ql[:, None]).mean())


def test_class_retrieval_perfect_and_missing_class():
    g = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    m = class_retrieval_metrics(np.eye(3), g, [0, 1, 2], [0, 1, 2, 0, 1, 2], ks=(1, 2))
    assert m["P@1"] == m["P@2"] == m["mAP"] == 1.0
    m = class_retrieval_metrics(np.eye(3), g, [0, 1, 5], [0, 1, 2, 0, 1, 2], ks=(1,))
    assert m["queries_without_relevant"] == 1.0 and m["mAP"] == pytest.approx(2 / 3)


def test_class_retrieval_errors():
    g = np.ones((4, 3))
    with pytest.raises(ValueError, match="larger than the gallery"):
        class_retrieval_metrics(g, g, [0] * 4, [0] * 4, ks=(5,))
    with pytest.raises(ValueError, match="shape mismatch"):
        class_retrieval_metrics(g, g, [0] * 3, [0] * 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        class_retrieval_metrics(np.ones((4, 2)), g, [0] * 4, [0] * 4, ks=(1,))
