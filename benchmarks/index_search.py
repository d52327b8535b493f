"""Approximate index search speed as a ratio to numpy brute force, with recall@k, measured in one run.

    .venv/bin/python benchmarks/index_search.py --n 1000000 --dim 256 --kind ivf --nprobe 8,16,32,64

The data imitates image embeddings: a Gaussian mixture of a few thousand centres of uneven
size, each with its own spread and a decaying noise spectrum, L2-normalised float32; the
queries are fresh draws from the same mixture (new lesions, not copies of indexed ones).
The baseline is exact search in numpy: queries @ vectors.T one database block at a time
with argpartition top-k, the way one would do it without an index; its result is also the
ground truth for recall. Each index setting is timed on the same queries (median of 3).
Goal: >= 50x faster than numpy at recall@10 >= 0.95, at 1M x 256-d.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from dermaray.retrieval import VectorIndex

GOAL_RATIO, GOAL_RECALL = 50.0, 0.95
CHUNK = 65536  # rows generated / scanned at a time, so no temporary is much over 200 MB


class Mixture:
    """A fixed Gaussian mixture in `dim` dimensions; `sample` draws unit vectors from it."""

    def __init__(self, dim: int, centres: int, noise: float, seed: int):
        rng = np.random.default_rng(seed)
        self.means = (rng.standard_normal((centres, dim)) / np.sqrt(dim)).astype(np.float32)  # norm ~ 1
        self.weights = rng.dirichlet(np.ones(centres))  # uneven cluster sizes
        self.spread = rng.uniform(0.6, 1.4, centres).astype(np.float32)  # some clusters tighter than others
        spectrum = 1 / np.sqrt(np.arange(1, dim + 1))  # most variance in few directions, as in real embeddings
        self.scale = (noise * spectrum / np.linalg.norm(spectrum)).astype(np.float32)  # noise norm ~ `noise`

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, len(self.scale)), dtype=np.float32)
        for start in range(0, n, CHUNK):
            rows = min(CHUNK, n - start)
            label = rng.choice(len(self.means), rows, p=self.weights)
            x = self.means[label] + self.spread[label, None] * self.scale * rng.standard_normal(
                (rows, len(self.scale)), dtype=np.float32
            )
            out[start : start + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def numpy_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, rows) of the k largest inner products, best first, scanning the database in blocks."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), CHUNK):
        scores = queries @ vectors[start : start + CHUNK].T
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores = np.hstack([best_scores, np.take_along_axis(scores, top, axis=1)])
        best_rows = np.hstack([best_rows, top + start])
        keep = np.argpartition(-best_scores, min(k, best_scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, axis=1), np.take_along_axis(best_rows, keep, axis=1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


def timed_search(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(median seconds of 3 runs, rows): short runs on a shared machine need more than one sample."""
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        _, rows = index.search(queries, k)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), rows


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kind", choices=["ivf", "hnsw"], default="ivf")
    parser.add_argument("--nlist", type=int, default=4096, help="ivf lists")
    parser.add_argument("--nprobe", type=ints, default=[8, 16, 32, 64], help="ivf lists scanned per query, comma-separated sweep")
    parser.add_argument("--hnsw-m", type=int, default=32, help="hnsw links per node")
    parser.add_argument(
        "--ef-search", type=ints, default=[32, 64, 128, 256], help="hnsw candidates per query, comma-separated sweep"
    )
    parser.add_argument("--centres", type=int, default=2000, help="mixture components")
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to a centre's (~1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for faiss (OpenMP) and numpy (BLAS) alike")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    start = time.perf_counter()
    mixture = Mixture(args.dim, args.centres, args.noise, args.seed)
    vectors = mixture.sample(args.n, args.seed + 1)
    queries = mixture.sample(args.queries, args.seed + 2)
    print(
        f"data: {args.n:,} x {args.dim} float32 ({vectors.nbytes / 2**30:.2f} GiB), {args.centres} centres, "
        f"{args.queries} queries, k={args.k}, {args.threads} threads; generated in {time.perf_counter() - start:.1f} s"
    )

    start = time.perf_counter()
    with threadpool_limits(args.threads):
        truth_scores, truth = numpy_top_k(vectors, queries, args.k)
    numpy_seconds = time.perf_counter() - start
    print(
        f"numpy brute force: {numpy_seconds:.2f} s ({args.queries / numpy_seconds:,.0f} queries/s); "
        f"exact neighbour cosine: 1st {truth_scores[:, 0].mean():.3f}, {args.k}th {truth_scores[:, -1].mean():.3f}"
    )

    ids = [str(i) for i in range(args.n)]
    start = time.perf_counter()
    if args.kind == "ivf":
        index = VectorIndex.build(vectors, ids, "ivf", nlist=args.nlist, normalize=False, seed=args.seed)
        sweep = [{"nprobe": p} for p in args.nprobe]
    else:
        index = VectorIndex.build(vectors, ids, "hnsw", hnsw_m=args.hnsw_m, normalize=False)
        sweep = [{"ef_search": e} for e in args.ef_search]
    print(f"build {index!r}: {time.perf_counter() - start:.1f} s")

    results = []
    for setting in sweep:
        index.tune(**setting)
        seconds, rows = timed_search(index, queries, args.k)
        results.append((setting, seconds, numpy_seconds / seconds, recall(rows, truth)))
        name, value = next(iter(setting.items()))
        print(
            f"{name}={value}: {seconds:.4f} s ({args.queries / seconds:,.0f} queries/s), "
            f"{numpy_seconds / seconds:.1f}x numpy, recall@{args.k} {results[-1][3]:.3f}"
        )

    good = [r for r in results if r[3] >= GOAL_RECALL]
    if not good:
        print(f"best: no {args.kind} setting reached recall@{args.k} >= {GOAL_RECALL}; goal not met")
        return
    setting, seconds, ratio, best_recall = max(good, key=lambda r: r[2])
    name, value = next(iter(setting.items()))
    verdict = "met" if ratio >= GOAL_RATIO else "not met"
    print(
        f"best: {args.kind} {name}={value} at recall@{args.k} {best_recall:.3f} is {ratio:.1f}x numpy brute force "
        f"({seconds:.4f} s vs {numpy_seconds:.2f} s); goal >= {GOAL_RATIO:.0f}x at recall >= {GOAL_RECALL}: {verdict}"
    )


if __name__ == "__main__":
    main()
