"""The main job, small: every stage that exists, chained through its outputs on a local Ray cluster."""

import json

from dermaray.config import load_config
from jobs import pipeline


def test_pipeline_chains_synth_ingest_notes(ray_cluster, tmp_path):
    cfg = load_config(
        "configs/local.yaml",
        [f"pipeline.workdir={tmp_path}", "synth.n_lesions=120", "pipeline.shifted_lesions=40", "notes.strategy=M"],
    )
    results = pipeline.run(cfg)
    assert json.loads((tmp_path / "pipeline_summary.json").read_text()) == json.loads(json.dumps(results))
    for domain, n in (("clinic", 120), ("shifted", 40)):
        ingest = results[f"ingest/{domain}"]
        assert ingest["rows_in"] == n + cfg.synth.corrupt.duplicate_id
        assert ingest["rows_in"] == ingest["rows_out"] + ingest["rows_quarantined"]
        assert results[f"notes/{domain}"]["notes"] == ingest["rows_out"]
        assert results[f"notes/{domain}"]["hallucination_rate"] == 0.0
