"""Every arm of benchmarks/study.py is a valid configuration: a mistyped override fails here, not 30 minutes into a study."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study import ARMS, DEFAULT_ARMS, OPTIONAL_ARMS

from dermaray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_arm_loads_and_changes_what_it_names(arm: str) -> None:
    base = load_config(ROOT / "configs/local.yaml")
    cfg = load_config(ROOT / "configs/local.yaml", ARMS[arm])
    assert (cfg == base) == (not ARMS[arm])  # only the first arm is the local config as it is


def test_the_direction_heads_arm_sets_both_choices_and_runs_when_named() -> None:
    arm = "pretrained, photometric, direction heads, delta_lb_norm 4x"
    cfg = load_config(ROOT / "configs/local.yaml", ARMS[arm])
    assert arm in OPTIONAL_ARMS and arm not in DEFAULT_ARMS
    assert cfg.grounding.heads_read == "direction"
    assert cfg.grounding.attribute_weights == {"area_mm2": 4.0, "delta_lb_norm": 4.0}
    assert set(OPTIONAL_ARMS) <= set(ARMS) and next(iter(ARMS)) in DEFAULT_ARMS
