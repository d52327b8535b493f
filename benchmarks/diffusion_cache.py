"""Seconds per UNet training step: re-encoding every batch's images and captions vs cached latents and captions.

    .venv/bin/python benchmarks/diffusion_cache.py                # the tiny base at 32 px, batch 32
    .venv/bin/python benchmarks/diffusion_cache.py --resolution 64 --batch 16

Both arms train the same UNet on the same batches with the same optimizer, interleaved step by step
(re-encode, cached, re-encode, ...) so drift in the machine's load hits both alike. "Re-encode" is what
the LoRA job did before latents were cached: the VAE encodes the batch (no gradient) and the text
encoder encodes its captions at every step. Prints the median seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm, after 2 warm-up steps each")
    args = parser.parse_args()

    import torch

    from dermaray.config import ModelsConfig
    from dermaray.data.synthetic import synthesize_lesion
    from dermaray.diffusion.captions import caption
    from dermaray.diffusion.pipeline import (
        DiffusionObjective,
        _denoising_loss,
        encode_latents,
        encode_prompts,
        image_tensor,
        load_pipeline,
        tokenize,
    )
    from dermaray.images import decode_rgb
    from dermaray.models import resolve_model
    from dermaray.schema import DIAGNOSES

    code = {d.name: d.code for d in DIAGNOSES}
    rows = [synthesize_lesion(0, i, image_size=128) for i in range(args.batch)]
    images = [decode_rgb(jpeg) for _, jpeg, _, _ in rows]
    prompts = [caption(code[row["iddx_3"]]) for row, _, _, _ in rows]
    pipe = load_pipeline(resolve_model("diffusion_base", "tiny", ModelsConfig()))
    pixels, ids = image_tensor(images, args.resolution), tokenize(pipe.tokenizer, prompts)
    cached = DiffusionObjective(pipe, "unet")
    posteriors = encode_latents(pipe.vae, pixels)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def reencode() -> torch.Tensor:
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generator)
        return _denoising_loss(pipe, latents, encode_prompts(pipe, ids), generator)

    def from_cache() -> torch.Tensor:
        return cached(posteriors, ids, generator)["loss"]

    seconds: dict[str, list[float]] = {"re-encode": [], "cached": []}
    for step in range(args.steps + 2):
        for name, loss_of in (("re-encode", reencode), ("cached", from_cache)):
            started = time.perf_counter()
            loss = loss_of()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 2:
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"tiny base, {args.resolution} px, batch {args.batch}, {args.steps} steps each, interleaved")
    for name, median in medians.items():
        print(f"  {name:10s} {median:.3f} s/step")
    print(f"  re-encode / cached: {medians['re-encode'] / medians['cached']:.2f}x")


if __name__ == "__main__":
    main()
