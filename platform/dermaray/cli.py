"""`dermaray <stage> [--config FILE] [key=value ...]`: run a job from `jobs/` locally.

The same modules run under `ray job submit -- python -m jobs.<stage> ...` on a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dermaray.config import DermarayConfig, dump_config, load_config

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


def config_from_argv(argv: list[str], prog: str = "dermaray") -> DermarayConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Run with a YAML config and key=value overrides.")
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. synth.n_lesions=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as exc:  # pydantic / YAML / key errors: one clear line, no traceback
        parser.error(str(exc))
    if args.print_config:
        print(dump_config(cfg))
        sys.exit(0)
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "models":  # model cache and store, not a stage
        from dermaray.models.cli import main as models_main

        return models_main(argv[1:])
    if argv and argv[0] == "check-cluster":  # the config against cluster.yaml, before anything is submitted
        from dermaray.cluster_check import main as check_main

        sys.exit(check_main(argv[1:]))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: dermaray <stage> [--config FILE] [key=value ...]\n       dermaray models list | pull ROLE/NAME | push ROLE/NAME\n"
              "       dermaray check-cluster --config configs/cluster.yaml --cluster cluster.yaml [--serve serve/config.yaml]\n\nstages:")
        for name, text in STAGES.items():
            print(f"  {name:15s} {text}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    setup_logging()
    job = importlib.import_module(f"jobs.{argv[0]}")
    job.run(config_from_argv(argv[1:], prog=f"dermaray {argv[0]}"))
if __name__ == "__main__":
    main()
