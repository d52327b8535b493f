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

Per stage: wall seconds; the peak private resident memory (RssAnon + RssFile: Ray's object store
is shared memory, whose pages would otherwise count in every process that touched them) of the
stage's driver and of the largest Ray worker process, sampled every 0.2 s while the stage runs.
Goals for 10x the data: wall time <= 11x, peaks <= 1.3x (the index aside: its file's size at
each size is subtracted from the serve start's figures).
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
    print(json.dumps({"seconds": time.perf_counter() - started}))


def private_bytes(pid: int) -> int:
    """A process' resident memory without shared memory (RssAnon + RssFile): Ray's object store is shared memory
    every worker maps, and the pages of it a worker has touched would count in its RSS as if it held them."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile")))
    return sum(int(v.split()[0]) * 1024 for v in fields.values())


class Peaks(threading.Thread):
    """While it runs, every 0.2 s: the driver's private resident memory, and the largest of any Ray worker process
    (process title `ray::...`, idle ones aside)."""

    def __init__(self, driver: int) -> None:
        super().__init__(daemon=True)
        self.driver_pid, self.driver, self.worker, self.title, self.stop = driver, 0, 0, "", threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for process in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if process.info["pid"] == self.driver_pid:
                        self.driver = max(self.driver, private_bytes(self.driver_pid))
                        continue
                    title = " ".join(process.info["cmdline"] or [])
                    if title.startswith("ray::") and not title.startswith(("ray::IDLE", "ray::RuntimeEnv")):
                        held = private_bytes(process.info["pid"])
                        if held > self.worker:
                            self.worker, self.title = held, title.split()[0][:60]
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    pass
            self.stop.wait(0.2)


def measure(stage: str, settings: list[str]) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", stage, *settings],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])},
    )
    peaks = Peaks(process.pid)
    peaks.start()
    out, err = process.communicate()
    wall = time.perf_counter() - started
    peaks.stop.set()
    peaks.join()
    if process.returncode:
        sys.exit(f"{stage} failed:\n{err[-4000:]}")
    json.loads(out.strip().splitlines()[-1])  # the stage said it finished
    return {"wall": wall, "driver": peaks.driver, "worker": peaks.worker, "worker_title": peaks.title}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dermaray-scale"))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="a subset, on the data a full run left")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    import shutil

    import ray

    stages = [s for s in STAGES if s in args.stages]
    if stages == list(STAGES):
        shutil.rmtree(args.workdir, ignore_errors=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    small, large = sorted(args.sizes)
    results: dict[tuple[str, int], dict] = {}
    for size in (small, large):
        for stage in stages:
            results[stage, size] = measure(stage, overrides(stage, args.workdir, size, address))
            r = results[stage, size]
            print(
                f"# {size:>6} {stage:<11} {r['wall']:7.1f} s, driver {r['driver'] / MB:5.0f} MB, "
                f"largest worker {r['worker'] / MB:5.0f} MB ({r['worker_title']})",
                flush=True,
            )
    files = {n: args.workdir / str(n) / "emb" / "index" / "index.faiss" for n in (small, large)}
    index = {n: f.stat().st_size if f.exists() else 0 for n, f in files.items()}
    ratio = large / small
    print(f"\n| stage | wall {small:,} s | wall {large:,} s | wall ratio | driver peak ratio | largest worker peak ratio |")
    print("|---|---|---|---|---|---|")
    total = {n: 0.0 for n in (small, large)}
    for stage in stages:
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
