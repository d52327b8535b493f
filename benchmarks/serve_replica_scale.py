"""A Retrieval replica's start time and memory against the gallery's size.

    .venv/bin/python benchmarks/serve_replica_scale.py --sizes 2000 20000
    .venv/bin/python benchmarks/serve_replica_scale.py --code /tmp/before/platform --legacy-config   # code before
                                                # serve.thumbnails and serve.text_index existed

Builds, per size, the artifacts a replica loads (tests/serve_artifacts: lesion table, tiny grounding
model, embeddings, exact index, thumbnails, classifier and the index of its image projections), then
constructs the Retriever (what the Retrieval deployment builds in __init__) in a fresh process per
size and reads the seconds it took and the process' resident memory after it (VmRSS) and at its
peak (VmHWM). Goal: at 10x the gallery, start <= 1.3x and RSS <= 1.3x plus the indexes' own size
(the grounded index and the classifier projections' index, whose files are subtracted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def memory(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def child(overrides: list[str]) -> None:
    import torch

    from dermaray.config import load_config
    from dermaray.serving.retriever import Retriever

    torch.set_num_threads(1)  # as a replica of 0.5 CPU runs
    cfg = load_config(None, overrides)
    floor = memory("VmRSS")
    started = time.perf_counter()
    retriever = Retriever(cfg.serve, cfg.models, cfg.storage_options)
    seconds = time.perf_counter() - started
    info = retriever.info()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss": memory("VmRSS"),
                "peak": memory("VmHWM"),
                "floor": floor,
                "lesions": info["lesions"],
                "text_search": info["text_search"],
            }
        )
    )


def build(root: Path, size: int, cache: Path) -> list[str]:
    import pyarrow.parquet as pq

    from tests.serve_artifacts import build as build_artifacts
    from tests.serve_artifacts import lesion_table

    overrides_file = root / f"{size}.json"
    if not overrides_file.exists():
        table = root / "lesions.parquet"
        if not table.exists() or pq.ParquetFile(table).metadata.num_rows < size:
            started = time.perf_counter()
            pq.write_table(lesion_table(size), table)
            print(f"# {size} synthetic lesions in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        lesions = pq.read_table(table).slice(0, size)
        overrides = build_artifacts(root / str(size), cache, diffusion=False, lesions=lesions)
        print(f"# artifacts for {size} lesions in {time.perf_counter() - started:.0f} s", flush=True)
        overrides_file.write_text(json.dumps(overrides))
    return json.loads(overrides_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dermaray-replica-scale"))
    parser.add_argument("--code", help="PYTHONPATH of the dermaray to measure (default: this checkout's)")
    parser.add_argument("--legacy-config", action="store_true", help="leave out serve.thumbnails and serve.text_index")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)

    sys.path.insert(0, str(REPO))
    cache = (REPO / ".cache" / "models").resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.code, str(REPO / "platform"), str(REPO)]))}
    rows = []
    for size in sorted(args.sizes):
        overrides = build(args.workdir, size, cache)
        if args.legacy_config:
            overrides = [o for o in overrides if not o.startswith(("serve.thumbnails=", "serve.text_index="))]
        out = subprocess.run(
            [sys.executable, __file__, "--child", *overrides], env=env, check=True, capture_output=True, text=True
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        # Both indexes a replica holds: the grounded embeddings' and the classifier projections'
        folders = [args.workdir / str(size) / f for f in ("index", "image_projections")]
        index_bytes = sum((f / "index.faiss").stat().st_size for f in folders if (f / "index.faiss").exists())
        rows.append({"size": size, "index": index_bytes, **result})
    print("| gallery | start s | RSS MB | peak MB | indexes MB | text search |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lesions']:,} | {r['seconds']:.2f} | {r['rss'] / MB:.0f} | {r['peak'] / MB:.0f} "
            f"| {r['index'] / MB:.1f} | {r['text_search']} |"
        )
    small, large = rows[0], rows[-1]
    extra = large["index"] - small["index"]
    print(
        f"\n{large['size']:,} vs {small['size']:,}: start {large['seconds'] / small['seconds']:.2f}x (goal <= 1.3), "
        f"RSS {(large['rss'] - extra) / small['rss']:.2f}x the index aside (goal <= 1.3), "
        f"peak {(large['peak'] - extra) / small['peak']:.2f}x"
    )


if __name__ == "__main__":
    main()
