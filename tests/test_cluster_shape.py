"""The cluster shape, for real: nodes that share no filesystem, object storage, credentials from a file.

A head and two worker nodes started with `ray start`; each worker node runs in its own mount
namespace with an empty tmpfs over the driver's scratch folder and model cache, so nothing the
driver has on disk exists there (as on a cloud cluster). The head has no CPU for tasks, so every
task, actor and training worker runs on a worker node. The pipeline runs synth -> ingest ->
notes -> grounding -> embeddings -> classifier -> diffusion -> diffusion_eval with its workdir
on the moto S3 server; each node builds the tiny models into its own cache.

S3 credentials come from a secrets file named in `storage_options.secrets_file` and read on
each node (no node, nor the driver, has them in its environment); the secret appears nowhere
in Ray's state API (actors, tasks, Train runs), the cluster's log files, the driver's log or
any summary the stages wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.ray_nodes import node_env, start_cluster

REPO = Path(__file__).resolve().parents[1]
SECRET = "file-held-secret-Wm4kTq9"  # moto accepts any credentials; this one must leak nowhere
STAGES = "[synth,ingest,notes,grounding,embeddings,classifier,diffusion,diffusion_eval]"
WORKDIR = "s3://dermaray/cluster-shape"


def without_credentials() -> dict[str, str]:
    return {k: v for k, v in node_env().items() if not k.startswith("AWS_")}


@pytest.fixture(scope="module")
def shape(s3_options, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("driver")  # the driver's files: its model cache, its logs
    secrets = tmp_path_factory.mktemp("secrets") / "s3.yaml"  # on every node, as a mounted secret would be
    secrets.write_text(f"key: dermaray-file-key\nsecret: {SECRET}\n")
    cluster = start_cluster(head_cpus=0)
    try:
        for name in ("a", "b"):
            cluster.add_worker(name, num_cpus=2, private=[scratch], env=without_credentials())
        yield cluster, scratch, secrets
    finally:
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the whole pipeline on three nodes: about 6-8 minutes idle, more on a loaded box
def test_pipeline_on_nodes_without_the_drivers_files(shape, s3_options):
    import s3fs

    cluster, scratch, secrets = shape
    log = scratch / "pipeline.log"
    command = [
        sys.executable,
        "-m",
        "jobs.pipeline",
        "--config",
        "configs/local.yaml",
        f"ray.address={cluster.gcs_address}",
        "ray.log_to_driver=false",
        f"pipeline.workdir={WORKDIR}",
        f"pipeline.stages={STAGES}",
        "pipeline.shifted_lesions=0",
        f"storage_options.endpoint_url={s3_options['endpoint_url']}",
        f"storage_options.secrets_file={secrets}",
        f"models.cache_dir={scratch / 'models'}",
        "synth.n_lesions=120",
        "synth.shard_size=60",
        "models.note_writer=tiny",
        "models.grounding_mllm=tiny",  # the random tower: the pretrained one would be trained on every node
        "notes.sampling.max_tokens=8",
        "grounding.train.epochs=1",
        "grounding.train.batch_size=16",
        "classifier.train.epochs=1",
        "classifier.train.batch_size=16",
        "diffusion.pretrain.vae_steps=2",
        "diffusion.pretrain.unet_steps=2",
        "diffusion.pretrain.batch_size=4",
        "diffusion.pretrain.max_images=16",
        "diffusion.limit=16",
        "diffusion.train.epochs=1",
        "diffusion.train.batch_size=8",
        "diffusion_eval.images_per_class=2",
        "diffusion_eval.steps=2",
        "diffusion_eval.real_images=8",
    ]
    with open(log, "wb") as out:
        # Train's run state on (off by default): the dashboard then serves each run's train_loop_config.
        env = {**without_credentials(), "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
        run = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1500)
    driver_log = log.read_text(errors="replace")
    assert run.returncode == 0, driver_log[-5000:]

    # Every stage's outputs are on object storage, complete.
    fs = s3fs.S3FileSystem(endpoint_url=s3_options["endpoint_url"], key="dermaray-file-key", secret=SECRET)
    summary = json.loads(fs.cat(f"{WORKDIR}/pipeline_summary.json"))
    ingest = summary["ingest/clinic"]
    assert ingest["rows_in"] == ingest["rows_out"] + ingest["rows_quarantined"] and ingest["rows_out"] > 90
    assert summary["notes/clinic"]["notes"] + summary["notes/clinic"]["errors"] == ingest["rows_out"]
    assert summary["grounding"]["epochs"] == 1 and summary["classifier"]["epochs"] == 1
    assert fs.exists(f"{WORKDIR}/diffusion/base/pretrain.json") and fs.exists(f"{WORKDIR}/diffusion/adapter")
    assert set(summary["diffusion_eval"]) == {"base", "lora"}
    # The driver built nothing for the nodes: its model cache holds at most what the driver itself loaded,
    # and the nodes' caches (their private tmpfs) are gone with them.
    assert not (scratch / "models" / "diffusion_base").exists()

    # The secret is in no state the dashboard serves, no log, no summary.
    from ray.util.state import list_actors, list_nodes, list_tasks

    state = [
        json.dumps(
            [
                a.__dict__
                for a in list_actors(address=cluster.dashboard_url, detail=True, limit=10000, raise_on_missing_output=False)
            ],
            default=str,
        ),
        json.dumps(
            [
                t.__dict__
                for t in list_tasks(address=cluster.dashboard_url, detail=True, limit=10000, raise_on_missing_output=False)
            ],
            default=str,
        ),
        json.dumps([n.__dict__ for n in list_nodes(address=cluster.dashboard_url, detail=True)], default=str),
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/train/v2/runs/v1", timeout=30).read().decode(),
    ]
    assert "train_loop_config" in state[3] and "endpoint_url" in state[3]  # the Train runs, with their configs, were read
    assert all(SECRET not in text for text in state)
    logs = [p for p in cluster.temp_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix in (".log", ".out", ".err") for p in logs)
    leaked = [str(p) for p in logs if SECRET.encode() in p.read_bytes()]
    assert leaked == [] and SECRET not in driver_log
    written = [p for p in fs.find(WORKDIR) if p.endswith((".json", ".md", ".html", ".yaml"))]
    assert written and not [p for p in written if SECRET.encode() in fs.cat(p)]
