"""A resume inside an epoch trains every example of that epoch exactly once.

The shared training loop (jobs/training.py) skips, on a resume, the batches of the epoch already
trained on before the checkpoint, by position. That is right only if the epoch's order repeats after
a restart. Here two Ray Train workers train on 96 keyed rows; rank 0 fails once in the second epoch,
after a mid-epoch checkpoint; Ray Train restarts the worker group from that checkpoint. The rows
whose updates survived (those before the checkpoint in the first attempt, then the resumed
attempt's) must be every row, once.
"""

import json
import os
import random
import time
from pathlib import Path

import ray
import torch

from dermaray.config import TrainConfig
from jobs.training import Task, fit

ROWS, BATCH, WORKERS, EPOCHS, EVERY = 96, 8, 2, 2, 2
BATCHES = ROWS // WORKERS // BATCH  # per worker and epoch; one optimizer step each
FAIL_AT = BATCHES + 3  # rank 0's 10th batch: epoch 2, batch 4, after the checkpoint at step 8


def build(config: dict) -> torch.nn.Module:
    return torch.nn.Linear(1, 1)


def loss(model: torch.nn.Module, batch: dict, config: dict) -> torch.Tensor:
    """Record the batch's keys (per worker process), fail once on rank 0, then a trivial regression."""
    rank = ray.train.get_context().get_world_rank()
    keys = batch["id"].tolist()
    with open(Path(config["log"]) / f"rank{rank}.jsonl", "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "keys": keys}) + "\n")
    failed = Path(config["log"]) / "failed"
    calls = sum(1 for line in open(Path(config["log"]) / f"rank{rank}.jsonl") if json.loads(line)["pid"] == os.getpid())
    if rank == 0 and calls == FAIL_AT + 1 and not failed.exists():
        failed.touch()
        raise RuntimeError("planted worker failure")
    x = batch["id"].float().unsqueeze(1) / ROWS
    return torch.nn.functional.mse_loss(model(x), 2 * x)


def evaluate(model, shard, config, device) -> dict:
    return {}


def save(folder: Path, model: torch.nn.Module, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")


def load(folder: Path, model: torch.nn.Module) -> None:
    model.load_state_dict(torch.load(folder / "weights.pt"))


KEYED = Task(build=build, loss=loss, evaluate=evaluate, save=save, load=load)


def _jitter(block: dict) -> dict:
    """A map step whose tasks finish in a random order, as decoding images of different sizes does."""
    time.sleep(random.random() * 0.3)
    return block


def _attempts(log: Path) -> dict[tuple[str, int], list[list[int]]]:
    """(rank's log, worker process) -> the keys of each batch it was given, in order."""
    by_pid: dict[tuple[str, int], list[list[int]]] = {}
    for rank_log in sorted(log.glob("rank*.jsonl")):
        for line in rank_log.read_text().splitlines():
            entry = json.loads(line)
            by_pid.setdefault((rank_log.name, entry["pid"]), []).append(entry["keys"])
    return by_pid


def test_a_resumed_epoch_trains_every_example_once(ray_cluster, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    # Blocks of unordered keys (37 is prime to 96: a permutation), put in the object store by the driver, and a
    # map whose tasks ask for little CPU: the session's Serve app may hold most of this 2-CPU cluster.
    rows = ray.data.from_items([{"id": (37 * i) % ROWS} for i in range(ROWS)], override_num_blocks=12)
    rows = rows.map_batches(_jitter, batch_size=None, num_cpus=0.05)
    tc = TrainConfig(
        num_workers=WORKERS,
        cpus_per_worker=0.25,
        batch_size=BATCH,
        epochs=EPOCHS,
        checkpoint_every_steps=EVERY,
        max_failures=1,
    )
    _, history = fit(KEYED, {"log": str(log)}, tc, {"train": rows, "val": rows}, ROWS, str(tmp_path / "out"), "keyed", {})

    assert (log / "failed").exists(), "the planted failure must have happened"
    assert [h["step"] for h in history] == [BATCHES, 2 * BATCHES]  # no step lost or repeated
    resumed_at = history[-1]["started_at_step"] - BATCHES  # batches of epoch 2 kept from the first attempt
    assert history[-1]["started_at_epoch"] == 1 and 0 < resumed_at < BATCHES, history[-1]

    processes = _attempts(log)
    first = {rank: batches for (rank, _), batches in processes.items() if len(batches) > BATCHES}
    second = {rank: batches for (rank, _), batches in processes.items() if len(batches) < BATCHES}
    assert sorted(first) == sorted(second) == ["rank0.jsonl", "rank1.jsonl"], {k: len(v) for k, v in processes.items()}
    epoch1 = [key for batches in first.values() for batch in batches[:BATCHES] for key in batch]
    assert sorted(epoch1) == list(range(ROWS))
    kept = [key for batches in first.values() for batch in batches[BATCHES : BATCHES + resumed_at] for key in batch]
    resumed = [key for batches in second.values() for batch in batches for key in batch]
    assert sorted(kept + resumed) == list(range(ROWS)), "a row trained twice or never in the resumed epoch"


def scored(model, shard, config, device) -> dict:
    return {"val_score": 1.0}


def test_checkpoint_every_epochs_validates_and_checkpoints_only_there(ray_cluster, tmp_path):
    """Every epoch reports its training metrics; validation and a checkpoint come every 2nd epoch and after the last."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "failed").touch()  # no planted failure here
    rows = ray.data.from_items([{"id": i} for i in range(ROWS)])
    task = Task(build=build, loss=loss, evaluate=scored, save=save, load=load)
    tc = TrainConfig(cpus_per_worker=0.25, batch_size=BATCH, epochs=3, checkpoint_every_epochs=2, checkpoints_to_keep=5)
    out = tmp_path / "out"
    _, history = fit(task, {"log": str(log)}, tc, {"train": rows, "val": rows}, ROWS, str(out), "sparse", {})

    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert ["val_score" in h for h in history] == [False, True, True]
    saved = sorted(p.name for p in (out / "runs" / "sparse").glob("checkpoint_*") if p.is_dir())
    assert len(saved) == 2, saved  # epochs 2 and 3, not 1
