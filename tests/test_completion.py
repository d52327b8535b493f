"""Stage fingerprints: what re-runs a stage, and what does not."""

from dermaray.completion import complete_fingerprint, fingerprint, read_record, settings_of, write_record
from dermaray.config import load_config


def _print(overrides: list[str], inputs: dict | None = None) -> str:
    cfg = load_config(None, overrides)
    return fingerprint("grounding", settings_of(cfg, ("grounding",)), inputs or {"ingest/clinic": "abc"})


def test_a_stage_fingerprint_follows_its_settings_and_its_inputs():
    base = _print([])
    assert _print([]) == base
    assert _print(["grounding.train.epochs=3"]) != base  # its own settings
    assert _print(["models.grounding_mllm=llava-1.5-7b"]) != base  # the model it uses
    assert _print([], {"ingest/clinic": "abd"}) != base  # an input that was made anew
    assert _print([], {"ingest/clinic": None}) != base  # an input of unknown origin
    # Neither another stage's settings nor where models are cached change what this stage writes.
    assert _print(["diffusion.train.epochs=3", "models.cache_dir=/elsewhere", "models.offline=false"]) == base


def test_a_record_is_complete_only_once_written_so(tmp_path):
    folder = str(tmp_path / "grounding")
    assert read_record(folder, {}) is None and complete_fingerprint(None) is None
    write_record(folder, "grounding", "f1", "running", {})
    assert complete_fingerprint(read_record(folder, {})) is None
    write_record(folder, "grounding", "f1", "complete", {}, {"grounding": {"epochs": 2}}, 1.5)
    record = read_record(folder, {})
    assert complete_fingerprint(record) == "f1" and record["results"] == {"grounding": {"epochs": 2}}
