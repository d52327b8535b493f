"""dermaray.retrieval.VectorIndex: exact search against numpy, approximate recall, storage, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from dermaray.retrieval import VectorIndex


def _ids(n):
    return [f"ISIC_{i:07d}" for i in range(n)]


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, dim, centres, seed):
    """Unit vectors from a Gaussian mixture: the shape of real embeddings, where neighbours are near-duplicates."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(1234).standard_normal((centres, dim))  # one set of centres for data and queries
    return _unit(means[rng.integers(centres, size=n)] + rng.standard_normal((n, dim)))


def _exact_top(vectors, queries, k):
    return np.argsort(-(_unit(queries) @ vectors.T), axis=1, kind="stable")[:, :k]


def _recall(rows, truth):
    return np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(rows.tolist(), truth.tolist(), strict=True)])


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16))
    return VectorIndex.build(vectors, _ids(500), model="test-encoder"), rng.standard_normal((20, 16)), vectors


@pytest.fixture(scope="module")
def clustered():
    return _clustered(20_000, 64, centres=100, seed=0), _clustered(300, 64, centres=100, seed=1)


def test_exact_search_equals_numpy_brute_force():
    rng = np.random.default_rng(0)
    vectors, queries = rng.standard_normal((2000, 32)), rng.standard_normal((50, 32))
    index = VectorIndex.build(vectors, _ids(2000))
    scores, rows = index.search(queries, k=10)

    similarities = _unit(queries) @ _unit(vectors).T
    expected = np.argsort(-similarities, axis=1)[:, :10]
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == scores.shape == (50, 10)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(similarities, expected, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert (len(index), index.dim, index.kind) == (2000, 32, "exact")


@pytest.mark.parametrize(("kind", "params"), [("ivf", {"nprobe": 16}), ("hnsw", {"ef_search": 64})])
def test_approximate_kinds_reach_recall_at_10_of_0_9(clustered, kind, params):
    vectors, queries = clustered
    index = VectorIndex.build(vectors, _ids(len(vectors)), kind, normalize=False, **params)
    _, rows = index.search(queries, k=10)
    truth = _exact_top(vectors, queries, 10)
    assert _recall(rows, truth) >= 0.9, f"{kind} recall@10 = {_recall(rows, truth):.3f}"
    assert (rows >= 0).all()
    if kind == "ivf":  # the data is not trivially easy: scanning one list of 512 misses many neighbours
        index.tune(nprobe=1)
        assert _recall(index.search(queries, k=10)[1], truth) < 0.8


def test_ivf_defaults_keep_39_training_points_per_list_and_tune_changes_nprobe(clustered):
    vectors, queries = clustered
    index = VectorIndex.build(vectors[:2000], _ids(2000), "ivf", nprobe=1)
    assert index.meta["params"] == {"nlist": 51, "nprobe": 1, "train_size": 2000, "seed": 0}  # 2000 // 39, not 4 * sqrt(2000)
    one_list = index.search(queries, 10)[1]
    index.tune(nprobe=10_000)  # more lists than exist means all of them: exact
    assert index.meta["params"]["nprobe"] == 51
    np.testing.assert_array_equal(index.search(queries, 10)[1], _exact_top(vectors[:2000], queries, 10))
    assert not np.array_equal(one_list, index.search(queries, 10)[1])


def test_k_beyond_the_index_pads_with_minus_one_and_minus_inf_and_search_ids_drops_padding():
    rng = np.random.default_rng(0)
    index = VectorIndex.build(rng.standard_normal((5, 8)), _ids(5))
    scores, rows = index.search(rng.standard_normal(8), k=8)  # a 1-d query is one row
    assert rows.shape == scores.shape == (1, 8)
    assert sorted(rows[0, :5]) == [0, 1, 2, 3, 4] and (rows[0, 5:] == -1).all()
    assert np.isfinite(scores[0, :5]).all() and (scores[0, 5:] == -np.inf).all()
    assert len(index.search_ids(rng.standard_normal(8), k=8)[0]) == 5


def test_search_ids_returns_lesion_ids_with_their_scores(small):
    index, queries, vectors = small
    scores, rows = index.search(queries, k=3)
    hits = index.search_ids(queries, k=3)
    assert len(hits) == 20 and all(len(h) == 3 for h in hits)
    assert hits[0] == [(f"ISIC_{r:07d}", pytest.approx(float(s))) for r, s in zip(rows[0], scores[0], strict=True)]
    assert index.search_ids(vectors[7], k=1)[0][0] == ("ISIC_0000007", pytest.approx(1.0))


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_local_round_trip_gives_identical_results(tmp_path, clustered, kind):
    vectors, queries = clustered
    index = VectorIndex.build(vectors[:3000], _ids(3000), kind, model="tiny-clip@v1")
    if kind != "exact":
        index.tune(**({"nprobe": 4} if kind == "ivf" else {"ef_search": 24}))  # a tuned setting survives the round trip
    index.save(str(tmp_path / "index"))
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["ids.parquet", "index.faiss", "meta.json"]

    loaded = VectorIndex.load(str(tmp_path / "index"))
    assert loaded.meta == index.meta and loaded.meta["model"] == "tiny-clip@v1" and loaded.ids == index.ids
    for got, expected in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_s3_round_trip_gives_identical_results_and_overwrites(s3_options, small, clustered):
    index, queries, _ = small
    uri = "s3://dermaray/indexes/round-trip"
    VectorIndex.build(clustered[0][:100], _ids(100)).save(uri, s3_options)  # replaced by the next save
    index.save(uri, s3_options)
    assert sorted(p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem(**s3_options).ls("dermaray/indexes/round-trip")) == [
        "ids.parquet", "index.faiss", "meta.json",
    ]  # fmt: skip

    loaded = VectorIndex.load(uri, s3_options)
    assert loaded.meta == index.meta and loaded.ids == index.ids
    assert loaded.search_ids(queries, 5) == index.search_ids(queries, 5)
    for got, expected in zip(loaded.search(queries, 5), index.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_load_of_a_missing_or_unfinished_folder_raises_file_not_found(tmp_path, s3_options, small):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VectorIndex.load(missing)
    with pytest.raises(FileNotFoundError, match="s3://dermaray/indexes/absent"):
        VectorIndex.load("s3://dermaray/indexes/absent", s3_options)

    small[0].save(str(tmp_path / "unfinished"))
    (tmp_path / "unfinished" / "meta.json").unlink()  # as if the save stopped before its last file
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        VectorIndex.load(str(tmp_path / "unfinished"))


def test_load_rejects_a_count_that_disagrees_with_the_files(tmp_path, small):
    folder = tmp_path / "index"
    small[0].save(str(folder))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "count": 499}))
    with pytest.raises(ValueError, match="meta.json says 499 x 16, index.faiss holds 500 x 16, ids.parquet holds 500"):
        VectorIndex.load(str(folder))


_V = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)


@pytest.mark.parametrize(
    ("vectors", "ids", "kwargs", "match"),
    [
        (np.zeros((0, 4)), [], {}, "empty"),
        (_V, _ids(49), {}, "49 ids for 50 vectors"),
        (_V, _ids(49) + ["ISIC_0000003"], {}, r"duplicate ids .*ISIC_0000003"),
        (np.where(np.arange(200).reshape(50, 4) == 9, np.nan, _V), _ids(50), {}, "non-finite .* row 2"),
        (np.where(np.arange(200).reshape(50, 4) == 9, np.inf, _V), _ids(50), {}, "non-finite"),
        (_V[0], _ids(1), {}, "2-d array"),
        (_V[None], _ids(1), {}, "2-d array"),
        (_V, _ids(50), {"kind": "pq"}, "unknown index kind 'pq'"),
        (_V, list(range(50)), {}, "ids must be strings"),
        (np.vstack([_V[:-1], np.zeros((1, 4))]), _ids(50), {}, "row 49 is all zeros"),
        (_V, _ids(50), {"normalize": False}, "unit-norm rows"),
        (_V[:20], _ids(20), {"kind": "ivf"}, "at least 39 vectors"),
        (_V, _ids(50), {"kind": "ivf", "nlist": 2}, "nlist=2 needs at least 78 vectors"),
        (_V, _ids(50), {"kind": "hnsw", "ef_search": 0}, "ef_search must be a positive integer"),
    ],
)
def test_bad_build_inputs_raise_value_error(vectors, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorIndex.build(vectors, ids, **kwargs)


def test_bad_search_inputs_and_tuning_raise_value_error(small):
    index, queries, _ = small
    with pytest.raises(ValueError, match=r"shape \[Q, 16\] or \[16\], got \(20, 8\)"):
        index.search(queries[:, :8], 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="non-finite"):
        index.search(np.full(16, np.nan), 3)
    with pytest.raises(ValueError, match="nprobe applies to ivf indexes, not 'exact'"):
        index.tune(nprobe=8)


@pytest.mark.parametrize(("kind", "params"), [("exact", {}), ("ivf", {"nlist": 16, "nprobe": 4}), ("ivf", {})])
def test_index_streamed_from_parquet_equals_the_in_memory_one(tmp_path, clustered, kind, params):
    """Three files read in 700-row chunks give the index `build` makes from one array: same
    training sample (4,096 of 6,000 rows with nlist=16; all of them by default), same neighbours."""
    vectors, queries = clustered[0][:6000], clustered[1]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    for part, start in enumerate(range(0, 6000, 2000)):
        block = vectors[start : start + 2000] * 3  # not unit: both paths normalise
        table = pa.table({"lesion_id": _ids(6000)[start : start + 2000], "embedding": list(block.astype(np.float32))})
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=500)

    streamed = VectorIndex.build_from_parquet(str(folder), kind=kind, batch_rows=700, **params)
    in_memory = VectorIndex.build(vectors * 3, _ids(6000), kind, **params)

    assert streamed.meta == in_memory.meta and streamed.ids == in_memory.ids
    if kind == "ivf":
        assert streamed.meta["params"]["train_size"] == (4096 if params else 6000)
    got, expected = streamed.search(queries, 10)[1], in_memory.search(queries, 10)[1]
    assert abs(_recall(got, _exact_top(vectors, queries, 10)) - _recall(expected, _exact_top(vectors, queries, 10))) <= 0.01
    np.testing.assert_array_equal(got, expected)  # same sample, same seed: the same index


def test_streamed_build_names_the_bad_row_across_chunks(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    vectors[70] = 0
    pq.write_table(pa.table({"lesion_id": _ids(100), "embedding": list(vectors)}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="row 70 is all zeros"):
        VectorIndex.build_from_parquet(str(tmp_path / "e.parquet"), batch_rows=30)
    with pytest.raises(ValueError, match="100 vectors announced, 60 given"):
        VectorIndex.build_streamed([(_ids(60), vectors[:60])], count=100)


def test_take_parquet_reads_the_rows_asked_for_in_their_order_and_iter_parquet_streams_them_all(tmp_path):
    from dermaray.storage import iter_parquet, take_parquet

    for part in range(3):
        rows = range(part * 100, part * 100 + 100)
        pq.write_table(pa.table({"n": list(rows), "s": [str(i) for i in rows]}), tmp_path / f"p{part}.parquet", row_group_size=30)
    taken = take_parquet(str(tmp_path), [250, 3, 299, 3, 120], columns=["n"])
    assert taken.column_names == ["n"] and taken["n"].to_pylist() == [250, 3, 299, 3, 120]
    assert take_parquet(str(tmp_path), []).num_rows == 0
    with pytest.raises(IndexError, match="outside the 300 rows"):
        take_parquet(str(tmp_path), [300])
    assert [n for b in iter_parquet(str(tmp_path), columns=["n"], batch_rows=64) for n in b["n"].to_pylist()] == list(range(300))
