"""Train the image + note classifier with Ray Train and report image-only vs image+note.

    python -m jobs.classifier --config configs/local.yaml

Notes come from the notes job run without the label (strategy M or P3 with
`notes.label_hierarchy=false`); the job refuses notes whose prompt stated the diagnosis.
Lesions without a usable note are counted and left out of both training and evaluation.
Writes `<output>/model` and `<output>/classifier_eval.{json,md}`: accuracy, balanced accuracy
and macro F1 for the image head and the image+note head, in-domain (test split) and on the
shifted domain; image->note and note->image retrieval P@k and mAP (relevance: same class).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import ClassifierConfig, DermarayConfig
from dermaray.grounding.classifier import (
    ClassifierSettings,
    MultimodalClassifier,
    classifier_loss,
    load_classifier,
    save_classifier,
)
from dermaray.grounding.data import CLASS_CODES, LABEL, PIXELS, Preprocessor
from dermaray.grounding.metrics import class_retrieval_metrics, classification_metrics
from dermaray.grounding.model import augment, model_path
from dermaray.grounding.text import TextEncoder
from dermaray.storage import absolute, download_folder, join, read_parquet, write_bytes
from jobs.common import init_ray, log, write_summary
from jobs.training import Task, export_model, fit, split_inputs

TEXT = "text_embedding"


def labelled(prompt_id: str) -> bool:
    """Whether a note's prompt stated the diagnosis (P1 and P2 always do; M and P3 only with +label)."""
    strategy, *switches = prompt_id.split("+")
    return strategy in ("P1", "P2") or "label" in switches


def usable_notes(uri: str, allow_labelled: bool, storage_options: dict) -> pa.Table:
    notes = read_parquet(uri, storage_options, columns=["lesion_id", "prompt_id", "note", "error"])
    leaking = sorted({p for p in notes["prompt_id"].to_pylist() if labelled(p)})
    if leaking and not allow_labelled:
        raise ValueError(f"{uri}: notes written with the label in the prompt ({', '.join(leaking)}) make the "
                         "classification trivial; write them with notes.strategy=M notes.label_hierarchy=false "
                         "(or set classifier.allow_labelled_notes=true for an ablation)")
    ok = pc.and_(pc.is_null(notes["error"]), pc.is_valid(notes["note"]))
    return notes.filter(ok).select(["lesion_id", "note"])


class ClassifierInputs:
    """Lesion rows -> pixels, class label and the frozen text embedding of the lesion's note."""

    def __init__(self, path: str, text_encoder: str, cache_dir: str, notes: pa.Table):
        self.pixels = Preprocessor(path, keep=())
        self.text = TextEncoder(text_encoder, cache_dir)
        self.notes = dict(zip(notes["lesion_id"].to_pylist(), notes["note"].to_pylist()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keep = np.array([i in self.notes for i in batch["lesion_id"]], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()}
        out = self.pixels(batch)
        out[TEXT] = self.text.encode([self.notes[i] for i in batch["lesion_id"]])
        return out


def inputs(uri: str, notes: pa.Table, split: str | None, cfg: DermarayConfig, materialize: bool, max_actors: int = 2) -> ray.data.Dataset:
    path = model_path(cfg.models.grounding_mllm, cfg.models.cache_dir)
    return split_inputs(uri, ["lesion_id", "split", "image_bytes", "diagnosis"], split, ClassifierInputs,
                        (path, cfg.models.text_encoder, cfg.models.cache_dir, notes), cfg.storage_options, materialize, max_actors)


# --- The task, run on the Ray Train workers ---------------------------------------------------


def build(config: dict) -> MultimodalClassifier:
    settings = ClassifierSettings(**config["settings"])
    with tempfile.TemporaryDirectory() as folder:
        init = download_folder(config["init_from"], folder, config["storage_options"]) if config["init_from"] else None
        return MultimodalClassifier.build(settings, config["cache_dir"], init)


def batch_loss(model: torch.nn.Module, batch: dict, config: dict) -> torch.Tensor:
    return classifier_loss(model.module if hasattr(model, "module") else model,
                           model(augment(batch[PIXELS]), batch[TEXT]), batch[LABEL])


@torch.no_grad()
def evaluate(model: MultimodalClassifier, shard: Any, config: dict, device: torch.device) -> dict[str, float]:
    model.eval()
    scores = score_batches(model, shard.iter_torch_batches(batch_size=256, device=device))
    model.train()
    if not len(scores["label"]):
        return {}
    return {f"val_accuracy_{head}": float((scores[f"{head}_logits"].argmax(1) == scores["label"]).mean())
            for head in ("image", "fused")}


def save(folder: Path, model: MultimodalClassifier, config: dict) -> None:
    save_classifier(folder, model, {"init_from": config["init_from"]})


def load(folder: Path, model: MultimodalClassifier) -> None:
    model.load_state_dict(torch.load(folder / "classifier.pt", map_location="cpu", weights_only=True))


CLASSIFIER = Task(build=build, loss=batch_loss, evaluate=evaluate, save=save, load=load)


# --- Evaluation -------------------------------------------------------------------------------


def score_batches(model: MultimodalClassifier, batches) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "text", "image_logits", "fused_logits", "label")}
    for batch in batches:
        out = model(torch.as_tensor(batch[PIXELS]), torch.as_tensor(batch[TEXT]))
        for k in ("image", "text", "image_logits", "fused_logits"):
            parts[k].append(out[k].cpu().numpy())
        parts["label"].append(np.asarray(batch[LABEL]))
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def evaluate_set(model: MultimodalClassifier, ds: ray.data.Dataset) -> dict[str, Any]:
    with torch.no_grad():
        s = score_batches(model, ds.iter_batches(batch_size=256, batch_format="numpy"))
    labels, n = s["label"], len(CLASS_CODES)
    result: dict[str, Any] = {"lesions": int(len(labels))}
    for head in ("image", "fused"):
        result[head] = classification_metrics(labels, s[f"{head}_logits"].argmax(1), n_classes=n)
    result["image_to_note"] = class_retrieval_metrics(s["image"], s["text"], labels, labels)
    result["note_to_image"] = class_retrieval_metrics(s["text"], s["image"], labels, labels)
    return result


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| set | lesions | head | accuracy | balanced accuracy | macro F1 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for head, label in (("image", "image only"), ("fused", "image + note")):
            m = r[head]
            lines.append(f"| {name} | {r['lesions']} | {label} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | {m['macro_f1']:.3f} |")
    lines += ["", "| set | direction | P@1 | P@5 | P@10 | mAP |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for key, label in (("image_to_note", "image → note"), ("note_to_image", "note → image")):
            m = r[key]
            lines.append(f"| {name} | {label} | {m['P@1']:.3f} | {m['P@5']:.3f} | {m['P@10']:.3f} | {m['mAP']:.3f} |")
    return "\n".join(lines) + "\n"


# --- On the driver ----------------------------------------------------------------------------


def run(cfg: DermarayConfig) -> dict:
    c, options, tc = cfg.classifier, cfg.storage_options, cfg.classifier.train
    init_ray(cfg.ray)
    notes = usable_notes(c.notes, c.allow_labelled_notes, options)
    lesions = read_parquet(c.input, options, columns=["lesion_id", "split"])
    with_note = pc.is_in(lesions["lesion_id"], notes["lesion_id"])
    counts = {s: int(pc.sum(pc.and_(pc.equal(lesions["split"], s), with_note)).as_py() or 0) for s in ("train", "val", "test")}
    without_note = lesions.num_rows - int(pc.sum(with_note).as_py() or 0)
    log.info("classifier: %s lesions with a note by split, %d without a note (left out)", counts, without_note)
    datasets = {s: inputs(c.input, notes, s, cfg, tc.materialize, max_actors=2 * tc.num_workers) for s in ("train", "val")}
    text_dim = TextEncoder(cfg.models.text_encoder, cfg.models.cache_dir).dim
    settings = ClassifierSettings(model=cfg.models.grounding_mllm, classes=list(CLASS_CODES), text_encoder=cfg.models.text_encoder,
                                  text_dim=text_dim, projection_dim=c.projection_dim, tune_image=c.tune_image)
    config = {"settings": asdict(settings), "init_from": absolute(c.init_from) if c.init_from else None, "storage_options": options,
              "cache_dir": str(Path(cfg.models.cache_dir).expanduser().resolve())}
    started = time.perf_counter()
    checkpoint, history = fit(CLASSIFIER, config, tc, datasets, counts["train"], c.output, c.run_name, options)
    model_uri = export_model(checkpoint, c.output, options)

    with tempfile.TemporaryDirectory() as folder:
        model = load_classifier(download_folder(model_uri, folder, options), cfg.models.cache_dir)
    eval_sets = {"in-domain (test split)": inputs(c.input, notes, "test", cfg, False)}
    if c.shifted_input and c.shifted_notes:
        eval_sets["shifted domain"] = inputs(c.shifted_input, usable_notes(c.shifted_notes, c.allow_labelled_notes, options), None, cfg, False)
    results = {name: evaluate_set(model, ds) for name, ds in eval_sets.items()}
    write_bytes(join(c.output, "classifier_eval.md"), markdown(results).encode(), options)
    summary = {"model": model_uri, "lesions_with_note": counts, "lesions_without_note": without_note,
               "epochs": history[-1]["epoch"], "steps": history[-1]["step"], "history": history, "eval": results,
               "seconds_this_run": round(time.perf_counter() - started, 2)}
    write_summary(join(c.output, "classifier_summary.json"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    print(markdown(run(config_from_argv(sys.argv[1:], prog="python -m jobs.classifier"))["eval"]))
