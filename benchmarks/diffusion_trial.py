"""A diffusion trial in one process: the tiny base pre-trained in two stages, adapters, the evaluation.

    make run    # once: its lesion table and its classifier (the judge)
    .venv/bin/python benchmarks/diffusion_trial.py --lesions out/ingest/clinic/lesions --judge out/classifier/model \
        --images 1500 --vae-steps 200 --unet-steps 1500 --lora-steps 500 --out /tmp/diffusion-trial

The same core functions as `jobs.diffusion` and `jobs.diffusion_eval` (pretrain_base, DiffusionObjective on
cached latents, the evaluation's base / LoRA / image-guided runs), without Ray: for trying settings in
minutes before a study run. Prints the evaluation's Markdown; writes the grids beside the base and adapter.
`--per-diagnosis --targets all-layers` trains adapters as benchmarks/study.py does (one per diagnosis, the steps
split by its share of lesions), in `--out`/adapters/<code>. `--vae-from out/study/diffusion/base` keeps a study's
VAE and pre-trains the UNet alone (a UNet or adapter setting compared without the VAE's 9 minutes), e.g. the noise
schedule: `--images 4000 --unet-steps 1500 --per-diagnosis --targets all-layers --rank 16 --lora-steps 1536` against
the same with `--zero-terminal-snr` (README, Results: 15 minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from dermaray.config import DiffusionConfig, DiffusionEvalConfig, ModelsConfig

    trained, evaluated = DiffusionConfig(), DiffusionEvalConfig()  # the jobs' defaults, unless a flag says otherwise
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", required=True, help="an ingested lesion table (its train and test splits)")
    parser.add_argument("--judge", required=True, help="a diagnosis classifier (jobs.classifier's model folder)")
    parser.add_argument("--out", default="/tmp/diffusion-trial")
    parser.add_argument("--images", type=int, default=1500, help="training-split lesions used")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--lora-steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3, help="both pre-training stages and the adapter")
    parser.add_argument("--rank", type=int, default=trained.lora_rank)
    parser.add_argument(
        "--targets", choices=["attention", "all-layers"], default="attention", help="the UNet layers the adapter trains"
    )
    parser.add_argument(
        "--per-diagnosis", action="store_true", help="one adapter per diagnosis, the LoRA steps split by its share of lesions"
    )
    parser.add_argument("--caption-dropout", type=float, default=trained.caption_dropout)
    parser.add_argument("--noise-offset", type=float, default=trained.noise_offset, help="base and adapters (0: none)")
    parser.add_argument(
        "--zero-terminal-snr", action="store_true", help="the UNet on a schedule ending in pure noise, v-prediction"
    )
    parser.add_argument("--base", help="a base this script pre-trained before (its --out/base): skips pre-training")
    parser.add_argument("--vae-from", help="a pre-trained base whose VAE to keep (no VAE steps): pre-trains the UNet alone on it")
    parser.add_argument("--adapter", help="an adapter this script trained before (its --out/adapter): skips LoRA training")
    parser.add_argument("--images-per-class", type=int, default=evaluated.images_per_class)
    parser.add_argument("--steps", type=int, default=evaluated.steps, help="denoising steps per generated image")
    parser.add_argument("--guide-strength", type=float, default=evaluated.guide_strength)
    parser.add_argument("--guide-sweep", type=float, nargs="*", default=evaluated.guide_sweep, help="further strengths")
    args = parser.parse_args()
    if args.base and args.vae_from:
        parser.error("--base skips pre-training, so --vae-from would be ignored: give one of them")
    if args.base and args.zero_terminal_snr:
        parser.error("--base skips pre-training: its schedule is the one it was trained with (--zero-terminal-snr ignored)")
    # The evaluation's settings checked before minutes of pre-training (a strength that leaves no denoising step).
    DiffusionEvalConfig(steps=args.steps, guide_strength=args.guide_strength, guide_sweep=args.guide_sweep)

    import pyarrow.compute as pc
    import torch

    from dermaray.cli import setup_logging
    from dermaray.diffusion import pipeline as p
    from dermaray.diffusion.evaluate import markdown
    from dermaray.diffusion.ip_adapter import base_ip_adapter
    from dermaray.grounding.data import CLASS_CODES
    from dermaray.images import decode_rgb
    from dermaray.layout import PER_DIAGNOSIS_ADAPTERS, SHARED_ADAPTER
    from dermaray.models import resolve_model
    from dermaray.storage import read_parquet
    from jobs.diffusion import lesion_caption
    from jobs.diffusion_eval import _evaluate

    setup_logging()
    out = Path(args.out)
    table = read_parquet(args.lesions, {}, columns=["split", "image_bytes", "diagnosis", "area_mm2", "long_diam_mm"])
    train = table.filter(pc.equal(table["split"], "train")).to_pylist()
    rows = random.Random(0).sample(train, min(args.images, len(train)))
    started = time.perf_counter()
    base_dir, losses = Path(args.base) if args.base else out / "base", None
    if not args.base:
        base = resolve_model("diffusion_base", "tiny", ModelsConfig())
        if args.vae_from:  # the random tiny base with that VAE in its place; the UNet (and IP-Adapter) train anew
            staged = out / "tiny-with-vae"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(base, staged)
            shutil.rmtree(staged / "vae")
            shutil.copytree(Path(args.vae_from) / "vae", staged / "vae")
            base = str(staged)
        generic = [lesion_caption(None, r, True) for r in rows]  # the base never reads a diagnosis
        losses = p.pretrain_base(
            base,
            base_dir,
            [decode_rgb(r["image_bytes"]) for r in rows],
            generic,
            vae_steps=0 if args.vae_from else args.vae_steps,
            unet_steps=args.unet_steps,
            batch_size=args.batch,
            lr=args.lr,
            seed=0,
            caption_dropout=args.caption_dropout,
            snr_gamma=trained.snr_gamma,
            noise_offset=args.noise_offset,
            zero_terminal_snr=args.zero_terminal_snr,
            resolution=args.resolution,
            log_every=100,
        )
    pretrained = time.perf_counter()

    # jobs.diffusion's layout: <out>/adapter (shared) or <out>/adapters/<code>; trained afresh (a leftover adapter
    # from another run in the same folder would be evaluated in its place).
    trained_dir = out / (PER_DIAGNOSIS_ADAPTERS if args.per_diagnosis else SHARED_ADAPTER)
    adapter_dir, lora_loss = Path(args.adapter) if args.adapter else trained_dir, float("nan")
    if not args.adapter:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    targets = p.LORA_TARGETS_ALL_LAYERS if args.targets == "all-layers" else p.LORA_TARGETS

    def train_adapter(lesions: list[dict], steps: int, folder: Path) -> float:
        pipe = p.load_pipeline(base_dir)
        p.add_lora(pipe.unet, rank=args.rank, targets=targets, seed=0)
        posteriors = p.encode_latents(pipe.vae, p.image_tensor([decode_rgb(r["image_bytes"]) for r in lesions], args.resolution))
        ids = p.tokenize(pipe.tokenizer, [lesion_caption(r["diagnosis"], r, True) for r in lesions])
        model = p.DiffusionObjective(pipe, "lora", args.caption_dropout, trained.snr_gamma, args.noise_offset).train()
        generator = torch.Generator().manual_seed(1)
        loss = p.train_steps(
            "LoRA",
            p.lora_parameters(pipe.unet),
            lambda b: model(posteriors[b], ids[b], generator)["loss"],
            len(lesions),
            steps,
            args.batch,
            args.lr,
            generator,
            100,
        )
        p.save_lora(pipe, folder)
        return loss

    if not args.adapter and args.per_diagnosis:  # a diagnosis with fewer than diffusion.min_lesions gets none
        by_code = {c: [r for r in rows if r["diagnosis"] == c] for c in CLASS_CODES}
        losses_by_code = {
            c: train_adapter(mine, max(1, round(args.lora_steps * len(mine) / len(rows))), adapter_dir / c)
            for c, mine in by_code.items()
            if len(mine) >= trained.min_lesions
        }
        lora_loss = sum(losses_by_code.values()) / len(losses_by_code)
    elif not args.adapter:
        lora_loss = train_adapter(rows, args.lora_steps, adapter_dir)
    adapted = time.perf_counter()

    test = table.filter(pc.equal(table["split"], "test")).to_pylist()[:400]
    settings = {
        "resolution": args.resolution,
        "images_per_class": args.images_per_class,
        "seed": evaluated.seed,
        "steps": args.steps,
        "guidance_scale": evaluated.guidance_scale,
        "guide_strength": args.guide_strength,
        "guide_sweep": args.guide_sweep,
        "ip_adapter": (own := base_ip_adapter(base_dir)) and str(own),  # the base's own, if pre-training trained one
        "ip_adapter_scales": evaluated.ip_adapter_scales,
        "classes": [c for c in CLASS_CODES if c in {r["diagnosis"] for r in test}],
    }
    results = _evaluate(
        str(base_dir),
        str(adapter_dir),
        args.judge,
        ModelsConfig(),
        [r["image_bytes"] for r in test],
        [r["diagnosis"] for r in test],
        settings,
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, data in results.pop("grids").items():
        (out / f"grid_{name}.png").write_bytes(data)
    print(
        f"pre-training losses {losses}, LoRA loss {lora_loss:.4f}; seconds: pre-training "
        f"{pretrained - started:.0f}, LoRA {adapted - pretrained:.0f}, evaluation {time.perf_counter() - adapted:.0f}"
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
