"""What an operator reads off a running app, and the bounded load that shows it scale and survive a kill.

Used by benchmarks/serve_autoscale.py and tests/test_serve_operations.py. The load goes to loopback
addresses only, and is bounded in requests and time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import yaml

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVE_CONFIG = Path(__file__).parent / "config.yaml"


# serve/config.yaml's autoscaling delays are minutes; a test or a benchmark on one machine shows the same
# behaviour in seconds.
SHORT_DELAYS = {"upscale_delay_s": 1, "downscale_delay_s": 5, "metrics_interval_s": 0.5, "look_back_period_s": 2}


def deployment_options(
    config: Path = SERVE_CONFIG, num_cpus: float | None = None, **autoscaling: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Deployment name -> `.options(...)` arguments as a Serve config file sets them; `num_cpus` replaces every
    deployment's CPU ask, and `autoscaling` overrides single autoscaling settings per deployment, e.g.
    Retrieval={"downscale_delay_s": 5}."""
    deployments = yaml.safe_load(config.read_text())["applications"][0]["deployments"]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments}
    for name, changes in autoscaling.items():
        options[name]["autoscaling_config"] = {**options[name].get("autoscaling_config", {}), **changes}
    if num_cpus is not None:
        for deployment in options.values():
            deployment["ray_actor_options"] = {"num_cpus": num_cpus}
    return options


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """Replicas of a deployment by state (RUNNING, STARTING, STOPPING, ...), from Serve's status API."""
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {str(getattr(state, "value", state)): n for state, n in status.replica_states.items() if n}


def running(app: str, deployment: str) -> int:
    return replica_states(app, deployment).get("RUNNING", 0)


def replica_pids(app: str, deployment: str) -> list[int]:
    """The process ids of a deployment's live replicas (Ray's state API), to kill one as a fault would."""
    import ray
    from ray.util.state import list_actors

    # This process' cluster, named: with several on one machine, the state API will not guess.
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    filters = [("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")]
    actors = list_actors(address=address, filters=filters)
    return [a.pid for a in actors if a.pid]


@dataclass(frozen=True)
class Sample:
    started: float  # seconds since the load began
    seconds: float
    status: str  # "200", "503", ... or "transport error (ReadError)"


async def drive(
    url: str,
    requests: int,
    concurrency: int,
    request: dict[str, Any],
    headers: dict[str, str] | None = None,
    max_seconds: float = 300.0,
    samples: list[Sample] | None = None,
    stop: threading.Event | None = None,
) -> list[Sample]:
    """`requests` POSTs of `request` (httpx arguments: url, params, files, json) from `concurrency` clients,
    for at most `max_seconds` or until `stop` is set; each answer is appended to `samples` as it comes (a list
    another thread may watch)."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"{url}: load goes to loopback addresses only")
    samples = [] if samples is None else samples
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=60, limits=limits) as client:

        async def client_loop() -> None:
            for _ in remaining:
                if time.perf_counter() - began > max_seconds or (stop is not None and stop.is_set()):
                    return
                started = time.perf_counter()
                try:
                    status = str((await client.post(**request)).status_code)
                except httpx.HTTPError as error:
                    status = f"transport error ({type(error).__name__})"
                samples.append(Sample(started - began, time.perf_counter() - started, status))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return samples
