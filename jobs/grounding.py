"""Ground an MLLM's image embedding in quantitative lesion attributes, with Ray Train.

    python -m jobs.grounding --config configs/local.yaml grounding.input=s3://bucket/ingest/clinic/lesions

Ray Data decodes the lesion table into pixels and z-scored targets; a `TorchTrainer` fits the
attribute heads (and the tower, per `grounding.tune`) on the train split, validates every
epoch and reports a checkpoint (model, heads, optimizer, scheduler, attribute scaler, settings,
history) to `<output>/runs/<run_name>`. Re-running with the same run name resumes from the
last checkpoint, so a killed driver loses at most one epoch. The final model is exported to
`<output>/model` for the embeddings job and the Serve app.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, GroundingConfig, TrainConfig
from dermaray.grounding.data import PIXELS, TARGETS, Preprocessor
from dermaray.grounding.model import (
    AttributeScaler,
    GroundingModel,
    GroundingSettings,
    augment,
    loss_fn,
    model_path,
    save_model,
)
from dermaray.storage import arrow_filesystem, join, read_parquet, write_bytes
from jobs.common import init_ray, log, write_summary

MODEL_DIR = "model"
TRAIN_STATE = "train_state.pt"


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """LR factor: linear warm-up, then cosine to zero; flat at zero past the end (never an error)."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def settings_of(cfg: DermarayConfig) -> GroundingSettings:
    g = cfg.grounding
    return GroundingSettings(
        model=cfg.models.grounding_mllm, attributes=list(g.attributes), tune=g.tune,
        lora_rank=g.lora_rank, lora_alpha=g.lora_alpha, lora_targets=list(g.lora_targets),
    )


# --- On the workers ---------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> GroundingModel:
    return model.module if hasattr(model, "module") else model  # DDP wraps it on several workers


def train_loop(config: dict[str, Any]) -> None:
    settings, scaler = GroundingSettings(**config["settings"]), AttributeScaler(**config["scaler"])
    tc = TrainConfig(**config["train"])
    context = ray.train.get_context()
    torch.manual_seed(tc.seed + context.get_world_rank())
    model = GroundingModel.from_settings(settings, config["cache_dir"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config["total_steps"], tc.warmup_fraction))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=False)
            model.load_trainable_state(torch.load(Path(folder) / MODEL_DIR / "trainable.pt", map_location="cpu", weights_only=True))
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = {k: saved[k] for k in ("epoch", "step", "history")}
        torch.set_rng_state(saved["rng"])

    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    weights = torch.tensor(config["weights"], dtype=torch.float32, device=device)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    started_at_epoch = state["epoch"]
    for epoch in range(state["epoch"], tc.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        for batch in train_shard.iter_torch_batches(
            batch_size=tc.batch_size, device=device, local_shuffle_buffer_size=4 * tc.batch_size,
            local_shuffle_seed=tc.seed + epoch,
        ):
            out = model(augment(batch[PIXELS]))
            loss = loss_fn(out["attributes"], batch[TARGETS], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            state["step"] += 1
            losses.append(float(loss.detach()))
        train_seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "train_seconds": train_seconds, "lr": schedule.get_last_lr()[0],
                   "started_at_epoch": started_at_epoch, **evaluate(unwrap(model), val_shard, scaler, device)}
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        if context.get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as folder:
                save_model(Path(folder) / MODEL_DIR, unwrap(model), scaler, {"epoch": state["epoch"], "step": state["step"]})
                torch.save({**state, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "rng": torch.get_rng_state()}, Path(folder) / TRAIN_STATE)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


@torch.no_grad()
def evaluate(model: GroundingModel, shard: Any, scaler: AttributeScaler, device: torch.device) -> dict[str, float]:
    """Validation loss (z space) and MAE per attribute in native units, on this worker's shard."""
    model.eval()
    predicted, target = [], []
    for batch in shard.iter_torch_batches(batch_size=256, device=device):
        predicted.append(model(batch[PIXELS])["attributes"].cpu())
        target.append(batch[TARGETS].cpu())
    model.train()
    if not predicted:
        return {}
    p, t = torch.cat(predicted), torch.cat(target)
    errors = np.abs(scaler.inverse(p.numpy()) - scaler.inverse(t.numpy())).mean(axis=0)
    return {"val_loss": float(loss_fn(p, t)), **{f"val_mae_{name}": float(e) for name, e in zip(scaler.names, errors)}}


# --- On the driver ----------------------------------------------------------------------------


def fit_scaler(g: GroundingConfig, storage_options: dict) -> tuple[AttributeScaler, dict[str, int]]:
    table = read_parquet(g.input, storage_options, columns=["split", *g.attributes])
    counts = {s: int(pc.sum(pc.equal(table["split"], s)).as_py() or 0) for s in ("train", "val", "test")}
    if counts["train"] < 2:
        raise ValueError(f"{g.input}: {counts['train']} training lesions; grounding needs a train split")
    train = table.filter(pc.equal(table["split"], "train"))
    values = np.stack([train[a].to_numpy(zero_copy_only=False) for a in g.attributes], axis=1)
    return AttributeScaler.fit(g.attributes, values, log_sizes=g.log_sizes), counts


def split_dataset(uri: str, split: str, path: str, scaler: AttributeScaler, storage_options: dict, materialize: bool) -> ray.data.Dataset:
    fs, root = arrow_filesystem(uri, storage_options)
    ds = (
        ray.data.read_parquet(root, filesystem=fs, columns=["lesion_id", "split", "image_bytes", *scaler.names])
        .filter(expr=f"split == '{split}'")
        .map_batches(Preprocessor, fn_constructor_args=(path, scaler, ()), batch_size=256, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
    )
    return ds.materialize() if materialize else ds


def export_model(checkpoint: Checkpoint, output: str, storage_options: dict) -> str:
    """Copy the checkpoint's model folder to `<output>/model` (any URI)."""
    target = join(output, MODEL_DIR)
    with checkpoint.as_directory() as folder:
        for file in sorted((Path(folder) / MODEL_DIR).iterdir()):
            write_bytes(join(target, file.name), file.read_bytes(), storage_options)
    return target


def run_path(g: GroundingConfig) -> str:
    return join(g.output, "runs")


def run(cfg: DermarayConfig) -> dict:
    g, options, tc = cfg.grounding, cfg.storage_options, cfg.grounding.train
    init_ray(cfg.ray)
    settings = settings_of(cfg)
    scaler, counts = fit_scaler(g, options)
    path = model_path(settings.model, cfg.models.cache_dir)
    log.info("grounding: %s on %d train / %d val lesions, attributes %s, tune=%s", settings.model, counts["train"], counts["val"], g.attributes, g.tune)
    datasets = {s: split_dataset(g.input, s, path, scaler, options, tc.materialize) for s in ("train", "val")}
    steps_per_epoch = math.ceil(math.ceil(counts["train"] / tc.num_workers) / tc.batch_size)
    weights = [float(g.attribute_weights.get(a, 1.0)) for a in g.attributes]
    storage_fs, storage_path = arrow_filesystem(run_path(g), options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "settings": asdict(settings), "scaler": asdict(scaler), "train": tc.model_dump(), "weights": weights,
            "total_steps": steps_per_epoch * tc.epochs, "cache_dir": str(Path(cfg.models.cache_dir).expanduser().resolve()),
        },
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=g.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
        datasets=datasets,
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"grounding training failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as folder:
        history = torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=False)["history"]
    model_uri = export_model(result.checkpoint, g.output, options)
    summary = {
        "model": model_uri, "base": settings.model, "tune": g.tune, "attributes": list(g.attributes),
        "lesions": counts, "epochs": history[-1]["epoch"], "steps": history[-1]["step"],
        "resumed_from_epoch": history[-1]["started_at_epoch"],  # 0: trained from scratch in one go
        "final": history[-1], "history": history, "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    write_summary(join(g.output, "grounding_summary.json"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.grounding"))
