"""`python -m jobs <stage> [--config FILE] [key=value ...]`: run a stage from the repository root.

The same as `python -m jobs.<stage> ...`, which is what `ray job submit` runs on a cluster. The
library's own commands (model cache and store, the cluster check) are `dermaray models ...` and
`dermaray check-cluster ...`: they need no Ray and no repository.
"""

from __future__ import annotations

import importlib
import sys

from dermaray.cli import config_from_argv, setup_logging

STAGES = {
    "synth": "render synthetic SLICE-3D-like lesions in the ISIC 2024 layout",
    "ingest": "read a source into canonical Parquet shards plus a quarantine table",
    "notes": "write and audit a clinical note per lesion with vLLM (resumable)",
    "grounding": "ground the MLLM image embedding in lesion attributes with Ray Train (resumable)",
    "embeddings": "embed every lesion (grounded or frozen) and build a vector index",
    "grounding_eval": "frozen vs grounded: attribute prediction and retrieval tables",
    "classifier": "train and evaluate the image + note classifier with Ray Train",
    "diffusion": "train a diagnosis-conditioned LoRA adapter on Stable Diffusion with Ray Train (resumable)",
    "diffusion_eval": "base vs LoRA generation: class relevance, KID, size faithfulness, sample grids",
    "report": "one self-contained HTML report of a pipeline workdir (tables, curves, galleries, grids)",
    "pipeline": "run every stage end to end",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"python -m jobs: unknown stage {argv[0]!r}", file=sys.stderr)
        print("usage: python -m jobs <stage> [--config FILE] [key=value ...]\n\nstages:")
        for name, text in STAGES.items():
            print(f"  {name:15s} {text}")
        print("\nmodel cache and store, cluster check: dermaray models ..., dermaray check-cluster ...")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    setup_logging()
    job = importlib.import_module(f"jobs.{argv[0]}")
    job.run(config_from_argv(argv[1:], prog=f"python -m jobs {argv[0]}"))


if __name__ == "__main__":
    main()
