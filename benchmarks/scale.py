"""How the data stages' cost grows with the data: wall time and peak memory at two sizes, one table.

    .venv/bin/python benchmarks/scale.py --sizes 2000 20000

Runs the pipeline's data stages on one local Ray cluster started here, each stage as the job
it is (`jobs.<stage>.run`) in a process of its own:

- synth: synthetic lesions in the ISIC 2024 layout;
- ingest: the canonical table and the quarantine;
- notes: template notes for every lesion (strategy M: no language model);
- embeddings: embeddings table, exact index and thumbnails (the tiny tower untuned: the same
  work per lesion as a grounded model, without training one);
- serve start: a Retrieval replica's start over that gallery (the Retriever, in a fresh process).

Per stage: wall seconds; the driver's peak resident memory (its process' VmHWM); the largest
Ray worker's peak resident memory, sampled every 0.2 s from the cluster's worker processes
while the stage runs. Goals for 10x the data: wall time <= 11x, peaks <= 1.3x (the index aside:
its file's size at each size is subtracted from the serve start's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
STAGES = ("synth", "ingest", "notes", "embeddings", "serve start")


def memory(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def overrides(stage: str, root: Path, size: int, address: str) -> list[str]:
    data = root / str(size)
    common = [f"ray.address={address}", f"models.cache_dir={REPO / '.cache' / 'models'}"]
    return (
        common
        + {
            "synth": [f"synth.n_lesions={size}", f"synth.output={data}/synthetic"],
            "ingest": ["ingest.source=isic2024", f"ingest.input={data}/synthetic", f"ingest.output={data}/ingest"],
            "notes": ["notes.strategy=M", f"notes.input={data}/ingest/lesions", f"notes.output={data}/notes"],
            "embeddings": ["embeddings.model=frozen", f"embeddings.input={data}/ingest/lesions", f"embeddings.output={data}/emb"],
            "serve start": [
                "serve.grounding_model=frozen",
                f"serve.index={data}/emb/index",
                f"serve.embeddings={data}/emb/embeddings",
                f"serve.lesions={data}/ingest/lesions",
                f"serve.thumbnails={data}/emb/thumbnails",
                "serve.classifier=null",
                "serve.text_index=null",
            ],
        }[stage]
    )


def child(stage: str, settings: list[str]) -> None:
    """Run one stage in this process; print its seconds and this process' peak RSS."""
    sys.path.insert(0, str(REPO))
    from dermaray.config import load_config

    cfg = load_config(None, settings)
    started = time.perf_counter()
    if stage == "serve start":
        import torch

        from dermaray.serving.retriever import Retriever

        torch.set_num_threads(1)
        Retriever(cfg.serve, cfg.models, cfg.storage_options)
    else:
        import importlib

        importlib.import_module(f"jobs.{stage}").run(cfg)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak": memory("VmHWM")}))


class WorkerPeaks(threading.Thread):
    """The largest resident memory of any Ray worker process (process title `ray::...`) while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for process in psutil.process_iter(["name", "cmdline"]):
                try:
                    title = " ".join(process.info["cmdline"] or [])
                    if title.startswith("ray::") and not title.startswith(("ray::IDLE", "ray::RuntimeEnv")):
                        self.peak = max(self.peak, process.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.stop.wait(0.2)


def measure(stage: str, settings: list[str]) -> dict:
    workers = WorkerPeaks()
    workers.start()
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", stage, *settings],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])},
    ).stdout
    wall = time.perf_counter() - started
    workers.stop.set()
    workers.join()
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "stage_seconds": result["seconds"], "driver": result["peak"], "worker": workers.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dermaray-scale"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    import shutil

    import ray

    shutil.rmtree(args.workdir, ignore_errors=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    small, large = sorted(args.sizes)
    results: dict[tuple[str, int], dict] = {}
    for size in (small, large):
        for stage in STAGES:
            results[stage, size] = measure(stage, overrides(stage, args.workdir, size, address))
            r = results[stage, size]
            print(
                f"# {size:>6} {stage:<11} {r['wall']:7.1f} s, driver {r['driver'] / MB:5.0f} MB, "
                f"largest worker {r['worker'] / MB:5.0f} MB",
                flush=True,
            )
    index = {n: (args.workdir / str(n) / "emb" / "index" / "index.faiss").stat().st_size for n in (small, large)}
    ratio = large / small
    print(f"\n| stage | wall {small:,} s | wall {large:,} s | wall ratio | driver peak ratio | largest worker peak ratio |")
    print("|---|---|---|---|---|---|")
    total = {n: 0.0 for n in (small, large)}
    for stage in STAGES:
        a, b = results[stage, small], results[stage, large]
        total[small], total[large] = total[small] + a["wall"], total[large] + b["wall"]
        aside = index[large] - index[small] if stage == "serve start" else 0
        worker = f"{b['worker'] / a['worker']:.2f}x" if a["worker"] and b["worker"] else "-"
        print(
            f"| {stage} | {a['wall']:.1f} | {b['wall']:.1f} | {b['wall'] / a['wall']:.2f}x "
            f"| {(b['driver'] - aside) / a['driver']:.2f}x | {worker} |"
        )
    print(f"| all | {total[small]:.1f} | {total[large]:.1f} | {total[large] / total[small]:.2f}x | | |")
    print(f"\n{ratio:g}x the data; goals: wall ratio <= {1.1 * ratio:g}x, peak ratios <= 1.3x (the index aside)")
    ray.shutdown()


if __name__ == "__main__":
    main()
