"""How closely the tiny VAE's round trip keeps a guide's lesion area, and its diagnosis, as its training goes on.

    make study    # once (or any workdir with an ingested clinic table and a classifier)
    .venv/bin/python benchmarks/vae_ceiling.py --lesions out/study/ingest/clinic/lesions --steps 1000   # ~5 min
    .venv/bin/python benchmarks/vae_ceiling.py --lesions out/study/ingest/clinic/lesions --steps 1600 --every 400 \
        --judge out/study/classifier/model                                                              # ~10 min

Image-guided generation returns its guide through the VAE at best (strength -> 0), so the Spearman between each
held-out guide's area and its round trip's (`lesion_area_mm2` on the pixels, at the generation size) caps every
guided result. Every generated image is a decode of the same VAE, so with `--judge` (a diagnosis classifier, as
`jobs.diffusion_eval` judges with) the judge's accuracy on the guides' round trips, beside its accuracy on the
guides themselves, caps what any adapter on that VAE can score. The VAE is the tiny preset's, trained from scratch
as the base's pre-training does (`vae_step_loss`, AdamW, random batches of training-split tiles); the guides are
the evaluation's (up to 16 held-out lesions per diagnosis). Prints the figure every `--every` steps, and the area
estimator's own Spearman against the recorded `area_mm2` at that size, which is what the VAE is compared with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", required=True, help="an ingested lesion table (its train and test splits)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=4000, help="training-split tiles the VAE sees")
    parser.add_argument("--judge", help="a diagnosis classifier (jobs.classifier's model folder): class relevance too")
    args = parser.parse_args()

    import numpy as np
    import pyarrow.compute as pc
    import torch
    from scipy import stats

    from dermaray.config import ModelsConfig
    from dermaray.diffusion.evaluate import lesion_area_mm2
    from dermaray.diffusion.pipeline import image_tensor, load_pipeline, vae_round_trip, vae_step_loss
    from dermaray.grounding.data import CLASS_CODES
    from dermaray.images import decode_rgb
    from dermaray.models import resolve_model
    from dermaray.storage import read_parquet, take_parquet

    table = read_parquet(args.lesions, {}, columns=["split", "diagnosis", "area_mm2"])
    held_out = pc.fill_null(pc.and_(pc.equal(table["split"], "test"), pc.is_valid(table["diagnosis"])), False).to_numpy()
    rows = np.flatnonzero(held_out)
    labels = table["diagnosis"].to_numpy(zero_copy_only=False)[rows]
    guides_rows = [r for code in CLASS_CODES for r in rows[labels == code][:16]]
    size = (args.resolution, args.resolution)
    guides = [
        decode_rgb(b).resize(size)
        for b in take_parquet(args.lesions, guides_rows, {}, ["image_bytes"])["image_bytes"].to_pylist()
    ]
    areas = [lesion_area_mm2(g) for g in guides]
    judge, diagnoses = None, table["diagnosis"].to_numpy(zero_copy_only=False)[guides_rows].tolist()
    if args.judge:
        from dermaray.diffusion.evaluate import class_relevance
        from jobs.diffusion_eval import ImageJudge

        judge = ImageJudge(args.judge, ModelsConfig(), torch.device("cpu"))

        def judged(images: list) -> str:
            r = class_relevance(diagnoses, judge(images)[0])
            return f"{r['relevance']:.3f} ({', '.join(f'{c} {v:.2f}' for c, v in r['per_class'].items())})"

        print(f"the judge on the guides themselves: {judged(guides)}")
    recorded = table["area_mm2"].to_numpy()[guides_rows]
    print(
        f"{len(guides)} guides; the estimator at {args.resolution} px against recorded area: "
        f"{stats.spearmanr(areas, recorded).statistic:.3f}"
    )

    train = np.flatnonzero(pc.fill_null(pc.equal(table["split"], "train"), False).to_numpy())[: args.images]
    pixels = image_tensor(
        [decode_rgb(b) for b in take_parquet(args.lesions, train, {}, ["image_bytes"])["image_bytes"].to_pylist()],
        args.resolution,
    )
    pipe = load_pipeline(resolve_model("diffusion_base", "tiny", ModelsConfig()))
    vae = pipe.vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    generator, started = torch.Generator().manual_seed(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = vae_step_loss(pipe, pixels[torch.randint(0, len(pixels), (args.batch,), generator=generator)], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            vae.eval()
            round_trips = vae_round_trip(vae, guides, args.resolution)
            vae.train()
            trip = [lesion_area_mm2(image) for image in round_trips]
            print(
                f"step {step}: round-trip area Spearman {stats.spearmanr(areas, trip).statistic:.3f}, "
                + (f"the judge on the round trips {judged(round_trips)}, " if judge else "")
                + f"loss {float(loss.detach()):.4f}, {time.perf_counter() - started:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
