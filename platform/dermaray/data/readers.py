"""Readers: one per source format, each mapping its rows onto the canonical lesion table.

A reader is a pure description of a format: how to load the metadata (as strings, so a
bad value is a quarantined row and not a failed file), where each row's image bytes
are, and how a row's fields become canonical fields. `canonicalize` applies it to a
batch; `jobs.ingest` spreads batches over a Ray cluster.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dermaray.config import IngestConfig
from dermaray.data.hdf5 import contiguous_extent
from dermaray.data.validate import RowRejected, inspect_image, parse_age, parse_attribute, parse_number, parse_text
from dermaray.schema import (
    ATTRIBUTES,
    ATTRIBUTES_BY_NAME,
    DIAGNOSES,
    DIAGNOSES_BY_CODE,
    LESION_SCHEMA,
    QUARANTINE_SCHEMA,
    SEXES,
    SPLITS,
    SUPERCLASSES,
)
from dermaray.storage import filesystem, is_remote, join, read_parquet, require

ROW_INDEX = "_row_index"
IMAGE_PATH = "_image_path"


class MissingColumnsError(ValueError):
    pass


def read_csv_as_text(uri: str, storage_options: dict[str, Any]) -> pa.Table:
    """Every column as text, blanks as "", so "NaN" or "forty" reach validation as written.

    Arrow's reader parses on every core of the driver, which waits on it before any task starts
    (ISIC 2024's metadata is ~400k rows). A file it refuses (a row with fewer fields than the
    header) or whose header repeats a name goes through pandas, which reads the missing fields as
    blanks (checked row by row) and renames a repeated column ("x.1")."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        header = next(csv.reader(text), [])
        text.detach()  # leaves `f` open
        f.seek(0)
        if len(set(header)) == len(header):
            try:
                return pacsv.read_csv(
                    f,
                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(
                        column_types=dict.fromkeys(header, pa.string()),
                        strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
            except pa.ArrowInvalid:
                f.seek(0)
        frame = pd.read_csv(f, dtype=str, keep_default_na=False)
    return pa.Table.from_pandas(frame, preserve_index=False)


def find_one(uri: str, storage_options: dict[str, Any], patterns: tuple[str, ...], what: str) -> str:
    fs, path = require(uri, storage_options)
    for pattern in patterns:
        found = sorted(fs.glob(join(path, pattern)))
        if found:
            return join(uri, found[0][len(path.rstrip("/")) + 1 :])
    raise FileNotFoundError(f"no {what} ({' or '.join(patterns)}) under {uri}")


def _site(mapping: dict[str, str], value) -> str | None:
    text = parse_text(value)
    return None if text is None else mapping.get(text.lower().replace("_", " "), text.lower())


def _sex(value) -> str | None:
    text = parse_text(value)
    if text is None:
        return None
    if text.lower() not in SEXES:
        raise RowRejected("invalid_value", f"sex={text!r} is not one of {SEXES}")
    return text.lower()


def _diagnosis_fields(code: str | None, superclass: str | None = None, full: str | None = None) -> dict:
    dx = DIAGNOSES_BY_CODE.get(code) if code else None
    superclass = superclass or (dx.superclass if dx else None)
    return {
        "diagnosis": code,
        "diagnosis_superclass": superclass,
        "diagnosis_full": full or (dx.hierarchy if dx else superclass),
        "malignant": None if superclass is None else superclass == "Malignant",
    }


class Reader:
    name: ClassVar[str]
    id_column: ClassVar[str]
    required_columns: ClassVar[tuple[str, ...]]

    def load_metadata(self, uri: str, storage_options: dict[str, Any]) -> pa.Table:
        raise NotImplementedError

    def fetch_images(self, uri: str, storage_options: dict[str, Any], batch: pa.Table) -> list[bytes | None]:
        """Image bytes aligned with the rows of a metadata batch; None where the image does not exist."""
        paths = batch.column(IMAGE_PATH).to_pylist()
        wanted = [p for p in paths if p]
        if not wanted:
            return [None] * len(paths)
        fs, _ = filesystem(uri, storage_options)
        fetched = fs.cat(wanted, on_error="return") if len(wanted) > 1 else {wanted[0]: _cat_one(fs, wanted[0])}
        return [fetched.get(p) if p and isinstance(fetched.get(p), bytes) else None for p in paths]

    def to_canonical(self, row: dict, attributes: dict[str, float | None] | None = None) -> dict:
        """The row's canonical fields; `attributes` are its ATTRIBUTES already parsed and checked
        (by `checked_attributes`), None to parse them here."""
        raise NotImplementedError

    # The source column of each attribute, parsed per batch by `checked_attributes`.
    attribute_columns: ClassVar[dict[str, str]] = {}
    attributes_required: ClassVar[bool] = False

    def checked_attributes(self, batch: pa.Table) -> list[dict[str, float | None] | None]:
        """Per row, its attributes parsed and range-checked a whole column at a time (Arrow, not
        a Python call per value); None for a row that did not pass, which `to_canonical` then
        checks value by value to name its reason. A column Arrow cannot cast sends every row there."""
        n = batch.num_rows
        if not self.attribute_columns or any(c not in batch.column_names for c in self.attribute_columns.values()):
            return [None] * n
        passed, missing, columns = np.ones(n, bool), np.zeros(n, bool), []
        for name, source in self.attribute_columns.items():
            column = batch.column(source)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                text = pc.utf8_trim_whitespace(column)
                column = pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)
            try:
                floats = pc.cast(column, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return [None] * n
            null = floats.is_null().to_numpy(zero_copy_only=False)
            values = floats.to_numpy(zero_copy_only=False)
            bounds = ATTRIBUTES_BY_NAME[name]
            with np.errstate(invalid="ignore"):
                in_range = np.isfinite(values) & (values >= bounds.lower) & (values <= bounds.upper)
            passed &= in_range | (null & (not self.attributes_required))
            missing |= null
            columns.append(values)
        names = list(self.attribute_columns)
        rows = np.stack(columns, axis=1).tolist()
        return [
            None
            if not ok
            else dict(zip(names, [None if v != v else v for v in row] if gap else row, strict=True))  # NaN != NaN: a null
            for ok, gap, row in zip(passed.tolist(), missing.tolist(), rows, strict=True)
        ]

    def check_columns(self, table: pa.Table, uri: str) -> None:
        missing = [c for c in self.required_columns if c not in table.column_names]
        if missing:
            raise MissingColumnsError(f"{self.name} metadata at {uri} lacks required columns {missing}")


def _cat_one(fs, path: str):
    try:
        return fs.cat_file(path)
    except Exception as exc:  # reported as image_missing, like the batched fs.cat
        return exc


class ImageFolderReader(Reader):
    """A metadata CSV plus image files found anywhere under the same folder."""

    metadata_patterns: ClassVar[tuple[str, ...]]
    image_suffixes: ClassVar[tuple[str, ...]]
    image_key_column: ClassVar[str]

    def load_metadata(self, uri: str, storage_options: dict[str, Any]) -> pa.Table:
        csv_uri = find_one(uri, storage_options, self.metadata_patterns, "metadata CSV")
        table = read_csv_as_text(csv_uri, storage_options)
        self.check_columns(table, csv_uri)
        fs, path = filesystem(uri, storage_options)
        images = {}
        for found in fs.find(path):
            stem, dot, suffix = found.rsplit("/", 1)[-1].rpartition(".")
            if dot and suffix.lower() in self.image_suffixes:
                images.setdefault(stem, found)
        keys = table.column(self.image_key_column).to_pylist()
        paths = [images.get(str(k).rsplit(".", 1)[0] if "." in str(k) else str(k)) for k in keys]
        return table.append_column(IMAGE_PATH, pa.array(paths, pa.string()))


class Isic2024Reader(Reader):
    """ISIC 2024 / SLICE-3D: `*-metadata.csv` plus `*-image.hdf5` (JPEG bytes keyed by isic_id)."""

    name = "isic2024"
    id_column = "isic_id"
    required_columns = ("isic_id", *[a.isic_column for a in ATTRIBUTES])
    _by_name = {d.name.lower(): d.code for d in DIAGNOSES}
    # ISIC 2024 names diagnoses more finely than these classes ("Melanoma in situ", "Squamous cell
    # carcinoma in situ"): an iddx_3 that starts with a class's name (less ", NOS") maps to it.
    _stems = sorted(((d.name.lower().removesuffix(", nos"), d.code) for d in DIAGNOSES), key=lambda s: -len(s[0]))
    _superclasses = {s.lower(): s for s in SUPERCLASSES}

    def load_metadata(self, uri: str, storage_options: dict[str, Any]) -> pa.Table:
        csv_uri = find_one(uri, storage_options, ("*metadata*.csv",), "metadata CSV")
        find_one(uri, storage_options, ("*image*.hdf5", "*.hdf5", "*.h5"), "image HDF5")  # fail early, not per batch
        table = read_csv_as_text(csv_uri, storage_options)
        self.check_columns(table, csv_uri)
        return table

    def fetch_images(self, uri: str, storage_options: dict[str, Any], batch: pa.Table) -> list[bytes | None]:
        import h5py

        hdf5_uri = find_one(uri, storage_options, ("*image*.hdf5", "*.hdf5", "*.h5"), "image HDF5")
        fs, path = filesystem(hdf5_uri, storage_options)
        with fs.open(path, "rb") as raw:
            # A local file by its path: HDF5's own reads of its index, not Python's, per lookup.
            with h5py.File(path if not is_remote(hdf5_uri) else raw, "r") as store:
                read = _reader_of_headers(store, raw)
                found = [_hdf5_extent(store, key, read) for key in batch.column(self.id_column).to_pylist()]
            # Stored whole and unfiltered (how h5py writes a scalar), an image is a byte range of
            # the file: read those in file order, without HDF5's per-dataset read machinery.
            for i in sorted((i for i, f in enumerate(found) if isinstance(f, tuple)), key=lambda i: found[i][0]):
                offset, size = found[i]
                raw.seek(offset)
                found[i] = raw.read(size)
            return found

    def diagnosis_code(self, iddx_3: str | None) -> str | None:
        """The class of an iddx_3 name; None when absent or not one of the classes (not a quarantine reason)."""
        if iddx_3 is None:
            return None
        name = iddx_3.lower()
        return self._by_name.get(name) or next((code for stem, code in self._stems if name.startswith(stem)), None)

    def superclass(self, row: dict) -> str | None:
        """iddx_1, else the first word of iddx_full or iddx_2 ("Benign::..." / "Benign melanocytic ...")."""
        iddx_1 = parse_text(row.get("iddx_1"))
        if iddx_1 is not None:
            if iddx_1.lower() not in self._superclasses:
                raise RowRejected("invalid_value", f"iddx_1={iddx_1!r} is not one of {SUPERCLASSES}")
            return self._superclasses[iddx_1.lower()]
        for column in ("iddx_full", "iddx_2"):
            words = (parse_text(row.get(column)) or "").split("::")[0].split()
            if words and words[0].lower() in self._superclasses:
                return self._superclasses[words[0].lower()]
        return None

    attribute_columns = {a.name: a.isic_column for a in ATTRIBUTES}
    attributes_required = True

    def to_canonical(self, row: dict, attributes: dict[str, float | None] | None = None) -> dict:
        # Most ISIC 2024 rows carry only iddx_1 and `target`: diagnosis is then null, the row is kept.
        target = parse_number("target", row.get("target"))
        fields = _diagnosis_fields(
            self.diagnosis_code(parse_text(row.get("iddx_3"))),
            self.superclass(row),
            parse_text(row.get("iddx_full")),
        )
        if target is not None:
            if target not in (0, 1):
                raise RowRejected("invalid_value", f"target={target:g} is not 0 or 1")
            fields["malignant"] = bool(target)  # ISIC's own malignancy label, kept when iddx_1 is absent too
        return {
            "domain": parse_text(row.get("attribution")),
            "patient_id": parse_text(row.get("patient_id")),
            "age_approx": parse_age(row.get("age_approx")),
            "sex": _sex(row.get("sex")),
            "anatom_site": parse_text(row.get("anatom_site_general")),
            **fields,
            **(attributes or {a.name: parse_attribute(a.name, row.get(a.isic_column), required=True) for a in ATTRIBUTES}),
        }


def _reader_of_headers(store, raw) -> Callable[[int, int], bytes] | None:
    """`read(offset, n)` on the file's bytes, for reading object headers ourselves; None when the
    file's addresses are not plain offsets of 8 bytes (a user block shifts them)."""
    plist = store.id.get_create_plist()
    if plist.get_sizes() != (8, 8) or plist.get_userblock() != 0:
        return None

    try:  # a local file: one system call, not a seek and a buffered read
        descriptor = raw.fileno()
        return lambda offset, size: os.pread(descriptor, size, offset)
    except (OSError, AttributeError):  # object storage (io.UnsupportedOperation is an OSError)
        pass

    def read(offset: int, size: int) -> bytes:
        raw.seek(offset)
        return raw.read(size)

    return read


def _hdf5_extent(store, key: str | None, read: Callable[[int, int], bytes] | None = None) -> tuple[int, int] | bytes | None:
    """Where dataset `key`'s bytes lie in the file, (offset, size), when they are one contiguous
    unfiltered range of fixed-size values; else its bytes as HDF5 reads them; None if absent.

    With `read`, a hard link's object header is parsed here (`dermaray.data.hdf5`: ~8 us a key,
    where opening the dataset through libhdf5 and asking costs ~36); libhdf5 opens the dataset when
    the header gives no answer."""
    if not key:
        return None
    import h5py

    # Only a key in the root group is a range: a path ("group/name") may pass through an external link
    # into another file, where the offsets HDF5 reports lie; its bytes are read through HDF5.
    ranged = "/" not in key.strip("/")
    if read is not None and ranged:
        try:
            link = store.id.links.get_info(key.encode())
        except (KeyError, RuntimeError):  # absent: libhdf5's open below says so
            link = None
        if link is not None and link.type == h5py.h5l.TYPE_HARD:
            extent = contiguous_extent(read, link.u)
            if extent is not None:
                return extent
    try:
        dataset = h5py.h5d.open(store.id, key.encode())
    except KeyError:
        return None
    if dataset.shape is None:  # a null dataspace (h5py.Empty) holds no value: no image bytes
        return b""
    offset, dtype = dataset.get_offset(), dataset.dtype
    size = dtype.itemsize * int(np.prod(dataset.shape, dtype=np.int64))
    # Raw bytes equal what HDF5 returns only for opaque values, null-padded strings (h5py's `np.bytes_`; a
    # null-terminated one is cut at its first zero byte) and single bytes (not compound records), and only
    # in this file (a hard link in the root group: not behind an external link).
    plain = (dtype.kind == "V" and dtype.names is None) or dtype == np.uint8
    plain |= dtype.kind == "S" and dataset.get_type().get_strpad() == h5py.h5t.STR_NULLPAD
    if ranged and offset is not None and plain and dataset.get_storage_size() == size:
        if store.id.links.get_info(key.encode()).type == h5py.h5l.TYPE_HARD:
            return offset, size
    buffer = np.empty(dataset.shape, dtype)
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, buffer)
    return buffer.tobytes()


class Ham10000Reader(ImageFolderReader):
    """HAM10000: `HAM10000_metadata.csv` and `<image_id>.jpg` in any subfolder.

    HAM10000 has no patient id and several images per lesion: the lesion id stands in
    for the patient when splitting, so images of one lesion never straddle splits.
    """

    name = "ham10000"
    id_column = "image_id"
    required_columns = ("lesion_id", "image_id", "dx")
    metadata_patterns = ("*metadata*.csv", "*.csv")
    image_suffixes = ("jpg", "jpeg", "png")
    image_key_column = "image_id"
    codes = {"akiec": "ACK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NEV", "vasc": "VASC"}
    sites = {
        "scalp": "head/neck", "face": "head/neck", "ear": "head/neck", "neck": "head/neck",
        "hand": "upper extremity", "foot": "lower extremity", "acral": "palms/soles",
        "back": "posterior torso", "trunk": "anterior torso", "chest": "anterior torso",
        "abdomen": "anterior torso", "genital": "oral/genital", "unknown": None,
    }  # fmt: skip

    def to_canonical(self, row: dict, attributes: dict[str, float | None] | None = None) -> dict:
        dx = parse_text(row.get("dx"))
        if dx is None:
            raise RowRejected("missing_value", "dx is empty")
        if dx.lower() not in self.codes:
            raise RowRejected("invalid_value", f"dx={dx!r} is not one of {sorted(self.codes)}")
        return {
            "domain": "ham10000",
            "patient_id": parse_text(row.get("lesion_id")),
            "age_approx": parse_age(row.get("age")),
            "sex": None if parse_text(row.get("sex")) in (None, "unknown") else _sex(row.get("sex")),
            "anatom_site": _site(self.sites, row.get("localization")),
            **_diagnosis_fields(self.codes[dx.lower()]),
        }


class PadUfes20Reader(ImageFolderReader):
    """PAD-UFES-20: `metadata.csv` and `<img_id>` PNGs (smartphone photographs)."""

    name = "pad_ufes_20"
    id_column = "img_id"
    required_columns = ("patient_id", "lesion_id", "img_id", "diagnostic")
    metadata_patterns = ("metadata.csv", "*.csv")
    image_suffixes = ("png", "jpg", "jpeg")
    image_key_column = "img_id"
    codes = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
    sites = {
        "arm": "upper extremity", "forearm": "upper extremity", "hand": "upper extremity",
        "face": "head/neck", "nose": "head/neck", "neck": "head/neck", "scalp": "head/neck",
        "ear": "head/neck", "lip": "head/neck", "back": "posterior torso", "chest": "anterior torso",
        "abdomen": "anterior torso", "thigh": "lower extremity", "foot": "lower extremity",
    }  # fmt: skip

    def to_canonical(self, row: dict, attributes: dict[str, float | None] | None = None) -> dict:
        code = parse_text(row.get("diagnostic"))
        if code is None:
            raise RowRejected("missing_value", "diagnostic is empty")
        if code.upper() not in self.codes:
            raise RowRejected("invalid_value", f"diagnostic={code!r} is not one of {self.codes}")
        diameters = [parse_attribute("long_diam_mm", row.get(c), required=False) for c in ("diameter_1", "diameter_2")]
        known = [d for d in diameters if d is not None]
        return {
            "domain": "pad_ufes_20",
            "patient_id": parse_text(row.get("patient_id")),
            "age_approx": parse_age(row.get("age")),
            "sex": _sex(row.get("gender")),
            "anatom_site": _site(self.sites, row.get("region")),
            **_diagnosis_fields(code.upper()),
            "long_diam_mm": max(known) if known else None,
            "minor_axis_mm": min(known) if len(known) == 2 else None,
        }


class CanonicalParquetReader(Reader):
    """Parquet already in the canonical schema (this project's own ingest output, or a partner's)."""

    name = "parquet"
    id_column = "lesion_id"
    required_columns = ("lesion_id", "image_bytes")
    passthrough = ("domain", "patient_id", "anatom_site", "diagnosis", "diagnosis_superclass", "diagnosis_full")

    def load_metadata(self, uri: str, storage_options: dict[str, Any]) -> pa.Table:
        table = read_parquet(uri, storage_options)
        self.check_columns(table, uri)
        return table

    def fetch_images(self, uri: str, storage_options: dict[str, Any], batch: pa.Table) -> list[bytes | None]:
        return batch.column("image_bytes").to_pylist()

    attribute_columns = {a.name: a.name for a in ATTRIBUTES}

    def to_canonical(self, row: dict, attributes: dict[str, float | None] | None = None) -> dict:
        fields = {name: parse_text(row.get(name)) for name in self.passthrough}
        malignant = row.get("malignant")
        return {
            **fields,
            "age_approx": parse_age(row.get("age_approx")),
            "sex": _sex(row.get("sex")),
            "malignant": None if malignant is None else bool(malignant),
            **(attributes or {a.name: parse_attribute(a.name, row.get(a.name), required=False) for a in ATTRIBUTES}),
        }


READERS: dict[str, Reader] = {
    r.name: r for r in (Isic2024Reader(), Ham10000Reader(), PadUfes20Reader(), CanonicalParquetReader())
}


@functools.lru_cache(maxsize=1 << 16)  # a patient has many lesions (ISIC 2024: ~400 on average)
def assign_split(key: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split by a stable hash of the patient (never by row)."""
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    for split, edge in zip(SPLITS, itertools.accumulate(fractions), strict=True):
        if u < edge:
            return split
    return SPLITS[-1]


def mark_duplicates(table: pa.Table, id_column: str) -> pa.Table:
    """Add the row index, and flag every repeat of an id after its first row."""
    ids = pd.Series(table.column(id_column).to_pylist())
    table = table.append_column(ROW_INDEX, pa.array(np.arange(table.num_rows), pa.int64()))
    return table.append_column("_duplicate", pa.array(ids.duplicated(keep="first").to_numpy() & ids.notna().to_numpy()))


# The ingest output before it is split: canonical columns plus the quarantine verdict.
OUTCOME_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in LESION_SCHEMA]
    + [pa.field("row_id", pa.string()), pa.field("reason", pa.string()), pa.field("detail", pa.string())]
)


def canonicalize(reader: Reader, source_uri: str, batch: pa.Table, blobs: list[bytes | None], cfg: IngestConfig) -> pa.Table:
    """A metadata batch (with its rows' image bytes) -> OUTCOME_SCHEMA table; `reason` is null for accepted rows."""
    out = []
    checked = reader.checked_attributes(batch)
    # Attributes that passed arrive parsed, and their columns (most of an ISIC row) stay out of the
    # rows' dicts; a batch with a row to check value by value keeps them all.
    parsed = () if any(a is None for a in checked) else set(reader.attribute_columns.values())
    rows = batch.select([c for c in batch.column_names if c not in parsed]).to_pylist()
    for row, attributes, blob in zip(rows, checked, blobs, strict=True):
        lesion_id = parse_text(row.get(reader.id_column))
        record: dict[str, Any] = {"lesion_id": lesion_id, "source": reader.name, "row_id": f"{source_uri}#{row[ROW_INDEX]}"}
        try:
            if lesion_id is None:
                raise RowRejected("missing_value", f"{reader.id_column} is empty")
            if row.get("_duplicate"):
                raise RowRejected("duplicate_id", f"{reader.id_column}={lesion_id} already seen in an earlier row")
            fields = reader.to_canonical(row, attributes)
            info = inspect_image(blob, cfg.max_image_pixels, cfg.max_image_bytes)
        except RowRejected as rejected:
            record.update(reason=rejected.reason, detail=rejected.detail[:500])
        else:
            record.update(fields)
            record.update(
                image_bytes=blob,
                image_format=info.format,
                image_width=info.width,
                image_height=info.height,
                split=assign_split(fields.get("patient_id") or lesion_id, cfg.split_fractions),
            )
        out.append(record)
    return pa.Table.from_pylist(out, schema=OUTCOME_SCHEMA)


def accepted(outcome: pa.Table) -> pa.Table:
    rows = outcome.filter(outcome.column("reason").is_null())
    return rows.select(LESION_SCHEMA.names).cast(LESION_SCHEMA)


def quarantined(outcome: pa.Table) -> pa.Table:
    rows = outcome.filter(outcome.column("reason").is_valid())
    return rows.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
