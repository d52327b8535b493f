"""Synth -> ingest on a real local Ray cluster, through a real S3 endpoint on 127.0.0.1."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from dermaray.config import load_config
from dermaray.data.readers import READERS, MissingColumnsError, _hdf5_extent
from dermaray.schema import LESION_SCHEMA, QUARANTINE_SCHEMA
from jobs import ingest
from tests.helpers import PLANTED_DEFECTS as DEFECTS
from tests.helpers import read_table as _read_table


def test_counts_reconcile_and_every_planted_defect_is_quarantined_with_its_reason(synthetic_on_s3, ingested_on_s3, s3_options):
    summary, manifest = ingested_on_s3, synthetic_on_s3
    assert summary["rows_in"] == 2000 + DEFECTS["duplicate_id"] == manifest["metadata_rows"]
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_quarantined"]
    assert summary["rows_quarantined"] == sum(DEFECTS.values())

    fs = s3fs.S3FileSystem(**s3_options)
    quarantine = _read_table(fs, "dermaray/ingest/quarantine")
    lesions = _read_table(fs, "dermaray/ingest/lesions")
    assert len(quarantine) == summary["rows_quarantined"] and len(lesions) == summary["rows_out"]
    found = {(r.lesion_id, r.reason) for r in quarantine.itertuples()}
    expected = {(p["isic_id"], p["expected_reason"]) for p in manifest["planted"]}
    assert found == expected
    duplicate_rows = {p["row_index"] for p in manifest["planted"] if p["defect"] == "duplicate_id"}
    quarantined_duplicates = {int(r.row_id.rsplit("#", 1)[1]) for r in quarantine.itertuples() if r.reason == "duplicate_id"}
    assert quarantined_duplicates == duplicate_rows  # the later row is the one set aside
    assert quarantine.detail.notna().all() and quarantine.row_id.str.startswith("s3://dermaray/synth/isic#").all()
    assert lesions.lesion_id.is_unique


def test_written_tables_have_the_canonical_schemas(ingested_on_s3, s3_options):
    fs = s3fs.S3FileSystem(**s3_options)
    lesion_file = next(f for f in fs.find("dermaray/ingest/lesions") if f.endswith(".parquet"))
    quarantine_file = next(f for f in fs.find("dermaray/ingest/quarantine") if f.endswith(".parquet"))
    assert pq.read_schema(io.BytesIO(fs.cat_file(lesion_file))).remove_metadata().equals(LESION_SCHEMA)
    assert pq.read_schema(io.BytesIO(fs.cat_file(quarantine_file))).remove_metadata().equals(QUARANTINE_SCHEMA)


def test_canonical_rows_keep_attributes_images_and_split_by_patient(ingested_on_s3, s3_options):
    lesions = _read_table(s3fs.S3FileSystem(**s3_options), "dermaray/ingest/lesions")
    assert set(lesions.split) == {"train", "val", "test"}
    assert (lesions.groupby("patient_id").split.nunique() == 1).all()  # no patient straddles splits
    assert 0.7 < (lesions.split == "train").mean() < 0.9
    assert lesions.diagnosis.notna().all() and set(lesions.diagnosis) <= {"MEL", "NEV", "BCC", "SCC", "ACK", "SEK", "DF", "VASC"}
    assert (lesions.malignant == lesions.diagnosis.isin(["MEL", "BCC", "SCC"])).all()
    row = lesions.iloc[0]
    image = Image.open(io.BytesIO(row.image_bytes))
    assert image.size == (row.image_width, row.image_height) == (128, 128)
    assert row.area_mm2 > 0 and np.isfinite(lesions.area_mm2).all()


def test_ingest_writes_local_output_and_rereads_its_own_parquet(ingested_on_s3, s3_options, tmp_path):
    cfg = load_config(
        None, ["ingest.source=parquet", "ingest.input=s3://dermaray/ingest/lesions", f"ingest.output={tmp_path}/again"]
    )
    cfg.storage_options = s3_options
    summary = ingest.run(cfg)
    assert summary["rows_in"] == summary["rows_out"] == ingested_on_s3["rows_out"]
    assert json.loads((tmp_path / "again" / "ingest_summary.json").read_text())["rows_quarantined"] == 0
    again = pd.read_parquet(tmp_path / "again" / "lesions")
    original = _read_table(s3fs.S3FileSystem(**s3_options), "dermaray/ingest/lesions")
    cols = ["lesion_id", "split", "area_mm2", "diagnosis"]
    pd.testing.assert_frame_equal(
        again[cols].sort_values("lesion_id").reset_index(drop=True),
        original[cols].sort_values("lesion_id").reset_index(drop=True),
    )


def test_missing_required_column_is_a_clear_error(tmp_path):
    (tmp_path / "train-metadata.csv").write_text("isic_id,patient_id\nISIC_1,IP_1\n")
    (tmp_path / "train-image.hdf5").write_bytes(b"")
    with pytest.raises(MissingColumnsError, match="tbp_lv_areaMM2"):
        READERS["isic2024"].load_metadata(str(tmp_path), {})


def test_unreachable_or_missing_uri_is_a_clear_error(s3_options):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        READERS["isic2024"].load_metadata("s3://dermaray/no/such/folder", s3_options)
    s3fs.S3FileSystem(**s3_options).pipe("dermaray/only-csv/train-metadata.csv", b"isic_id\nISIC_1\n")
    with pytest.raises(FileNotFoundError, match="image HDF5"):
        READERS["isic2024"].load_metadata("s3://dermaray/only-csv", s3_options)
    with pytest.raises(FileNotFoundError, match="does not exist or cannot be reached"):
        READERS["parquet"].load_metadata(
            "s3://dermaray/x",
            {**s3_options, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}},
        )


def test_isic_images_read_as_byte_ranges_or_through_hdf5_alike_locally_and_on_s3(tmp_path, s3_options):
    """Contiguous datasets (opaque, bytes, null-padded strings) are read as file ranges; compressed (chunked) ones
    through HDF5; a missing key is None."""
    import h5py

    blobs = {f"ISIC_{i}": bytes(np.random.default_rng(i).integers(0, 256, 300 + i, dtype=np.uint8)) for i in range(4)}
    with h5py.File(tmp_path / "train-image.hdf5", "w") as store:
        store.create_dataset("ISIC_0", data=np.void(blobs["ISIC_0"]))  # how ISIC 2024 stores a JPEG
        store.create_dataset("ISIC_1", data=np.frombuffer(blobs["ISIC_1"], np.uint8), compression="gzip")
        store.create_dataset("ISIC_2", data=np.frombuffer(blobs["ISIC_2"], np.uint8))
        store.create_dataset("ISIC_3", data=np.bytes_(blobs["ISIC_3"]))
    rows = pa.table({"isic_id": ["ISIC_3", "ISIC_missing", "ISIC_1", "ISIC_0", "ISIC_2"]})
    expected = [blobs["ISIC_3"], None, blobs["ISIC_1"], blobs["ISIC_0"], blobs["ISIC_2"]]
    reader = READERS["isic2024"]
    assert reader.fetch_images(str(tmp_path), {}, rows) == expected
    with h5py.File(tmp_path / "train-image.hdf5", "r") as store:  # which were read as ranges
        assert [type(_hdf5_extent(store, key)).__name__ for key in ["ISIC_0", "ISIC_1", "ISIC_2", "ISIC_3"]] == [
            "tuple", "bytes", "tuple", "tuple",
        ]  # fmt: skip

    s3fs.S3FileSystem(**s3_options).put(str(tmp_path / "train-image.hdf5"), "dermaray/hdf5-layouts/train-image.hdf5")
    assert reader.fetch_images("s3://dermaray/hdf5-layouts", s3_options, rows) == expected


def test_rows_per_task_keeps_every_cpu_busy_without_tiny_tasks():
    assert ingest.rows_per_task(400_000, 1024, 16) == 1024  # a large source: batch_size bounds the file
    assert ingest.rows_per_task(5000, 1024, 2) == 625  # 8 tasks: 4 a CPU, not 5 tasks of 1,024
    assert ingest.rows_per_task(600, 1024, 2) == 128  # never below 128 rows ...
    assert ingest.rows_per_task(600, 3, 2) == 3  # ... unless batch_size asks for fewer
    assert ingest.rows_per_task(0, 1024, 2) == 128


def test_null_counts_come_from_parquet_statistics_or_from_the_column_where_a_file_has_none(tmp_path):
    from dermaray.storage import parquet_null_counts

    folder = tmp_path / "table"
    folder.mkdir()
    first = pa.table({"diagnosis": ["MEL", None, None], "malignant": [True, None, False]})
    second = pa.table({"diagnosis": [None, "NEV"], "malignant": [None, None]})
    pq.write_table(first, folder / "part-0.parquet", row_group_size=2)  # two row groups
    pq.write_table(second, folder / "part-3.parquet", write_statistics=False)
    assert pq.ParquetFile(folder / "part-3.parquet").metadata.row_group(0).column(0).statistics is None
    rows, nulls = parquet_null_counts(str(folder), ["diagnosis", "malignant"])
    assert rows == 5
    assert nulls == {"diagnosis": 3, "malignant": 3}
    with pytest.raises(KeyError, match="no columns \\['split'\\]"):
        parquet_null_counts(str(folder), ["split"])
