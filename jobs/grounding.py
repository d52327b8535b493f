"""Ground an MLLM's image embedding in quantitative lesion attributes, with Ray Train.

    python -m jobs.grounding --config configs/local.yaml grounding.input=s3://bucket/ingest/clinic/lesions

Ray Data decodes the lesion table into pixels and z-scored targets; a `TorchTrainer` fits the
attribute heads (and the tower, per `grounding.tune`) on the train split, validates every
epoch and reports a checkpoint (model, heads, optimizer, schedule, attribute scaler, settings,
history) to `<output>/runs/<run_name>`. Re-running with the same run name resumes from the
last checkpoint, so a killed driver loses at most one epoch. The final model is exported to
`<output>/model` for the embeddings job and the Serve app.
"""

from __future__ import annotations

import sys
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
from dermaray.config import DermarayConfig, GroundingConfig, GroundingSpec, ModelsConfig
from dermaray.grounding.data import PIXELS, TARGETS, Preprocessor
from dermaray.grounding.model import (
    WEIGHTS_FILE,
    AttributeScaler,
    GroundingModel,
    GroundingSettings,
    augment,
    loss_fn,
    save_model,
)
from dermaray.grounding.photometric import photometric_views
from dermaray.layout import summary_uri
from dermaray.storage import read_parquet
from jobs.common import clear_summary, init_ray, log, write_summary
from jobs.training import Task, export_model, fit, prepared_splits, unwrap


def settings_of(cfg: DermarayConfig) -> GroundingSettings:
    return GroundingSettings(model=cfg.models.grounding_mllm, **cfg.grounding.model_dump(include=set(GroundingSpec.model_fields)))


# --- The task, run on the Ray Train workers ---------------------------------------------------


def build(config: dict) -> GroundingModel:
    return GroundingModel.from_settings(GroundingSettings(**config["settings"]), ModelsConfig(**config["models"]))


def training_views(model: torch.nn.Module, batch: dict, config: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's images as training sees them: each flipped or turned, and photometric views where configured
    (`keep`: per image and attribute, whether the view still shows its value; None without them)."""
    pixels, keep = augment(batch[PIXELS]), None
    if config.get("photometric"):
        embedder = unwrap(model).embedder
        pixels, keep = photometric_views(pixels, embedder.normalization, config["settings"]["attributes"])
    return pixels, keep


def batch_loss(model: torch.nn.Module, batch: dict, config: dict) -> torch.Tensor:
    weights = torch.tensor(config["weights"], dtype=torch.float32, device=batch[TARGETS].device)
    pixels, keep = training_views(model, batch, config)
    return loss_fn(model(pixels)["attributes"], batch[TARGETS], weights, keep)


@torch.no_grad()
def evaluate(model: GroundingModel, shard: Any, config: dict, device: torch.device) -> dict[str, float]:
    """Validation loss (z space) and MAE per attribute in native units, on this worker's shard."""
    scaler = AttributeScaler(**config["scaler"])
    model.eval()
    predicted, target = [], []
    for batch in shard.iter_torch_batches(batch_size=256, device=device):
        predicted.append(model(batch[PIXELS])["attributes"].float().cpu())  # float: evaluation may run under autocast
        target.append(batch[TARGETS].cpu())
    model.train()
    if not predicted:
        return {}
    p, t = torch.cat(predicted), torch.cat(target)
    errors = np.abs(scaler.inverse(p.numpy()) - scaler.inverse(t.numpy())).mean(axis=0)
    return {
        "val_loss": float(loss_fn(p, t)),
        **{f"val_mae_{name}": float(e) for name, e in zip(scaler.names, errors, strict=True)},
    }


def save(folder: Path, model: GroundingModel, config: dict) -> None:
    save_model(folder, model, AttributeScaler(**config["scaler"]))


def load(folder: Path, model: GroundingModel) -> None:
    model.load_trainable_state(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))


GROUNDING = Task(build=build, loss=batch_loss, evaluate=evaluate, save=save, load=load)


# --- On the driver ----------------------------------------------------------------------------


def inputs_of(g: GroundingConfig) -> list[str]:
    """The lesion tables grounding trains on: its input, then any other clinic's (mixed-clinic training)."""
    return [g.input, *g.mixed_inputs]


def fit_scaler(g: GroundingConfig, storage_options: dict) -> tuple[AttributeScaler, dict[str, int]]:
    """The attribute scaler, fitted on every input's train split, and the lesions per split over all inputs."""
    tables = [read_parquet(uri, storage_options, columns=["split", *g.attributes]) for uri in inputs_of(g)]
    table = pa.concat_tables(tables, promote_options="permissive")
    counts = {s: int(pc.sum(pc.equal(table["split"], s)).as_py() or 0) for s in ("train", "val", "test")}
    if counts["train"] < 2:
        raise ValueError(f"{', '.join(inputs_of(g))}: {counts['train']} training lesions; grounding needs a train split")
    train = table.filter(pc.equal(table["split"], "train"))
    values = np.stack([train[a].to_numpy(zero_copy_only=False) for a in g.attributes], axis=1)
    return AttributeScaler.fit(g.attributes, values, log_sizes=g.log_sizes), counts


def split_datasets(
    uri: str | list[str],
    splits: tuple[str, ...],
    model: str,
    models: ModelsConfig,
    scaler: AttributeScaler,
    storage_options: dict,
    materialize: bool,
    max_actors: int = 2,
    image_size: int | None = None,
) -> dict[str, ray.data.Dataset]:
    """Splits of the lesion table (or tables) as model inputs (pixels, z-scored targets, class label)."""
    columns = ["lesion_id", "split", "image_bytes", "diagnosis", *scaler.names]
    args = (model, models, scaler, (), image_size)
    return prepared_splits(uri, columns, splits, Preprocessor, args, storage_options, materialize, max_actors)


def run(cfg: DermarayConfig) -> dict:
    g, options, tc = cfg.grounding, cfg.storage_options, cfg.grounding.train
    clear_summary(summary_uri(g.output, "grounding"), options)
    init_ray(cfg.ray)
    settings = settings_of(cfg)
    scaler, counts = fit_scaler(g, options)
    log.info(
        "grounding: %s on %d train / %d val lesions%s, attributes %s, tune=%s",
        settings.model,
        counts["train"],
        counts["val"],
        f" of {len(inputs_of(g))} clinics" if g.mixed_inputs else "",
        g.attributes,
        g.tune,
    )
    uris, actors = inputs_of(g), 2 * tc.num_workers
    datasets = split_datasets(
        uris, ("train", "val"), settings.model, cfg.models, scaler, options, tc.materialize, actors, g.image_size
    )
    config = {
        "settings": settings.model_dump(),
        "scaler": asdict(scaler),
        "weights": [float(g.attribute_weights.get(a, 1.0)) for a in g.attributes],
        "photometric": g.photometric,
        "models": cfg.models.model_dump(),  # each worker resolves the base model on its own node
    }
    started = time.perf_counter()
    checkpoint, history = fit(GROUNDING, config, tc, datasets, counts["train"], g.output, g.run_name, options)
    summary = {
        "model": export_model(checkpoint, g.output, options),
        "base": settings.model,
        "tune": g.tune,
        "photometric": g.photometric,
        "image_size": g.image_size,
        "heads_read": g.heads_read,
        "attribute_weights": g.attribute_weights,
        "inputs": inputs_of(g),
        "attributes": list(g.attributes),
        "lesions": counts,
        "epochs": history[-1]["epoch"],
        "steps": history[-1]["step"],
        "resumed_from_epoch": history[-1]["started_at_epoch"],  # 0: trained from scratch in one go
        "final": history[-1],
        "history": history,
        "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    write_summary(summary_uri(g.output, "grounding"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.grounding"))
