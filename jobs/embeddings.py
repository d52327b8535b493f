"""Embed every lesion with a grounded (or frozen) model; write Parquet and a vector index.

    python -m jobs.embeddings --config configs/local.yaml embeddings.model=s3://bucket/grounding/model

Writes `<output>/embeddings` (lesion id, split, domain, diagnosis, true attributes, unit-norm
embedding, predicted attributes, thumbnail), `<output>/index` (dermaray.retrieval.VectorIndex)
and `<output>/thumbnails` (dermaray.serving.thumbnails, in the index's row order).
"""

from __future__ import annotations

import sys
import time

import ray

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.grounding.embed import CARRIED, THUMBNAIL, LesionEmbedder, model_identity
from dermaray.layout import embeddings_index, embeddings_table, embeddings_thumbnails, summary_uri
from dermaray.retrieval import VectorIndex
from dermaray.serving.thumbnails import with_thumbnails, write_thumbnails
from dermaray.storage import arrow_filesystem, iter_parquet, parquet_row_count, remove_tree, require
from jobs.common import clear_summary, init_ray, log, write_summary

OUTPUT_BLOCK_BYTES = 16 * 2**20


def run(cfg: DermarayConfig) -> dict:
    e, options = cfg.embeddings, cfg.storage_options
    require(e.input, options)
    init_ray(cfg.ray)
    started = time.perf_counter()
    identity = model_identity(e.model, cfg.models.grounding_mllm, options)
    # Gone before anything is written: a run that fails leaves no index (nor summary) of an earlier model
    # beside new vectors. The summary, written last, says the output is complete.
    clear_summary(summary_uri(e.output, "embeddings"), options)
    remove_tree(embeddings_index(e.output), options)
    remove_tree(embeddings_thumbnails(e.output), options)
    fs, root = arrow_filesystem(e.input, options)
    columns = list(dict.fromkeys([*CARRIED, "image_bytes"]))
    lesions = ray.data.read_parquet(root, filesystem=fs, columns=columns)
    # An output block is sent on when it reaches this size: at Ray Data's default (128 MiB) the embedding actor
    # held the rows of a whole 40k-lesion run before sending any (its memory grew with the data).
    lesions.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    read = lesions
    if e.thumbnail_px:  # made before the embedder (Ray Data fuses the two), carried through it into the table
        fn_kwargs = {"size": e.thumbnail_px, "column": THUMBNAIL}
        read = lesions.map_batches(with_thumbnails, fn_kwargs=fn_kwargs, batch_format="pyarrow")
    embedded = read.map_batches(
        LesionEmbedder,
        fn_constructor_args=(e.model, cfg.models.grounding_mllm, cfg.models, options),
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=e.concurrency),
        num_cpus=e.num_cpus,
        num_gpus=e.num_gpus,
        **({"resources": e.resources} if e.resources else {}),  # resources=None is an error in Ray
    )
    target = embeddings_table(e.output)
    remove_tree(target, options)  # rewritten whole: a re-run never mixes two models' vectors
    out_fs, out_path = arrow_filesystem(target, options)
    embedded.write_parquet(out_path, filesystem=out_fs)
    rows_out = parquet_row_count(target, options)
    rows_in = lesions.count()
    if rows_out != rows_in:
        raise RuntimeError(f"embeddings: {rows_in} lesions in, {rows_out} embeddings out")
    first = next(iter_parquet(target, options, ["embedding"], batch_rows=1), None) if rows_out else None
    summary = {
        "input": e.input,
        "model": e.model,
        "model_weights": identity["weights"],
        "embeddings": target,
        "lesions": rows_in,
        "dim": len(first.column("embedding")[0]) if first is not None else 0,
    }
    if e.index is not None and rows_out:
        # Streamed from the table just written: the driver holds the index and one chunk, never all vectors.
        index = VectorIndex.build_from_parquet(
            target,
            options,
            kind=e.index.kind,
            nlist=e.index.nlist,
            nprobe=e.index.nprobe,
            model=identity["model"],  # what a replica checks: the grounded model's URI, or "<base>:frozen"
            model_weights=identity["weights"],
        )
        index.save(embeddings_index(e.output), options)
        summary["index"] = {"uri": embeddings_index(e.output), "kind": e.index.kind, "count": len(index)}
    if e.thumbnail_px and rows_out:
        # In the table's order, which is the index's: a replica finds a hit's thumbnail by its row.
        chunks = (
            (batch.column("lesion_id").to_pylist(), batch.column(THUMBNAIL).to_pylist())
            for batch in iter_parquet(target, options, ["lesion_id", THUMBNAIL], batch_rows=4096)
        )
        uri = embeddings_thumbnails(e.output)
        summary["thumbnails"] = {"uri": uri, "count": write_thumbnails(uri, chunks, e.thumbnail_px, options)}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_summary(summary_uri(e.output, "embeddings"), summary, options)
    log.info("embeddings: %d lesions embedded with %s", rows_in, e.model)
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.embeddings"))
