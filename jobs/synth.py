"""Render synthetic lesions on a Ray cluster and write them in the ISIC 2024 layout.

    python -m jobs.synth synth.n_lesions=2000 synth.output=s3://bucket/synthetic

Tiles are rendered in parallel Ray Data tasks (`synth.shard_size` per task); the driver
streams them, in lesion order, into one `train-image.hdf5` and `train-metadata.csv`, and
writes `synth_manifest.json` (the planted defects and the reason ingest must give for each).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import ray
from tqdm import tqdm

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, SynthConfig
from dermaray.data.corruption import EXPECTED_REASON, IMAGE_DEFECTS, corrupt_image, corrupt_row, plan_defects
from dermaray.data.synthetic import ISIC_METADATA_COLUMNS, synthesize_lesion
from dermaray.storage import filesystem, join
from jobs.common import init_ray, log


def render_batch(batch: dict[str, np.ndarray], cfg: SynthConfig) -> dict[str, list]:
    rows, images = [], []
    for index in batch["id"]:
        row, jpeg, _, _ = synthesize_lesion(
            cfg.seed,
            int(index),
            cfg.domain,
            cfg.image_size,
            cfg.lesions_per_patient,
            cfg.class_weights,
            cfg.jpeg_quality,
            cfg.unlabelled_fraction,
        )
        rows.append(json.dumps(row))
        images.append(jpeg)
    return {"index": batch["id"], "row": rows, "jpeg": images}


def _store(store: h5py.File, key: str, blob: bytes) -> None:
    store.create_dataset(key, data=np.void(blob) if blob else np.empty(0, np.uint8))


def run(cfg: DermarayConfig) -> dict:
    s = cfg.synth
    defects = plan_defects(s.n_lesions, s.corrupt, s.seed)
    init_ray(cfg.ray)
    ds = ray.data.range(s.n_lesions, override_num_blocks=max(1, math.ceil(s.n_lesions / s.shard_size))).map_batches(
        render_batch, fn_kwargs={"cfg": s}, batch_size=s.shard_size, batch_format="numpy"
    )
    # Batches arrive in lesion order and go straight to the HDF5 file and the CSV: the driver holds one batch
    # and the few rows a planted defect needs afterwards, whatever the number of lesions.
    ds.context.execution_options.preserve_order = True
    defect_rows: dict[int, dict] = {}
    planted, written, unlabelled, header_written = [], 0, 0, False
    columns = list(ISIC_METADATA_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        hdf5_path, csv_path = Path(tmp) / "train-image.hdf5", Path(tmp) / "train-metadata.csv"
        with (
            h5py.File(hdf5_path, "w") as store,
            open(csv_path, "w", newline="") as csv_file,
            tqdm(total=s.n_lesions, desc="synth: lesions", unit="lesion") as bar,
        ):
            for batch in ds.iter_batches(batch_size=s.shard_size, batch_format="numpy"):
                chunk = []
                for index, row_json, jpeg in zip(batch["index"], batch["row"], batch["jpeg"], strict=True):
                    row, kind = json.loads(row_json), defects.get(int(index))
                    blob = corrupt_image(kind, bytes(jpeg)) if kind in IMAGE_DEFECTS else bytes(jpeg)
                    if blob is not None:
                        _store(store, row["isic_id"], blob)
                    chunk.append(corrupt_row(kind, row) if kind else row)
                    if kind:
                        defect_rows[int(index)] = chunk[-1]
                pd.DataFrame(chunk, columns=columns).to_csv(csv_file, header=not header_written, index=False)
                header_written = True
                written += len(chunk)
                unlabelled += sum(1 for r in chunk if not r.get("iddx_3"))  # only iddx_1 and target
                bar.update(len(batch["index"]))
            duplicates = []
            for index, kind in sorted(defects.items()):
                entry = {"isic_id": defect_rows[index]["isic_id"], "defect": kind, "expected_reason": EXPECTED_REASON[kind]}
                if kind == "duplicate_id":  # lesion `index` stays healthy; a second row repeats its id
                    duplicates.append(dict(defect_rows[index]))
                    entry["row_index"] = written + len(duplicates) - 1
                    unlabelled += not defect_rows[index].get("iddx_3")
                planted.append(entry)
            if duplicates:
                pd.DataFrame(duplicates, columns=columns).to_csv(csv_file, header=False, index=False)
        manifest = {
            "n_lesions": s.n_lesions,
            "metadata_rows": written + len(duplicates),
            "unlabelled_rows": unlabelled,
            "domain": s.domain,
            "seed": s.seed,
            "planted": planted,
            "config": s.model_dump(mode="json"),
        }
        (Path(tmp) / "synth_manifest.json").write_text(json.dumps(manifest, indent=2))
        fs, out = filesystem(s.output, cfg.storage_options)
        fs.makedirs(out, exist_ok=True)
        for name in ("train-image.hdf5", "train-metadata.csv", "synth_manifest.json"):
            fs.put_file(str(Path(tmp) / name), join(out, name))
    log.info("synth: %d lesions (%d planted defects) -> %s", s.n_lesions, len(planted), s.output)
    return manifest


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.synth"))
