"""Notes job throughput as ratios to (a) bare in-process `LLM.generate` and (b) Hugging Face
`generate` one prompt at a time, on the same model, dtype and prompts, measured in one run.

    .venv/bin/python benchmarks/notes_throughput.py --lesions 500 --max-tokens 64                # SmolLM2-135M
    .venv/bin/python benchmarks/notes_throughput.py --model tiny --lesions 2000 --max-tokens 64  # the random tiny Llama

Every path writes exactly --max-tokens tokens per prompt (EOS ignored), so prompts/s
compare like for like. The job is timed end to end (engine actor start, reading the
lesions, writing and re-reading the notes Parquet, the audit); the bare engine only for
its generate call. Hugging Face is timed on --hf-prompts prompts and scaled. The job runs
twice: with one engine actor, against the one bare engine (what the job costs over it), and
with --engines actors (default: one per CPU of the Ray cluster; a CPU engine uses one core), against
Hugging Face using every core. Goals: job / bare >= 0.9, job / HF >= 20.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ lives in the repository, not in site-packages

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", type=int, default=500)
    parser.add_argument("--model", default="smollm2-135m", help="note_writer preset")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=40)
    parser.add_argument("--engines", type=int, help="engine actors of the second job run (default: the Ray cluster's CPUs)")
    parser.add_argument("--workdir", default="/tmp/dermaray-notes-bench")
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dermaray.config import load_config
    from dermaray.layout import summary_uri
    from dermaray.models import resolve_model
    from dermaray.notes.engine import NoteWriter, engine_dtype, switches_of
    from dermaray.notes.prompts import build_messages
    from dermaray.storage import read_parquet
    from jobs import ingest, notes, synth
    from jobs.common import init_ray

    source, canonical, out = (f"{args.workdir}/{name}" for name in ("synthetic", "ingest", "notes"))
    cfg = load_config(
        "configs/local.yaml",
        [
            f"synth.n_lesions={args.lesions}", f"synth.output={source}", f"ingest.input={source}", f"ingest.output={canonical}",
            f"notes.input={canonical}/lesions", f"notes.output={out}", "notes.strategy=P2",
            f"notes.sampling.max_tokens={args.max_tokens}", "notes.sampling.ignore_eos=true",
            f"models.note_writer={args.model}", "notes.model_lesions=null",
        ],
    )  # fmt: skip
    init_ray(cfg.ray)
    cpus = ray.cluster_resources()["CPU"]
    engines = args.engines or int(cpus)
    if cpus < engines * cfg.notes.num_cpus:
        raise SystemExit(f"--engines {engines} needs {engines * cfg.notes.num_cpus} CPUs; the Ray cluster has fewer")
    if not os.path.exists(summary_uri(canonical, "ingest")):
        synth.run(cfg)
        ingest.run(cfg)
    model_path = resolve_model("note_writer", cfg.models.note_writer, cfg.models)
    rows = read_parquet(cfg.notes.input, columns=notes.input_columns(cfg.notes)).sort_by("lesion_id").to_pylist()

    # (b) Hugging Face generate, one prompt at a time, on the same chat-templated prompts, before any
    # engine starts: vLLM's CPU engine pins this process's threads to one core, Hugging Face uses them all.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    messages = [build_messages(row, cfg.notes.strategy, switches_of(cfg.notes)) for row in rows]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    dtype = engine_dtype(cfg.notes.dtype)
    hf_threads = torch.get_num_threads()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts[: args.hf_prompts]:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            model.generate(**ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False)
    hf_rate = args.hf_prompts / (time.perf_counter() - start)
    del model

    def job(engines: int) -> tuple[dict, float]:
        """The job (engine actors in Ray Data, sharded Parquet output, audit): its summary and seconds."""
        shutil.rmtree(out, ignore_errors=True)
        cfg.notes.concurrency = engines
        cfg.notes.shard_size = -(-len(rows) // engines)  # a shard per engine: each writes as many notes
        start = time.perf_counter()
        summary = notes.run(cfg)
        assert summary["output_tokens"] == summary["lesions"] * args.max_tokens
        return summary, time.perf_counter() - start

    summary, job_seconds = job(1)
    job_rate = summary["lesions"] / job_seconds
    warm_rate = summary["lesions"] / (job_seconds - summary["engine_start_seconds"])
    shard_rate = summary["lesions"] / summary["shard_seconds"]  # one actor: its time inside shards
    wide, wide_seconds = job(engines)
    wide_rate = wide["lesions"] / wide_seconds

    # (a) bare vLLM in this process, last: its engine pins this process to one core, and a job run from
    # it afterwards took 105 s instead of 74 s here (244 notes, two engines).
    start = time.perf_counter()
    writer = NoteWriter(cfg.notes, model_path, "bench")
    engine_start = time.perf_counter() - start
    assert [writer.engine_input(row)[0] for row in rows] == prompts and writer.dtype == dtype
    start = time.perf_counter()
    outputs = writer.llm.generate(prompts, writer.params, use_tqdm=False)
    bare_rate = len(prompts) / (time.perf_counter() - start)
    assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outputs)
    del writer, outputs

    print(f"prompts: {len(prompts)}, {args.max_tokens} new tokens each, note_writer {args.model} in {dtype}, strategy P2")
    print(f"hugging face generate, one at a time: {hf_rate:8.2f} prompts/s ({args.hf_prompts} prompts, {hf_threads} threads)")
    print(f"bare LLM.generate in-process:         {bare_rate:8.2f} prompts/s")
    print(f"notes job (Ray Data + vLLM actor):    {job_rate:8.2f} prompts/s end to end, {job_seconds:.1f} s")
    print(
        f"  of which engine start in the actor: {summary['engine_start_seconds']:.1f} s (paid once per actor; "
        f"{engine_start:.1f} s in this process)"
    )
    print(
        f"  of which inside the shards (prompts, generate, audit, Parquet file): {summary['shard_seconds']:.1f} s; "
        f"the rest is Ray Data, the actor's process and the driver"
    )
    print(
        f"ratio job / bare vLLM = {job_rate / bare_rate:.2f} end to end, "
        f"{warm_rate / bare_rate:.2f} without the engine start, {shard_rate / bare_rate:.2f} inside the shards  (goal >= 0.9)"
    )
    print(f"notes job, {engines} engine actors:      {wide_rate:8.2f} prompts/s end to end, {wide_seconds:.1f} s")
    print(
        f"ratio job / HF one-at-a-time = {job_rate / hf_rate:.1f} with one engine, "
        f"{wide_rate / hf_rate:.1f} with {engines}  (goal >= 20)"
    )


if __name__ == "__main__":
    main()
