"""Fault tolerance on a real multi-node cluster: a head and worker nodes started with `ray start` here.

A worker node is killed the way a machine is lost (SIGKILL of its raylet, agents and workers),
mid-training and mid-notes. Ray Train must restore the worker group from the last checkpoint
and finish; Ray Data must restart the lost engine actor and redo its shard, writing each note
exactly once. Worker nodes join when a job asks for them and a lost node's capacity comes back
as a fresh node, as an autoscaler does: the jobs need that many worker slots to go on.

Resources pin the work: each worker node has 4 CPUs (logical: this box has 2 cores) and each
training worker or engine actor asks for 4, so only worker nodes can hold them; the head has 3,
for the drivers' Ray Data work. The training data is prepared (materialized) before the worker
nodes join, so its blocks live on the head and a lost worker node takes only training workers
with it. Every node runs in its own process group, killed at the end.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermaray.storage import read_parquet
from tests.ray_nodes import node_env, start_cluster

CACHE = str(Path(".cache/models").resolve())
EPOCHS = 10
SLOT = 4  # CPUs of a worker node = CPUs of one training worker or engine actor


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(head_cpus=3)
    try:
        yield c
    finally:
        c.shutdown()


def worker_nodes(cluster) -> set[str]:
    return set(cluster.node_names().values()) - {"head"}


def driver(cluster, module: str, *args: str, log: Path) -> subprocess.Popen:
    """`python -m <module> args` joined to the cluster, as `ray job submit` would run it on the head."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                *args,
                f"ray.address={cluster.gcs_address}",
                f"models.cache_dir={CACHE}",
                "ray.log_to_driver=false",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=node_env(),
        )


def finish(process: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.returncode == 0, f"{process.args[2]} exited {process.returncode}:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def lesions(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    p = driver(
        cluster,
        "jobs.pipeline",
        "--config",
        "configs/local.yaml",
        f"pipeline.workdir={root}",
        "pipeline.shifted_lesions=0",
        "synth.n_lesions=300",
        "synth.shard_size=100",
        "pipeline.stages=[synth,ingest]",
        log=root / "data.log",
    )
    finish(p, root / "data.log", 180)
    return root / "ingest" / "clinic" / "lesions"


def test_training_survives_a_lost_worker_node(cluster, lesions, tmp_path):
    out = tmp_path / "grounding"
    log = tmp_path / "grounding.log"
    p = driver(
        cluster,
        "jobs.grounding",
        f"grounding.input={lesions}",
        f"grounding.output={out}",
        "grounding.tune=full",
        f"grounding.train.epochs={EPOCHS}",
        "grounding.train.num_workers=2",
        f"grounding.train.cpus_per_worker={SLOT}",
        "grounding.train.batch_size=32",
        "grounding.train.max_failures=3",
        log=log,
    )
    try:
        # Training asks for two worker slots once its data is ready: two worker nodes join.
        deadline = time.time() + 240
        while not cluster.actor_nodes("TrainController") and p.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert p.poll() is None, f"the job ended before training:\n{log.read_text()[-3000:]}"
        for name in sorted({"a", "b"} - worker_nodes(cluster)):
            cluster.add_worker(name, num_cpus=SLOT)
        snapshot = out / "runs" / "grounding" / "checkpoint_manager_snapshot.json"  # Ray Train's record of checkpoints
        while not snapshot.exists() and p.poll() is None and time.time() < deadline + 120:
            time.sleep(0.1)
        assert snapshot.exists() and p.poll() is None, f"no checkpoint before the kill:\n{log.read_text()[-3000:]}"
        cluster.kill_node("b")  # one worker per node: b holds one of the two training workers
        cluster.add_worker("c", num_cpus=SLOT)
        finish(p, log, 300)
    finally:
        if p.poll() is None:
            p.kill()
    summary = json.loads((out / "grounding_summary.json").read_text())
    assert summary["epochs"] == EPOCHS and [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    assert 1 <= summary["resumed_from_epoch"] < EPOCHS, "the last attempt must have started from a checkpoint"
    steps_per_epoch = summary["history"][0]["step"]
    assert summary["steps"] == EPOCHS * steps_per_epoch  # the same schedule as a run never interrupted
    assert (out / "model" / "trainable.pt").is_file()


def test_notes_survive_a_lost_engine_node(cluster, lesions, tmp_path):
    out = tmp_path / "notes"
    log = tmp_path / "notes.log"
    limit, shard = 240, 20
    for name in ("d", "e")[: max(0, 2 - len(worker_nodes(cluster)))]:  # two engine slots (when run alone)
        cluster.add_worker(name, num_cpus=SLOT)
    p = driver(
        cluster,
        "jobs.notes",
        f"notes.input={lesions}",
        f"notes.output={out}",
        "notes.strategy=P2",
        f"notes.limit={limit}",
        f"notes.shard_size={shard}",
        "notes.concurrency=2",
        f"notes.num_cpus={SLOT}",
        "notes.sampling.max_tokens=16",
        "notes.max_model_len=1024",
        log=log,
    )
    try:
        deadline = time.time() + 240
        engines: set[str] = set()
        while not engines and p.poll() is None and time.time() < deadline:  # the state API is slow: find them first
            engines = cluster.actor_nodes("ShardWriter") - {"head"}
            time.sleep(0.5)
        assert engines, f"no engine actor on a worker node:\n{log.read_text()[-3000:]}"
        while not list(out.glob("notes-*.parquet")) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        before = len(list(out.glob("notes-*.parquet")))
        cluster.kill_node(sorted(engines)[0])
        assert 1 <= before < limit // shard, "the kill must land mid-run"
        cluster.add_worker("f", num_cpus=SLOT)
        finish(p, log, 300)
    finally:
        if p.poll() is None:
            p.kill()
    written = read_parquet(str(out), columns=["lesion_id", "error"]).to_pandas()
    expected = sorted(read_parquet(str(lesions), columns=["lesion_id"]).column("lesion_id").to_pylist())[:limit]
    assert sorted(written.lesion_id) == expected  # none missing, none twice
    # The random tiny model may end a note at once ("empty_note", a row with its reason); nothing
    # else may fail, the lost engine least of all.
    assert set(written.error.dropna().str.split(":").str[0]) <= {"empty_note", "no_text"}, written.error.dropna()
    assert len(list(out.glob("notes-*.parquet"))) == limit // shard
