"""The notes study on the real note writer: every prompt strategy on the same lesions, audited.

    .venv/bin/python benchmarks/notes_study.py --lesions 400 --workdir out

Per strategy (M, P1, P2, LF; P3 needs an image-capable model) the notes job writes notes for
the same --lesions synthetic lesions with `smollm2-135m`; the study reports the share of notes
with each audit flag (95% bootstrap intervals), note length and output tokens per second, plus
the audit's precision and recall against the hand-labelled notes of tests/data. Writes
<workdir>/reports/notes_study/notes_study.{json,md}; the HTML report (jobs.report) shows them.
--label-sample K also writes K notes per strategy, without their audit, for hand labelling.
A second run with the same --workdir keeps the notes (the notes job resumes) and audits them again
with the current rules; output tokens/s are then not measured.
About 15 minutes at 400 lesions on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ lives in the repository, not in site-packages

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRATEGIES = ("M", "P1", "P2", "LF")
SKIPPED = {"P3": "the prompt is the image alone; smollm2-135m reads text only (an image-capable note_writer on GPU)"}
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", type=int, default=400, help="lesions per strategy (the same ones for each)")
    parser.add_argument("--workdir", default="out")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--model", default="smollm2-135m", help="note_writer preset or folder")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--label-sample", type=int, default=0, help="notes per strategy to write out for hand labelling")
    parser.add_argument("--fixtures", default=str(FIXTURES), help="folder of the hand-labelled notes")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic lesions (another seed: other lesions)")
    args = parser.parse_args()

    from dermaray.config import load_config
    from dermaray.layout import Layout, summary_uri
    from dermaray.notes.audit import audit_note
    from dermaray.notes.study import AUDITED_COLUMNS, agreement_by_part, markdown, strategy_result
    from dermaray.storage import join, read_parquet, write_bytes
    from jobs import ingest, notes, synth
    from jobs.common import init_ray

    root = join(os.path.abspath(args.workdir), "notes_study")
    source, canonical = join(root, "synthetic"), join(root, "ingest")
    cfg = load_config(
        "configs/local.yaml",
        [
            f"models.note_writer={args.model}",
            "notes.model_lesions=null",
            f"notes.sampling.max_tokens={args.max_tokens}",
            f"synth.n_lesions={args.lesions}",
            f"synth.output={source}",
            f"synth.seed={args.seed}",
            f"ingest.input={source}",
            f"ingest.output={canonical}",
            f"notes.input={canonical}/lesions",
            f"notes.limit={args.lesions}",
        ],
    )
    init_ray(cfg.ray)
    if not Path(summary_uri(canonical, "ingest")).exists():
        synth.run(cfg)
        ingest.run(cfg)
    lesions = {r["lesion_id"]: r for r in read_parquet(cfg.notes.input, columns=list(AUDITED_COLUMNS)).to_pylist()}

    results, sample, dtypes = {}, [], set()
    for strategy in args.strategies.split(","):
        run_cfg = cfg.model_copy(
            update={"notes": cfg.notes.model_copy(update={"strategy": strategy, "output": join(root, "notes", strategy)})}
        )
        start = time.perf_counter()
        summary = notes.run(run_cfg)
        seconds = summary["seconds_this_run"] - summary["engine_start_seconds"] if summary["shards_written_now"] else None
        rows = read_parquet(run_cfg.notes.output).to_pylist()
        for r in rows:  # notes kept from an earlier run are judged by today's rules
            if r["error"] is None:
                r["audit_flags"] = audit_note(r["note"], lesions[r["lesion_id"]]).flag_strings()
        results[strategy] = strategy_result(rows, seconds if strategy != "M" else None)
        dtypes.add(summary["dtype"])
        print(f"{strategy}: {len(rows)} notes in {time.perf_counter() - start:.0f} s")
        ok = [r for r in rows if r["error"] is None]
        for r in random.Random(strategy).sample(ok, min(args.label_sample, len(ok))):
            sample.append(
                {
                    "id": f"{strategy}-{r['lesion_id']}",
                    "strategy": strategy,
                    "prompt_id": r["prompt_id"],
                    "row": lesions[r["lesion_id"]],
                    "note": r["note"],
                }
            )

    out = {
        "model": args.model,
        "lesions": args.lesions,
        "max_tokens": args.max_tokens,
        "dtype": ",".join(sorted(d for d in dtypes if d)) or None,
        "strategies": results,
        "skipped": SKIPPED,
    }
    out["audit_agreement"] = agreement_by_part(args.fixtures)
    reports = Layout(os.path.abspath(args.workdir)).notes_study
    write_bytes(join(reports, "notes_study.json"), json.dumps(out, indent=2, default=float).encode())
    text = markdown(out)
    write_bytes(join(reports, "notes_study.md"), text.encode())
    if sample:
        write_bytes(join(root, "label_sample.jsonl"), "".join(json.dumps(s, default=str) + "\n" for s in sample).encode())
        print(f"{len(sample)} notes for hand labelling: {join(root, 'label_sample.jsonl')}")
    print(text)


if __name__ == "__main__":
    main()
