"""A grounding variant tried in one process, in about 90 s on 2 cores: Spearman per attribute, in-domain and shifted;
R@1 over the untuned base (the study's "frozen") on the clinic's test split (or its val split: `--scored-split val`).

    .venv/bin/python benchmarks/grounding_trial.py --workdir out/study                     # the study's first arm
    .venv/bin/python benchmarks/grounding_trial.py --workdir out/study --feature-layer -2  # the tower's penultimate layer
    .venv/bin/python benchmarks/grounding_trial.py --workdir out/study --heads mlp --seed 1
    .venv/bin/python benchmarks/grounding_trial.py --workdir out --tower hidden_size=64 num_hidden_layers=4 \
        intermediate_size=128                                                              # a wider random tower
    .venv/bin/python benchmarks/grounding_trial.py --workdir out --weight eccentricity=4    # one attribute weighted more
    .venv/bin/python benchmarks/grounding_trial.py --workdir out/study --cnn               # a small CNN in the tower's place
    .venv/bin/python benchmarks/grounding_trial.py --workdir out/study --heads-read direction  # heads on the unit embedding

The study's first arm without Ray (the grounding job's model and batch loss: flips and quarter turns, photometric
views; AdamW with warm-up and cosine; configs/local.yaml's base, learning rate, batch size and attribute weights; fp32, no
clipping) on a workdir's ingested lesions: the clinic's train split trains, its test (or val) split and every shifted lesion
are scored, and the train split itself (how well the model fits what it trained on: under-fitting vs
not generalising). The test split's retrieval is scored as the study scores it (dermaray.grounding.evaluate.evaluate_set:
cosine neighbours of the grounded embedding against the untuned base's, R@1 within 0.1 sd; the frozen probe fitted on
the train split). A first look before a variant earns a study arm; it
does not replace one (no validation, checkpoints or resume). Appends one JSON line per run to --results.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ConvEmbedder(torch.nn.Module):
    """A small CNN in the tower and projector's place (`--cnn`): three stride-2 stages of two 3x3 convolutions, one
    more convolution, average pooling; 109k weights at a 64-d embedding. What a convolution's inductive bias buys over the ViT."""

    def __init__(self, dim: int, normalization: tuple | None):
        super().__init__()
        self.dim, self.normalization = dim, normalization  # the photometric views read the base's normalization

        def stage(i: int, o: int) -> list[torch.nn.Module]:
            return [
                torch.nn.Conv2d(i, o, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv2d(o, o, 3, padding=1, stride=2),
                torch.nn.GELU(),
            ]

        last = [torch.nn.Conv2d(dim, dim, 3, padding=1), torch.nn.GELU()]
        self.net = torch.nn.Sequential(*stage(3, 16), *stage(16, 32), *stage(32, dim), *last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels).mean(dim=(-2, -1))


def rank_contrast(
    embedding: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, temperature: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank-N-Contrast (Zha et al., NeurIPS 2023) over a batch: for an anchor i and each other lesion j, j's
    similarity against every k at least as far from i in attribute space (weighted L1 over z-scores), so the
    embedding's cosine similarities order lesions by their attributes: what the retrieval metrics read. An attribute a
    view no longer shows truly (`keep` 0, dermaray.grounding.photometric) counts in no distance to that view."""
    z = torch.nn.functional.normalize(embedding, dim=-1)
    logits = z @ z.T / temperature
    keep = torch.ones_like(targets) if keep is None else keep
    pair = weights * keep[:, None, :] * keep[None, :, :]
    distance = (pair * (targets[:, None, :] - targets[None, :, :]).abs()).sum(-1)  # [B, B]
    n = len(z)
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    # [i, j, k]: k counts in j's denominator when d(i, k) >= d(i, j), k != i
    farther = (distance[:, None, :] >= distance[:, :, None]) & off[:, None, :]
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()  # the same shift per anchor row
    denominator = (shifted.exp()[:, None, :] * farther).sum(-1)  # [i, j]
    log_prob = shifted - torch.log(denominator.clamp(min=1e-12))
    return -(log_prob * off).sum() / off.sum()


def retrieval(scored: dict, embedding: np.ndarray, predicted: np.ndarray, attributes: list[str], cfg) -> dict:
    """The scored split's R@1 (frozen -> grounded, and the paired gain's interval) per attribute, as the study scores it:
    `embedding` and `predicted` (native units) are the grounded model's on scored["in_domain"], in its row order."""
    import pandas as pd

    from dermaray.grounding.data import PIXELS
    from dermaray.grounding.embed import FROZEN, PREDICTED_PREFIX, LesionEmbedder
    from dermaray.grounding.evaluate import evaluate_set

    frozen = LesionEmbedder(FROZEN, cfg.models.grounding_mllm, cfg.models, device="cpu")  # what jobs.embeddings runs

    def frame(table, vectors: np.ndarray) -> pd.DataFrame:
        rows = {"lesion_id": table["lesion_id"].to_pylist(), **{a: table[a].to_numpy() for a in attributes}}
        return pd.DataFrame({**rows, "embedding": list(vectors)})

    def frozen_frame(table) -> pd.DataFrame:
        chunks = (table.slice(i, 256)["image_bytes"].to_pylist() for i in range(0, table.num_rows, 256))
        pixels = (frozen.preprocess({"image_bytes": np.array(c, dtype=object)})[PIXELS] for c in chunks)
        return frame(table, np.concatenate([frozen.embed_pixels(px)[0] for px in pixels]))

    test = scored["in_domain"]
    grounded = frame(test, torch.nn.functional.normalize(torch.from_numpy(embedding), dim=-1).numpy())
    grounded = grounded.assign(**{PREDICTED_PREFIX + a: predicted[:, j] for j, a in enumerate(attributes)})
    evaluated = evaluate_set(
        frozen_frame(test),
        grounded,
        frozen_frame(scored["train"]),
        attributes,
        cfg.grounding_eval.tau_std,
        cfg.grounding_eval.max_queries,
        cfg.grounding_eval.seed,
    )
    out = {}
    for name, a in evaluated["attributes"].items():
        r = a["retrieval"]
        out[name] = {
            "frozen": round(r["frozen"]["R@1_ci"][0], 3),
            "grounded": round(r["grounded"]["R@1_ci"][0], 3),
            "by_head": round(r["grounded_head"]["R@1_ci"][0], 3),
            "gain": [round(v, 3) for v in r["grounded"]["R@1_gain_ci"]],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="out/study", help="a pipeline workdir with ingest/clinic and ingest/shifted")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature-layer", type=int, default=None, help="the tower's layer read (default: the config's)")
    parser.add_argument("--heads", choices=["linear", "mlp"], default="linear", help="mlp: one hidden layer of 128")
    parser.add_argument(
        "--heads-read", choices=["embedding", "direction"], default=None, help="what the heads read (default: the config's)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="the tower's input side (default: the config's)")
    parser.add_argument("--base", default=None, help="the grounding MLLM: a preset or a local folder (default: the config's)")
    parser.add_argument(
        "--tower", nargs="+", metavar="KEY=VALUE", help="a random tiny LLaVA whose vision tower has these shapes (not --base)"
    )
    parser.add_argument(
        "--cnn", action="store_true", help="a small CNN (109k weights) in the tower and projector's place, as wide an embedding"
    )
    parser.add_argument("--weight", nargs="+", metavar="ATTRIBUTE=W", default=[], help="loss weights over the config's")
    parser.add_argument(
        "--rank-contrast", type=float, default=0.0, help="weight of a Rank-N-Contrast term on the embedding (0: none)"
    )
    parser.add_argument("--temperature", type=float, default=0.1, help="the rank-contrast term's temperature")
    parser.add_argument(
        "--contrast-weight",
        nargs="+",
        metavar="ATTRIBUTE=W",
        default=[],
        help="the rank-contrast distance's weights over the loss weights (0 leaves an attribute out of it)",
    )
    parser.add_argument(
        "--scored-split",
        choices=["test", "val"],
        default="test",
        help="the clinic's split scored in-domain (Spearman, R@1): val to choose a setting without reading the test split",
    )
    parser.add_argument("--results", default=None, help="a JSON-lines file to append the run to")
    args = parser.parse_args()
    if args.tower and args.base:
        parser.error("--tower builds its own base: give --tower or --base, not both")
    if args.tower and args.cnn:
        parser.error("--cnn replaces the tower that --tower would build: give one of them")

    def pairs(option: str, values: list[str], kind: type) -> dict:
        try:
            return {k: kind(v) for k, v in (value.split("=", 1) for value in values)}
        except ValueError:
            parser.error(f"{option} takes NAME=VALUE pairs (a {kind.__name__} value), got {values}")

    tower_shapes, weights = pairs("--tower", args.tower or [], int), pairs("--weight", args.weight, float)
    contrast_weights = pairs("--contrast-weight", args.contrast_weight, float)

    import pyarrow.compute as pc

    from dermaray.config import GroundingSpec, load_config
    from dermaray.grounding.data import PIXELS, TARGETS, Preprocessor
    from dermaray.grounding.metrics import spearman
    from dermaray.grounding.model import AttributeScaler, GroundingModel, GroundingSettings, loss_fn
    from dermaray.layout import Layout
    from dermaray.storage import read_parquet
    from jobs.grounding import batch_loss, training_views
    from jobs.training import warmup_cosine

    cfg = load_config("configs/local.yaml")
    g, attributes, at = cfg.grounding, cfg.grounding.attributes, Layout(str(Path(args.workdir).absolute()))
    if unknown := (set(weights) | set(contrast_weights)) - set(attributes):
        parser.error(f"--weight and --contrast-weight name attributes not grounded: {sorted(unknown)}")
    weights = {**g.attribute_weights, **weights}
    contrast_weights = {**weights, **contrast_weights}
    if args.tower:
        from dermaray.models.tiny import build_grounding_mllm

        scratch = tempfile.TemporaryDirectory(prefix="grounding-tower-")  # removed when the trial ends
        build_grounding_mllm(Path(scratch.name), args.seed, tower_shapes)
        cfg.models.grounding_mllm = scratch.name
    elif args.base:
        cfg.models.grounding_mllm = args.base
    columns = ["lesion_id", "split", "image_bytes", *attributes]
    tables = {d: read_parquet(at.lesions(d), {}, columns) for d in ("clinic", "shifted")}
    train = tables["clinic"].filter(pc.equal(tables["clinic"]["split"], "train"))
    scored = {
        "train": train,
        "in_domain": tables["clinic"].filter(pc.equal(tables["clinic"]["split"], args.scored_split)),
        "shifted": tables["shifted"],
    }
    scaler = AttributeScaler.fit(attributes, np.stack([train[a].to_numpy() for a in attributes], axis=1), g.log_sizes)
    prepare = Preprocessor(cfg.models.grounding_mllm, cfg.models, scaler, (), args.image_size)

    def tensors(table) -> tuple[torch.Tensor, torch.Tensor]:
        def batch(t) -> dict:
            images = np.array(t["image_bytes"].to_pylist(), dtype=object)
            return {"image_bytes": images, **{a: t[a].to_numpy() for a in attributes}}

        parts = [prepare(batch(table.slice(i, 256))) for i in range(0, table.num_rows, 256)]
        return tuple(torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in (PIXELS, TARGETS))

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    x, y = tensors(train)
    spec = g.model_dump(include=set(GroundingSpec.model_fields) - {"attributes"})
    chosen = {"image_size": args.image_size, "feature_layer": args.feature_layer, "heads_read": args.heads_read}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    settings = GroundingSettings(cfg.models.grounding_mllm, attributes, **{**spec, **chosen})
    model = GroundingModel.from_settings(settings, cfg.models)
    if args.cnn:  # after from_settings: the heads and the photometric views' normalization stay the base's
        model.embedder = ConvEmbedder(model.embedder.dim, model.embedder.normalization)
    if args.heads == "mlp":
        dim = model.embedder.dim
        model.heads = torch.nn.Sequential(torch.nn.Linear(dim, 128), torch.nn.GELU(), torch.nn.Linear(128, len(attributes)))
    # What the grounding job's loss reads (jobs.grounding.run builds the same).
    loss_config = {
        "weights": [weights.get(a, 1.0) for a in attributes],
        "photometric": g.photometric,
        "settings": {"attributes": attributes},
    }
    weight_vector = torch.tensor(loss_config["weights"], dtype=torch.float32)
    contrast_vector = torch.tensor([contrast_weights.get(a, 1.0) for a in attributes], dtype=torch.float32)

    def contrasted_loss(model, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """jobs.grounding.batch_loss (flips, turns, photometric views; Huber on the heads) plus the rank-contrast term."""
        pixels, keep = training_views(model, {PIXELS: pixels}, loss_config)
        out = model(pixels)
        contrast = rank_contrast(out["embedding"], targets, contrast_vector, args.temperature, keep)
        return loss_fn(out["attributes"], targets, weight_vector, keep) + args.rank_contrast * contrast

    params = [p for p in model.parameters() if p.requires_grad]
    tc = g.train
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    steps = args.epochs * -(-len(x) // tc.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, tc.warmup_fraction))
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), tc.batch_size):
            rows = order[i : i + tc.batch_size]
            if args.rank_contrast:
                loss = contrasted_loss(model, x[rows], y[rows])
            else:
                loss = batch_loss(model, {PIXELS: x[rows], TARGETS: y[rows]}, loss_config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    result: dict = {"args": vars(args), "settings": settings.model_dump(), "seconds": round(time.perf_counter() - started, 1)}
    for name, table in scored.items():
        px, truth = tensors(table)
        with torch.no_grad():
            outputs = [model(px[i : i + 512]) for i in range(0, len(px), 512)]
        predicted = torch.cat([o["attributes"] for o in outputs]).numpy()
        result[name] = {a: round(float(spearman(truth[:, j].numpy(), predicted[:, j])), 3) for j, a in enumerate(attributes)}
        if name == "in_domain":  # the same forward pass gives the scored split's retrieval its grounded side
            scored_embedding, scored_predicted = torch.cat([o["embedding"] for o in outputs]).numpy(), scaler.inverse(predicted)
    result["R@1"] = retrieval(scored, scored_embedding, scored_predicted, attributes, cfg)
    print(json.dumps(result))
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
