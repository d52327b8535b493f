"""The end-to-end job: synthetic lesions -> canonical table -> audited notes -> grounding -> ... -> report.

    python -m jobs.pipeline --config configs/local.yaml

Each stage writes under `pipeline.workdir` (local or s3://) where `dermaray.layout.Layout` puts it,
and the next reads it from there, exactly as when the stages run alone. Notes follow
`notes.strategy` (LF locally: label-free); the classifier reads them when their prompt had no
label, else label-free template notes written for it under notes_blind/.

Re-running resumes (`pipeline.resume`, dermaray.completion): a stage complete for the same settings
and inputs is skipped, one stopped mid-way continues (notes shard by shard, training from its last
checkpoint), and one whose settings changed runs anew with every stage that reads it. The summary's
`resumed` lists the stages skipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dermaray.cli import config_from_argv, setup_logging
from dermaray.completion import complete_fingerprint, fingerprint, read_record, settings_of, write_record
from dermaray.config import DermarayConfig, Stage
from dermaray.grounding.embed import FROZEN
from dermaray.layout import MAIN_DOMAIN, SHIFTED_DOMAIN, Layout
from dermaray.notes.engine import switches_of
from dermaray.notes.prompts import prompt_id, states_label
from dermaray.storage import absolute, join, remove_tree
from jobs import classifier, diffusion, diffusion_eval, embeddings, grounding, grounding_eval, ingest, notes, report, synth
from jobs.common import init_ray, log, write_summary


def domains(cfg: DermarayConfig) -> dict[str, int]:
    """Domain -> lesions to synthesize: the main set, plus a shifted set for robustness checks."""
    shifted = {SHIFTED_DOMAIN: cfg.pipeline.shifted_lesions} if cfg.pipeline.shifted_lesions else {}
    return {MAIN_DOMAIN: cfg.synth.n_lesions, **shifted}


def _with(cfg: DermarayConfig, section: str, **values) -> DermarayConfig:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


@dataclass(frozen=True)
class Step:
    """One unit of the pipeline that is skipped or run whole: a stage (of one domain), its output folders
    (its record in the first; all deleted when its settings changed), the steps it reads, and the work."""

    key: str  # "ingest/clinic", "grounding", ...; its wall seconds and results are filed under it
    stage: Stage  # selected by pipeline.stages
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    settings: dict[str, Any]
    work: Callable[[], dict[str, Any]]  # runs the stage; the entries it adds to the pipeline's results


def plan(cfg: DermarayConfig, at: Layout) -> list[Step]:
    """Every step of the pipeline in the order it runs them, whether selected or not."""
    steps, lesions, clinic = [], {d: at.lesions(d) for d in domains(cfg)}, MAIN_DOMAIN

    def step(key, stage, outputs, inputs, stage_cfg, sections, work):
        steps.append(Step(key, stage, tuple(outputs), tuple(inputs), settings_of(stage_cfg, sections), work))

    for domain, n in domains(cfg).items():
        synthetic, canonical = at.synthetic(domain), at.ingest(domain)
        c = _with(cfg, "synth", output=synthetic, domain=domain, n_lesions=n)

        def run_synth(c=c, domain=domain):
            manifest = synth.run(c)
            return {f"synth/{domain}": {"lesions": manifest["n_lesions"], "planted_defects": len(manifest["planted"])}}

        step(f"synth/{domain}", "synth", [synthetic], [], c, ("synth",), run_synth)
        c = _with(cfg, "ingest", source="isic2024", input=synthetic, output=canonical)
        step(
            f"ingest/{domain}",
            "ingest",
            [canonical],
            [f"synth/{domain}"],
            c,
            ("ingest",),
            lambda c=c, d=domain: {f"ingest/{d}": ingest.run(c)},
        )
        model_lesions = cfg.notes.model_lesions
        if domain == SHIFTED_DOMAIN and cfg.pipeline.shifted_model_lesions is not None:
            model_lesions = cfg.pipeline.shifted_model_lesions
        c = _with(cfg, "notes", input=lesions[domain], output=at.notes(domain), model_lesions=model_lesions)
        step(
            f"notes/{domain}",
            "notes",
            [at.notes(domain)],
            [f"ingest/{domain}"],
            c,
            ("notes",),
            lambda c=c, d=domain: {f"notes/{d}": notes.run(c)},
        )

    mixed = [SHIFTED_DOMAIN] if cfg.pipeline.mixed_clinics and SHIFTED_DOMAIN in lesions else []
    c = _with(cfg, "grounding", input=lesions[clinic], mixed_inputs=[lesions[d] for d in mixed], output=at.grounding)
    step(
        "grounding",
        "grounding",
        [at.grounding],
        [f"ingest/{d}" for d in (clinic, *mixed)],
        c,
        ("grounding",),
        lambda c=c: {"grounding": _without_history(grounding.run(c))},
    )

    def run_embeddings():
        # Thumbnails only for what Serve serves: the grounded model's gallery of the main clinic.
        return {
            f"embeddings/{name}/{domain}": embeddings.run(
                _with(
                    cfg,
                    "embeddings",
                    input=lesions[domain],
                    output=at.embeddings(name, domain),
                    model=model,
                    thumbnail_px=cfg.embeddings.thumbnail_px if (name, domain) == ("grounded", MAIN_DOMAIN) else None,
                )
            )
            for name, model in (("frozen", FROZEN), ("grounded", at.grounding_model))
            for domain in domains(cfg)
        }

    ingested = [f"ingest/{d}" for d in domains(cfg)]
    outputs = [at.embeddings("frozen"), at.embeddings("grounded")]
    step("embeddings", "embeddings", outputs, ["grounding", *ingested], cfg, ("embeddings",), run_embeddings)
    c = _with(
        cfg,
        "grounding_eval",
        frozen=at.embeddings("frozen"),
        domains=list(domains(cfg)),
        trained_on=mixed,
        grounded=at.embeddings("grounded"),
        output=at.grounding_eval,
    )

    def run_grounding_eval(c=c):
        grounding_eval.run(c)
        return {"grounding_eval": join(at.grounding_eval, "grounding_eval.md")}

    step("grounding_eval", "grounding_eval", [at.grounding_eval], ["embeddings"], c, ("grounding_eval",), run_grounding_eval)

    # The classifier must not read the answer: it takes the notes above when their prompt had no
    # label (LF), else label-free template notes written for it.
    blind = states_label(prompt_id(cfg.notes.strategy, switches_of(cfg.notes)))
    notes_for = {d: at.notes_blind(d) if blind else at.notes(d) for d in domains(cfg)}
    init_from = at.grounding_model if "grounding" in cfg.pipeline.stages else cfg.classifier.init_from
    c = _with(
        cfg,
        "classifier",
        input=lesions[clinic],
        notes=notes_for[clinic],
        output=at.classifier,
        shifted_input=lesions.get(SHIFTED_DOMAIN),
        shifted_notes=notes_for.get(SHIFTED_DOMAIN),
        init_from=init_from,
    )

    def run_classifier(c=c):
        if blind:
            for domain in domains(cfg):
                notes.run(
                    _with(cfg, "notes", input=lesions[domain], output=notes_for[domain], strategy="M", label_hierarchy=False)
                )
        return {"classifier": _without_history(classifier.run(c))}

    outputs = [at.classifier, *([at.notes_blind()] if blind else [])]
    reads = [
        *ingested,
        *([] if blind else [f"notes/{d}" for d in domains(cfg)]),
        *(["grounding"] if init_from == at.grounding_model else []),
    ]
    step("classifier", "classifier", outputs, reads, c, ("classifier", "notes"), run_classifier)
    c = _with(cfg, "diffusion", input=lesions[clinic], output=at.diffusion)
    step(
        "diffusion",
        "diffusion",
        [at.diffusion],
        [f"ingest/{clinic}"],
        c,
        ("diffusion",),
        lambda c=c: {"diffusion": _without_history(diffusion.run(c))},
    )
    c = _with(
        _with(cfg, "diffusion", output=at.diffusion),
        "diffusion_eval",
        classifier=at.classifier_model,
        real=lesions[clinic],
        output=at.diffusion_eval,
    )

    def run_diffusion_eval(c=c):
        evaluated = diffusion_eval.run(c)
        return {"diffusion_eval": {name: evaluated[name]["class_relevance"]["relevance"] for name in ("base", "lora")}}

    reads = ["diffusion", "classifier", f"ingest/{clinic}"]
    step("diffusion_eval", "diffusion_eval", [at.diffusion_eval], reads, c, ("diffusion_eval", "diffusion"), run_diffusion_eval)
    return steps


def _without_history(summary: dict) -> dict:
    """The summary without per-epoch histories (the stage's own summary file keeps them), each adapter's too."""
    kept = {k: v for k, v in summary.items() if k != "history"}
    if isinstance(kept.get("per_diagnosis"), dict):
        kept["per_diagnosis"] = {code: _without_history(s) for code, s in kept["per_diagnosis"].items()}
    return kept


def run(cfg: DermarayConfig) -> dict:
    started = time.perf_counter()
    init_ray(cfg.ray)
    seconds = {"ray start": round(time.perf_counter() - started, 2)}
    options, selected = cfg.storage_options, set(cfg.pipeline.stages)
    # Absolute: Ray workers of a cluster started elsewhere do not share the driver's directory.
    at, results, resumed, prints = Layout(absolute(cfg.pipeline.workdir)), {}, [], {}
    steps = plan(cfg, at)
    for s in steps:
        if s.stage not in selected:  # not run now: what a later step reads is what an earlier run left
            prints[s.key] = complete_fingerprint(read_record(s.outputs[0], options))
            continue
        prints[s.key] = fingerprint(s.key, s.settings, {k: prints[k] for k in s.inputs})
        record = read_record(s.outputs[0], options)
        if cfg.pipeline.resume and complete_fingerprint(record) == prints[s.key]:
            log.info("pipeline: %s is complete for these settings and inputs; skipped", s.key)
            results.update(record["results"])
            resumed.append(s.key)
            continue
        if not cfg.pipeline.resume or (record and record["fingerprint"] != prints[s.key]):
            log.info(
                "pipeline: %s runs anew (%s); its outputs are deleted first",
                s.key,
                "settings or inputs changed" if cfg.pipeline.resume else "pipeline.resume is false",
            )
            for folder in s.outputs:
                remove_tree(folder, options)
        write_record(s.outputs[0], s.key, prints[s.key], "running", options)
        mark = time.perf_counter()
        entries = s.work()
        seconds[s.key] = round(time.perf_counter() - mark, 2)
        write_record(s.outputs[0], s.key, prints[s.key], "complete", options, entries, seconds[s.key])
        results.update(entries)
    results["stage_seconds"] = seconds
    results["resumed"] = resumed  # complete from an earlier run, not run again
    write_summary(at.summary, results, options)
    if "report" in selected:  # last: it reads the summary above and every stage's outputs
        mark = time.perf_counter()
        results["report"] = report.run(_with(cfg, "report", workdir=at.root))["output"]
        seconds["report"] = round(time.perf_counter() - mark, 2)
        write_summary(at.summary, results, options)
    log.info("pipeline: done, outputs under %s", at.root)
    return results


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.pipeline"))
