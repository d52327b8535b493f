"""The app under load and faults, as an operator sees it: replicas follow the load up and back down,
Generation wakes from zero on its first request and goes back to zero, and a Retrieval replica killed
under load costs no request and is replaced.

One more app over the session's artifacts (`served_app`), on its own route prefix, with
serve/config.yaml's deployments and autoscaling, the delays shortened and the CPU asks made small
for this 2-core machine. Load goes to 127.0.0.1 only, bounded in requests and seconds; the only
process killed is a replica of this app, by its pid.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pyarrow.parquet as pq
import pytest

from dermaray.config import load_config
from serve.operations import SHORT_DELAYS, deployment_options, drive, replica_pids, running

APP = "ops"
# Delays of seconds, not minutes; Retrieval's target scaled to what one CPU replica batches here.
FAST = {**SHORT_DELAYS, "downscale_delay_s": 4}


def _deploy(served_app, **retrieval) -> None:
    from ray import serve

    from serve.app import app_from_config

    options = deployment_options(num_cpus=0.05, Retrieval={**FAST, "target_ongoing_requests": 8}, Generation=FAST)
    if retrieval:  # e.g. num_replicas=2: a fixed count instead of autoscaling
        options["Retrieval"] = {k: v for k, v in options["Retrieval"].items() if k != "autoscaling_config"} | retrieval
    overrides = [o for o in served_app.overrides if not o.startswith("serve.api_key")] + ["serve.allow_anonymous=true"]
    serve.run(app_from_config(load_config(None, overrides), options=options), name=APP, route_prefix=f"/{APP}")


@pytest.fixture(scope="module")
def ops(served_app):
    from ray import serve

    _deploy(served_app)
    image = pq.read_table(next((served_app.root / "lesions").glob("*.parquet")), columns=["image_bytes"])
    yield f"{served_app.url}/{APP}", image["image_bytes"][0].as_py()
    serve.delete(APP)


def _search(image: bytes) -> dict:
    return {"url": "/search", "params": {"k": 3}, "files": {"file": ("lesion.jpg", image, "image/jpeg")}}


def _in_background(
    url: str, image: bytes, requests: int, concurrency: int, stop: threading.Event | None = None
) -> tuple[threading.Thread, list]:
    samples: list = []  # filled as answers come

    def load() -> None:
        asyncio.run(drive(url, requests, concurrency, _search(image), max_seconds=180, samples=samples, stop=stop))

    thread = threading.Thread(target=load)
    thread.start()
    return thread, samples


def _wait(condition, seconds: float, what: str) -> float:
    started = time.perf_counter()
    while not condition():
        assert time.perf_counter() - started < seconds, f"{what} did not happen within {seconds:.0f} s"
        time.sleep(0.25)
    return time.perf_counter() - started


def test_replicas_follow_the_load_up_and_down(ops) -> None:
    url, image = ops
    assert running(APP, "Retrieval") == 1 and running(APP, "Generation") == 0  # min_replicas, and zero

    started = time.perf_counter()  # Generation from zero: the first request waits for a replica to start
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/generate", json={"diagnosis": "MEL", "count": 1, "steps": 2})
    cold = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert running(APP, "Generation") == 1
    print(f"Generation cold start: first /generate answered in {cold:.1f} s")

    # Load until Retrieval has scaled up (how long that takes depends on this machine), then a little longer.
    stop = threading.Event()
    load, samples = _in_background(url, image, 10_000, 16, stop)
    up = _wait(lambda: running(APP, "Retrieval") == 2 or not load.is_alive(), 150, "scaling up")
    time.sleep(2)
    stop.set()
    load.join()
    statuses = Counter(s.status for s in samples)
    assert running(APP, "Retrieval") == 2, f"Retrieval did not scale up under {len(samples)} requests at concurrency 16"
    assert set(statuses) == {"200"}, statuses
    print(f"Retrieval 1 -> 2 after {up:.1f} s of load at concurrency 16 ({len(samples)} requests, all 200)")

    down = _wait(lambda: running(APP, "Retrieval") == 1 and running(APP, "Generation") == 0, 60, "scaling back down")
    print(f"Retrieval 1 -> 2 under load, back to 1 and Generation back to 0 {down:.1f} s after the load ended")


def test_a_replica_killed_under_load_costs_no_request(ops, served_app) -> None:
    url, image = ops
    _deploy(served_app, num_replicas=2)
    _wait(lambda: running(APP, "Retrieval") == 2, 60, "two Retrieval replicas running")
    before = set(replica_pids(APP, "Retrieval"))
    victim = min(before)

    load, samples = _in_background(url, image, 2000, 16)
    _wait(lambda: len(samples) >= 400, 60, "400 requests answered")
    killed = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    # Serve counts the dead replica as running until its health check fails: wait for a new process, then two running.
    # The bound is for 2 cores shared with 16 clients: the new replica imports torch and loads the index while
    # the survivor serves; CI once saw 30.5 s.
    _wait(lambda: set(replica_pids(APP, "Retrieval")) - before, 60, "a replacement replica process")
    _wait(lambda: running(APP, "Retrieval") == 2, 60, "the replacement running")
    recovered = time.perf_counter() - killed
    assert recovered < 60, f"the replacement took {recovered:.1f} s"
    load.join(timeout=300)
    statuses = Counter(s.status for s in samples)
    print(
        f"SIGKILL of one of 2 Retrieval replicas under 2,000 /search at concurrency 16: {dict(statuses)}; "
        f"a replacement running {recovered:.1f} s after the kill"
    )
    assert sum(statuses.values()) == 2000 and statuses == {"200": 2000}, statuses
