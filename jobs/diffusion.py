"""LoRA adapters on Stable Diffusion that turn a diagnosis into reference images, trained with Ray Train.

    python -m jobs.diffusion --config configs/local.yaml diffusion.input=s3://bucket/ingest/clinic/lesions

1. A random `tiny` base would only make noise, so it is first pre-trained briefly (VAE and UNet)
   on the training-split lesions in one Ray task and saved with `save_pretrained` to
   `<output>/base`; hub bases (SD 1.5, SDXL) skip this.
   Its captions leave the diagnosis out by default ("a dermoscopic photo of large lesion"): the
   base knows what a lesion looks like, not which diagnosis it is, like a general-purpose base.
2. LoRA adapters on the UNet's attention learn the diagnoses from class captions ("a dermoscopic
   photo of large melanoma, skin lesion"): one shared adapter for every diagnosis, or one per
   diagnosis (`diffusion.adapters`). Each is a `TorchTrainer` run over Ray Data shards with a
   checkpoint per epoch (and every `train.checkpoint_every_steps` steps) holding the adapter file,
   optimizer and schedule; a re-run with the same run name resumes with the adapter weights
   restored exactly.
3. Adapters are exported in the diffusers format to `<output>/adapter` or
   `<output>/adapters/<code>` (`pytorch_lora_weights.safetensors`), loadable with
   `pipe.load_lora_weights(folder)`.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import torch

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, DiffusionConfig
from dermaray.diffusion.captions import caption, size_word
from dermaray.diffusion.pipeline import (
    DiffusionObjective,
    add_lora,
    image_tensor,
    load_lora_state,
    load_pipeline,
    native_resolution,
    pretrain_base,
    read_lora,
    save_lora,
    tokenize,
)
from dermaray.grounding.data import decode_rgb
from dermaray.models.registry import PRESETS, resolve_model
from dermaray.storage import absolute, is_remote, join, read_parquet, require
from jobs.common import init_ray, log, write_summary
from jobs.training import Task, export_model, fit, split_inputs

PIXELS, IDS = "pixel_values", "input_ids"
SETTINGS_FILE = "adapter.json"
SHARED_ADAPTER = "adapter"  # <output>/adapter: one adapter, every diagnosis, class captions
PER_DIAGNOSIS_ADAPTERS = "adapters"  # <output>/adapters/<code>: one adapter per diagnosis


def lesion_caption(diagnosis: str | None, area_mm2: float | None, size_words: bool) -> str:
    """The lesion's training caption; `diagnosis` None leaves the diagnosis out (base pre-training)."""
    use_size = size_words and area_mm2 is not None and np.isfinite(area_mm2)
    return caption(diagnosis, size_word(float(area_mm2)) if use_size else None)


def lesion_notes(uri: str, storage_options: dict) -> dict[str, str]:
    """{lesion id: note} of a notes Parquet (jobs.notes), notes written without error only."""
    notes = read_parquet(uri, storage_options, columns=["lesion_id", "note", "error"])
    ok = pc.and_(pc.is_null(notes["error"]), pc.is_valid(notes["note"]))
    notes = notes.filter(ok)
    return dict(zip(notes["lesion_id"].to_pylist(), notes["note"].to_pylist()))


class DiffusionInputs:
    """Lesion rows -> pixels in [-1, 1] at the training resolution and caption token ids."""

    def __init__(self, base: str, resolution: int, size_words: bool, only: set[str] | None = None,
                 notes: tuple[str, dict] | None = None):
        # `only`: the lesion ids to keep (a split's first `limit`, or one diagnosis' lesions);
        # `notes`: (notes URI, storage options): each lesion's note follows its caption
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        self.resolution, self.size_words, self.only = resolution, size_words, only
        self.notes = lesion_notes(*notes) if notes else {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.only is not None:
            keep = np.array([i in self.only for i in batch["lesion_id"]], dtype=bool)
            batch = {k: v[keep] for k, v in batch.items()}
            if not keep.any():
                empty = (0, 3, self.resolution, self.resolution)
                return {PIXELS: np.zeros(empty, np.float32), IDS: np.zeros((0, self.tokenizer.model_max_length), np.int64)}
        images = [decode_rgb(b) for b in batch["image_bytes"]]
        captions = [lesion_caption(d, a, self.size_words) for d, a in zip(batch["diagnosis"], batch["area_mm2"])]
        # The tokenizer cuts captions at the text encoder's length (77 tokens for CLIP): the
        # diagnosis words come first so they always survive.
        captions = [f"{c}, {self.notes[i]}" if i in self.notes else c for c, i in zip(captions, batch["lesion_id"])]
        return {PIXELS: image_tensor(images, self.resolution).numpy(), IDS: tokenize(self.tokenizer, captions).numpy()}


# --- Base pre-training (tiny presets only) ------------------------------------------------------


@ray.remote
def pretrain_task(base: str, target: str, rows: list[dict], p: dict, size_words: bool, resolution: int | None, seed: int) -> dict:
    setup_logging()  # the step losses, every 50 steps, in the worker's log (and the driver's, with log_to_driver)
    images = [decode_rgb(r["image_bytes"]) for r in rows]
    with_diagnosis = p["captions"] == "diagnosis"
    captions = [lesion_caption(r["diagnosis"] if with_diagnosis else None, r["area_mm2"], size_words) for r in rows]
    return pretrain_base(base, target, images, captions, steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                         seed=seed, log_every=max(1, min(50, p["steps"])), resolution=resolution)


def prepared_base(cfg: DermarayConfig) -> tuple[str, dict | None]:
    """(local folder of the base to adapt, pre-training losses or None)."""
    d, preset = cfg.diffusion, cfg.models.diffusion_base
    base = resolve_model("diffusion_base", preset, cfg.models.cache_dir) if preset in PRESETS["diffusion_base"] else preset
    if preset != "tiny" or d.pretrain.steps == 0:
        return base, None
    target = join(d.output, "base")
    if is_remote(target):
        raise ValueError("diffusion.output must be a local or shared path while the tiny base is pre-trained here")
    if Path(target, "model_index.json").is_file():
        log.info("diffusion: reusing the pre-trained base at %s", target)
        return absolute(target), json.loads(Path(target, "pretrain.json").read_text())
    table = read_parquet(d.input, cfg.storage_options, columns=["split", "image_bytes", "diagnosis", "area_mm2"])
    rows = table.filter(pc.equal(table["split"], "train")).to_pylist()
    rows = random.Random(d.train.seed).sample(rows, min(len(rows), d.pretrain.max_images))
    log.info("diffusion: pre-training the tiny base on %d lesions for %d steps", len(rows), d.pretrain.steps)
    with tempfile.TemporaryDirectory(dir=Path(target).parent if Path(target).parent.exists() else None) as staging:
        losses = ray.get(pretrain_task.options(num_cpus=d.train.cpus_per_worker).remote(
            base, staging, rows, d.pretrain.model_dump(), d.size_words, d.resolution, d.train.seed))
        Path(staging, "pretrain.json").write_text(json.dumps(losses))
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(staging).rename(target)  # whole or absent: a folder with model_index.json is complete
    return absolute(target), losses


# --- The LoRA task, run on the Ray Train workers --------------------------------------------------


def build(config: dict) -> DiffusionObjective:
    pipe = load_pipeline(config["base"])
    add_lora(pipe.unet, rank=config["rank"], alpha=config["alpha"], targets=tuple(config["targets"]), seed=config["seed"])
    return DiffusionObjective(pipe, "lora")


def batch_loss(model: torch.nn.Module, batch: dict, config: dict) -> torch.Tensor:
    return model(batch[PIXELS], batch[IDS])["loss"]


@torch.no_grad()
def evaluate(model: DiffusionObjective, shard: Any, config: dict, device: torch.device) -> dict[str, float]:
    """Validation denoising loss with fixed noise, so epochs compare like with like."""
    generator, losses = torch.Generator(device="cpu").manual_seed(1234), []
    for batch in shard.iter_torch_batches(batch_size=64, device=device):
        losses.append(float(model(batch[PIXELS], batch[IDS], generator=generator)["loss"]))
    return {"val_loss": float(np.mean(losses))} if losses else {}


def save(folder: Path, model: DiffusionObjective, config: dict) -> None:
    save_lora(model.unet, folder)
    settings = {k: config[k] for k in ("base_name", "rank", "alpha", "targets", "resolution", "size_words")}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))


def load(folder: Path, model: DiffusionObjective) -> None:
    load_lora_state(model.unet, read_lora(folder))


LORA = Task(build=build, loss=batch_loss, evaluate=evaluate, save=save, load=load)


# --- On the driver ----------------------------------------------------------------------------


def split_ids(d: DiffusionConfig, storage_options: dict) -> dict[str, dict[str, list[str]]]:
    """{diagnosis: {split: lesion ids, sorted}} for train and val; the first `limit` of each split when set."""
    table = read_parquet(d.input, storage_options, columns=["lesion_id", "split", "diagnosis"])
    rows = sorted(zip(table["lesion_id"].to_pylist(), table["split"].to_pylist(), table["diagnosis"].to_pylist()))
    ids: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "val"):
        chosen = [(i, code) for i, s, code in rows if s == split][: d.limit]
        for i, code in chosen:
            ids.setdefault(code, {"train": [], "val": []})[split].append(i)
    return ids


def split_dataset(d: DiffusionConfig, split: str, ids: list[str], base: str, resolution: int, storage_options: dict) -> ray.data.Dataset:
    columns = ["lesion_id", "split", "image_bytes", "diagnosis", "area_mm2"]
    every_row = d.adapters == "shared" and d.limit is None  # no id set to ship to the actors
    only = None if every_row else set(ids)
    notes = (d.notes, storage_options) if d.notes else None
    return split_inputs(d.input, columns, split, DiffusionInputs, (base, resolution, d.size_words, only, notes), storage_options,
                        d.train.materialize, max(2, 2 * d.train.num_workers))


def train_adapter(cfg: DermarayConfig, base: str, resolution: int, ids: dict[str, list[str]], run_name: str, name: str) -> dict:
    """One adapter on these lesions (Ray Train run `run_name`), exported to `<output>/<name>`; its summary."""
    d, options = cfg.diffusion, cfg.storage_options
    if not ids["train"]:
        raise ValueError(f"{d.input} has no training-split lesions for adapter {name}")
    datasets = {s: split_dataset(d, s, ids[s], base, resolution, options) for s in ("train", "val")}
    config = {"base": base, "base_name": cfg.models.diffusion_base, "rank": d.lora_rank, "alpha": d.lora_alpha,
              "targets": list(d.lora_targets), "seed": d.train.seed, "resolution": resolution, "size_words": d.size_words}
    checkpoint, history = fit(LORA, config, d.train, datasets, len(ids["train"]), d.output, run_name, options)
    return {"adapter": export_model(checkpoint, d.output, options, name=name), "lesions_train": len(ids["train"]),
            "epochs": history[-1]["epoch"], "steps": history[-1]["step"],
            "resumed_from_epoch": history[-1]["started_at_epoch"], "resumed_from_step": history[-1]["started_at_step"],
            "final": history[-1], "history": history}


def run(cfg: DermarayConfig) -> dict:
    d, options = cfg.diffusion, cfg.storage_options
    require(d.input, options)
    init_ray(cfg.ray)
    started = time.perf_counter()
    base, pretrain_losses = prepared_base(cfg)
    resolution = d.resolution or native_resolution(load_pipeline(base))
    by_class = split_ids(d, options)
    if d.notes:
        with_note = set(lesion_notes(d.notes, options))
        in_splits = {i for split in by_class.values() for ids in split.values() for i in ids}
        log.info("diffusion: captions with the lesion's note for %d of %d lesions (the rest: diagnosis caption only)",
                 len(in_splits & with_note), len(in_splits))
    summary: dict[str, Any] = {"base": base, "pretrain": pretrain_losses, "resolution": resolution, "adapters": d.adapters}
    if d.adapters == "shared":
        ids = {s: sorted(i for split in by_class.values() for i in split[s]) for s in ("train", "val")}
        summary.update(train_adapter(cfg, base, resolution, ids, d.run_name, SHARED_ADAPTER))
    else:
        unknown = sorted(set(d.diagnoses or ()) - set(by_class))
        if unknown:
            raise ValueError(f"diffusion.diagnoses {unknown} have no lesions in {d.input}; it has {sorted(by_class)}")
        summary["per_diagnosis"] = {}
        for code, ids in sorted(by_class.items()):
            if d.diagnoses is not None and code not in d.diagnoses:
                continue
            log.info("diffusion: adapter for %s on %d training lesions", code, len(ids["train"]))
            summary["per_diagnosis"][code] = train_adapter(cfg, base, resolution, ids, f"{d.run_name}-{code}", f"{PER_DIAGNOSIS_ADAPTERS}/{code}")
    summary["seconds_this_run"] = round(time.perf_counter() - started, 2)
    write_summary(join(d.output, "diffusion_summary.json"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.diffusion"))
