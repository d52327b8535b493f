"""LoRA adapters on Stable Diffusion that turn a diagnosis into reference images, trained with Ray Train.

    python -m jobs.diffusion --config configs/local.yaml diffusion.input=s3://bucket/ingest/clinic/lesions

1. A random `tiny` base would only make noise, so it is first pre-trained on the training-split
   lesions in one Ray task (the VAE, then the UNet on cached latents) and saved with
   `save_pretrained` to `<output>/base`; hub bases (SD 1.5) skip this. With
   `diffusion.pretrain.ip_adapter_steps`, an IP-Adapter is trained on it too (`<output>/base/ip_adapter`).
   Its captions leave the diagnosis out by default ("a dermoscopic photo of large lesion"): the
   base knows what a lesion looks like, not which diagnosis it is, like a general-purpose base.
2. LoRA adapters on the UNet (its attention, or `diffusion.lora_targets`) learn the diagnoses from class captions ("a dermoscopic
   photo of large melanoma, skin lesion"): one shared adapter for every diagnosis, or one per
   diagnosis (`diffusion.adapters`). Ray Data encodes every training image's latent posterior
   once (the base's VAE, in the preprocessing actors; kept across epochs with
   `train.materialize`, in one pass for all the per-diagnosis adapters). Each adapter is a
   `TorchTrainer` run over those shards with a checkpoint per epoch (and every
   `train.checkpoint_every_steps` steps) holding the adapter file, optimizer and schedule; a
   re-run with the same run name resumes with the adapter weights restored exactly.
3. Adapters are exported through diffusers' `save_lora_weights` to `<output>/adapter` or
   `<output>/adapters/<code>` (`pytorch_lora_weights.safetensors`), loadable with
   `pipe.load_lora_weights(folder)`.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import torch

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, DiffusionConfig, ModelsConfig
from dermaray.diffusion.base import base_resolution, prepared_base_uri
from dermaray.diffusion.captions import caption, lesion_size_word
from dermaray.diffusion.pipeline import (
    DiffusionObjective,
    add_lora,
    encode_latents,
    image_tensor,
    load_lora_state,
    load_pipeline,
    pretrain_base,
    read_lora,
    save_lora,
    tokenize,
)
from dermaray.images import decode_rgb
from dermaray.layout import PER_DIAGNOSIS_ADAPTERS, SHARED_ADAPTER, summary_uri
from dermaray.models.registry import get_preset, model_folder, resolve_model
from dermaray.schema import written_notes
from dermaray.storage import (
    absolute,
    exists,
    join,
    read_bytes,
    read_parquet,
    remove_tree,
    require,
    table_version,
    upload_folder,
)
from jobs.common import clear_summary, init_ray, log, reporting, write_summary
from jobs.training import RUNS, Task, export_model, fit, prepared_splits

LATENTS, IDS = "latent_posteriors", "input_ids"
DIAGNOSIS = "diagnosis"  # prepared rows tagged with it while every per-diagnosis adapter's lesions share one pass
SETTINGS_FILE = "adapter.json"
# Written last into <output>/base: the pre-trained base is complete. It holds the losses and the settings the base
# was made with (`pretrain_settings`), so a run with other settings trains it again instead of reusing it.
PRETRAIN_FILE = "pretrain.json"


def lesion_caption(diagnosis: str | None, lesion: dict[str, Any], size_words: bool) -> str:
    """The lesion's training caption; `diagnosis` None leaves the diagnosis out (base pre-training). `lesion`: its
    long_diam_mm and area_mm2, sized as its note is (lesion_size_word)."""
    return caption(diagnosis, lesion_size_word(lesion) if size_words else None)


def lesion_notes(uri: str, storage_options: dict) -> dict[str, str]:
    """{lesion id: note} of a notes Parquet (jobs.notes), notes written without error only."""
    notes = written_notes(read_parquet(uri, storage_options, columns=["lesion_id", "note", "error"]))
    return dict(zip(notes["lesion_id"].to_pylist(), notes["note"].to_pylist(), strict=True))


class DiffusionInputs:
    """Lesion rows -> latent posteriors of the base's VAE (`encode_latents`) and caption token ids."""

    def __init__(
        self,
        base: str,
        models: ModelsConfig,
        storage_options: dict,
        resolution: int,
        size_words: bool,
        only: set[str] | None = None,
        notes: str | None = None,
        tag_diagnosis: bool = False,
    ):
        # `base`: a preset or the pre-trained base's URI, fetched on this node; `only`: the lesion ids to
        # keep (a split's first `limit`, or the adapters' lesions); `notes`: a notes URI: each lesion's
        # note follows its caption; `tag_diagnosis`: each output row keeps its diagnosis (DIAGNOSIS)
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        with tempfile.TemporaryDirectory(prefix="diffusion-base-") as scratch:
            folder = model_folder("diffusion_base", base, models, storage_options, scratch)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.resolution, self.size_words, self.only, self.tag_diagnosis = resolution, size_words, only, tag_diagnosis
        self.notes = lesion_notes(notes, storage_options) if notes else {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Class captions need the diagnosis: a lesion without one trains no adapter (split_ids counts them).
        keep = np.array(
            [
                code is not None and (self.only is None or i in self.only)
                for i, code in zip(batch["lesion_id"], batch["diagnosis"], strict=True)
            ],
            dtype=bool,
        )
        if not keep.all():
            batch = {k: v[keep] for k, v in batch.items()}
            if not keep.any():
                side = self.resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))
                empty = (0, 2 * self.vae.config.latent_channels, side, side)
                return self.tagged(
                    {LATENTS: np.zeros(empty, np.float32), IDS: np.zeros((0, self.tokenizer.model_max_length), np.int64)}, batch
                )
        images = [decode_rgb(b) for b in batch["image_bytes"]]
        lengths = batch.get("long_diam_mm", np.full(len(batch["diagnosis"]), np.nan))  # without it: sized by the area
        captions = [
            lesion_caption(d, {"long_diam_mm": n, "area_mm2": a}, self.size_words)
            for d, n, a in zip(batch["diagnosis"], lengths, batch["area_mm2"], strict=True)
        ]
        # The tokenizer cuts captions at the text encoder's length (77 tokens for CLIP): the
        # diagnosis words come first so they always survive.
        captions = [f"{c}, {self.notes[i]}" if i in self.notes else c for c, i in zip(captions, batch["lesion_id"], strict=True)]
        posteriors = encode_latents(self.vae, image_tensor(images, self.resolution))
        return self.tagged({LATENTS: posteriors.numpy(), IDS: tokenize(self.tokenizer, captions).numpy()}, batch)

    def tagged(self, out: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`out` for the kept rows `batch`, with each row's diagnosis when asked (`tag_diagnosis`)."""
        return {**out, DIAGNOSIS: np.asarray(batch["diagnosis"], dtype=str)} if self.tag_diagnosis else out


# --- Base pre-training (tiny presets only) ------------------------------------------------------


@ray.remote(num_returns="streaming", max_calls=1)  # a worker of its own: see jobs.common.reporting
def pretrain_task(
    models: ModelsConfig, target: str, storage_options: dict, rows: list[dict], settings: dict
) -> Iterator[tuple[str, Any]]:
    """Pre-train the tiny base on this node as `settings` (`pretrain_settings`) say and write it to `target` (any
    URI), PRETRAIN_FILE (its losses and those settings) last.

    Yields ("log", line) as it goes (the step losses, every 50 steps), then ("result", the losses)."""

    def work() -> dict:
        p = settings["pretrain"]
        images = [decode_rgb(r["image_bytes"]) for r in rows]
        with_diagnosis = p["captions"] == "diagnosis"
        captions = [lesion_caption(r["diagnosis"] if with_diagnosis else None, r, settings["size_words"]) for r in rows]
        with tempfile.TemporaryDirectory(prefix="diffusion-base-") as staging:
            losses = pretrain_base(
                resolve_model("diffusion_base", models.diffusion_base, models),
                staging,
                images,
                captions,
                vae_steps=p["vae_steps"],
                unet_steps=p["unet_steps"],
                batch_size=p["batch_size"],
                lr=p["lr"],
                seed=settings["seed"],
                caption_dropout=settings["caption_dropout"],
                snr_gamma=settings["snr_gamma"],
                noise_offset=settings["noise_offset"],
                zero_terminal_snr=p["zero_terminal_snr"],
                resolution=settings["resolution"],
                ip_adapter_steps=p["ip_adapter_steps"],
            )
            Path(staging, PRETRAIN_FILE).write_text(json.dumps({"losses": losses, "settings": settings}, indent=2))
            upload_folder(staging, target, storage_options, last=PRETRAIN_FILE)
        return losses

    yield from reporting(work, pretrain_base.__module__)


def pretrain_settings(cfg: DermarayConfig) -> dict:
    """Everything the pre-trained tiny base is made from, as JSON values (compared with a saved base's record)."""
    d = cfg.diffusion
    settings = {
        "base_recipe": get_preset("diffusion_base", "tiny").version,  # the random base it starts from
        "input": absolute(d.input),
        "input_version": table_version(d.input, cfg.storage_options),  # the same path re-ingested is other data
        "pretrain": d.pretrain.model_dump(),
        "size_words": d.size_words,
        "resolution": d.resolution,
        "seed": d.train.seed,
        "caption_dropout": d.caption_dropout,
        "snr_gamma": d.snr_gamma,
        "noise_offset": d.noise_offset,
    }
    return json.loads(json.dumps(settings))


def prepared_base(cfg: DermarayConfig) -> tuple[str, dict | None]:
    """(the base to adapt: a preset, or the URI of the pre-trained tiny base; pre-training losses or None).

    A base already at the target is reused only when it was made with this run's `pretrain_settings`; otherwise
    it is trained again, so changing e.g. `diffusion.pretrain.vae_steps` never silently keeps the old base.
    Every process that needs the base fetches it on its own node from there."""
    d, options = cfg.diffusion, cfg.storage_options
    target = prepared_base_uri(cfg)
    if target == cfg.models.diffusion_base:
        return target, None
    settings = pretrain_settings(cfg)
    if exists(join(target, PRETRAIN_FILE), options):
        record = json.loads(read_bytes(join(target, PRETRAIN_FILE), options))
        made_with = record.get("settings") or {}  # a record without settings: written before they were kept
        if made_with == settings:
            log.info("diffusion: reusing the pre-trained base at %s", target)
            return target, record["losses"]
        changed = sorted(k for k in settings if made_with.get(k) != settings[k])
        log.warning("diffusion: the base at %s was pre-trained with other %s; pre-training it again", target, changed)
    table = read_parquet(d.input, options, columns=["split", "image_bytes", "diagnosis", "area_mm2", "long_diam_mm"])
    rows = table.filter(pc.equal(table["split"], "train")).to_pylist()
    rows = random.Random(d.train.seed).sample(rows, min(len(rows), d.pretrain.max_images))
    log.info(
        "diffusion: pre-training the tiny base on %d lesions: %d VAE steps, then %d UNet and %d IP-Adapter steps on "
        "cached latents",
        len(rows),
        d.pretrain.vae_steps,
        d.pretrain.unet_steps,
        d.pretrain.ip_adapter_steps,
    )
    remove_tree(target, options)  # an earlier run's partial upload (no PRETRAIN_FILE), or a base made otherwise
    # No earlier adapter run adapted the base made now: resuming one would carry its weights over to this base.
    remove_tree(join(d.output, RUNS), options)
    stream = pretrain_task.options(num_cpus=d.train.cpus_per_worker).remote(cfg.models, target, options, rows, settings)
    losses = None
    for ref in stream:  # the worker's progress as it goes: minutes of pre-training are not silent on the driver
        kind, value = ray.get(ref)
        if kind == "log":
            log.info("diffusion: %s", value)
        else:
            losses = value
    return target, losses


# --- The LoRA task, run on the Ray Train workers --------------------------------------------------


def build(config: dict) -> DiffusionObjective:
    with tempfile.TemporaryDirectory(prefix="diffusion-base-") as scratch:  # weights are in memory once loaded
        pipe = load_pipeline(
            model_folder("diffusion_base", config["base"], ModelsConfig(**config["models"]), config["storage_options"], scratch)
        )
    add_lora(pipe.unet, rank=config["rank"], alpha=config["alpha"], targets=tuple(config["targets"]), seed=config["seed"])
    return DiffusionObjective(pipe, "lora", config["caption_dropout"], config["snr_gamma"], config["noise_offset"])


def batch_loss(model: torch.nn.Module, batch: dict, config: dict) -> torch.Tensor:
    return model(batch[LATENTS], batch[IDS])["loss"]


@torch.no_grad()
def evaluate(model: DiffusionObjective, shard: Any, config: dict, device: torch.device) -> dict[str, float]:
    """Validation denoising loss with fixed noise and no caption dropout, so epochs compare like with like."""
    generator, losses = torch.Generator(device="cpu").manual_seed(1234), []
    model.eval()  # the training loop sets train() again at each epoch's start
    for batch in shard.iter_torch_batches(batch_size=64, device=device):
        losses.append(float(model(batch[LATENTS], batch[IDS], generator=generator)["loss"]))
    return {"val_loss": float(np.mean(losses))} if losses else {}


def save(folder: Path, model: DiffusionObjective, config: dict) -> None:
    save_lora(model.unet, folder)
    settings = {k: config[k] for k in ("base_name", "rank", "alpha", "targets", "resolution", "size_words")}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))


def load(folder: Path, model: DiffusionObjective) -> None:
    load_lora_state(model.unet, read_lora(folder))


LORA = Task(build=build, loss=batch_loss, evaluate=evaluate, save=save, load=load)


# --- On the driver ----------------------------------------------------------------------------


def split_ids(d: DiffusionConfig, storage_options: dict) -> tuple[dict[str, dict[str, list[str]]], dict[str, int]]:
    """({diagnosis: {split: lesion ids, sorted}}, {split: lesions without a diagnosis}) for train and val.

    Lesions without a diagnosis (most of ISIC 2024) are left out of every adapter and counted; `limit`
    takes the first lesions with a diagnosis of each split."""
    table = read_parquet(d.input, storage_options, columns=["lesion_id", "split", "diagnosis"])
    rows = sorted(zip(table["lesion_id"].to_pylist(), table["split"].to_pylist(), table["diagnosis"].to_pylist(), strict=True))
    ids: dict[str, dict[str, list[str]]] = {}
    unlabelled = {}
    for split in ("train", "val"):
        in_split = [(i, code) for i, s, code in rows if s == split]
        unlabelled[split] = sum(code is None for _, code in in_split)
        for i, code in [(i, code) for i, code in in_split if code is not None][: d.limit]:
            ids.setdefault(code, {"train": [], "val": []})[split].append(i)
    return ids, unlabelled


def split_datasets(
    d: DiffusionConfig,
    ids: dict[str, list[str]],
    base: str,
    models: ModelsConfig,
    resolution: int,
    storage_options: dict,
    tag_diagnosis: bool = False,
) -> dict[str, ray.data.Dataset]:
    """{split: the latents and caption ids of its lesions `ids[split]`} (and each row's diagnosis: `tag_diagnosis`)."""
    columns = ["lesion_id", "split", "image_bytes", "diagnosis", "area_mm2", "long_diam_mm"]
    every_row = d.adapters == "shared" and d.limit is None  # no id set to ship to the actors
    only = None if every_row else {i for split_ids in ids.values() for i in split_ids}
    args = (base, models, storage_options, resolution, d.size_words, only, d.notes, tag_diagnosis)
    return prepared_splits(
        d.input, columns, tuple(ids), DiffusionInputs, args, storage_options, d.train.materialize, max(2, 2 * d.train.num_workers)
    )


def rows_of(code: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch[DIAGNOSIS] == code
    return {k: v[keep] for k, v in batch.items() if k != DIAGNOSIS}


def per_diagnosis_datasets(
    d: DiffusionConfig, by_code: dict[str, dict[str, list[str]]], base: str, models: ModelsConfig, resolution: int, options: dict
) -> dict[str, dict[str, ray.data.Dataset]]:
    """{diagnosis: {split: its adapter's dataset}} for the adapters `by_code` ({diagnosis: {split: lesion ids}}).

    Materialized: the table is read and every adapter's lesions encoded in one pass, then each diagnosis' rows are
    kept from it (the pass itself is freed once they are); every adapter's rows then wait in the object store
    until that adapter trains. Streamed: one pipeline per adapter reading its own lesions, run as that adapter
    trains (one pass over every lesion would encode them all for each adapter)."""
    if not d.train.materialize:
        return {code: split_datasets(d, ids, base, models, resolution, options) for code, ids in by_code.items()}
    every = {s: [i for ids in by_code.values() for i in ids[s]] for s in ("train", "val")}
    prepared = split_datasets(d, every, base, models, resolution, options, tag_diagnosis=True)
    return {
        code: {s: ds.map_batches(partial(rows_of, code), batch_format="numpy").materialize() for s, ds in prepared.items()}
        for code in by_code
    }


def train_adapter(
    cfg: DermarayConfig,
    base: str,
    resolution: int,
    ids: dict[str, list[str]],
    run_name: str,
    name: str,
    datasets: dict[str, ray.data.Dataset] | None = None,
) -> dict:
    """One adapter on these lesions (Ray Train run `run_name`; `datasets`: their prepared splits, made here when
    None), exported to `<output>/<name>`; its summary."""
    d, options = cfg.diffusion, cfg.storage_options
    if not ids["train"]:
        raise ValueError(f"{d.input} has no training-split lesions for adapter {name}")
    if datasets is None:
        datasets = split_datasets(d, {s: ids[s] for s in ("train", "val")}, base, cfg.models, resolution, options)
    config = {
        "base": base,
        "base_name": cfg.models.diffusion_base,
        "models": cfg.models.model_dump(),
        "storage_options": options,
        "rank": d.lora_rank,
        "alpha": d.lora_alpha,
        "targets": list(d.lora_targets),
        "seed": d.train.seed,
        "resolution": resolution,
        "size_words": d.size_words,
        "caption_dropout": d.caption_dropout,
        "snr_gamma": d.snr_gamma,
        "noise_offset": d.noise_offset,
    }
    started = time.perf_counter()
    checkpoint, history = fit(LORA, config, d.train, datasets, len(ids["train"]), d.output, run_name, options)
    return {
        "seconds": round(time.perf_counter() - started, 2),  # the Ray Train run's, start to last checkpoint
        "adapter": export_model(checkpoint, d.output, options, name=name),
        "lesions_train": len(ids["train"]),
        "epochs": history[-1]["epoch"],
        "steps": history[-1]["step"],
        "resumed_from_epoch": history[-1]["started_at_epoch"],
        "resumed_from_step": history[-1]["started_at_step"],
        "final": history[-1],
        "history": history,
    }


def run(cfg: DermarayConfig) -> dict:
    d, options = cfg.diffusion, cfg.storage_options
    clear_summary(summary_uri(d.output, "diffusion"), options)
    require(d.input, options)
    init_ray(cfg.ray)
    started = time.perf_counter()
    base, pretrain_losses = prepared_base(cfg)
    resolution = d.resolution or base_resolution(base, cfg.models, options)
    by_class, unlabelled = split_ids(d, options)
    if any(unlabelled.values()):
        log.info("diffusion: %s lesions without a diagnosis (train, val) left out of every adapter", unlabelled)
    if d.notes:
        with_note = set(lesion_notes(d.notes, options))
        in_splits = {i for split in by_class.values() for ids in split.values() for i in ids}
        log.info(
            "diffusion: captions with the lesion's note for %d of %d lesions (the rest: diagnosis caption only)",
            len(in_splits & with_note),
            len(in_splits),
        )
    summary: dict[str, Any] = {
        "base": base,
        "pretrain": pretrain_losses,
        "resolution": resolution,
        "adapters": d.adapters,
        "lesions_without_diagnosis": unlabelled,
    }  # excluded from every adapter, not captioned
    if d.adapters == "shared":
        ids = {s: sorted(i for split in by_class.values() for i in split[s]) for s in ("train", "val")}
        summary.update(train_adapter(cfg, base, resolution, ids, d.run_name, SHARED_ADAPTER))
    else:
        unknown = sorted(set(d.diagnoses or ()) - set(by_class))
        if unknown:
            raise ValueError(f"diffusion.diagnoses {unknown} have no lesions in {d.input}; it has {sorted(by_class)}")
        wanted = {code: ids for code, ids in sorted(by_class.items()) if d.diagnoses is None or code in d.diagnoses}
        summary["skipped"] = {
            code: {"lesions_train": len(ids["train"]), "reason": f"fewer than {d.min_lesions} training lesions"}
            for code, ids in wanted.items()
            if len(ids["train"]) < d.min_lesions
        }
        if summary["skipped"]:
            log.info(
                "diffusion: no adapter for %s (fewer than diffusion.min_lesions=%d training lesions)",
                {c: s["lesions_train"] for c, s in summary["skipped"].items()},
                d.min_lesions,
            )
        if len(summary["skipped"]) == len(wanted):
            counts = {c: s["lesions_train"] for c, s in summary["skipped"].items()}
            raise ValueError(
                f"no diagnosis in {d.input} has diffusion.min_lesions={d.min_lesions} training lesions ({counts}); "
                "lower it or use diffusion.adapters=shared"
            )
        trained = {code: ids for code, ids in wanted.items() if code not in summary["skipped"]}
        datasets = per_diagnosis_datasets(d, trained, base, cfg.models, resolution, options)
        summary["per_diagnosis"] = {}
        for code, ids in trained.items():
            log.info("diffusion: adapter for %s on %d training lesions", code, len(ids["train"]))
            summary["per_diagnosis"][code] = train_adapter(
                cfg, base, resolution, ids, f"{d.run_name}-{code}", f"{PER_DIAGNOSIS_ADAPTERS}/{code}", datasets.pop(code)
            )
    summary["seconds_this_run"] = round(time.perf_counter() - started, 2)
    write_summary(summary_uri(d.output, "diffusion"), summary, options)
    return summary


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.diffusion"))
