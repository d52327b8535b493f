"""URIs everywhere: one place turns a URI plus fsspec storage options into a filesystem.

Local paths, file://, s3:// (s3fs; `endpoint_url` for MinIO or a test server), gs:// and
anything else fsspec knows. pyarrow and Ray Data get the same filesystem wrapped, so a
test endpoint configured once reaches every reader and writer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from fsspec.core import url_to_fs

from dermaray.config import SECRETS_FILE_KEY
from dermaray.layout import join  # defined with the layout (which the config imports); every caller imports it from here


def with_secrets(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options with `secrets_file` replaced by that file's options (key, secret, ...), read here, on this node."""
    options = dict(storage_options or {})
    secrets_file = options.pop(SECRETS_FILE_KEY, None)
    if secrets_file:
        try:
            secrets = yaml.safe_load(Path(secrets_file).expanduser().read_text())
        except OSError as exc:
            raise FileNotFoundError(
                f"storage_options.{SECRETS_FILE_KEY} {secrets_file} cannot be read on this node: {exc}"
            ) from exc
        if not isinstance(secrets, dict):
            raise ValueError(f"storage_options.{SECRETS_FILE_KEY} {secrets_file} must hold a mapping of fsspec options")
        options.update(secrets)
    return options


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for `uri`."""
    return url_to_fs(uri, **with_secrets(storage_options))


class NodeFSHandler(pafs.FSSpecHandler):
    """An fsspec filesystem for pyarrow that pickles as (protocol, options): what Ray ships to other
    nodes (Ray Data read tasks, Ray Train's storage) holds no credential read from a secrets file;
    each node reads that file itself when the filesystem is unpickled there."""

    def __init__(self, uri: str, storage_options: dict[str, Any]):
        self._args = (uri, dict(storage_options))
        super().__init__(filesystem(uri, storage_options)[0])

    def __reduce__(self):
        return NodeFSHandler, self._args


def arrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it), for pyarrow and Ray Data readers / writers."""
    fs, path = filesystem(uri, storage_options)
    if getattr(fs, "protocol", None) in ("file", ("file", "local")):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(NodeFSHandler(uri, storage_options or {})), path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute, for processes that run elsewhere (Ray Train workers change directory)."""
    return uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def remove_tree(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a folder if it exists (outputs are rewritten whole, never appended to)."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)  # other processes (Ray workers) may have written here since our last listing
    return fs.exists(path)


def present(uri: str, marker: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `<uri>/<marker>` exists, for an optional part; True when storage cannot be asked (the load will say why)."""
    fs, path = filesystem(join(uri, marker), storage_options)
    try:
        return fs.exists(path)
    except Exception:
        return True


def require(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of an input that must exist; one clear error if it is absent or unreachable."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)  # other processes (Ray workers) may have written here since our last listing
    try:
        found = fs.exists(path)
    except Exception as exc:  # connection refused, bad credentials, unknown host, ...
        raise FileNotFoundError(f"{uri} does not exist or cannot be reached: {type(exc).__name__}: {exc}") from exc
    if not found:
        raise FileNotFoundError(f"{uri} does not exist or cannot be reached")
    return fs, path


def download_folder(uri: str, target: str, storage_options: dict[str, Any] | None = None) -> str:
    """Copy a folder at `uri` into the local folder `target` (a local `uri` is returned as is)."""
    if not is_remote(uri):
        require(uri, storage_options)
        return uri.removeprefix("file://")
    fs, path = require(uri, storage_options)
    fs.get(path.rstrip("/") + "/", target.rstrip("/") + "/", recursive=True)
    return target


def upload_folder(
    folder: str | os.PathLike, uri: str, storage_options: dict[str, Any] | None = None, last: str | None = None
) -> str:
    """Copy a local folder's files to `uri` (any URI); the file named `last` goes last, so its presence means complete."""
    files = sorted((p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: (p.name == last, p.as_posix()))
    for file in files:
        write_bytes(join(uri, file.relative_to(folder).as_posix()), file.read_bytes(), storage_options)
    return uri


def parquet_files(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = require(uri, storage_options)
    files = [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/_temporary/" not in p)
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri}")
    return fs, files


def table_version(uri: str, storage_options: dict[str, Any] | None = None) -> list[list[str]]:
    """[file name within the table, its version] for each Parquet file of a table, without reading it: an object's
    content hash where the store keeps one (S3's ETag, GCS's md5Hash, Azure's etag), else the file's size and
    modification time, else fsspec's own `checksum`. A table rewritten in place reads as another table; one left
    alone, or given other permissions, as the same."""
    fs, files = parquet_files(uri, storage_options)
    root = filesystem(uri, storage_options)[1].rstrip("/")
    return [[f[len(root) :].lstrip("/") or f.rsplit("/", 1)[-1], _file_version(fs, f)] for f in files]


def _file_version(fs: fsspec.AbstractFileSystem, path: str) -> str:
    info = fs.info(path)
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return f"{info['size']}@{info[key]}"
    return str(fs.checksum(path))


def read_parquet(uri: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """A file or a folder of Parquet files as one table (for tables that fit in memory)."""
    fs, files = parquet_files(uri, storage_options)
    tables = []
    for name in files:
        with fs.open(name, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")


def iter_parquet(
    uri: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None, batch_rows: int = 65536
) -> Iterator[pa.RecordBatch]:
    """The rows of a file or folder of Parquet files as record batches, file by file in name order
    (the same order every time), holding one batch in memory."""
    fs, files = parquet_files(uri, storage_options)
    for name in files:
        with fs.open(name, "rb") as f:
            # Pages read as they decode, not a whole column chunk (a row group can be hundreds of MB).
            parquet = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages; a long stream would keep them all


def take_parquet(
    uri: str, positions: Sequence[int], storage_options: dict[str, Any] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The rows at `positions` (in `read_parquet`'s order of a folder's rows) of a file or folder
    of Parquet files, in the order given, reading only the row groups that hold them."""
    wanted = np.asarray(positions, np.int64)
    order = np.argsort(wanted, kind="stable")
    ascending = wanted[order]
    fs, files = parquet_files(uri, storage_options)
    total = parquet_row_count(uri, storage_options)
    if len(wanted) and (ascending[0] < 0 or ascending[-1] >= total):
        raise IndexError(f"positions outside the {total} rows of {uri}")
    if not len(wanted):
        schema = parquet_schema(uri, storage_options)
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    pieces, start = [], 0
    for name in files:
        with fs.open(name, "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                lo, hi = np.searchsorted(ascending, [start, start + rows])
                if hi > lo:
                    table = parquet.read_row_group(group, columns=columns)
                    pieces.append(table.take(pa.array(ascending[lo:hi] - start)))
                start += rows
    found = pa.concat_tables(pieces, promote_options="permissive")
    return found.take(pa.array(np.argsort(order, kind="stable")))  # back to the order asked for


def parquet_schema(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of a file or folder of Parquet files, from the first file's footer."""
    fs, files = parquet_files(uri, storage_options)
    with fs.open(files[0], "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def parquet_row_count(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Rows in a folder of Parquet files, from their footers alone."""
    return parquet_null_counts(uri, [], storage_options)[0]


def parquet_null_counts(
    uri: str, columns: Sequence[str], storage_options: dict[str, Any] | None = None
) -> tuple[int, dict[str, int]]:
    """Rows in a folder of Parquet files and the nulls of each of `columns`, from the footers'
    statistics; a column chunk written without them is read."""
    fs, files = parquet_files(uri, storage_options)
    rows, nulls = 0, dict.fromkeys(columns, 0)
    for name in files:
        with fs.open(name, "rb") as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            rows += meta.num_rows
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise KeyError(f"{name} has no columns {missing}")
            leaf = {parquet.schema.column(i).path: i for i in range(meta.num_columns)}
            for group in range(meta.num_row_groups):
                for column in columns:
                    stats = meta.row_group(group).column(leaf[column]).statistics
                    if stats is not None and stats.has_null_count:
                        nulls[column] += stats.null_count
                    else:
                        nulls[column] += parquet.read_row_group(group, columns=[column]).column(0).null_count
    return rows, nulls


def write_parquet_atomic(table: pa.Table, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write `uri` whole or not at all: a temp object, then a rename (local) or copy (object stores).

    A reader never sees a half-written file, so "the file exists" can mean "the work is done".
    """
    fs, path = filesystem(uri, storage_options)
    folder, name = path.rsplit("/", 1)
    temp = f"{folder}/_temporary/{name}.{uuid.uuid4().hex}"
    fs.makedirs(f"{folder}/_temporary", exist_ok=True)
    with fs.open(temp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(temp, path)
