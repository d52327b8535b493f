"""Ray Train step throughput as a ratio to a bare PyTorch loop on the same model, measured in one run.

    .venv/bin/python benchmarks/train_throughput.py --lesions 4000 --epochs 10

Both train the grounding model (tiny preset, whole tower tuned) on the same decoded pixels with
the same batch size, optimizer, schedule, augmentation and number of threads; the bare loop
indexes tensors in memory, Ray Train reads its shard through Ray Data. Steps/s count only the
training epochs (model load, Ray Train start-up and validation excluded; start-up is printed
apart). The bare loop runs before and after Ray Train and their mean is the baseline.
Goal: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import ray
import torch

from dermaray.config import ModelsConfig, load_config
from dermaray.grounding.data import PIXELS, TARGETS
from dermaray.grounding.model import GroundingModel, GroundingSettings, augment, loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ lives in the repository, not in site-packages
from jobs import ingest, synth
from jobs.common import init_ray
from jobs.grounding import GROUNDING, fit_scaler, split_datasets
from jobs.training import fit, warmup_cosine


def bare_loop(
    settings: GroundingSettings,
    models: ModelsConfig,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    epochs: int,
    lr: float,
    total_steps: int,
) -> float:
    """Steps per second of a plain single-process loop over in-memory tensors."""
    torch.manual_seed(0)
    model = GroundingModel.from_settings(settings, models).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, 0.05))
    weights = torch.ones(targets.shape[1])
    steps, seconds = 0, 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(pixels))
        for start in range(0, len(pixels), batch_size):
            index = order[start : start + batch_size]
            loss = loss_fn(model(augment(pixels[index]))["attributes"], targets[index], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
        seconds += time.perf_counter() - started
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads: the Ray Train worker's CPUs too")
    parser.add_argument("--workdir", default="/tmp/dermaray-bench")
    args = parser.parse_args()
    source, canonical = f"{args.workdir}/synthetic-{args.lesions}-128px", f"{args.workdir}/ingest-{args.lesions}"
    cfg = load_config(
        None,
        [
            f"synth.n_lesions={args.lesions}",
            f"synth.output={source}",
            "synth.shard_size=250",
            f"ingest.input={source}",
            f"ingest.output={canonical}",
            f"grounding.input={canonical}/lesions",
            f"grounding.output={args.workdir}/grounding-bench",
            "grounding.tune=full",
            f"grounding.train.epochs={args.epochs}",
            f"grounding.train.batch_size={args.batch_size}",
            f"grounding.train.cpus_per_worker={args.threads}",
            f"ray.num_cpus={args.threads}",
        ],
    )
    init_ray(cfg.ray)
    if not os.path.exists(f"{source}/synth_manifest.json"):
        synth.run(cfg)  # data preparation, not timed
    if not os.path.exists(f"{canonical}/lesions"):
        ingest.run(cfg)

    g, tc = cfg.grounding, cfg.grounding.train
    settings = GroundingSettings(model=cfg.models.grounding_mllm, attributes=list(g.attributes), tune="full")
    scaler, counts = fit_scaler(g, {})
    prepared = split_datasets(g.input, ("train", "val"), settings.model, cfg.models, scaler, {}, materialize=True)
    train, val = prepared["train"], prepared["val"]
    columns = train.take_batch(batch_size=counts["train"], batch_format="numpy")
    pixels, targets = torch.as_tensor(columns[PIXELS]), torch.as_tensor(columns[TARGETS])
    steps_per_epoch = -(-counts["train"] // args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    torch.set_num_threads(args.threads)
    bare_before = bare_loop(settings, cfg.models, pixels, targets, args.batch_size, args.epochs, tc.lr, total_steps)
    config = {
        "settings": settings.model_dump(),
        "scaler": asdict(scaler),
        "weights": [1.0] * len(g.attributes),
        "models": cfg.models.model_dump(),
    }
    started = time.perf_counter()
    _, history = fit(
        GROUNDING, config, tc, {"train": train, "val": val}, counts["train"], g.output, f"bench-{time.time_ns()}", {}
    )
    wall = time.perf_counter() - started
    bare_after = bare_loop(settings, cfg.models, pixels, targets, args.batch_size, args.epochs, tc.lr, total_steps)

    train_seconds = sum(h["train_seconds"] for h in history)
    ray_rate = history[-1]["step"] / train_seconds
    later = history[1:]  # the first epoch also starts Ray Data's split coordinator and iterators
    later_rate = (
        sum(b["step"] - a["step"] for a, b in pairwise(history)) / sum(h["train_seconds"] for h in later)
        if later
        else float("nan")
    )
    baseline = (bare_before + bare_after) / 2
    print(
        f"data: {counts['train']} training lesions, batch {args.batch_size}, "
        f"{args.epochs} epochs = {total_steps} steps, {args.threads} threads"
    )
    print(f"bare PyTorch loop: {bare_before:.1f} / {bare_after:.1f} steps/s (before / after)")
    print(
        f"Ray Train: {ray_rate:.1f} steps/s in training epochs ({train_seconds:.1f} s); "
        f"fit() wall {wall:.1f} s incl. start-up and validation"
    )
    print(
        f"Ray Train after the first epoch: {later_rate:.1f} steps/s; per epoch: "
        + ", ".join(
            f"{(h['step'] - (e['step'] if e else 0)) / h['train_seconds']:.1f}"
            for h, e in zip(history, [None, *history], strict=False)
        )
    )
    print(
        f"ratio Ray Train / bare = {ray_rate / baseline:.2f} over all epochs, "
        f"{later_rate / baseline:.2f} after the first  (goal >= 0.9)"
    )
    ray.shutdown()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
