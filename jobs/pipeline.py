"""The end-to-end job: synthetic lesions -> canonical table -> audited notes -> grounding -> ... -> report.

    python -m jobs.pipeline --config configs/local.yaml

Each stage writes under `pipeline.workdir` (local or s3://) where `dermaray.layout.Layout` puts it,
and the next reads it from there, exactly as when the stages run alone. Notes follow
`notes.strategy` (LF locally: label-free); the classifier reads them when their prompt had no
label, else label-free template notes written for it under notes_blind/.
"""

from __future__ import annotations

import sys
import time

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.grounding.embed import FROZEN
from dermaray.layout import MAIN_DOMAIN, SHIFTED_DOMAIN, Layout
from dermaray.notes.engine import switches_of
from dermaray.notes.prompts import prompt_id, states_label
from dermaray.storage import absolute, join
from jobs import classifier, diffusion, diffusion_eval, embeddings, grounding, grounding_eval, ingest, notes, report, synth
from jobs.common import init_ray, log, write_summary


def domains(cfg: DermarayConfig) -> dict[str, int]:
    """Domain -> lesions to synthesize: the main set, plus a shifted set for robustness checks."""
    shifted = {SHIFTED_DOMAIN: cfg.pipeline.shifted_lesions} if cfg.pipeline.shifted_lesions else {}
    return {MAIN_DOMAIN: cfg.synth.n_lesions, **shifted}


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
    at, stages, results = Layout(absolute(cfg.pipeline.workdir)), cfg.pipeline.stages, {}
    lesions = {d: at.lesions(d) for d in domains(cfg)}
    for domain, n in domains(cfg).items():
        synthetic, canonical = at.synthetic(domain), at.ingest(domain)
        if "synth" in stages:
            manifest = synth.run(_with(cfg, "synth", output=synthetic, domain=domain, n_lesions=n))
            results[f"synth/{domain}"] = {"lesions": manifest["n_lesions"], "planted_defects": len(manifest["planted"])}
            lap(f"synth/{domain}")
        if "ingest" in stages:
            results[f"ingest/{domain}"] = ingest.run(_with(cfg, "ingest", source="isic2024", input=synthetic, output=canonical))
            lap(f"ingest/{domain}")
        if "notes" in stages:
            model_lesions = cfg.notes.model_lesions
            if domain == SHIFTED_DOMAIN and cfg.pipeline.shifted_model_lesions is not None:
                model_lesions = cfg.pipeline.shifted_model_lesions
            results[f"notes/{domain}"] = notes.run(
                _with(cfg, "notes", input=lesions[domain], output=at.notes(domain), model_lesions=model_lesions)
            )
            lap(f"notes/{domain}")

    if "grounding" in stages:
        summary = grounding.run(_with(cfg, "grounding", input=lesions[MAIN_DOMAIN], output=at.grounding))
        results["grounding"] = {k: v for k, v in summary.items() if k != "history"}
        lap("grounding")
    if "embeddings" in stages:
        for name, model in (("frozen", FROZEN), ("grounded", at.grounding_model)):
            for domain in domains(cfg):
                results[f"embeddings/{name}/{domain}"] = embeddings.run(
                    _with(cfg, "embeddings", input=lesions[domain], output=at.embeddings(name, domain), model=model)
                )
        lap("embeddings")
    if "grounding_eval" in stages:
        grounding_eval.run(
            _with(
                cfg,
                "grounding_eval",
                frozen=at.embeddings("frozen"),
                domains=list(domains(cfg)),
                grounded=at.embeddings("grounded"),
                output=at.grounding_eval,
            )
        )
        results["grounding_eval"] = join(at.grounding_eval, "grounding_eval.md")
        lap("grounding_eval")
    if "classifier" in stages:
        # The classifier must not read the answer: it takes the notes above when their prompt had no
        # label (LF), else label-free template notes written for it.
        blind = {d: at.notes(d) for d in domains(cfg)}
        if states_label(prompt_id(cfg.notes.strategy, switches_of(cfg.notes))):
            blind = {d: at.notes_blind(d) for d in domains(cfg)}
            for domain in domains(cfg):
                notes.run(_with(cfg, "notes", input=lesions[domain], output=blind[domain], strategy="M", label_hierarchy=False))
        summary = classifier.run(
            _with(
                cfg,
                "classifier",
                input=lesions[MAIN_DOMAIN],
                notes=blind[MAIN_DOMAIN],
                output=at.classifier,
                shifted_input=lesions.get(SHIFTED_DOMAIN),
                shifted_notes=blind.get(SHIFTED_DOMAIN),
                init_from=at.grounding_model if "grounding" in stages else cfg.classifier.init_from,
            )
        )
        results["classifier"] = {k: v for k, v in summary.items() if k != "history"}
        lap("classifier")
    if "diffusion" in stages:
        summary = diffusion.run(_with(cfg, "diffusion", input=lesions[MAIN_DOMAIN], output=at.diffusion))
        results["diffusion"] = {k: v for k, v in summary.items() if k != "history"}
        lap("diffusion")
    if "diffusion_eval" in stages:
        evaluated = diffusion_eval.run(
            _with(
                _with(cfg, "diffusion", output=at.diffusion),
                "diffusion_eval",
                classifier=at.classifier_model,
                real=lesions[MAIN_DOMAIN],
                output=at.diffusion_eval,
            )
        )
        results["diffusion_eval"] = {name: evaluated[name]["class_relevance"]["relevance"] for name in ("base", "lora")}
        lap("diffusion_eval")
    results["stage_seconds"] = seconds
    write_summary(at.summary, results, cfg.storage_options)
    if "report" in stages:  # last: it reads the summary above and every stage's outputs
        results["report"] = report.run(_with(cfg, "report", workdir=at.root))["output"]
        lap("report")
        write_summary(at.summary, results, cfg.storage_options)
    log.info("pipeline: done, outputs under %s", at.root)
    return results


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.pipeline"))
