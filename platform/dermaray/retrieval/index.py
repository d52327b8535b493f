"""A saved, searchable faiss index over L2-normalised embeddings, keyed by lesion id.

    import numpy as np
    from dermaray.retrieval import VectorIndex

    index = VectorIndex.build(vectors, lesion_ids, kind="ivf", model="tiny-clip@v1")
    index.save("s3://bucket/indexes/isic", storage_options={"endpoint_url": ...})
    index = VectorIndex.load("s3://bucket/indexes/isic", storage_options={"endpoint_url": ...})
    index.tune(nprobe=32)                      # search-time recall / speed trade-off
    scores, rows = index.search(queries, k=10)  # cosine similarities, row positions
    hits = index.search_ids(queries[0], k=10)   # [[("ISIC_0012345", 0.93), ...]]

Kinds: "exact" (IndexFlatIP, brute force), "ivf" (IndexIVFFlat: k-means lists, `nprobe` of
them scanned per query) and "hnsw" (IndexHNSWFlat graph, `ef_search` candidates per query).
Every kind uses the inner-product metric over unit vectors, so scores are cosine similarities.

Results always have shape [Q, k]. Faiss is asked for at most len(index) neighbours (k is
clamped there); any slot it could not fill (k > len(index), or an approximate search that
found fewer than k) holds row -1 with score -inf, so a padded slot can never be mistaken for
row 0 or for a real similarity. `search_ids` drops those slots.

Search runs on faiss's OpenMP threads (all cores unless told otherwise). This module never
changes that global setting; call `faiss.omp_set_num_threads(n)` yourself to limit it.

On storage an index is a folder at any fsspec URI: `index.faiss` (faiss.write_index),
`ids.parquet` (one string column `id`, row i = row position i) and `meta.json`, written last:
a folder holding meta.json is complete.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dermaray import storage

IndexKind = Literal["exact", "ivf", "hnsw"]

_FAISS_TYPES = {"exact": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}
_FORMAT = 1
_MIN_POINTS_PER_LIST = 39  # below this faiss's k-means warns that the lists are poorly trained
_MAX_POINTS_PER_LIST = 256  # faiss's own k-means subsamples beyond this many points per centroid
_HNSW_EF_CONSTRUCTION = 40  # faiss's default
_UNIT_NORM_TOLERANCE = 1e-3
_CHECK_CHUNK = 65536  # rows per pass when validating, so a 1 GB matrix gets no 1 GB temporaries


class VectorIndex:
    """A faiss index over unit vectors, the lesion id of every row, and a metadata dict.

    Make one with `build` or `load`; the constructor takes parts that are already consistent.
    """

    def __init__(self, index: faiss.Index, ids: Sequence[str], meta: dict[str, Any]):
        self._index = index
        self._ids = list(ids)
        self._meta = meta

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: Sequence[str],
        kind: IndexKind = "exact",
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 64,
        normalize: bool = True,
        model: str | None = None,
        model_weights: str | None = None,
        seed: int = 0,
    ) -> VectorIndex:
        """Index `vectors` [n, dim], row i under `ids[i]`.

        normalize=True L2-normalises a float32 copy; normalize=False indexes the array as it is
        (no copy, for large inputs) and requires every row to have unit norm already.
        nlist/nprobe apply to "ivf" only, hnsw_m/ef_search to "hnsw" only. nlist defaults to
        4 * sqrt(n), lowered so every list has >= 39 training points. `seed` fixes the ivf
        training sample and k-means; hnsw construction is multi-threaded, so its graph (and
        hence its approximate results) may differ slightly between builds.
        `model` names the encoder that produced the vectors and `model_weights` the digest of its weights;
        both are kept in the metadata, so a reader can refuse vectors another model made.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-d array [n, dim], got shape {vectors.shape}")
        if vectors.shape[1] == 0:
            raise ValueError(f"cannot index an empty array (shape {vectors.shape})")
        ids = list(ids)
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors; need exactly one id per row")
        unit = _unit_rows(vectors, normalize)  # once: the training sample is a subset of these rows
        rows = training_rows(len(unit), nlist, seed) if kind == "ivf" and len(unit) else None
        return cls.build_streamed(
            [(ids, unit)],
            count=len(unit),
            kind=kind,
            training=None if rows is None else lambda: unit if len(rows) == len(unit) else unit[rows],
            normalize=False,
            nlist=nlist,
            nprobe=nprobe,
            hnsw_m=hnsw_m,
            ef_search=ef_search,
            model=model,
            model_weights=model_weights,
            seed=seed,
        )

    @classmethod
    def build_streamed(
        cls,
        chunks: Iterable[tuple[Sequence[str], np.ndarray]],
        count: int,
        kind: IndexKind = "exact",
        *,
        training: Callable[[], np.ndarray] | None = None,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 64,
        normalize: bool = True,
        model: str | None = None,
        model_weights: str | None = None,
        seed: int = 0,
    ) -> VectorIndex:
        """The index `build` makes, from (ids, vectors) chunks that are added as they come.

        Only the index and one chunk are in memory at a time, so the vectors can stream from
        storage. `count` is the total number of rows (the ivf list count depends on it). An ivf
        index is trained on what `training()` returns: the rows `training_rows(count, nlist, seed)`
        pick, with which the streamed index equals the one `build` makes from the whole array
        (up to ties in list assignment: faiss assigns chunks under 20 rows by another code path).
        It is called once, before the first vector is added, and its array is gone (normalised
        in place with normalize=True) before then: the sample can be as large as the index.
        """
        if kind not in _FAISS_TYPES:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {sorted(_FAISS_TYPES)}")
        if count == 0:
            raise ValueError("cannot index an empty array (0 vectors)")
        index = params = dim = None
        all_ids: list[str] = []
        for chunk_ids, vectors in chunks:
            vectors = np.asarray(vectors)
            if vectors.ndim != 2:
                raise ValueError(f"vectors must be a 2-d array [n, dim], got shape {vectors.shape}")
            if vectors.shape[1] == 0:
                raise ValueError(f"cannot index an empty array (shape {vectors.shape})")
            if len(chunk_ids) != len(vectors):
                raise ValueError(f"got {len(chunk_ids)} ids for {len(vectors)} vectors; need exactly one id per row")
            if not all(isinstance(i, str) for i in chunk_ids):
                raise ValueError("ids must be strings (lesion ids)")
            if index is None:
                dim = vectors.shape[1]
                index, params = _empty_index(kind, dim, count, training, normalize, nlist, nprobe, hnsw_m, ef_search, seed)
            elif vectors.shape[1] != dim:
                raise ValueError(f"a chunk of dimension {vectors.shape[1]} follows chunks of dimension {dim}")
            if len(all_ids) + len(vectors) > count:
                raise ValueError(f"more vectors than the {count} announced")
            index.add(_unit_rows(vectors, normalize, first_row=len(all_ids)))
            all_ids.extend(chunk_ids)
        if len(all_ids) != count:
            raise ValueError(f"{count} vectors announced, {len(all_ids)} given")
        if len(set(all_ids)) != count:
            dupes = sorted(i for i, n in Counter(all_ids).items() if n > 1)
            raise ValueError(f"duplicate ids ({len(dupes)} distinct): {dupes[:5]}")
        meta = {
            "format": _FORMAT,
            "kind": kind,
            "dim": dim,
            "count": count,
            "metric": "inner_product",
            "params": params,
            "model": model,
            "model_weights": model_weights,
        }
        return cls(index, all_ids, meta)

    @classmethod
    def build_from_parquet(
        cls,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        kind: IndexKind = "exact",
        *,
        id_column: str = "lesion_id",
        vector_column: str = "embedding",
        batch_rows: int = 4096,
        nlist: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> VectorIndex:
        """Index the vectors of a Parquet file or folder (e.g. the embeddings table) as they stream.

        Row counts come from the footers; an ivf index first reads its training rows (one pass
        over the vector column), then every chunk is added as it is read. Memory: the index,
        plus one chunk (or, while training, the training sample). `options` are `build`'s.
        """
        count = storage.parquet_row_count(uri, storage_options)
        rows = training_rows(count, nlist, seed) if kind == "ivf" and count else None

        def training() -> np.ndarray:  # one pass over the vector column, keeping the sampled rows
            sample, start = None, 0
            for batch in storage.iter_parquet(uri, storage_options, [vector_column], batch_rows):
                vectors = _matrix(batch.column(vector_column), vector_column)
                if sample is None:
                    sample = np.empty((len(rows), vectors.shape[1]), np.float32)
                lo, hi = np.searchsorted(rows, [start, start + len(vectors)])
                sample[lo:hi] = vectors[rows[lo:hi] - start]
                start += len(vectors)
            return sample

        chunks = (
            (batch.column(id_column).to_pylist(), _matrix(batch.column(vector_column), vector_column))
            for batch in storage.iter_parquet(uri, storage_options, [id_column, vector_column], batch_rows)
        )
        return cls.build_streamed(
            chunks, count, kind, training=None if rows is None else training, nlist=nlist, seed=seed, **options
        )

    # -- search ------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, rows [Q, k] int64) of the k most similar rows per query.

        Queries are L2-normalised, so scores are cosine similarities, best first. A 1-d query
        is one row. Slots beyond len(index), or not filled by an approximate search, hold
        row -1 and score -inf.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [Q, {self.dim}] or [{self.dim}], got {queries.shape}")
        queries = _unit_rows(queries, normalize=True)

        found_scores, found_rows = self._index.search(queries, min(int(k), len(self)))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        filled = found_rows >= 0
        scores[:, : found_rows.shape[1]] = np.where(filled, found_scores, -np.inf)
        rows[:, : found_rows.shape[1]] = found_rows
        return scores, rows

    def search_ids(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to k (lesion id, cosine similarity) pairs, best first; padding dropped."""
        scores, rows = self.search(queries, k)
        return [
            [(self._ids[r], float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
            for row, score in zip(rows.tolist(), scores.tolist(), strict=True)
        ]

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change search-time parameters: nprobe (ivf) or ef_search (hnsw). Higher = better recall, slower."""
        kind, params = self.kind, self._meta["params"]
        if nprobe is not None:
            if kind != "ivf":
                raise ValueError(f"nprobe applies to ivf indexes, not {kind!r}")
            nprobe = _positive("nprobe", nprobe)
            self._index.nprobe = min(nprobe, self._index.nlist)  # scanning more lists than exist is all of them
            params["nprobe"] = self._index.nprobe
        if ef_search is not None:
            if kind != "hnsw":
                raise ValueError(f"ef_search applies to hnsw indexes, not {kind!r}")
            self._index.hnsw.efSearch = params["ef_search"] = _positive("ef_search", ef_search)

    # -- storage -----------------------------------------------------------------------

    def save(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        """Write the folder `uri` (local path or any fsspec URI); an existing index there is replaced."""
        fs, path = storage.filesystem(uri, storage_options)
        meta_path = f"{path.rstrip('/')}/meta.json"
        if fs.exists(meta_path):
            fs.rm(meta_path)  # first, so a half-overwritten folder never looks complete
        # Streamed to storage as faiss writes it: no second copy of the index in memory.
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path.rstrip('/')}/index.faiss", "wb") as out:
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(out.write))
        ids = io.BytesIO()
        pq.write_table(pa.table({"id": pa.array(self._ids, pa.string())}), ids)
        storage.write_bytes(storage.join(uri, "ids.parquet"), ids.getvalue(), storage_options)
        storage.write_bytes(storage.join(uri, "meta.json"), json.dumps(self._meta, indent=2).encode(), storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: dict[str, Any] | None = None) -> VectorIndex:
        """Read a folder written by `save`. FileNotFoundError if it holds no complete index."""
        fs, path = storage.filesystem(uri, storage_options)
        fs.invalidate_cache(path)  # another process may have saved it since this one last listed
        try:
            meta = json.loads(storage.read_bytes(storage.join(uri, "meta.json"), storage_options))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no vector index at {uri}: meta.json is missing (nothing saved, or a save did not finish)"
            ) from None
        if meta.get("format") != _FORMAT or meta.get("kind") not in _FAISS_TYPES:
            raise ValueError(f"{uri}/meta.json: unsupported format {meta.get('format')!r} or kind {meta.get('kind')!r}")
        with fs.open(f"{path.rstrip('/')}/index.faiss", "rb") as stream:  # read as faiss parses: no second copy
            index = faiss.read_index(faiss.PyCallbackIOReader(stream.read))
        ids = (
            pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, "ids.parquet"), storage_options)))
            .column("id")
            .to_pylist()
        )

        if not isinstance(index, _FAISS_TYPES[meta["kind"]]) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(
                f"{uri}: index.faiss holds a {type(index).__name__}, not the {meta['kind']!r} index meta.json describes"
            )
        if not meta["count"] == index.ntotal == len(ids) or meta["dim"] != index.d:
            raise ValueError(
                f"{uri}: inconsistent files: meta.json says {meta['count']} x {meta['dim']}, "
                f"index.faiss holds {index.ntotal} x {index.d}, ids.parquet holds {len(ids)} ids"
            )
        loaded = cls(index, ids, meta)
        loaded.tune(**{name: meta["params"][name] for name in ("nprobe", "ef_search") if name in meta["params"]})
        return loaded

    # -- properties --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._meta["count"]

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, count={len(self)}, dim={self.dim}, params={self._meta['params']})"

    @property
    def dim(self) -> int:
        return self._meta["dim"]

    @property
    def kind(self) -> IndexKind:
        return self._meta["kind"]

    @property
    def ids(self) -> list[str]:
        """Lesion id of each row position (a copy)."""
        return list(self._ids)

    @property
    def meta(self) -> dict[str, Any]:
        """kind, dim, count, metric, params, model (a copy; change search parameters with `tune`)."""
        return json.loads(json.dumps(self._meta))


def _expected_list_sizes(index: faiss.IndexIVFFlat, training: np.ndarray, count: int) -> list[int]:
    """How many of `count` vectors each list will get, as the training sample says: exact when
    the sample is every row, else scaled, with 10% and a few to spare."""
    _, lists = index.quantizer.search(training, 1)
    expected = np.bincount(lists.ravel(), minlength=index.nlist) * (count / len(training))
    if len(training) < count:
        expected = expected * 1.1 + 8
    return np.ceil(expected).astype(np.int64).tolist()


def _matrix(column: pa.Array, name: str) -> np.ndarray:
    """A list<float> column of equal-length rows as an [n, dim] array."""
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null vectors")
    lengths = pc.list_value_length(column)
    if len(column) and pc.min(lengths).as_py() != pc.max(lengths).as_py():
        raise ValueError(f"column {name!r} holds vectors of different lengths")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def _positive(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _unit_rows(x: np.ndarray, normalize: bool, first_row: int = 0, in_place: bool = False) -> np.ndarray:
    """`x` as C-contiguous float32 unit rows: checked in chunks, normalised if asked (into a copy,
    or into `x` itself with in_place=True when x is already C-contiguous float32).

    Errors name rows counted from `first_row` (the position of x[0] in a streamed build)."""
    given = x
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _CHECK_CHUNK):
        block = x[start : start + _CHECK_CHUNK]
        if not np.isfinite(block).all():
            bad = first_row + start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f"non-finite value (NaN or inf) in row {bad}")
        norms[start : start + len(block)] = np.linalg.norm(block, axis=1)
    if normalize:
        if (norms == 0).any():
            raise ValueError(
                f"row {first_row + int(np.flatnonzero(norms == 0)[0])} is all zeros and has no direction to normalise"
            )
        if in_place and x is given and x.flags.writeable and x.flags.owndata:  # never a caller's view
            x /= norms[:, None]
            return x
        return x / norms[:, None]
    off = np.abs(norms - 1) > _UNIT_NORM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        norm, row = norms[row], first_row + row
        raise ValueError(f"normalize=False needs unit-norm rows, but row {row} has norm {norm:.4f}; pass normalize=True")
    return x


def ivf_lists(count: int, nlist: int | None) -> int:
    """The ivf list count for `count` vectors: `nlist`, or 4 * sqrt(count) lowered so every list has >= 39 training points."""
    if count < _MIN_POINTS_PER_LIST:
        raise ValueError(f"an ivf index needs at least {_MIN_POINTS_PER_LIST} vectors, got {count}; use kind='exact'")
    if nlist is None:
        nlist = max(1, min(round(4 * math.sqrt(count)), count // _MIN_POINTS_PER_LIST))
    nlist = _positive("nlist", nlist)
    if count < nlist * _MIN_POINTS_PER_LIST:
        raise ValueError(
            f"nlist={nlist} needs at least {nlist * _MIN_POINTS_PER_LIST} vectors to train, got {count}; lower nlist"
        )
    return nlist


def training_rows(count: int, nlist: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted row positions an ivf index over `count` vectors trains on.

    At most 256 points per list, the most faiss's k-means would use anyway; sorted, so a
    reader passes over the rows (or the file) front to back once.
    """
    size = min(count, _MAX_POINTS_PER_LIST * ivf_lists(count, nlist))
    return np.arange(count) if size == count else np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def _empty_index(
    kind: IndexKind,
    dim: int,
    count: int,
    training: Callable[[], np.ndarray] | None,
    normalize: bool,
    nlist: int | None,
    nprobe: int,
    hnsw_m: int,
    ef_search: int,
    seed: int,
) -> tuple[faiss.Index, dict[str, Any]]:
    """A trained index of `kind` holding no vectors yet, and the parameters meta.json records."""
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
        # Room for every vector up front: grown add by add, the last reallocation would hold
        # the old and the new copy of the whole index at once.
        index.codes.resize(count * index.code_size)
        index.codes.resize(0)
        return index, {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, _positive("hnsw_m", hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = _positive("ef_search", ef_search)
        return index, {"hnsw_m": hnsw_m, "ef_search": index.hnsw.efSearch, "ef_construction": _HNSW_EF_CONSTRUCTION}
    nlist = ivf_lists(count, nlist)
    nprobe = _positive("nprobe", nprobe)
    training = None if training is None else training()
    if training is None or training.ndim != 2 or training.shape[1] != dim or len(training) < nlist * _MIN_POINTS_PER_LIST:
        shape = None if training is None else training.shape
        raise ValueError(
            f"an ivf index of {nlist} lists needs >= {nlist * _MIN_POINTS_PER_LIST} training vectors of dim {dim}, got {shape}"
        )
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    training = _unit_rows(training, normalize, in_place=True)
    index.train(training)
    index.nprobe = min(nprobe, nlist)
    params = {"nlist": nlist, "nprobe": index.nprobe, "train_size": len(training), "seed": seed}
    sizes = _expected_list_sizes(index, training, count)
    training = None  # freed before the lists take the index's memory
    invlists = faiss.downcast_InvertedLists(index.invlists)
    for number, size in enumerate(sizes):
        # Room up front: lists grown add by add reallocate, and the freed copies left the
        # process holding about 1.5x the index. Back to size 0 keeps the capacity.
        invlists.resize(number, size)
        invlists.resize(number, 0)
    return index, params
