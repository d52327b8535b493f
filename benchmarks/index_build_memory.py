"""Peak memory of building the vector index: streamed from the embeddings Parquet, against in memory.

    .venv/bin/python benchmarks/index_build_memory.py --counts 20000 200000 --dim 512

Writes synthetic unit vectors as the embeddings job does (lesion_id, embedding; files of
10,000 rows), then builds and saves the index in a fresh process per case and reads that
process's peak RSS (imports included). "in memory" is the old path: the whole table, one
np.stack of all vectors, faiss.serialize_index to bytes. "streamed" is
VectorIndex.build_from_parquet + save. Goal: streamed peak <= 1.2 x index.faiss + 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MB = 2**20


def write_embeddings(folder: Path, count: int, dim: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    for part, start in enumerate(range(0, count, 10_000)):
        n = min(10_000, count - start)
        block = centres[rng.integers(64, size=n)] + rng.standard_normal((n, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        ids = [f"ISIC_{i:07d}" for i in range(start, start + n)]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), dim).cast(pa.list_(pa.float32()))
        pq.write_table(pa.table({"lesion_id": ids, "embedding": embedding}), folder / f"part-{part:05d}.parquet")


def memory(field: str) -> int:
    """Bytes of this process' current (VmRSS) or peak (VmHWM) resident memory. Not ru_maxrss:
    Linux carries that across exec, so a child would start at its parent's size."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def child(method: str, embeddings: str, output: str, kind: str) -> None:
    """Build and save in this process; print the RSS after imports (the floor every method pays)."""
    import faiss
    import numpy as np

    from dermaray.retrieval import VectorIndex
    from dermaray.storage import read_parquet

    floor = memory("VmRSS")
    if method == "streamed":
        VectorIndex.build_from_parquet(embeddings, kind=kind).save(output)
    else:
        table = read_parquet(embeddings, columns=["lesion_id", "embedding"])
        vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        index = VectorIndex.build(vectors, table["lesion_id"].to_pylist(), kind=kind)
        os.makedirs(output, exist_ok=True)
        with open(f"{output}/index.faiss", "wb") as f:
            f.write(faiss.serialize_index(index._index).tobytes())
    print(json.dumps({"floor": floor, "peak": memory("VmHWM")}))


def measure(method: str, embeddings: Path, output: Path, kind: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", method, str(embeddings), str(output), kind], stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{method} {kind} failed with status {proc.returncode}")
    return {"index": (output / "index.faiss").stat().st_size, **json.loads(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["exact", "ivf"])
    parser.add_argument("--workdir", default="/tmp/dermaray-index-memory")
    args = parser.parse_args()
    print(f"{'vectors':>8} {'kind':>5} {'index MB':>9} {'method':>10} {'floor MB':>9} {'peak MB':>8} {'goal MB':>8}  peak/goal")
    for count in args.counts:
        embeddings = Path(args.workdir) / f"embeddings-{count}x{args.dim}"
        if not embeddings.exists():
            write_embeddings(embeddings, count, args.dim)
        for kind in args.kinds:
            for method in ("in memory", "streamed"):
                m = measure(method, embeddings, Path(args.workdir) / "index", kind)
                goal = 1.2 * m["index"] + 300 * MB
                print(
                    f"{count:>8} {kind:>5} {m['index'] / MB:>9.0f} {method:>10} {m['floor'] / MB:>9.0f} "
                    f"{m['peak'] / MB:>8.0f} {goal / MB:>8.0f}  {m['peak'] / goal:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
    else:
        main()
