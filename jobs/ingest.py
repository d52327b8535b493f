"""Ingest a source into the canonical lesion table, quarantining what cannot enter.

    python -m jobs.ingest ingest.source=isic2024 ingest.input=s3://bucket/isic ingest.output=s3://bucket/ingest

Writes `<output>/lesions/*.parquet` (LESION_SCHEMA), `<output>/quarantine/*.parquet`
(QUARANTINE_SCHEMA: row id, source, reason, detail) and `<output>/ingest_summary.json`.
The job fails unless rows in = rows out + rows quarantined.
"""

from __future__ import annotations

import sys
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, IngestConfig
from dermaray.data.readers import READERS, accepted, canonicalize, mark_duplicates, quarantined
from dermaray.layout import summary_uri
from dermaray.schema import LESION_SCHEMA, QUARANTINE_SCHEMA
from dermaray.storage import arrow_filesystem, join, parquet_row_count, read_parquet
from jobs.common import clear_summary, init_ray, log, write_summary


def canonicalize_batch(batch: pa.Table, cfg: IngestConfig, storage_options: dict) -> pa.Table:
    """Fetch one batch's images and canonicalize its rows (one Ray Data task per batch)."""
    reader = READERS[cfg.source]
    rows = batch.to_pylist()
    return canonicalize(reader, cfg.input, rows, reader.fetch_images(cfg.input, storage_options, rows), cfg)


def _write(ds: ray.data.Dataset, uri: str, storage_options: dict, rows_per_file: int, schema: pa.Schema) -> None:
    fs, path = arrow_filesystem(uri, storage_options)
    ds.write_parquet(path, filesystem=fs, mode="overwrite", min_rows_per_file=rows_per_file)
    written = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if not any(info.path.endswith(".parquet") for info in written):  # Ray writes no file for zero rows
        fs.create_dir(path)
        pq.write_table(schema.empty_table(), f"{path}/empty.parquet", filesystem=fs)


def run(cfg: DermarayConfig) -> dict:
    c = cfg.ingest
    clear_summary(summary_uri(c.output, "ingest"), cfg.storage_options)
    reader = READERS[c.source]
    metadata = mark_duplicates(reader.load_metadata(c.input, cfg.storage_options), reader.id_column)
    rows_in = metadata.num_rows
    log.info("ingest: %d %s rows from %s", rows_in, c.source, c.input)
    init_ray(cfg.ray)
    # Metadata is small beside the images: slice it on the driver; tasks fetch the bytes.
    batches = [metadata.slice(i, c.batch_size) for i in range(0, rows_in, c.batch_size)] or [metadata]
    outcome = (
        ray.data.from_arrow(batches)
        .map_batches(
            canonicalize_batch,
            fn_kwargs={"cfg": c, "storage_options": cfg.storage_options},
            batch_size=None,
            batch_format="pyarrow",
        )
        .materialize()
    )
    for name, select, schema in (("lesions", accepted, LESION_SCHEMA), ("quarantine", quarantined, QUARANTINE_SCHEMA)):
        rows = outcome.map_batches(select, batch_format="pyarrow", batch_size=None)
        _write(rows, join(c.output, name), cfg.storage_options, c.rows_per_file, schema)

    # Reconcile against what is on storage (Parquet footers), not against the plan.
    rows_out = parquet_row_count(join(c.output, "lesions"), cfg.storage_options)
    written_quarantine = read_parquet(join(c.output, "quarantine"), cfg.storage_options, columns=["reason"])
    reasons = Counter(written_quarantine.column("reason").to_pylist())
    rows_quarantined = written_quarantine.num_rows
    labels = read_parquet(
        join(c.output, "lesions"), cfg.storage_options, columns=["diagnosis", "diagnosis_superclass", "malignant"]
    )
    summary = {
        "source": c.source,
        "input": c.input,
        "output": c.output,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_quarantined": rows_quarantined,
        "quarantine_reasons": dict(sorted(reasons.items())),
        # Lesions that carry each label (the rest have it null: ISIC 2024 rows mostly lack a diagnosis).
        "labelled": {
            "diagnosis": rows_out - labels["diagnosis"].null_count,
            "superclass": rows_out - labels["diagnosis_superclass"].null_count,
            "malignant": rows_out - labels["malignant"].null_count,
        },
    }
    write_summary(summary_uri(c.output, "ingest"), summary, cfg.storage_options)
    if rows_in != rows_out + rows_quarantined:
        raise RuntimeError(f"ingest lost rows: {rows_in} in != {rows_out} out + {rows_quarantined} quarantined")
    log.info("ingest: %d in = %d out + %d quarantined %s", rows_in, rows_out, rows_quarantined, dict(reasons))
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.ingest"))
