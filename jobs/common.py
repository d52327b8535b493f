"""What every job shares: joining or starting a Ray cluster, and writing its summary."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray

from dermaray.config import RayConfig
from dermaray.storage import remove_tree, write_bytes

# Defaults for the driver and every worker, never over what the submitter set. Whether a model hub is
# reached is `models.offline`, decided where a model is resolved, not an environment forced on nodes.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
}

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager in a submitted job's driver

log = logging.getLogger("dermaray")


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address` ("auto" inside `ray job submit`), or start a local cluster."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Under `ray job submit` the job's runtime env applies already, and Ray refuses a ray.init that
    # names one of its env var keys again: the submitter's values win, ours fill in the rest.
    job = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    env_vars = {k: v for k, v in WORKER_ENV.items() if k not in (job.get("env_vars") or {})}
    ray.init(
        address=address,
        num_cpus=None if address else cfg.num_cpus,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=cfg.log_to_driver,
        ignore_reinit_error=True,
    )


def clear_summary(uri: str, storage_options: dict) -> None:
    """A job's first step: its summary, written last, is what says its outputs are complete; an earlier run's
    must not vouch for outputs this run is about to rewrite."""
    remove_tree(uri, storage_options)


def write_summary(uri: str, summary: dict, storage_options: dict) -> None:
    write_bytes(uri, json.dumps(summary, indent=2, sort_keys=True).encode(), storage_options)
    log.info("summary %s", json.dumps(summary, sort_keys=True))


def reporting(work: Callable[[], Any], logger: str) -> Iterator[tuple[str, Any]]:
    """Run `work` in a thread; yield ("log", message) for each INFO or higher record `logger` emits
    meanwhile, then ("result", what `work` returned). The body of a Ray streaming-generator task, it
    shows a long task's progress on the driver whatever `ray.log_to_driver` says (the local config
    turns that off), once: the records go to the driver's log through the stream, not to stderr.

    Run it in a task with `max_calls=1`: a cancelled task leaves its thread running, and the worker
    process must end with it."""
    records: queue.Queue = queue.Queue()
    done = object()
    handler = logging.handlers.QueueHandler(records)
    source = logging.getLogger(logger)
    level = source.level
    source.setLevel(logging.INFO if not level or level > logging.INFO else level)
    source.addHandler(handler)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # raised again below, in the task
            outcome["error"] = exc
        finally:
            records.put(done)

    thread = threading.Thread(target=run, name=f"reporting {logger}", daemon=True)
    thread.start()
    try:
        while True:
            try:  # a timeout, so that Ray's cancel (an interrupt of this thread) lands within a second
                record = records.get(timeout=1.0)
            except queue.Empty:
                continue
            if record is done:
                break
            yield "log", record.getMessage()
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["value"]
