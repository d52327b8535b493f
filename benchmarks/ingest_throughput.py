"""Ingest throughput as a ratio to single-process PIL decode x cores, measured in one run.

    .venv/bin/python benchmarks/ingest_throughput.py --lesions 20000

The baseline decodes every JPEG of the same HDF5 (bytes already in memory) in one process,
before and after the job; ideal parallel ingest would run at that rate x the cluster's
CPUs. Goal: ratio >= 0.8. Per row the job also reads the bytes, validates the metadata,
hashes the split and writes Parquet, but it checks a JPEG by decoding it at 1/8 scale
(`inspect_image`), which costs less than the full decode: the second ratio printed is
against that check x cores, what the job spends beyond its own decode.

A first, untimed ingest of 400 lesions in small batches warms the cluster: Ray's worker
processes start and import their modules once per cluster, a cost a 400k-lesion ingest does
not feel but a 10k-lesion benchmark on 2 cores would measure as a third of its time. The
batches are small so that a task runs on every CPU: a worker that first starts during the
timed run costs it about a second.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import h5py
import ray
from PIL import Image

from dermaray.config import IngestConfig, load_config
from dermaray.data.validate import inspect_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ lives in the repository, not in site-packages
from jobs import ingest, synth
from jobs.common import init_ray


def images_per_second(blobs: list[bytes], work) -> float:
    start = time.perf_counter()
    for blob in blobs:
        work(blob)
    return len(blobs) / (time.perf_counter() - start)


def decode(blob: bytes) -> None:
    Image.open(io.BytesIO(blob)).load()


def check(blob: bytes) -> None:
    """What ingest does to each image (a JPEG at 1/8 scale)."""
    inspect_image(blob, max_pixels=1 << 30, max_bytes=1 << 30)


def synthetic(workdir: str, lesions: int, image_size: int) -> str:
    """The folder of a synthetic ISIC 2024 source, made once (data preparation, not timed)."""
    source = f"{workdir}/synthetic-{lesions}-{image_size}px"
    if not os.path.exists(f"{source}/synth_manifest.json"):
        overrides = [f"synth.n_lesions={lesions}", f"synth.output={source}", "synth.shard_size=250"]
        synth.run(load_config(None, [*overrides, f"synth.image_size={image_size}"]))
    return source


def ingest_config(source: str, output: str, batch_size: int):
    return load_config(None, [f"ingest.input={source}", f"ingest.output={output}", f"ingest.batch_size={batch_size}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", type=int, default=20000)
    parser.add_argument("--workdir", default="/tmp/dermaray-bench")
    parser.add_argument(
        "--batch-size", type=int, default=IngestConfig().batch_size, help="most lesions per task (the job may take fewer)"
    )
    parser.add_argument("--image-size", type=int, default=128, help="tile side in pixels (SLICE-3D tiles are ~133)")
    args = parser.parse_args()
    init_ray(load_config(None, []).ray)
    cores = int(ray.cluster_resources().get("CPU", 1))
    source = synthetic(args.workdir, args.lesions, args.image_size)
    warm = synthetic(args.workdir, 400, args.image_size)
    ingest.run(ingest_config(warm, f"{args.workdir}/ingest-warm-up", max(1, 400 // (4 * cores))))

    with h5py.File(f"{source}/train-image.hdf5", "r") as store:
        blobs = [store[key][()].tobytes() for key in store.keys()]
    before, check_before = images_per_second(blobs, decode), images_per_second(blobs, check)
    cfg = ingest_config(source, f"{args.workdir}/ingest", args.batch_size)
    start = time.perf_counter()
    summary = ingest.run(cfg)
    elapsed = time.perf_counter() - start
    after, check_after = images_per_second(blobs, decode), images_per_second(blobs, check)

    baseline, checked = (before + after) / 2, (check_before + check_after) / 2
    rate = summary["rows_in"] / elapsed
    print(f"tiles: {args.image_size} px, {sum(map(len, blobs)) / len(blobs) / 1024:.1f} kB JPEG on average")
    print(f"rows: {summary['rows_in']} in, {summary['rows_out']} out, {summary['rows_quarantined']} quarantined")
    print(f"single-process PIL decode: {before:,.0f} / {after:,.0f} images/s (before / after the job)")
    print(f"single-process check (inspect_image): {check_before:,.0f} / {check_after:,.0f} images/s")
    print(f"ingest job: {rate:,.0f} rows/s over {elapsed:.2f} s on {cores} CPUs")
    print(f"ratio ingest / (decode x {cores} cores) = {rate / (baseline * cores):.2f}  (goal >= 0.8)")
    print(f"ratio ingest / (check x {cores} cores) = {rate / (checked * cores):.2f}  (the job's own decode)")


if __name__ == "__main__":
    main()
