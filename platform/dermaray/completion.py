"""Which pipeline stages are done: a record per stage in its output folder, and the fingerprint it holds.

A stage's fingerprint hashes its settings (the config sections it runs with, and the model presets
it uses) with the fingerprints of the stages it reads. The pipeline writes the stage's record twice:
`running` before the stage starts, `complete` with its results after it ends (last, so a record says
complete only when every output is there). On the next run a stage whose record is complete with the
same fingerprint is skipped; one whose fingerprint changed has its outputs deleted and runs again, and
so, through the fingerprints, does every stage that reads it. A stage left `running` (its driver was
killed) with the same fingerprint runs again over what it left: notes keep their written shards,
training resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from dermaray.config import DermarayConfig
from dermaray.storage import exists, join, read_bytes, write_bytes

STAGE_RECORD = "_stage.json"  # in a stage's (first) output folder

# Where models are found, not which: moving the cache or adding a mirror changes no output.
MODEL_LOCATION_FIELDS = {"cache_dir", "offline", "store", "store_options"}


def settings_of(cfg: DermarayConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    """The settings a stage runs with: its config sections, and the model presets."""
    settings = {name: getattr(cfg, name).model_dump(mode="json") for name in sections}
    settings["models"] = cfg.models.model_dump(mode="json", exclude=MODEL_LOCATION_FIELDS)
    return settings


def fingerprint(stage: str, settings: dict[str, Any], inputs: dict[str, str | None]) -> str:
    """The hash of a stage's settings and of its inputs' fingerprints (None: an input of unknown origin)."""
    canonical = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def record_uri(output: str) -> str:
    return join(output, STAGE_RECORD)


def read_record(output: str, storage_options: dict) -> dict[str, Any] | None:
    uri = record_uri(output)
    return json.loads(read_bytes(uri, storage_options)) if exists(uri, storage_options) else None


def write_record(
    output: str,
    stage: str,
    print_: str,
    state: Literal["running", "complete"],
    storage_options: dict,
    results: dict[str, Any] | None = None,
    seconds: float | None = None,
) -> None:
    record = {"stage": stage, "fingerprint": print_, "state": state, "results": results, "seconds": seconds}
    write_bytes(record_uri(output), json.dumps(record, indent=2, sort_keys=True, default=str).encode(), storage_options)


def complete_fingerprint(record: dict[str, Any] | None) -> str | None:
    """The fingerprint of a complete stage; None for a missing or unfinished one."""
    return record["fingerprint"] if record and record["state"] == "complete" else None
