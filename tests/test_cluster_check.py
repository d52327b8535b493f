"""`dermaray check-cluster`: the shipped cluster config fits cluster.yaml and serve/config.yaml, and broken ones are named."""

from pathlib import Path

import pytest
import yaml

from dermaray.cluster_check import check_cluster, main
from dermaray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
SERVE = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())


def problems(*overrides: str, cluster: dict = CLUSTER, serve: dict = SERVE) -> dict[str, str]:
    found = check_cluster(load_config(ROOT / "configs" / "cluster.yaml", list(overrides)), cluster, serve)
    return {p.key: p.message for p in found}


def test_the_shipped_files_fit(capsys) -> None:
    assert problems() == {}
    assert main(["--config", str(ROOT / "configs" / "cluster.yaml"), "--cluster", str(ROOT / "cluster.yaml")]) == 0
    assert "fits" in capsys.readouterr().out


def test_too_many_engine_actors_for_the_inference_nodes() -> None:
    found = problems("notes.concurrency=5")
    assert list(found) == ["notes.concurrency"]
    assert "at most 4" in found["notes.concurrency"] and "worker.gpu.inference" in found["notes.concurrency"]
    assert "max_workers" in found["notes.concurrency"]  # the fix is named


def test_a_resource_no_node_type_has() -> None:
    found = problems("embeddings.resources={gpu_a100: 1}")
    assert list(found) == ["embeddings"] and "gpu_a100" in found["embeddings"] and "no node type" in found["embeddings"]


def test_a_worker_larger_than_any_node_and_too_many_workers() -> None:
    found = problems("grounding.train.cpus_per_worker=200", "diffusion.train.num_workers=40")
    assert "CPU=200" in found["grounding.train"] and "the most one node has: CPU=96" in found["grounding.train"]
    assert "at most 32" in found["diffusion.train.num_workers"]  # 4 training nodes x 8 GPUs


def test_local_paths_are_named_with_their_key() -> None:
    found = problems("serve.lesions=/srv/lesions", "embeddings.output=out/embeddings", "report.workdir=file:///tmp/run")
    assert set(found) == {"serve.lesions", "embeddings.output", "report.workdir"}
    assert all("object storage" in message for message in found.values())


def test_a_local_config_is_not_a_cluster_config() -> None:
    found = check_cluster(load_config(ROOT / "configs" / "local.yaml"), CLUSTER, SERVE)
    keys = {p.key for p in found}
    assert {"synth.output", "ingest.input", "pipeline.workdir", "serve.diffusion", "classifier.notes"} <= keys
    assert "models.cache_dir" not in keys and "serve.api_key_env" not in keys  # per node by design, and not a path


def test_model_presets_must_exist_and_be_fetchable() -> None:
    found = problems("models.diffusion_base=sd-9", "models.note_writer=/data/qwen")
    assert "unknown diffusion_base preset 'sd-9'" in found["models.diffusion_base"] and "models.note_writer" in found
    assert "models.offline" in problems("models.offline=true")  # hub presets on fresh nodes with no way to fetch them
    assert problems("models.offline=true", "models.store=s3://YOUR-BUCKET/dermaray/models") == {}


def test_serve_replicas_must_fit() -> None:
    serve = yaml.safe_load(yaml.safe_dump(SERVE))
    [app] = serve["applications"]
    generation = next(d for d in app["deployments"] if d["name"] == "Generation")
    generation["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1, "resources": {"inference": 1}}
    generation["autoscaling_config"]["max_replicas"] = 6
    found = problems(serve=serve)
    assert list(found) == ["serve/config.yaml dermaray.Generation max_replicas"] and "at most 4" in next(iter(found.values()))
    generation["ray_actor_options"] = {"num_cpus": 1, "memory": 2 * 1024**4}  # 2 TiB: no node has it
    assert "the most one node has: memory=806.4GiB" in problems(serve=serve)["serve/config.yaml dermaray.Generation"]


def test_an_unknown_instance_type_must_declare_its_cpus() -> None:
    cluster = yaml.safe_load(yaml.safe_dump(CLUSTER))
    cluster["available_node_types"]["worker.cpu"]["node_config"]["InstanceType"] = "x9.huge"
    assert "declare its CPU and GPU" in problems(cluster=cluster)["cluster.yaml available_node_types.worker.cpu"]
    cluster["available_node_types"]["worker.cpu"]["resources"] = {"CPU": 8}
    assert problems(cluster=cluster) == {}


def test_the_cli_prints_one_line_per_problem_and_exits_1(capsys) -> None:
    args = [
        "--config",
        str(ROOT / "configs" / "cluster.yaml"),
        "--cluster",
        str(ROOT / "cluster.yaml"),
        "notes.concurrency=5",
        "serve.index=out/index",
    ]
    assert main(args) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("notes.concurrency: ") and lines[1].startswith("serve.index: ")
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs" / "cluster.yaml"), "--cluster", "/nonexistent/cluster.yaml"])


def test_serve_config_fits_a_two_cpu_machine_at_max_replicas() -> None:
    """`serve deploy serve/config.yaml` on `ray start --head` on 2 CPUs: every replica can be placed at once."""
    from dermaray.cluster_check import asks

    replicas = [a for a in asks(load_config(None), SERVE) if a.what == "Serve replica"]
    assert {a.key.rsplit(".", 1)[1] for a in replicas} == {"Ingress", "Retrieval", "Generation"}
    assert sum(a.per_unit["CPU"] * a.count for a in replicas) <= 2
    assert all(not a.per_unit.get("GPU") for a in replicas)
