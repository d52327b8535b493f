"""The end-to-end job: synthetic lesions -> canonical table -> audited notes -> grounding -> ... -> report.

    python -m jobs.pipeline --config configs/local.yaml

Each stage writes under `pipeline.workdir` (local or s3://) and the next reads it from
there, exactly as when the stages run alone:

    synthetic/<domain>, ingest/<domain>   lesions in the ISIC 2024 layout, canonical table + quarantine
    notes/<domain>                        notes as configured (notes.strategy; LF locally: label-free)
    grounding/                            Ray Train runs and the grounded model
    embeddings/{frozen,grounded}/<domain> per-lesion embeddings and vector indexes
    reports/grounding                     frozen vs grounded tables
    notes_blind/<domain>, classifier/     label-free template notes (when notes/ states the label) and
                                          the image + note classifier
    diffusion/                            pre-trained tiny base, LoRA runs and the adapter
    reports/diffusion                     base vs LoRA: class relevance, KID, size faithfulness, grids
    reports/report.html                   the HTML report of all of the above (jobs.report)
"""

from __future__ import annotations

import sys
import time

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.grounding.embed import FROZEN
from dermaray.notes.engine import switches_of
from dermaray.notes.prompts import prompt_id, states_label
from dermaray.storage import absolute, join
from jobs import classifier, diffusion, diffusion_eval, embeddings, grounding, grounding_eval, ingest, notes, report, synth
from jobs.common import init_ray, log, write_summary


def domains(cfg: DermarayConfig) -> dict[str, int]:
    """Domain -> lesions to synthesize: the main set, plus a shifted set for robustness checks."""
    shifted = {"shifted": cfg.pipeline.shifted_lesions} if cfg.pipeline.shifted_lesions else {}
    return {"clinic": cfg.synth.n_lesions, **shifted}


def _with(cfg: DermarayConfig, section: str, **values) -> DermarayConfig:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def run(cfg: DermarayConfig) -> dict:
    started = time.perf_counter()
    init_ray(cfg.ray)
    seconds, mark = {"ray start": round(time.perf_counter() - started, 2)}, [time.perf_counter()]

    def lap(stage: str) -> None:  # wall seconds per stage, in the summary for the report
        now = time.perf_counter()
        seconds[stage] = round(seconds.get(stage, 0.0) + now - mark[0], 2)
        mark[0] = now

    # Absolute: Ray workers of a cluster started elsewhere do not share the driver's directory.
    root, stages, results = absolute(cfg.pipeline.workdir), cfg.pipeline.stages, {}
    lesions = {d: join(root, "ingest", d, "lesions") for d in domains(cfg)}
    for domain, n in domains(cfg).items():
        synthetic, canonical = join(root, "synthetic", domain), join(root, "ingest", domain)
        if "synth" in stages:
            manifest = synth.run(_with(cfg, "synth", output=synthetic, domain=domain, n_lesions=n))
            results[f"synth/{domain}"] = {"lesions": manifest["n_lesions"], "planted_defects": len(manifest["planted"])}
            lap(f"synth/{domain}")
        if "ingest" in stages:
            results[f"ingest/{domain}"] = ingest.run(_with(cfg, "ingest", source="isic2024", input=synthetic, output=canonical))
            lap(f"ingest/{domain}")
        if "notes" in stages:
            model_lesions = cfg.notes.model_lesions
            if domain == "shifted" and cfg.pipeline.shifted_model_lesions is not None:
                model_lesions = cfg.pipeline.shifted_model_lesions
            results[f"notes/{domain}"] = notes.run(_with(cfg, "notes", input=lesions[domain], output=join(root, "notes", domain),
                                                         model_lesions=model_lesions))
            lap(f"notes/{domain}")

    grounded_model = join(root, "grounding", "model")
    if "grounding" in stages:
        summary = grounding.run(_with(cfg, "grounding", input=lesions["clinic"], output=join(root, "grounding")))
        results["grounding"] = {k: v for k, v in summary.items() if k != "history"}
        lap("grounding")
    if "embeddings" in stages:
        for name, model in (("frozen", FROZEN), ("grounded", grounded_model)):
            for domain in domains(cfg):
                results[f"embeddings/{name}/{domain}"] = embeddings.run(
                    _with(cfg, "embeddings", input=lesions[domain], output=join(root, "embeddings", name, domain), model=model))
        lap("embeddings")
    if "grounding_eval" in stages:
        grounding_eval.run(_with(cfg, "grounding_eval", frozen=join(root, "embeddings", "frozen"), domains=list(domains(cfg)),
                                 grounded=join(root, "embeddings", "grounded"), output=join(root, "reports", "grounding")))
        results["grounding_eval"] = join(root, "reports", "grounding", "grounding_eval.md")
        lap("grounding_eval")
    if "classifier" in stages:
        # The classifier must not read the answer: it takes the notes above when their prompt had no
        # label (LF), else label-free template notes written for it.
        blind = {d: join(root, "notes", d) for d in domains(cfg)}
        if states_label(prompt_id(cfg.notes.strategy, switches_of(cfg.notes))):
            blind = {d: join(root, "notes_blind", d) for d in domains(cfg)}
            for domain in domains(cfg):
                notes.run(_with(cfg, "notes", input=lesions[domain], output=blind[domain], strategy="M", label_hierarchy=False))
        summary = classifier.run(_with(
            cfg, "classifier", input=lesions["clinic"], notes=blind["clinic"], output=join(root, "classifier"),
            shifted_input=lesions.get("shifted"), shifted_notes=blind.get("shifted"),
            init_from=grounded_model if "grounding" in stages else cfg.classifier.init_from,
        ))
        results["classifier"] = {k: v for k, v in summary.items() if k != "history"}
        lap("classifier")
    if "diffusion" in stages:
        summary = diffusion.run(_with(cfg, "diffusion", input=lesions["clinic"], output=join(root, "diffusion")))
        results["diffusion"] = {k: v for k, v in summary.items() if k != "history"}
        lap("diffusion")
    if "diffusion_eval" in stages:
        evaluated = diffusion_eval.run(_with(
            _with(cfg, "diffusion", output=join(root, "diffusion")), "diffusion_eval",
            classifier=join(root, "classifier", "model"), real=lesions["clinic"], output=join(root, "reports", "diffusion")))
        results["diffusion_eval"] = {name: evaluated[name]["class_relevance"]["relevance"] for name in ("base", "lora")}
        lap("diffusion_eval")
    results["stage_seconds"] = seconds
    write_summary(join(root, "pipeline_summary.json"), results, cfg.storage_options)
    if "report" in stages:  # last: it reads the summary above and every stage's outputs
        results["report"] = report.run(_with(cfg, "report", workdir=root))["output"]
        lap("report")
        write_summary(join(root, "pipeline_summary.json"), results, cfg.storage_options)
    log.info("pipeline: done, outputs under %s", root)
    return results


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.pipeline"))
