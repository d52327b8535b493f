"""What a grounded embedding's length carries, which cosine retrieval never sees: on a lesion table's split, the
embedding's norm (mean, sd) and its Spearman correlation with each attribute, beside the heads' own Spearman.

    .venv/bin/python benchmarks/embedding_norm.py out/study/grounding/model                 # after `make study`
    .venv/bin/python benchmarks/embedding_norm.py out/study/arms/<arm>/grounding/model --split val

Heads that read the embedding itself (`grounding.heads_read: embedding`) can use its length: two lesions whose
embeddings point the same way but differ in length get different predictions, while the cosine index ranks them
as the same. A length that varies a lot and follows an attribute is that attribute kept out of the index's reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a grounding model folder (jobs.grounding's <output>/model)")
    parser.add_argument("--lesions", default="out/study/ingest/clinic/lesions", help="an ingested lesion table")
    parser.add_argument("--split", default="test")
    parser.add_argument("--config", default="configs/local.yaml", help="for the models' cache")
    args = parser.parse_args()

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dermaray.config import load_config
    from dermaray.grounding.data import PIXELS
    from dermaray.grounding.embed import LesionEmbedder
    from dermaray.grounding.metrics import spearman

    cfg = load_config(args.config)
    embedder = LesionEmbedder(args.model, cfg.models.grounding_mllm, cfg.models, device="cpu")
    table = pq.read_table(args.lesions, columns=["split", "image_bytes", *embedder.attributes])
    table = table.filter(pc.equal(table["split"], args.split))
    if not table.num_rows:
        raise SystemExit(f"{args.lesions} has no {args.split!r} lesions")
    norms, predicted = [], []
    for start in range(0, table.num_rows, 256):
        images = np.array(table.slice(start, 256)["image_bytes"].to_pylist(), dtype=object)
        with torch.no_grad():
            out = embedder.network(torch.as_tensor(embedder.preprocess({"image_bytes": images})[PIXELS]))
        norms.append(out["embedding"].norm(dim=-1).numpy())
        predicted.append(out["attributes"].numpy())
    norm, predicted = np.concatenate(norms), np.concatenate(predicted)
    result = {
        "model": args.model,
        "heads_read": embedder.network.settings.heads_read,
        "lesions": table.num_rows,
        "norm_mean": round(float(norm.mean()), 3),
        "norm_sd": round(float(norm.std()), 3),
        "spearman_norm": {a: round(float(spearman(table[a].to_numpy(), norm)), 3) for a in embedder.attributes},
        "spearman_heads": {
            a: round(float(spearman(table[a].to_numpy(), predicted[:, i])), 3) for i, a in enumerate(embedder.attributes)
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
