"""The end-to-end job: synthetic lesions -> canonical table -> audited notes -> ... -> report.

    python -m jobs.pipeline --config configs/local.yaml

Each stage writes under `pipeline.workdir` (local or s3://) and the next reads it from
there, exactly as when the stages run alone.
"""

from __future__ import annotations

import sys

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.storage import join
from jobs import ingest, notes, synth
from jobs.common import init_ray, log, write_summary


def domains(cfg: DermarayConfig) -> dict[str, int]:
    """Domain -> lesions to synthesize: the main set, plus a shifted set for robustness checks."""
    shifted = {"shifted": cfg.pipeline.shifted_lesions} if cfg.pipeline.shifted_lesions else {}
    return {"clinic": cfg.synth.n_lesions, **shifted}


def run(cfg: DermarayConfig) -> dict:
    init_ray(cfg.ray)
    root, results = cfg.pipeline.workdir, {}
    for domain, n in domains(cfg).items():
        synthetic, canonical = join(root, "synthetic", domain), join(root, "ingest", domain)
        if "synth" in cfg.pipeline.stages:
            stage = cfg.model_copy(update={"synth": cfg.synth.model_copy(update={"output": synthetic, "domain": domain, "n_lesions": n})})
            manifest = synth.run(stage)
            results[f"synth/{domain}"] = {"lesions": manifest["n_lesions"], "planted_defects": len(manifest["planted"])}
        if "ingest" in cfg.pipeline.stages:
            stage = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"source": "isic2024", "input": synthetic, "output": canonical})})
            results[f"ingest/{domain}"] = ingest.run(stage)
        if "notes" in cfg.pipeline.stages:
            written = join(root, "notes", domain)
            stage = cfg.model_copy(update={"notes": cfg.notes.model_copy(update={"input": join(canonical, "lesions"), "output": written})})
            results[f"notes/{domain}"] = notes.run(stage)
    write_summary(join(root, "pipeline_summary.json"), results, cfg.storage_options)
    log.info("pipeline: done, outputs under %s", root)
    return results


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.pipeline"))
