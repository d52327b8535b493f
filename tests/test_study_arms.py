"""Every arm of benchmarks/study.py is a valid configuration that holds what it names: a mistyped override fails here,
not 30 minutes into a study."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study import ARMS, DEFAULT_ARMS, OPTIONAL_ARMS, diffusion_overrides

from dermaray.config import load_config

LOCAL = Path(__file__).resolve().parents[1] / "configs/local.yaml"


def assert_holds(overrides: list[str]) -> None:
    """The local config with `overrides` loads, and holds each value they set."""
    resolved = load_config(LOCAL, overrides).model_dump()
    for override in overrides:
        path, value = override.split("=", 1)
        held = resolved
        for key in path.split("."):
            held = held[key]
        expected = yaml.safe_load(value)
        if isinstance(held, float):
            expected = float(expected)  # YAML reads 1e-3 as a string; the config as the number it is
        assert held == expected, override


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_arm_loads_and_holds_each_value_it_sets(arm: str) -> None:
    cfg = load_config(LOCAL, ARMS[arm])
    assert (cfg == load_config(LOCAL)) == (not ARMS[arm])  # only the first arm is the local config as it is
    assert_holds(ARMS[arm])


def test_the_diffusion_part_loads_and_holds_each_value_it_sets() -> None:
    assert_holds(diffusion_overrides())


def test_the_direction_heads_arm_sets_both_choices_and_runs_when_named() -> None:
    arm = "pretrained, photometric, direction heads, delta_lb_norm 4x"
    cfg = load_config(LOCAL, ARMS[arm])
    assert arm in OPTIONAL_ARMS and arm not in DEFAULT_ARMS
    assert cfg.grounding.heads_read == "direction"
    assert cfg.grounding.attribute_weights == {"area_mm2": 4.0, "delta_lb_norm": 4.0}
    assert set(OPTIONAL_ARMS) <= set(ARMS) and next(iter(ARMS)) in DEFAULT_ARMS
