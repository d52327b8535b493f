"""Bulk clinical-note synthesis: vLLM engine actors inside Ray Data, resumable, exactly once.

    python -m jobs.notes notes.input=s3://bucket/ingest/lesions notes.output=s3://bucket/notes notes.strategy=P2

Lesions are sorted by id and cut into shards of `notes.shard_size`; an engine actor writes
each shard's notes as one Parquet file, atomically. With `notes.model_lesions` the model
writes the notes of that many lesions (the test split first) and the rest get the template
note; every row records which (`model_id`, `prompt_id`). A shard whose file exists is done, so
a re-run after a killed driver or engine actor writes only the missing shards: every
lesion ends up in exactly one note row. `_plan.json` pins the input ids and settings, and
a re-run with other ones is refused instead of mixing two runs in one output.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, ModelsConfig, NotesConfig
from dermaray.layout import summary_uri
from dermaray.models.registry import get_preset, is_preset, resolve_model
from dermaray.notes.engine import TEMPLATE_MODEL_ID, NoteWriter, switches_of
from dermaray.notes.prompts import prompt_id
from dermaray.notes.study import flag_codes_of
from dermaray.schema import LESION_SCHEMA, NOTES_SCHEMA
from dermaray.storage import filesystem, join, read_bytes, read_parquet, write_bytes, write_parquet_atomic
from jobs.common import clear_summary, init_ray, log, write_summary

SHARD = "_shard"
BY_MODEL = "_by_model"


def shard_uri(output: str, shard: int) -> str:
    return join(output, f"notes-{shard:06d}.parquet")


class ShardWriter:
    """A Ray Data actor: one engine, many shards; each shard's file written whole."""

    def __init__(self, cfg: NotesConfig, models: ModelsConfig, storage_options: dict, with_model: bool = True):
        setup_logging()  # a worker process: its log lines reach the driver and the Ray dashboard
        start = time.perf_counter()
        # Resolved here, on the engine's node: fetched into (or built in) that node's cache once.
        with_model = with_model and cfg.strategy != "M"
        model_path = resolve_model("note_writer", models.note_writer, models) if with_model else None
        self.writer = NoteWriter(cfg, model_path, model_id_of(models.note_writer), with_model=with_model)
        self.output, self.storage_options = cfg.output, storage_options
        self.engine_start_s = time.perf_counter() - start
        log.info("notes: engine %s (%s) ready in %.1f s", self.writer.model_id, self.writer.dtype, self.engine_start_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        for shard in sorted(set(batch.column(SHARD).to_pylist())):
            start = time.perf_counter()
            part = batch.filter(pc.equal(batch.column(SHARD), shard))
            by_model = part.column(BY_MODEL).to_pylist()
            notes = [{**n, "shard": shard} for n in self.writer.write(part.drop_columns([SHARD, BY_MODEL]).to_pylist(), by_model)]
            write_parquet_atomic(
                pa.Table.from_pylist(notes, schema=NOTES_SCHEMA), shard_uri(self.output, shard), self.storage_options
            )
            seconds = time.perf_counter() - start
            log.info("notes: shard %d, %d notes in %.1f s", shard, len(notes), seconds)
            errors = sum(n["error"] is not None for n in notes)
            done.append(
                {
                    "shard": shard,
                    "notes": len(notes),
                    "errors": errors,
                    "engine_start_s": self.engine_start_s,
                    "shard_s": seconds,
                    "dtype": self.writer.dtype,
                }
            )
        return pa.Table.from_pylist(done)


def model_id_of(name: str) -> str:
    """The hub id of a hub preset (`@revision` when pinned), the source of a packaged one, else a name for the
    preset or folder."""
    preset = get_preset("note_writer", name) if is_preset("note_writer", name) else None
    if preset and preset.hub_id:
        return preset.hub_id + (f"@{preset.revision}" if preset.revision else "")
    return (preset and preset.source) or f"dermaray/note_writer-{name}"


def chosen_for_model(lesions: pa.Table, model_lesions: int | None) -> set[str]:
    """The lesions whose notes the model writes: all, or `model_lesions` of them, the test split first, then by id."""
    ids = lesions.column("lesion_id").to_pylist()
    if model_lesions is None:
        return set(ids)
    order = sorted(zip((split != "test" for split in lesions.column("split").to_pylist()), ids, strict=True))
    return {lesion_id for _, lesion_id in order[:model_lesions]}


def input_columns(cfg: NotesConfig) -> list[str]:
    # Image bytes travel only when the prompt shows the image.
    return [name for name in LESION_SCHEMA.names if name != "image_bytes" or cfg.with_image]


def make_plan(cfg: NotesConfig, preset: str, lesion_ids: list[str]) -> dict:
    return {
        "input": cfg.input,
        "lesions": len(lesion_ids),
        "lesion_ids_sha1": hashlib.sha1("\n".join(lesion_ids).encode()).hexdigest(),
        "shard_size": cfg.shard_size,
        "prompt_id": prompt_id(cfg.strategy, switches_of(cfg)),
        "model_id": model_id_of(preset) if cfg.strategy != "M" else TEMPLATE_MODEL_ID,
        "sampling": cfg.sampling.model_dump(mode="json"),
        "with_image": cfg.with_image,
        "model_lesions": cfg.model_lesions,
    }


def claim_output(cfg: NotesConfig, plan: dict, storage_options: dict) -> None:
    """Record the plan, or check that the output already holds this same plan."""
    plan_uri = join(cfg.output, "_plan.json")
    fs, path = filesystem(plan_uri, storage_options)
    if fs.exists(path):
        existing = json.loads(read_bytes(plan_uri, storage_options))
        if existing != plan:
            changed = sorted(k for k in plan if existing.get(k) != plan[k])
            raise ValueError(
                f"{cfg.output} holds notes of another plan (differs in {changed}); use a new notes.output or delete it"
            )
    else:
        write_bytes(plan_uri, json.dumps(plan, indent=2).encode(), storage_options)


def finished_shards(output: str, storage_options: dict) -> set[int]:
    fs, path = filesystem(output, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return {int(n[len("notes-") : -len(".parquet")]) for n in names if n.startswith("notes-") and n.endswith(".parquet")}


def run(cfg: DermarayConfig) -> dict:
    n, options = cfg.notes, cfg.storage_options
    clear_summary(summary_uri(n.output, "notes"), options)
    if n.strategy == "P3" and not n.with_image:
        raise ValueError(
            "strategy P3 gives the model no metadata: it needs notes.with_image=true and an image-capable note_writer"
        )
    lesions = read_parquet(n.input, options, columns=input_columns(n)).sort_by("lesion_id")
    if n.limit:
        lesions = lesions.slice(0, n.limit)
    ids = lesions.column("lesion_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{n.input} has duplicate lesion ids; ingest it first")
    claim_output(n, make_plan(n, cfg.models.note_writer, ids), options)
    by_model = chosen_for_model(lesions, None if n.strategy == "M" else n.model_lesions)
    n_shards = -(-len(ids) // n.shard_size)
    done = finished_shards(n.output, options)
    pending = [s for s in range(n_shards) if s not in done]
    log.info(
        "notes: %d lesions in %d shards, %d already done, %d to write (%s)",
        len(ids),
        n_shards,
        len(done),
        len(pending),
        n.strategy,
    )

    start, engine_start_s, shard_s, dtypes = time.perf_counter(), 0.0, 0.0, set()
    if pending:
        init_ray(cfg.ray)
        blocks = []
        for s in pending:
            part = lesions.slice(s * n.shard_size, n.shard_size)
            part = part.append_column(SHARD, pa.array([s] * part.num_rows, pa.int32()))
            blocks.append(part.append_column(BY_MODEL, pa.array([i in by_model for i in part.column("lesion_id").to_pylist()])))
        results = ray.data.from_arrow(blocks).map_batches(
            ShardWriter,
            fn_constructor_args=(n, cfg.models, options, bool(by_model)),  # no lesion for the model: no engine
            batch_size=None,
            batch_format="pyarrow",
            # One shard at a time per actor: an actor whose engine is up first would otherwise queue every
            # shard while the others still start (two engines wrote no faster than one).
            compute=ray.data.ActorPoolStrategy(size=n.concurrency, max_tasks_in_flight_per_actor=1),
            num_cpus=n.num_cpus,
            num_gpus=n.num_gpus,
            runtime_env={"env_vars": n.engine_env},  # before the actor's process imports torch and vLLM
            **({"resources": n.resources} if n.resources else {}),  # resources=None is an error in Ray
        )
        for row in results.iter_rows():
            log.info("notes: shard %d written (%d notes, %d errors)", row["shard"], row["notes"], row["errors"])
            engine_start_s = max(engine_start_s, row["engine_start_s"])
            shard_s += row["shard_s"]
            dtypes.add(row["dtype"])
    elapsed = time.perf_counter() - start

    notes = read_parquet(
        n.output,
        options,
        columns=["lesion_id", "model_id", "error", "finish_reason", "hallucinated", "audit_flags", "output_tokens"],
    )
    written = notes.column("lesion_id").to_pylist()
    if sorted(written) != ids:
        raise RuntimeError(f"notes output does not hold each lesion exactly once ({len(written)} rows for {len(ids)} lesions)")
    frame = notes.to_pandas()
    audited = frame[frame.error.isna()]
    model_notes = audited[audited.model_id != TEMPLATE_MODEL_ID]
    # Per flag code, the notes with at least one flag of it (as dermaray.notes.audit.flag_counts counts).
    codes = audited.audit_flags.map(lambda flags: sorted(flag_codes_of(flags)))
    flags = codes.explode().dropna().value_counts()
    summary = {
        "input": n.input,
        "output": n.output,
        "strategy": n.strategy,
        "prompt_id": prompt_id(n.strategy, switches_of(n)),
        "lesions": len(ids),
        "notes": len(audited),
        "notes_by_model": len(model_notes),
        "notes_by_template": len(audited) - len(model_notes),
        "errors": int(frame.error.notna().sum()),
        "error_kinds": {k: int(v) for k, v in frame.error.dropna().str.split(":").str[0].value_counts().items()},
        "cut_at_max_tokens": int((audited.finish_reason == "length").sum()),
        "shards_written_now": len(pending),
        "hallucination_rate": float(audited.hallucinated.mean()) if len(audited) else None,
        "hallucination_rate_model_notes": float(model_notes.hallucinated.mean()) if len(model_notes) else None,
        "audit_flag_counts": {k: int(v) for k, v in flags.items()},  # notes with the flag
        "output_tokens": int(frame.output_tokens.fillna(0).sum()),
        "dtype": ",".join(sorted(d for d in dtypes if d)) or None,  # the engine's, this run (None: no engine ran)
        "seconds_this_run": round(elapsed, 2),
        "engine_start_seconds": round(engine_start_s, 2),  # the slowest actor's model load, within the above
        "shard_seconds": round(shard_s, 2),  # writing the shards (notes, audit, file) summed over actors, within the above
    }
    write_summary(summary_uri(n.output, "notes"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.notes"))
