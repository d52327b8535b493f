import subprocess
import sys

import pytest
from pydantic import ValidationError

from dermaray.config import load_config, parse_override


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  n_lesions: 10\n  seed: 3\ningest:\n  source: ham10000\n")
    cfg = load_config(
        path,
        ["synth.n_lesions=42", "storage_options.endpoint_url=http://127.0.0.1:9000", "ingest.split_fractions=[0.5, 0.25, 0.25]"],
    )
    assert cfg.synth.n_lesions == 42 and cfg.synth.seed == 3
    assert cfg.ingest.source == "ham10000"
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert cfg.ingest.split_fractions == (0.5, 0.25, 0.25)


@pytest.mark.parametrize(
    "override",
    [
        "synth.n_lesionz=5",
        "synth.n_lesions=zero",
        "synth.n_lesions=0",
        "ingest.source=dicom",
        "ingest.split_fractions=[0.5, 0.5, 0.5]",
        ["pipeline.mixed_clinics=true", "pipeline.shifted_lesions=0"],
        ["grounding.input=out/a", "grounding.mixed_inputs=[out/b, out/a]"],
        ["diffusion.pretrain.zero_terminal_snr=true", "diffusion.pretrain.unet_steps=0"],  # no UNet learns the schedule
        "grounding.attribute_weights.delta_lb_nrom=4",  # a weight that would weigh nothing
        ["grounding.attributes=[area_mm2]", "grounding.attribute_weights.eccentricity=2"],
        "grounding.attribute_weights.area_mm2=-1",
        "grounding.heads_read=norm",
    ],
)
def test_bad_overrides_are_errors(override):
    with pytest.raises(ValidationError):
        load_config(None, override if isinstance(override, list) else [override])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["diffusion_eval.guide_sweep=[0.2, 1.5]"], "strengths in"),
        (["diffusion_eval.guide_strength=null", "diffusion_eval.guide_sweep=[0.2]"], "needs guide_strength"),
        (["diffusion_eval.steps=2", "diffusion_eval.guide_sweep=[0.3]"], "no denoising step"),  # int(2 x 0.3) = 0
        (["serve.steps=1"], "chain_guide: none"),  # /chain draws from the upload by default, at strength 0.6
    ],
)
def test_a_guide_strength_that_denoises_nothing_is_refused(overrides, match):
    with pytest.raises(ValidationError, match=match):
        load_config(None, overrides)
    assert load_config(None, ["serve.steps=1", "serve.chain_guide=none"]).serve.steps == 1  # text alone: fine


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ValueError):
        parse_override("no-equals-sign")


def test_cli_reports_bad_config_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.synth", "synth.n_lesionz=5"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "n_lesionz" in result.stderr and "Traceback" not in result.stderr


def test_cli_prints_resolved_config():
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "synth", "--print-config", "synth.seed=7"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "seed: 7" in result.stdout


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        load_config(path)
