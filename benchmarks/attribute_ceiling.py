"""How much of each grounded attribute a tile holds at the size the tower sees it: measured, not learned.

    .venv/bin/python benchmarks/attribute_ceiling.py --workdir out/study              # after `make study`
    .venv/bin/python benchmarks/attribute_ceiling.py --workdir out --sizes 64 --lesions 300

Each tile is resized as the tower's processor resizes it (bicubic), its lesion segmented from the pixels alone
(`estimate_lesion_mask`: skin colour from a border ring, Otsu on the colour distance) and measured with the
attribute code that made the labels (`measure_attributes`). Spearman against the labels, with 95% bootstrap
intervals over lesions, per size and clinic (the clinic's test split; every lesion of the shifted clinic, as
grounding_eval scores them), beside the grounded model's figure from the workdir's grounding_eval.json.

A classical measurement well above the model says the information is in the input and the model does not
extract it; one at or below the model's says the input (its size, the clinic's lighting) is what caps it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measured(images: list[bytes], size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each attribute measured on the segmented tiles at `size` px; and which tiles gave a usable mask."""
    from dermaray.data.attributes import measure_attributes
    from dermaray.diffusion.evaluate import estimate_lesion_mask
    from dermaray.schema import ATTRIBUTE_NAMES

    values = {a: np.full(len(images), np.nan) for a in ATTRIBUTE_NAMES}
    for i, blob in enumerate(images):
        rgb = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((size, size), Image.BICUBIC))
        try:
            found = measure_attributes(rgb, estimate_lesion_mask(rgb))
        except ValueError:  # no lesion found, or the whole tile: no measurement
            continue
        for a in ATTRIBUTE_NAMES:
            values[a][i] = found[a]
    return values, np.isfinite(values[ATTRIBUTE_NAMES[0]])


def model_spearman(workdir: Path) -> tuple[dict[str, dict[str, list[float]]], set[str]]:
    """({"clinic" | "shifted": {attribute: [rho, low, high]}} from the workdir's grounding evaluation, if any;
    the domains it scored on their test split only: the clinic, and a shifted clinic mixed into training)."""
    from dermaray.grounding.study import figures
    from dermaray.layout import Layout

    path = Path(Layout(str(workdir)).grounding_eval, "grounding_eval.json")
    if not path.exists():
        return {}, {"clinic"}
    # As the study reads them: the shifted clinic's every lesion, or only its test split where the model trained on it.
    found = figures(json.loads(path.read_text()))
    scores = {"clinic": found["spearman_in_domain"]}
    if "spearman_shifted" in found:
        scores["shifted"] = found["spearman_shifted"]
    return scores, {"clinic"} | ({"shifted"} if found.get("shifted_scored") == "test split" else set())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="out/study", help="a pipeline workdir: its ingest/ and reports/grounding/")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lesions", type=int, default=1000, help="at most this many per clinic (a seeded sample)")
    args = parser.parse_args()

    import pyarrow.compute as pc

    from dermaray.config import load_config
    from dermaray.grounding.evaluate import spearman_ci
    from dermaray.layout import Layout
    from dermaray.schema import ATTRIBUTE_NAMES
    from dermaray.stats import format_ci
    from dermaray.storage import read_parquet

    at = Layout(str(Path(args.workdir).absolute()))
    model, test_only = model_spearman(Path(args.workdir).absolute())
    # The attributes the workdir's model grounded, else those the local config grounds.
    grounded = list(model.get("clinic", {})) or load_config("configs/local.yaml").grounding.attributes
    for domain in ("clinic", "shifted"):
        if not Path(at.lesions(domain)).exists():
            continue
        table = read_parquet(at.lesions(domain), {}, ["split", "image_bytes", *ATTRIBUTE_NAMES])
        if domain in test_only:
            table = table.filter(pc.equal(table["split"], "test"))
        if table.num_rows > args.lesions:
            table = table.take(np.sort(np.random.default_rng(0).choice(table.num_rows, args.lesions, replace=False)))
        images = table.column("image_bytes").to_pylist()
        side = Image.open(io.BytesIO(images[0])).size[0]
        print(f"\n### {domain}: {table.num_rows} lesions{' (test split)' if domain in test_only else ''}, tiles of {side} px\n")
        sizes = {size: measured(images, size) for size in args.sizes}
        header = [f"measured at {s} px" for s in args.sizes] + (["grounded model"] if domain in model else [])
        print("| attribute | " + " | ".join(header) + " |")
        print("|---|" + "---|" * len(header))
        for a in grounded:
            truth = table.column(a).to_numpy(zero_copy_only=False).astype(np.float64)
            cells = [format_ci(spearman_ci(truth[ok], values[a][ok])) for values, ok in sizes.values()]
            if domain in model:
                cells.append(format_ci(tuple(model[domain][a])))
            print(f"| {a} | " + " | ".join(cells) + " |")
        # A tile where no lesion was found has no measurement: the measured columns leave it out, the model's does not.
        print("\nno lesion found: " + ", ".join(f"{s} px {int((~ok).sum())}" for s, (_, ok) in sizes.items()))


if __name__ == "__main__":
    main()
