"""Train the image + note classifier with Ray Train and report image-only vs image+note.

    python -m jobs.classifier --config configs/local.yaml

Notes come from the notes job run without the label (strategy LF, or M or P3 with
`notes.label_hierarchy=false`); the job refuses notes whose prompt stated the diagnosis.
The heads predict `classifier.label`: the diagnosis, ISIC's superclass (iddx_1) or malignancy
(ISIC's target). Lesions without that label (most ISIC 2024 lesions have no diagnosis) and
lesions without a usable note are counted and left out of both training and evaluation.
Writes `<output>/model`, `<output>/image_projections` (a vector index of the model's image
projection of every lesion of `input`: what Serve's text search searches, so no replica embeds
the gallery) and `<output>/classifier_eval.md` (+ `classifier_summary.json`): accuracy,
balanced accuracy and macro F1 (for `malignant` also the ISIC 2024 challenge's partial AUC above
80% TPR) for the image head and the image+note head, in-domain (test split) and on the shifted
domain; image->note and note->image retrieval P@k and mAP (relevance: same class).
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
from dermaray.config import DermarayConfig, ModelsConfig
from dermaray.grounding.classifier import (
    WEIGHTS_FILE,
    ClassifierSettings,
    ImageProjector,
    MultimodalClassifier,
    classifier_loss,
    load_classifier,
    save_classifier,
    weights_digest,
)
from dermaray.grounding.data import LABEL, PIXELS, Preprocessor
from dermaray.grounding.evaluate import classifier_markdown
from dermaray.grounding.labels import LabelSpec, balanced_class_weights, label_spec, tally
from dermaray.grounding.metrics import class_retrieval_metrics, classification_metrics, partial_auc_above_tpr
from dermaray.grounding.model import augment, grounding_settings
from dermaray.grounding.text import TextEncoder
from dermaray.layout import IMAGE_PROJECTIONS, summary_uri
from dermaray.notes.prompts import states_label
from dermaray.retrieval import VectorIndex
from dermaray.schema import written_notes
from dermaray.stats import bootstrap_ci
from dermaray.storage import absolute, download_folder, join, parquet_row_count, read_parquet, remove_tree, write_bytes
from jobs.common import clear_summary, init_ray, log, write_summary
from jobs.training import Task, export_model, fit, prepared_splits, split_inputs, unwrap

TEXT = "text_embedding"


def usable_notes(uri: str, allow_labelled: bool, storage_options: dict) -> pa.Table:
    notes = read_parquet(uri, storage_options, columns=["lesion_id", "prompt_id", "note", "error"])
    leaking = sorted({p for p in notes["prompt_id"].to_pylist() if states_label(p)})
    if leaking and not allow_labelled:
        raise ValueError(
            f"{uri}: notes written with the label in the prompt ({', '.join(leaking)}) make the "
            "classification trivial; write them with notes.strategy=M notes.label_hierarchy=false "
            "(or set classifier.allow_labelled_notes=true for an ablation)"
        )
    return written_notes(notes).select(["lesion_id", "note"])


class ClassifierInputs:
    """Lesion rows -> pixels, class label and the frozen text embedding of the lesion's note.

    Rows without a note or without the label are dropped here; the driver counts them (`lesion_tally`)."""

    def __init__(
        self,
        models: ModelsConfig,
        notes: pa.Table,
        label: str = "diagnosis",
        base: str | None = None,
        image_size: int | None = None,
    ):
        """`base` and `image_size`: the tower's base model and side (`image_input`); None: models.grounding_mllm's own."""
        self.pixels = Preprocessor(base or models.grounding_mllm, models, keep=(), image_size=image_size)
        self.text = TextEncoder(models.text_encoder, models)
        self.notes = dict(zip(notes["lesion_id"].to_pylist(), notes["note"].to_pylist(), strict=True))
        self.label = label_spec(label)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        labels, labelled = self.label.indices(batch[self.label.column])
        with_note = np.array([i in self.notes for i in batch["lesion_id"]], dtype=bool)
        batch = {k: v[labelled & with_note] for k, v in batch.items()}
        out = self.pixels(batch)
        out[LABEL] = labels[with_note[labelled]]
        out[TEXT] = self.text.encode([self.notes[i] for i in batch["lesion_id"]])
        return out


def _input_parts(notes: pa.Table, cfg: DermarayConfig) -> tuple[list[str], tuple]:
    """The lesion columns ClassifierInputs reads, and its constructor arguments."""
    spec = label_spec(cfg.classifier.label)
    return ["lesion_id", "split", "image_bytes", spec.column], (cfg.models, notes, spec.kind, *image_input(cfg))


def image_input(cfg: DermarayConfig) -> tuple[str, int | None]:
    """(the tower's base model, the side it sees): a grounded start's (its settings' model and grounding.image_size),
    as MultimodalClassifier.build records them; else models.grounding_mllm at its processor's side."""
    c = cfg.classifier
    if not c.init_from:
        return cfg.models.grounding_mllm, None
    start = grounding_settings(absolute(c.init_from), cfg.storage_options)
    return start.model, start.image_size


def inputs(
    uri: str, notes: pa.Table, splits: tuple[str, ...], cfg: DermarayConfig, materialize: bool, max_actors: int = 2
) -> dict[str, ray.data.Dataset]:
    """{split: its lesions as classifier inputs}."""
    columns, args = _input_parts(notes, cfg)
    return prepared_splits(uri, columns, splits, ClassifierInputs, args, cfg.storage_options, materialize, max_actors)


def every_lesion(uri: str, notes: pa.Table, cfg: DermarayConfig) -> ray.data.Dataset:
    """Every lesion of the table (whatever its split) as classifier inputs, streamed."""
    columns, args = _input_parts(notes, cfg)
    return split_inputs(uri, columns, None, ClassifierInputs, args, cfg.storage_options, False)


# --- The task, run on the Ray Train workers ---------------------------------------------------


def build(config: dict) -> MultimodalClassifier:
    settings = ClassifierSettings(**config["settings"])
    with tempfile.TemporaryDirectory() as folder:
        init = download_folder(config["init_from"], folder, config["storage_options"]) if config["init_from"] else None
        return MultimodalClassifier.build(settings, ModelsConfig(**config["models"]), init)


def batch_loss(model: torch.nn.Module, batch: dict, config: dict) -> torch.Tensor:
    return classifier_loss(unwrap(model), model(augment(batch[PIXELS]), batch[TEXT]), batch[LABEL])


@torch.no_grad()
def evaluate(model: MultimodalClassifier, shard: Any, config: dict, device: torch.device) -> dict[str, float]:
    model.eval()
    scores = score_batches(model, shard.iter_torch_batches(batch_size=256, device=device))
    model.train()
    if not len(scores["label"]):
        return {}
    out = {
        f"val_accuracy_{head}": float((scores[f"{head}_logits"].argmax(1) == scores["label"]).mean())
        for head in ("image", "fused")
    }
    if config["settings"].get("label") == "malignant" and len(set(scores["label"].tolist())) == 2:
        out.update(
            {
                f"val_pauc_{head}": partial_auc_above_tpr(scores["label"], malignant_probability(scores[f"{head}_logits"]))
                for head in ("image", "fused")
            }
        )
    return out


def save(folder: Path, model: MultimodalClassifier, config: dict) -> None:
    save_classifier(folder, model, {"init_from": config["init_from"]})


def load(folder: Path, model: MultimodalClassifier) -> None:
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))


CLASSIFIER = Task(build=build, loss=batch_loss, evaluate=evaluate, save=save, load=load)


# --- Evaluation -------------------------------------------------------------------------------


def score_batches(model: MultimodalClassifier, batches) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "text", "image_logits", "fused_logits", "label")}
    for batch in batches:
        out = model(torch.as_tensor(batch[PIXELS]), torch.as_tensor(batch[TEXT]))
        for k in ("image", "text", "image_logits", "fused_logits"):
            parts[k].append(out[k].float().cpu().numpy())  # float: evaluation may run under autocast
        parts["label"].append(np.asarray(batch[LABEL]))
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def malignant_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax probability of class 1 (malignant, see dermaray.grounding.labels) from [n, 2] logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.exp(shifted[:, 1]) / np.exp(shifted).sum(axis=1)


def evaluate_set(
    model: MultimodalClassifier, ds: ray.data.Dataset, spec: LabelSpec, excluded_unlabelled: int = 0
) -> dict[str, Any]:
    with torch.no_grad():
        s = score_batches(model, ds.iter_batches(batch_size=256, batch_format="numpy"))
    labels = s["label"]
    result: dict[str, Any] = {"label": spec.kind, "lesions": int(len(labels)), "excluded_unlabelled": excluded_unlabelled}
    if not len(labels):  # nothing labelled to evaluate on: counted, no metrics
        return result
    for head in ("image", "fused"):
        predicted = s[f"{head}_logits"].argmax(1)
        result[head] = classification_metrics(labels, predicted, n_classes=len(spec.classes))
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):  # 95% bootstrap intervals over the lesions
            result[head][f"{name}_ci"] = bootstrap_ci(
                lambda i, p=predicted, k=name: classification_metrics(labels[i], p[i], n_classes=len(spec.classes))[k],
                len(labels),
            )
        if spec.kind == "malignant":  # the ISIC 2024 challenge metric; undefined with one class present
            both = len(set(labels.tolist())) == 2
            result[head]["pauc"] = partial_auc_above_tpr(labels, malignant_probability(s[f"{head}_logits"])) if both else None
    ks = [k for k in (1, 5, 10) if k <= len(labels)]
    result["image_to_note"] = class_retrieval_metrics(s["image"], s["text"], labels, labels, ks)
    result["note_to_image"] = class_retrieval_metrics(s["text"], s["image"], labels, labels, ks)
    return result


# --- On the driver ----------------------------------------------------------------------------


def lesion_tally(uri: str, notes: pa.Table, spec: LabelSpec, storage_options: dict) -> dict[str, Any]:
    """dermaray.grounding.labels.tally of a lesion table: used / without the label / without a note, per split."""
    lesions = read_parquet(uri, storage_options, columns=["lesion_id", "split", spec.column])
    with_note = pc.is_in(lesions["lesion_id"], notes["lesion_id"]).to_pylist()
    return tally(spec, lesions["split"].to_pylist(), lesions[spec.column].to_pylist(), with_note)


def write_image_projections(model_uri: str, weights: str, cfg: DermarayConfig) -> dict[str, Any]:
    """Index the image projection by the classifier at `model_uri` (whose weights' digest is `weights`) of every lesion
    of `classifier.input` (exact inner product), streamed: the driver holds the index and one batch."""
    c, options = cfg.classifier, cfg.storage_options
    target = join(c.output, IMAGE_PROJECTIONS)
    remove_tree(target, options)
    projector_args = (model_uri, cfg.models, options)
    # On the training workers' kind of node: a GPU each when training had one (a 7B MLLM's tower on CPU would take hours).
    resources = {"num_gpus": 1} if c.train.use_gpu else {}
    if c.train.resources:
        resources["resources"] = c.train.resources
    projected = split_inputs(
        c.input,
        ["lesion_id", "image_bytes"],
        None,
        ImageProjector,
        projector_args,
        options,
        False,
        c.train.num_workers,
        **resources,
    )
    chunks = (
        (batch["lesion_id"].tolist(), batch["embedding"])
        for batch in projected.iter_batches(batch_size=4096, batch_format="numpy")
    )
    count = parquet_row_count(c.input, options)
    index = VectorIndex.build_streamed(chunks, count, "exact", model=f"{model_uri}:image_projection", model_weights=weights)
    index.save(target, options)
    return {"uri": target, "count": len(index)}


def run(cfg: DermarayConfig) -> dict:
    c, options, tc = cfg.classifier, cfg.storage_options, cfg.classifier.train
    clear_summary(summary_uri(c.output, "classifier"), options)
    spec = label_spec(c.label)
    init_ray(cfg.ray)
    notes = usable_notes(c.notes, c.allow_labelled_notes, options)
    counted = lesion_tally(c.input, notes, spec, options)
    counts = {s: counted["used"].get(s, 0) for s in ("train", "val", "test")}
    unlabelled = {s: counted["excluded_unlabelled"].get(s, 0) for s in ("train", "val", "test")}
    without_note = sum(counted["unusable"].values())
    log.info(
        "classifier: label %s; lesions used by split %s; left out: %s without the label, %d without a note",
        spec.kind,
        counts,
        unlabelled,
        without_note,
    )
    if not counts["train"]:
        raise ValueError(
            f"{c.input} has no training-split lesion with a {spec.kind} label and a usable note "
            f"({unlabelled['train']} without the label); choose another classifier.label"
        )
    train_classes = counted["class_counts"].get("train", [0] * len(spec.classes))
    weights = balanced_class_weights(train_classes) if c.class_weights == "balanced" else None
    # The test split is prepared in the same pass as the training splits (when they are materialized).
    prepared = inputs(c.input, notes, ("train", "val", "test"), cfg, tc.materialize, max_actors=2 * tc.num_workers)
    datasets = {s: prepared[s] for s in ("train", "val")}
    text_dim = TextEncoder(cfg.models.text_encoder, cfg.models).dim
    settings = ClassifierSettings(
        model=cfg.models.grounding_mllm,  # a grounded start's own base replaces it (MultimodalClassifier.build)
        classes=list(spec.classes),
        text_encoder=cfg.models.text_encoder,
        text_dim=text_dim,
        projection_dim=c.projection_dim,
        tune_image=c.tune_image,
        label=spec.kind,
        class_weights=weights,
    )
    config = {
        "settings": asdict(settings),
        "init_from": absolute(c.init_from) if c.init_from else None,
        "storage_options": options,
        "models": cfg.models.model_dump(),
    }
    started = time.perf_counter()
    checkpoint, history = fit(CLASSIFIER, config, tc, datasets, counts["train"], c.output, c.run_name, options)
    model_uri = export_model(checkpoint, c.output, options)

    with tempfile.TemporaryDirectory() as folder:
        local = download_folder(model_uri, folder, options)
        model, digest = load_classifier(local, cfg.models), weights_digest(local)
    projections = write_image_projections(model_uri, digest, cfg)
    eval_sets = {"in-domain (test split)": (prepared["test"], unlabelled["test"])}
    if c.shifted_input and c.shifted_notes:
        shifted_notes = usable_notes(c.shifted_notes, c.allow_labelled_notes, options)
        shifted_unlabelled = sum(lesion_tally(c.shifted_input, shifted_notes, spec, options)["excluded_unlabelled"].values())
        eval_sets["shifted domain"] = (every_lesion(c.shifted_input, shifted_notes, cfg), shifted_unlabelled)
    results = {name: evaluate_set(model, ds, spec, excluded) for name, (ds, excluded) in eval_sets.items()}
    write_bytes(join(c.output, "classifier_eval.md"), classifier_markdown(results).encode(), options)
    # lesions_with_note: the lesions used (with the label and a note), per split; excluded_unlabelled:
    # without the label; lesions_without_note: with the label but no usable note. Together: every lesion.
    summary = {
        "model": model_uri,
        "image_projections": projections,
        "label": spec.kind,
        "classes": list(spec.classes),
        "class_weights": weights,
        "class_counts_train": dict(zip(spec.classes, train_classes, strict=True)),
        "lesions_with_note": counts,
        "excluded_unlabelled": unlabelled,
        "lesions_without_note": without_note,
        "epochs": history[-1]["epoch"],
        "steps": history[-1]["step"],
        "history": history,
        "eval": results,
        "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    write_summary(summary_uri(c.output, "classifier"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    print(classifier_markdown(run(config_from_argv(sys.argv[1:], prog="python -m jobs.classifier"))["eval"]))
