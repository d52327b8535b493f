"""What the Ray Train jobs share: the epoch loop with checkpoints and resume, and the trainer.

A training job describes itself as a `Task` (build the model, the loss of a batch, validation
metrics, how to save the model folder); `train_loop` runs it on every Ray Train worker:

- restores model, optimizer, schedule, RNG and history from `ray.train.get_checkpoint()`,
  so a re-run with the same run name (or a restarted worker group) continues where the last
  checkpoint left off and ends at the same step count;
- reports metrics every epoch, and validation metrics and a checkpoint (`model/` + `train_state.pt` +
  `train_config.json`, from rank 0) every `checkpoint_every_epochs` epochs and after the last, and
  every `checkpoint_every_steps` optimizer steps when set (long epochs: diffusion on big sets);
- steps as `dermaray.optimizer_step` does: mixed precision (`train.precision`), gradient
  accumulation, clipping, and gradient checkpointing when asked for;
- reads the training set in one order per epoch (Ray Data's ordered execution, a seeded local
  shuffle): a resume inside an epoch skips the batches trained on before the checkpoint by position,
  so the order must repeat for every example to be trained on exactly once per epoch.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dermaray.config import TrainConfig
from dermaray.layout import MODEL
from dermaray.optimizer_step import OptimizerStep, cast_frozen, enable_gradient_checkpointing, resolve_precision
from dermaray.storage import arrow_filesystem, is_remote, join, parquet_files, upload_folder
from jobs.common import log

TRAIN_STATE = "train_state.pt"
RUNS = "runs"  # <output>/runs/<run name>: a training run's checkpoints, what a re-run resumes from
TRAIN_CONFIG = "train_config.json"  # the train settings a checkpoint was made with, precision resolved


@dataclass(frozen=True)
class Task:
    """The parts of a training job that differ; module-level functions, so Ray can ship them."""

    build: Callable[[dict], torch.nn.Module]  # (config) -> model, weights as at step 0
    loss: Callable[[torch.nn.Module, dict, dict], torch.Tensor]  # (model, batch, config) -> scalar
    evaluate: Callable[[torch.nn.Module, Any, dict, torch.device], dict]  # (model, val shard, config, device)
    save: Callable[[Path, torch.nn.Module, dict], None]  # (folder, model, config): the model folder
    load: Callable[[Path, torch.nn.Module], None]  # (folder, model): restore what `save` wrote


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR factor: linear warm-up, then cosine to zero; flat at zero past the end (never an error)."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model  # DDP wraps it on several workers


def train_loop(config: dict[str, Any]) -> None:
    task: Task = config["task"]
    tc = TrainConfig(**config["train"])
    context = ray.train.get_context()
    torch.manual_seed(tc.seed + context.get_world_rank())
    device = ray.train.torch.get_device()
    precision = resolve_precision(tc.precision, device)
    model = cast_frozen(task.build(config), precision)
    if tc.gradient_checkpointing:
        log.info("gradient checkpointing in %s", enable_gradient_checkpointing(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config["total_steps"], tc.warmup_fraction))
    stepper = OptimizerStep(params, optimizer, precision, device.type, tc.max_grad_norm, tc.grad_accumulation)
    # `batch` counts the batches of the current epoch already trained on (non-zero only in a
    # checkpoint taken inside an epoch, see TrainConfig.checkpoint_every_steps).
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": []}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=False)
            task.load(Path(folder) / MODEL, model)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        stepper.load_state_dict(saved.get("stepper", {}))
        state = {"batch": saved.get("batch", 0), **{k: saved[k] for k in ("epoch", "step", "history")}}

    # DDP (several workers) must be told that some trainable weights may get no gradient: the grounding
    # embedding reads an inner layer of the vision tower, so with tune=full or LoRA the layers above it
    # are trainable but unused, and DDP would fail the first step.
    # Gradients are all-reduced on every micro-batch (no `no_sync`): simple, and right when an epoch
    # ends inside an accumulation.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    started_at = {"started_at_epoch": state["epoch"], "started_at_step": state["step"]}

    def report(metrics: dict[str, Any], checkpoint: bool = True) -> None:
        """Metrics from every rank; the checkpoint (model folder + train state) from rank 0."""
        if not checkpoint or context.get_world_rank() != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            task.save(Path(folder) / MODEL, unwrap(model), config)
            torch.save(
                {
                    **state,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "stepper": stepper.state_dict(),
                },
                Path(folder) / TRAIN_STATE,
            )
            (Path(folder) / TRAIN_CONFIG).write_text(json.dumps({**tc.model_dump(), "precision": precision}, indent=2))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    def stepped(grad_norm: float | None) -> bool:
        if grad_norm is None:
            return False
        schedule.step()
        state["step"] += 1
        norms.append(grad_norm)
        return True

    for epoch in range(state["epoch"], tc.epochs):
        model.train()
        started, losses, norms = time.perf_counter(), [], []
        batches = train_shard.iter_torch_batches(
            batch_size=tc.batch_size,
            device=device,
            local_shuffle_buffer_size=4 * tc.batch_size,
            local_shuffle_seed=tc.seed + epoch,
            pin_memory=device.type == "cuda",
        )
        for index, batch in enumerate(batches):
            if index < state["batch"]:
                continue  # trained on before the checkpoint this run resumed from
            with stepper.autocast():
                loss = task.loss(model, batch, config)
            took_step = stepped(stepper.backward(loss))
            state["batch"] = index + 1
            losses.append(float(loss.detach()))
            # Mid-epoch checkpoints fall on optimizer steps, so no accumulated gradient is lost by a resume.
            if took_step and tc.checkpoint_every_steps and state["step"] % tc.checkpoint_every_steps == 0:
                report(
                    {
                        "epoch": epoch,
                        "step": state["step"],
                        "train_loss": float(np.mean(losses[-tc.checkpoint_every_steps * tc.grad_accumulation :])),
                        **started_at,
                    }
                )
        stepped(stepper.flush())
        checkpointed = (epoch + 1) % tc.checkpoint_every_epochs == 0 or epoch + 1 == tc.epochs
        evaluation = {}
        if checkpointed:
            with stepper.autocast():
                evaluation = task.evaluate(unwrap(model), val_shard, config, device)
        metrics = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "grad_norm": float(np.mean(norms)) if norms else float("nan"),  # before clipping
            "train_seconds": time.perf_counter() - started,
            "lr": schedule.get_last_lr()[0],
            "precision": precision,
            **started_at,
            **evaluation,
        }
        state.update(epoch=epoch + 1, batch=0)
        state["history"].append(metrics)
        report(metrics, checkpointed)


def scaling(tc: TrainConfig) -> ScalingConfig:
    return ScalingConfig(
        num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker, **tc.resources}
    )


def ordered_ingest() -> DataConfig:
    """Ray Train's dataset sharding with a deterministic order: Ray Data keeps block order
    (`preserve_order`), and its splitter then hands the same blocks to the same worker every epoch and
    after a restart (it ignores locality hints under `preserve_order`, so locality is off)."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options, enable_shard_locality=False)


def fit(
    task: Task,
    config: dict[str, Any],
    tc: TrainConfig,
    datasets: dict[str, ray.data.Dataset],
    n_train: int,
    output: str,
    run_name: str,
    storage_options: dict,
) -> tuple[Checkpoint, list[dict]]:
    """Train under `<output>/runs/<run_name>` (resuming a run of that name); (last checkpoint, history)."""
    steps_per_epoch = math.ceil(math.ceil(math.ceil(n_train / tc.num_workers) / tc.batch_size) / tc.grad_accumulation)
    if not is_remote(output) and sum(node["Alive"] for node in ray.nodes()) > 1:
        # Workers on other nodes write checkpoints to this path on *their* disks unless it is a shared mount.
        log.warning(
            "training output %s is a local path on a cluster of several nodes: checkpoints and resume need it "
            "on a filesystem every node shares, or on object storage (s3://, gs://)",
            output,
        )
    storage_fs, storage_path = arrow_filesystem(join(output, RUNS), storage_options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**config, "task": task, "train": tc.model_dump(), "total_steps": steps_per_epoch * tc.epochs},
        scaling_config=scaling(tc),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),  # DDP's collectives on GPUs: NCCL
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
        datasets=datasets,
        dataset_config=ordered_ingest(),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as folder:
        history = torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=False)["history"]
    return result.checkpoint, history


def split_inputs(
    uri: str | list[str],
    columns: list[str],
    split: str | tuple[str, ...] | None,
    prepare: type,
    args: tuple,
    storage_options: dict,
    materialize: bool,
    max_actors: int = 2,
    **actor_resources: Any,
) -> ray.data.Dataset:
    """The rows of one split of the lesion table (or of several; every row when `split` is None) mapped to model
    inputs by an actor pool of `prepare` (`actor_resources`: what each actor asks for, e.g. num_gpus=1).

    Several tables (a list of URIs, e.g. two clinics'): their files in one seeded shuffled order, so each stretch
    of an epoch mixes them (training shuffles only within a buffer of a few batches), the same on every run."""
    tables = [uri] if isinstance(uri, str) else list(uri)
    fs, root = arrow_filesystem(tables[0], storage_options)
    if len(tables) > 1:
        if len({t.split("://")[0] if is_remote(t) else "file" for t in tables}) > 1:
            raise ValueError(f"tables trained together must be on one filesystem (all local or all in one store): {tables}")
        files = [f for t in tables for f in parquet_files(t, storage_options)[1]]
        root = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    ds = ray.data.read_parquet(root, filesystem=fs, columns=columns)
    if split is not None:
        ds = ds.filter(expr=" or ".join(f"split == '{s}'" for s in ((split,) if isinstance(split, str) else split)))
    ds = ds.map_batches(
        prepare,
        fn_constructor_args=args,
        batch_size=256,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        **actor_resources,
    )
    if materialize:
        # Materialized rows keep the table's file order (and the splits taken from them, which inherit this
        # setting): a resumed run must see the order the interrupted one saw, and a table of several files
        # read by several actors would otherwise come back in whatever order they finished.
        ds.context.execution_options.preserve_order = True
    return ds.materialize() if materialize else ds


def prepared_splits(
    uri: str | list[str],
    columns: list[str],
    splits: tuple[str, ...],
    prepare: type,
    args: tuple,
    storage_options: dict,
    materialize: bool,
    max_actors: int = 2,
) -> dict[str, ray.data.Dataset]:
    """Several splits of the lesion table as model inputs, {split: dataset}.

    Materialized: one read and one actor pool for all of them (each `prepare` actor loads its model
    once per stage, not once per split), then each split is kept from the prepared rows. Streamed:
    one pipeline per split, each read as its consumer (a Ray Train run) pulls it."""
    if not materialize or len(splits) == 1:
        return {s: split_inputs(uri, columns, s, prepare, args, storage_options, materialize, max_actors) for s in splits}
    named = type(prepare.__name__, (BySplit,), {})  # Ray names the operator after it: MapBatches(<prepare>)
    prepared = split_inputs(uri, columns, splits, named, (prepare, *args), storage_options, True, max_actors)
    return {s: prepared.filter(expr=f"{SPLIT} == '{s}'").drop_columns([SPLIT]).materialize() for s in splits}


SPLIT = "_split"  # the split of each prepared row, while the splits share one pass


class BySplit:
    """A `prepare` actor whose output rows keep their split: `prepare` may drop rows, so it is called per split."""

    def __init__(self, prepare: type, *args: Any):
        self.prepare = prepare(*args)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(batch["split"]):
            return {**self.prepare(batch), SPLIT: np.array([], dtype=str)}  # str: Arrow types it string, not null
        parts = []
        for split in np.unique(batch["split"]):
            keep = batch["split"] == split
            out = self.prepare({k: v[keep] for k, v in batch.items()})
            rows = len(next(iter(out.values())))
            parts.append({**out, SPLIT: np.full(rows, str(split))})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def export_model(checkpoint: Checkpoint, output: str, storage_options: dict, name: str = MODEL) -> str:
    """Copy the checkpoint's model folder to `<output>/<name>` (any URI)."""
    with checkpoint.as_directory() as folder:
        return upload_folder(Path(folder) / MODEL, join(output, name), storage_options)
