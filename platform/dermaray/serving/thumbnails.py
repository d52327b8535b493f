"""Gallery thumbnails stored beside the vector index, read by the Serve replicas as responses show them.

    <folder>/thumbnails.bin   the JPEGs back to back, in the index's row order
    <folder>/offsets.npy      int64 [n + 1]: thumbnail r is bytes offsets[r]:offsets[r + 1]
    <folder>/meta.json        count, size, and the digest of the lesion ids they belong to; written last

The embeddings job writes them as it streams its table; a replica keeps only the offsets and a
bounded cache, and reads the byte ranges of a response's thumbnails from storage in one call. So
a replica's start and memory do not grow with the gallery's images.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from dermaray import storage
from dermaray.images import decode_rgb

FORMAT = "dermaray.thumbnails/1"
DATA, OFFSETS, META = "thumbnails.bin", "offsets.npy", "meta.json"


def thumbnail_jpeg(image_bytes: bytes, size: int) -> bytes:
    """The image shrunk to fit `size` x `size` (aspect kept), as a JPEG."""
    image = decode_rgb(image_bytes)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def with_thumbnails(batch: pa.Table, size: int, column: str) -> pa.Table:
    """A Ray Data batch with `column` added: each row's image as a thumbnail (None where it has no image)."""
    images = batch.column("image_bytes").to_pylist()
    thumbs = [None if b is None else thumbnail_jpeg(b, size) for b in images]
    return batch.append_column(column, pa.array(thumbs, pa.binary()))


def _add_ids(digest: Any, ids: Iterable[str]) -> None:
    for lesion_id in ids:
        digest.update(lesion_id.encode() + b"\n")


def ids_digest(ids: Iterable[str]) -> str:
    """What the thumbnails record of the lesions they belong to, in order."""
    digest = hashlib.sha256()
    _add_ids(digest, ids)
    return digest.hexdigest()


def write_thumbnails(
    uri: str, chunks: Iterable[tuple[Sequence[str], Sequence[bytes | None]]], size: int, storage_options: dict | None = None
) -> int:
    """Write (ids, thumbnails) chunks, in row order, to the folder `uri`; returns the count.

    A row without a thumbnail is stored empty (a replica answers 404 for it). Memory: one chunk
    and the offsets (an int64 array, 8 bytes a row)."""
    fs, path = storage.filesystem(uri, storage_options)
    folder = path.rstrip("/")
    if fs.exists(f"{folder}/{META}"):
        fs.rm(f"{folder}/{META}")  # first: a half-rewritten folder never looks complete
    fs.makedirs(folder, exist_ok=True)
    offsets, digest, end = array("q", [0]), hashlib.sha256(), 0
    with fs.open(f"{folder}/{DATA}", "wb") as out:
        for ids, thumbs in chunks:
            if len(ids) != len(thumbs):
                raise ValueError(f"a chunk of {len(ids)} ids came with {len(thumbs)} thumbnails")
            _add_ids(digest, ids)
            for thumb in thumbs:
                if thumb:
                    out.write(thumb)
                    end += len(thumb)
                offsets.append(end)
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(offsets, np.int64))
    storage.write_bytes(storage.join(uri, OFFSETS), buffer.getvalue(), storage_options)
    meta = {"format": FORMAT, "count": len(offsets) - 1, "size": size, "ids_sha256": digest.hexdigest()}
    storage.write_bytes(storage.join(uri, META), json.dumps(meta, indent=2).encode(), storage_options)
    return meta["count"]


class Thumbnails:
    """The thumbnails of a gallery, by row, read lazily from storage through an LRU cache of `cache_rows` rows."""

    def __init__(self, uri: str, ids: Sequence[str], storage_options: dict | None = None, cache_rows: int = 4096):
        """ValueError when the folder holds thumbnails of other lesions than `ids` (the index's, in row order)."""
        self.meta = json.loads(storage.read_bytes(storage.join(uri, META), storage_options))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{uri}/{META}: unsupported format {self.meta.get('format')!r}")
        if self.meta["count"] != len(ids) or self.meta["ids_sha256"] != ids_digest(ids):
            raise ValueError(
                f"{uri} holds thumbnails of {self.meta['count']} other lesions (or another order) than the "
                f"{len(ids)} of the index: rebuild both with one run of the embeddings job"
            )
        self.offsets = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, OFFSETS), storage_options)))
        if len(self.offsets) != len(ids) + 1:
            raise ValueError(f"{uri}/{OFFSETS} holds {len(self.offsets) - 1} offsets, not {len(ids)}")
        self.fs, path = storage.filesystem(uri, storage_options)
        self.data = f"{path.rstrip('/')}/{DATA}"
        self.cache_rows = cache_rows
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # replicas serve requests from several threads

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> bytes | None:
        """Row `row`'s JPEG, or None when its lesion had no image."""
        return self.get_many([row])[0]

    def get_many(self, rows: Sequence[int]) -> list[bytes | None]:
        """The JPEGs of `rows`; those not cached are read in one call (concurrent range reads on object storage),
        not one request after another."""
        found: dict[int, bytes] = {}
        with self._lock:
            for row in rows:
                if row in self._cache:
                    self._cache.move_to_end(row)
                    found[row] = self._cache[row]
        missing = sorted({r for r in rows if r not in found and self.offsets[r + 1] > self.offsets[r]})
        if missing:
            starts = [int(self.offsets[r]) for r in missing]
            ends = [int(self.offsets[r + 1]) for r in missing]
            found.update(
                zip(missing, self.fs.cat_ranges([self.data] * len(missing), starts, ends, on_error="raise"), strict=True)
            )
        with self._lock:
            for row in rows:
                self._cache[row] = found.setdefault(row, b"")  # b"": a lesion without an image
                self._cache.move_to_end(row)
            while len(self._cache) > self.cache_rows:
                self._cache.popitem(last=False)
        return [found[row] or None for row in rows]

    def info(self) -> dict[str, Any]:
        return {"count": len(self), "size": self.meta["size"], "cached": len(self._cache)}
