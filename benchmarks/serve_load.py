"""Load on /search over loopback HTTP, against in-process embed + search of the same image, in one run.

    .venv/bin/python benchmarks/serve_load.py                       # serves out/ (make run), or tiny artifacts
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key ...   # a running app

Starts the app on 127.0.0.1 (retrieval and ingress only: /search does not touch generation)
unless --url names a running one, which must be a loopback address. Then, on one gallery image:

1. in-process: the same `Retriever.search_image` a Retrieval replica runs (decode, grounded
   embedding, classifier diagnosis, index search, result shaping), sequentially and from
   `--concurrency` threads (`--requests` calls), each at its best torch thread count;
2. /search at concurrency 1 (adds HTTP, the proxy, the ingress and one handle call);
3. /search, `--requests` (2,000) at concurrency `--concurrency` (32): p50, p99, throughput and
   the responses by status class (any 5xx or transport error fails the run).

4. the same two loads against what a user would write instead of Serve: one plain FastAPI
   app under uvicorn, in its own process, whose /search calls the same Retriever.search_image
   (a sync endpoint: FastAPI runs it on its thread pool) and returns the result as JSON.

It prints /search p50 / in-process p50 at concurrency 1, and at concurrency 32 against the
in-process p50 at the same concurrency (goal <= 1.3). Under concurrent load a request waits
behind the others in both cases; the Retrieval replica batches concurrent searches into one
forward pass, which threads calling the model one image at a time cannot. Against plain
uvicorn: Serve's p50 at concurrency 1 / uvicorn's (goal <= 1.3) and Serve's requests/s at
concurrency 32 / uvicorn's (goal >= 1). Skip that part with --no-plain.

With --direct-ingress (Serve's throughput-optimized settings, which include direct ingress) the
load goes to the ingress replicas' own HTTP servers instead of the proxy, spread over them as a
load balancer would; with --retrieval-in-ingress a search then takes no hop inside the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serve_artifacts for the tiny fallback

import httpx
import numpy as np

GOAL = 1.3
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def artifacts(args: argparse.Namespace, scratch: Path) -> list[str]:
    """`serve.*` overrides: the pipeline's out/ when it is complete, else tiny artifacts built here."""
    from dermaray.config import load_config

    cfg = load_config(args.config, [])
    s = cfg.serve
    needed = [s.grounding_model, s.index, s.embeddings, s.lesions] + ([s.classifier] if s.classifier else [])
    if all(Path(p).exists() for p in needed) and not args.tiny:
        print(f"artifacts: the pipeline's ({s.lesions}, {s.index})")
        return ["serve.diffusion=null"]
    from tests import serve_artifacts

    print(f"artifacts: tiny, built now under {scratch} (run `make run` to serve the pipeline's)")
    return serve_artifacts.build(scratch / "artifacts", Path(cfg.models.cache_dir).resolve(), n_lesions=200, diffusion=False)


def in_process(retriever, image: bytes, k: int, requests: int, concurrency: int) -> list[float]:
    """Latencies of `requests` calls of Retriever.search_image from `concurrency` threads."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(_: int) -> float:
        started = time.perf_counter()
        retriever.search_image(image, k)
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(timed, range(requests)))


def best_in_process(retriever, image: bytes, k: int, requests: int, concurrency: int) -> tuple[float, list[float], int]:
    """(p50, latencies, torch threads) at the torch thread count that gives the lowest p50: the
    strictest baseline (a replica with num_cpus < 1 runs one thread; on a busy 2-core machine
    two threads can be slower than one)."""
    import torch

    default, best = torch.get_num_threads(), None
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        in_process(retriever, image, k, 20, 1)  # warm
        latencies = in_process(retriever, image, k, requests, concurrency)
        if best is None or statistics.median(latencies) < best[0]:
            best = (statistics.median(latencies), latencies, threads)
    torch.set_num_threads(default)
    return best


def ingress_replica_urls(app: str, replicas: int, timeout: float = 60.0) -> list[str]:
    """The HTTP servers of `app`'s `replicas` ingress replicas under direct ingress: Serve's target
    groups, which its REST API (GET /api/serve/applications/) publishes for a load balancer. Read here
    through the controller's handle (private to Serve), as the benchmark's cluster runs no dashboard.
    A replica is listed once its port is allocated, so this waits for all of them. The targets name
    the node's address; on this one-machine cluster the replicas listen on loopback
    (RAY_SERVE_DEFAULT_HTTP_HOST unset)."""
    import ray
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + timeout
    while True:
        details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
        targets = [
            f"http://127.0.0.1:{target['port']}"
            for group in details.get("target_groups", [])
            if group["app_name"] == app and str(group["protocol"]).upper().endswith("HTTP")
            for target in group["targets"]
        ]
        if len(targets) >= replicas:
            return targets
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve published {len(targets)} HTTP targets of {app!r}, not {replicas}: is direct ingress on?")
        time.sleep(0.5)


def wait_for_ray_to_exit(timeout: float = 60.0) -> None:
    """Until no process of the local cluster is left: replicas and raylet finishing their shutdown would share
    the cores with the baseline and slow it."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if command.startswith("ray::") or "/ray/core/src/ray/" in command or "ray/_private/" in command:
                alive.append(process)
        if not alive:
            break
        time.sleep(0.5)
    time.sleep(2)  # and the load they left to settle


def start_plain(config: str, overrides: list[str]):
    """(process, url) of the plain uvicorn baseline, once it answers."""
    import subprocess

    from tests.serve_fixtures import _free_port

    port = _free_port()
    server = Path(__file__).with_name("plain_search_server.py")
    process = subprocess.Popen([sys.executable, str(server), str(port), config, *overrides])
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the plain uvicorn server exited with {process.returncode}")
        try:
            httpx.get(f"{url}/docs", timeout=2)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the plain uvicorn server did not answer within 300 s")


async def load(
    url: str | list[str], image: bytes, k: int, headers: dict, requests: int, concurrency: int
) -> tuple[list[float], Counter, float]:
    """Latencies, responses by status class and seconds of `requests` searches from `concurrency`
    clients; given several URLs (ingress replicas' own ports), client i sends to URL i mod n, as a
    load balancer in front of them would spread connections."""
    urls = [url] if isinstance(url, str) else url
    latencies: list[float] = []
    statuses: Counter = Counter()
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=u, headers=headers, timeout=60, limits=limits))
            for u in urls
        ]

        async def worker(client: httpx.AsyncClient) -> None:
            for _ in remaining:
                started = time.perf_counter()
                try:
                    response = await client.post("/search", params={"k": k}, files={"file": ("lesion.jpg", image, "image/jpeg")})
                    statuses[f"{response.status_code // 100}xx"] += 1
                except httpx.HTTPError as error:
                    statuses[f"transport error ({type(error).__name__})"] += 1
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
        return latencies, statuses, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/local.yaml", help="dermaray config whose serve section is served")
    parser.add_argument("--url", help="a running app on a loopback address (default: start one)")
    parser.add_argument("--api-key", default=os.environ.get("DERMARAY_API_KEY"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=200, help="requests for the concurrency-1 and in-process p50s")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="serve tiny artifacts even when out/ is complete")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain FastAPI + uvicorn baseline")
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="start Serve with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress, user code on the replica's loop, gRPC handles)",
    )
    parser.add_argument(
        "--retrieval-in-ingress", action="store_true", help="serve.retrieval_in_ingress: the ingress replica searches itself"
    )
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="as --throughput-optimized, and send to the ingress replicas' own HTTP ports (Serve's target groups), "
        "not through the proxy",
    )
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the deployment that searches")
    args = parser.parse_args()
    args.throughput_optimized |= args.direct_ingress  # the throughput-optimized settings include direct ingress
    if args.throughput_optimized:  # read when Serve is imported, and by every process of the cluster ray.init starts
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if args.direct_ingress and args.url:
        parser.error("--direct-ingress starts its own app: it cannot be combined with --url")
    if not 1 <= args.concurrency <= 256 or not 1 <= args.requests <= 100_000:
        parser.error("concurrency must be 1-256 and requests 1-100000 (a bounded load)")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}); this script never loads other hosts")

    import ray
    from ray import serve

    from dermaray.config import load_config
    from dermaray.storage import read_parquet
    from serve.app import app_from_config
    from tests.serve_fixtures import _free_port

    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    overrides = artifacts(args, scratch) + [f"serve.retrieval_in_ingress={str(args.retrieval_in_ingress).lower()}"]
    cfg = load_config(args.config, overrides)
    searching = "Ingress" if args.retrieval_in_ingress else "Retrieval"
    image = read_parquet(cfg.serve.lesions, cfg.storage_options, columns=["image_bytes"])["image_bytes"][0].as_py()
    headers = {"X-API-Key": args.api_key} if args.api_key else {}

    url = args.url
    if url is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        serve.run(app_from_config(cfg, options={searching: {"num_replicas": args.replicas}}), name="dermaray", route_prefix="/")
        url = (
            ingress_replica_urls("dermaray", args.replicas if args.retrieval_in_ingress else 1)
            if args.direct_ingress
            else f"http://127.0.0.1:{port}"
        )
    print(
        f"app: {url}  Serve: {'throughput-optimized' if args.throughput_optimized else 'default settings'}"
        f"{', direct to the ingress replicas' if args.direct_ingress else ', through the proxy'}, "
        f"search in {searching} x {args.replicas} replica(s)\n"
        f"gallery image: {len(image)} bytes  k={args.k}  cores: {os.cpu_count()}  "
        f"load average: {os.getloadavg()[0]:.1f} (other processes share these cores)"
    )

    from dermaray.serving.retriever import Retriever

    retriever = Retriever(cfg.serve, cfg.models, cfg.storage_options)
    one, _, threads = best_in_process(retriever, image, args.k, args.sequential, 1)
    print(
        f"in-process Retriever.search_image (decode, embed, diagnose, search, shape), sequential: "
        f"p50 {1000 * one:.2f} ms (torch threads {threads})"
    )
    many, many_latencies, threads_many = best_in_process(retriever, image, args.k, args.requests, args.concurrency)
    print(
        f"in-process at concurrency {args.concurrency} ({args.requests} calls, threads): p50 {1000 * many:.1f} ms  "
        f"p99 {1000 * percentile(many_latencies, 99):.1f} ms (torch threads {threads_many})"
    )
    del retriever

    upload = {"file": ("lesion.jpg", image, "image/jpeg")}
    for each in [url] if isinstance(url, str) else url:
        with httpx.Client(base_url=each, headers=headers, timeout=60) as client:
            for _ in range(20):  # warm the proxy, the ingress and the replica
                client.post("/search", params={"k": args.k}, files=upload).raise_for_status()
    sequential, statuses, _ = asyncio.run(load(url, image, args.k, headers, args.sequential, 1))
    p50_one = statistics.median(sequential)
    print(f"/search at concurrency 1 ({args.sequential} requests): p50 {1000 * p50_one:.2f} ms  {dict(statuses)}")

    latencies, statuses, seconds = asyncio.run(load(url, image, args.k, headers, args.requests, args.concurrency))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    errors = sum(n for status, n in statuses.items() if status != "2xx")
    server_errors = sum(n for status, n in statuses.items() if not status.startswith(("2", "4")))
    print(
        f"/search at concurrency {args.concurrency} ({args.requests} requests): p50 {1000 * p50:.1f} ms  "
        f"p99 {1000 * p99:.1f} ms  {args.requests / seconds:.0f} req/s  by status: {dict(sorted(statuses.items()))}  "
        f"errors: {errors}  5xx or transport: {server_errors}"
    )
    if not args.no_plain:
        if args.url is None:  # the baseline gets the cores to itself, as Serve had them
            serve.shutdown()
            ray.shutdown()
            wait_for_ray_to_exit()
        process, plain = start_plain(args.config, overrides)
        try:
            with httpx.Client(base_url=plain, timeout=60) as client:
                for _ in range(20):
                    client.post(
                        "/search", params={"k": args.k}, files={"file": ("lesion.jpg", image, "image/jpeg")}
                    ).raise_for_status()
            plain_one, plain_statuses, _ = asyncio.run(load(plain, image, args.k, {}, args.sequential, 1))
            plain_latencies, plain_many, plain_seconds = asyncio.run(
                load(plain, image, args.k, {}, args.requests, args.concurrency)
            )
        finally:
            process.terminate()
            process.wait(30)
        p50_plain = statistics.median(plain_one)
        print(
            f"plain FastAPI + uvicorn /search: concurrency 1 p50 {1000 * p50_plain:.2f} ms {dict(plain_statuses)}; "
            f"concurrency {args.concurrency} p50 {1000 * percentile(plain_latencies, 50):.1f} ms "
            f"{args.requests / plain_seconds:.0f} req/s {dict(sorted(plain_many.items()))}"
        )
        print(
            f"Serve / plain uvicorn: p50 at concurrency 1 {p50_one / p50_plain:.2f}x (goal <= {GOAL}x); requests/s at "
            f"concurrency {args.concurrency} {(args.requests / seconds) / (args.requests / plain_seconds):.2f}x (goal >= 1)"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(
        f"ratio /search p50 / in-process p50: concurrency 1 {p50_one / one:.2f}x; concurrency {args.concurrency} "
        f"{p50 / many:.2f}x against in-process at the same concurrency, {p50 / one:.2f}x against sequential "
        f"in-process (goal <= {GOAL}x)"
    )
    if args.url is None and args.no_plain:
        serve.shutdown()
        ray.shutdown()
    return 1 if server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
