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
from dermaray.data.readers import READERS, ROW_INDEX, accepted, canonicalize, mark_duplicates, quarantined
from dermaray.layout import summary_uri
from dermaray.schema import LESION_SCHEMA, QUARANTINE_SCHEMA
from dermaray.storage import arrow_filesystem, join, parquet_row_count, read_parquet, remove_tree
from jobs.common import clear_summary, init_ray, log, write_summary

LESIONS, QUARANTINE = "lesions", "quarantine"  # the two tables under the output folder


def ingest_batch(bounds: dict, metadata: ray.ObjectRef, cfg: IngestConfig, storage_options: dict) -> pa.Table:
    """Fetch one batch's images, canonicalize its rows, write its quarantined rows; return the
    accepted ones (one Ray Data task per batch, one pass over the data).

    `bounds` holds the batch's first and end row of the metadata table, which every task maps
    from the object store without a copy. The quarantine file is named by the first row, so a
    retried task replaces (or removes) its own file and never adds a second copy.
    """
    start, stop = int(bounds["start"][0]), int(bounds["stop"][0])
    batch = ray.get(metadata).slice(start, stop - start)
    reader = READERS[cfg.source]
    blobs = reader.fetch_images(cfg.input, storage_options, batch)
    outcome = canonicalize(reader, cfg.input, batch, blobs, cfg)
    rejected = quarantined(outcome)
    fs, folder = arrow_filesystem(join(cfg.output, QUARANTINE), storage_options)
    path = f"{folder}/part-{batch[ROW_INDEX][0].as_py():012d}.parquet"
    if rejected.num_rows:
        fs.create_dir(folder)
        pq.write_table(rejected, path, filesystem=fs)
    elif fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)  # an earlier attempt of this task quarantined rows this one accepted
    return accepted(outcome)


def _ensure_table(uri: str, storage_options: dict, schema: pa.Schema) -> None:
    """A folder that holds no Parquet file gets an empty one: readers find a table of zero rows."""
    fs, path = arrow_filesystem(uri, storage_options)
    written = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if not any(info.path.endswith(".parquet") for info in written):  # Ray writes no file for zero rows
        fs.create_dir(path)
        pq.write_table(schema.empty_table(), f"{path}/empty.parquet", filesystem=fs)


def run(cfg: DermarayConfig) -> dict:
    c = cfg.ingest
    clear_summary(summary_uri(c.output, "ingest"), cfg.storage_options)
    for name in (LESIONS, QUARANTINE):
        remove_tree(join(c.output, name), cfg.storage_options)  # tasks add quarantine files: start from none
    reader = READERS[c.source]
    metadata = mark_duplicates(reader.load_metadata(c.input, cfg.storage_options), reader.id_column)
    rows_in = metadata.num_rows
    log.info("ingest: %d %s rows from %s", rows_in, c.source, c.input)
    init_ray(cfg.ray)
    # Metadata is small beside the images: it is put once; tasks slice it and fetch the bytes. Each
    # batch is read, decoded, checked and written once, as it streams: nothing is materialized.
    bounds = [{"start": i, "stop": min(i + c.batch_size, rows_in)} for i in range(0, rows_in, c.batch_size)]
    lesions = ray.data.from_items(bounds, override_num_blocks=max(len(bounds), 1)).map_batches(
        ingest_batch,
        fn_kwargs={"metadata": ray.put(metadata), "cfg": c, "storage_options": cfg.storage_options},
        batch_size=1,
        batch_format="numpy",
    )
    # Ray Data reserves part of the cluster for each operator; on a small cluster that held the
    # decoding to one task at a time while the writer's share idled (40k rows on 2 CPUs: 10 s
    # with it, 6 s without). Object-store backpressure still bounds what waits for the writer.
    lesions.context.op_resource_reservation_enabled = False
    fs, path = arrow_filesystem(join(c.output, LESIONS), cfg.storage_options)
    # Not fused with the map: a fused task would take rows_per_file rows of input, so a small
    # ingest would run as one task on one core. Encoding Parquet needs less CPU than decoding
    # JPEGs, and a different CPU request is what keeps the two operators apart.
    lesions.write_parquet(
        path, filesystem=fs, mode="overwrite", min_rows_per_file=c.rows_per_file, ray_remote_args={"num_cpus": 0.5}
    )
    _ensure_table(join(c.output, LESIONS), cfg.storage_options, LESION_SCHEMA)
    _ensure_table(join(c.output, QUARANTINE), cfg.storage_options, QUARANTINE_SCHEMA)

    # Reconcile against what is on storage (Parquet footers), not against the plan.
    rows_out = parquet_row_count(join(c.output, LESIONS), cfg.storage_options)
    written_quarantine = read_parquet(join(c.output, QUARANTINE), cfg.storage_options, columns=["reason"])
    reasons = Counter(written_quarantine.column("reason").to_pylist())
    rows_quarantined = written_quarantine.num_rows
    labels = read_parquet(
        join(c.output, LESIONS), cfg.storage_options, columns=["diagnosis", "diagnosis_superclass", "malignant"]
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
