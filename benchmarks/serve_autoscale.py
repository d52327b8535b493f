"""Autoscaling and a replica kill, recorded: replicas and /search latency over a bounded load ramp.

    .venv/bin/python benchmarks/serve_autoscale.py                 # serves out/ (make run), or tiny artifacts
    .venv/bin/python benchmarks/serve_autoscale.py --no-kill --ramp 4:20,16:40,0:30

Starts Ray and the app on 127.0.0.1 with serve/config.yaml's deployments and autoscaling, its delays
shortened to seconds and its CPU asks made small for this machine (as tests/test_serve_operations.py
does). Then:

1. the first /generate, with Generation at zero replicas: its cold-start latency;
2. a load ramp on /search (`--ramp`, concurrency:seconds steps; 0 = idle), replica counts sampled
   every 0.5 s from Serve's status API;
3. unless --no-kill: at the peak, once Retrieval runs 2 replicas, SIGKILL one replica's process;
   the failed requests by status, and the seconds until a replacement runs.

Prints a table in 5-second bins and the figures, and writes the picture (`--out`, PNG through
Debian's chromium headless; SVG when chromium is absent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # serve/ and tests.serve_artifacts

import httpx  # noqa: E402
import numpy as np  # noqa: E402

APP = "dermaray"


def parse_ramp(text: str) -> list[tuple[int, float]]:
    steps = [(int(c), float(s)) for c, s in (part.split(":") for part in text.split(","))]
    if not steps or any(not 0 <= c <= 64 or not 0 < s <= 120 for c, s in steps):
        raise argparse.ArgumentTypeError("--ramp: concurrency 0-64 and 0-120 s per step, e.g. 4:20,16:40,0:30")
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/local.yaml", help="dermaray config whose serve section is served")
    parser.add_argument("--ramp", type=parse_ramp, default=parse_ramp("2:10,16:50,0:25"))
    parser.add_argument("--no-kill", action="store_true", help="no replica kill at the peak")
    parser.add_argument("--tiny", action="store_true", help="serve tiny artifacts even when out/ is complete")
    parser.add_argument("--out", default=str(REPO / "serve" / "autoscaling.png"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from dermaray.config import load_config
    from dermaray.report.html import line_chart
    from dermaray.storage import read_parquet
    from serve.app import app_from_config
    from serve.operations import SHORT_DELAYS, deployment_options, drive, replica_pids, running
    from tests import serve_artifacts
    from tests.serve_fixtures import _free_port

    scratch = Path(tempfile.mkdtemp(prefix="serve-autoscale-"))
    configured = load_config(args.config, [])
    s = configured.serve
    needed = [s.grounding_model, s.index, s.embeddings, s.lesions, s.diffusion]
    if all(p and Path(p).exists() for p in needed) and not args.tiny:
        print(f"artifacts: the pipeline's ({s.lesions}, {s.index}, {s.diffusion})")
        overrides = []
    else:
        print(f"artifacts: tiny, built now under {scratch} (run `make run` to serve the pipeline's)")
        cache = Path(configured.models.cache_dir).resolve()
        overrides = serve_artifacts.build(scratch / "artifacts", cache, n_lesions=200, diffusion=True)
    cfg = load_config(args.config, [*overrides, "serve.allow_anonymous=true"])
    image = read_parquet(cfg.serve.lesions, cfg.storage_options, columns=["image_bytes"])["image_bytes"][0].as_py()

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)  # the dashboard serves the state API (replica pids)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    options = deployment_options(num_cpus=0.05, Retrieval={**SHORT_DELAYS, "target_ongoing_requests": 8}, Generation=SHORT_DELAYS)
    serve.run(app_from_config(cfg, options=options), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print(f"app: {url}  cores: {os.cpu_count()}  load average: {os.getloadavg()[0]:.1f}  ramp: {args.ramp}")

    began = time.perf_counter()
    replicas: list[tuple[float, int, int]] = []  # (seconds, Retrieval running, Generation running)
    done = threading.Event()

    def sample_replicas() -> None:
        while not done.is_set():
            replicas.append((time.perf_counter() - began, running(APP, "Retrieval"), running(APP, "Generation")))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample_replicas)
    sampler.start()

    has_generation = cfg.serve.diffusion is not None
    cold = None
    if has_generation:
        started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as client:
            response = client.post("/generate", json={"diagnosis": "MEL", "count": 1, "steps": 2})
        cold = time.perf_counter() - started
        print(f"first /generate with Generation at 0 replicas: {response.status_code} in {cold:.1f} s")

    search = {"url": "/search", "params": {"k": 5}, "files": {"file": ("lesion.jpg", image, "image/jpeg")}}
    samples, phases, kill = [], [], {}
    peak = max(c for c, _ in args.ramp)

    def kill_at_peak(phase_start: float, phase_seconds: float) -> None:
        while time.perf_counter() - phase_start < phase_seconds - 10:
            if running(APP, "Retrieval") == 2:
                before = set(replica_pids(APP, "Retrieval"))
                kill["at"] = time.perf_counter() - began
                os.kill(min(before), signal.SIGKILL)
                while not set(replica_pids(APP, "Retrieval")) - before or running(APP, "Retrieval") < 2:
                    if time.perf_counter() - began - kill["at"] > 60:
                        return
                    time.sleep(0.25)
                kill["replaced_after"] = time.perf_counter() - began - kill["at"]
                return
            time.sleep(0.25)

    for concurrency, seconds in args.ramp:
        start = time.perf_counter()
        phases.append((start - began, concurrency))
        if concurrency == 0:
            time.sleep(seconds)
            continue
        killer = None
        if concurrency == peak and not args.no_kill and not kill:
            killer = threading.Thread(target=kill_at_peak, args=(start, seconds))
            killer.start()
        got = asyncio.run(drive(url, 100_000, concurrency, search, max_seconds=seconds))
        samples += [(s.started + start - began, s.seconds, s.status) for s in got]
        if killer:
            killer.join()
    done.set()
    sampler.join()
    serve.shutdown()
    ray.shutdown()

    # One row per 5 s: load, replicas, latency.
    end = max(t for t, *_ in replicas)
    header = ("t (s)", "conc.", "Retrieval", "Generation", "requests", "p50 ms", "p99 ms", "not 200")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (6, 5, 9, 10, 8, 7, 7, 7), strict=True)))
    for t0 in np.arange(0, end, 5.0):
        window = [s for s in samples if t0 <= s[0] < t0 + 5]
        reps = [r for r in replicas if t0 <= r[0] < t0 + 5] or [replicas[-1]]
        conc = next((c for t, c in reversed(phases) if t <= t0 + 2.5), 0)
        lat = [1000 * s[1] for s in window]
        p50, p99 = (f"{np.percentile(lat, 50):.0f}", f"{np.percentile(lat, 99):.0f}") if lat else ("", "")
        print(
            f"{t0:6.0f} {conc:5d} {max(r[1] for r in reps):9d} {max(r[2] for r in reps):10d} {len(window):8d} {p50:>7} {p99:>7} "
            f"{sum(s[2] != '200' for s in window):7d}"
        )
    statuses = Counter(s[2] for s in samples)
    load_start = next(t for t, c in phases if c == peak)
    load_end = max(t for t, c in phases if c) + next(s for c, s in reversed(args.ramp) if c)
    up = next((t - load_start for t, r, _ in replicas if t >= load_start and r >= 2), None)
    down = next((t - load_end for t, r, _ in replicas if t >= load_end and r == 1), None)
    print(f"\nrequests: {len(samples)} by status {dict(statuses)}")
    print(f"Generation cold start (first /generate from 0 replicas): {cold:.1f} s" if cold else "Generation: not served")
    if up is None:
        print("Retrieval: never scaled up")
    else:
        back = f"{down:.1f} s after it ended" if down is not None else "not within the run"
        print(f"Retrieval 1 -> 2: {up:.1f} s after the peak load began; back to 1: {back}")
    gen_zero = next((t for t, _, g in replicas if t > (cold or 0) + 1 and g == 0), None)
    print(f"Generation back to 0 replicas at t={gen_zero:.0f} s" if gen_zero else "Generation: never back to 0 in this run")
    if kill:
        after = [s for s in samples if s[0] >= kill["at"]]
        failed = Counter(s[2] for s in after if s[2] != "200")
        replaced = kill.get("replaced_after")
        print(
            f"SIGKILL of a Retrieval replica at t={kill['at']:.1f} s: {len(after)} requests after it, failed by status "
            f"{dict(failed) or 0}; replacement running {replaced:.1f} s after the kill"
            if replaced
            else f"SIGKILL at t={kill['at']:.1f} s: no replacement within 60 s; failed {dict(failed)}"
        )

    # The picture: replicas over time, and p50 latency per second.
    seconds_p50 = []
    for t0 in range(int(end) + 1):
        lat = [1000 * s[1] for s in samples if t0 <= s[0] < t0 + 1]
        if lat:
            seconds_p50.append((t0, float(np.median(lat))))
    killed = f" (SIGKILL of a Retrieval replica at t={kill['at']:.0f} s)" if kill else ""
    steps = [(t, c) for (t, c), (t_next, _) in zip(phases, [*phases[1:], (end, 0)], strict=True) for t in (t, t_next)]
    charts = [
        line_chart(
            {"Retrieval": [(t, r) for t, r, _ in replicas], "Generation": [(t, g) for t, _, g in replicas]},
            "Running replicas" + killed, "seconds", "replicas", width=860, height=200,
        ),
        line_chart({"concurrency": steps}, "/search load: concurrent clients", "seconds", "clients", width=860, height=160),
        line_chart({"p50 per second": seconds_p50}, "/search latency", "seconds", "ms", width=860, height=200),
    ]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = scratch / "autoscaling.html"
    page.write_text(f"<html><body style='margin:0;background:white'>{'<br>'.join(charts)}</body></html>")
    chromium = shutil.which("chromium")
    if chromium and out.suffix == ".png":
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={out}",
             "--window-size=860,580", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    else:
        out = out.with_suffix(".svg")
        out.write_text(charts[0])
    print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
