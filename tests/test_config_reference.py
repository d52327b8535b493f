"""docs/config.md is generated from the config models; it must match them."""

from pathlib import Path

from dermaray.config import DermarayConfig, load_config
from dermaray.config_reference import reference, rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_reference_is_current():
    assert DOC.read_text() == reference(), "regenerate it: python -m dermaray.config_reference > docs/config.md"


def test_every_leaf_key_is_listed_and_overridable():
    cfg = DermarayConfig()
    keys = [
        key
        for name in DermarayConfig.model_fields
        if name != "storage_options"
        for key, *_ in rows(getattr(cfg, name), f"{name}.")
    ]
    assert "grounding.train.epochs" in keys and "report.gallery_k" in keys and "notes.sampling.max_tokens" in keys
    for key in keys:
        assert f"| `{key}` |" in DOC.read_text()
    # Each listed key is a real override path (unknown keys are errors): setting it to its own default loads.
    for key in ("grounding.train.epochs", "report.gallery_k", "synth.corrupt.duplicate_id"):
        section, *path = key.split(".")
        value = getattr(cfg, section)
        for part in path:
            value = getattr(value, part)
        load_config(None, [f"{key}={value}"])
