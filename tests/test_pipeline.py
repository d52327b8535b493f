"""The main job, small: every stage that exists, chained through its outputs on a local Ray cluster."""

import json
from pathlib import Path

from dermaray.config import load_config
from jobs import pipeline


def test_pipeline_chains_every_stage(ray_cluster, tmp_path, monkeypatch):
    cache = Path(".cache/models").resolve()
    config = Path("configs/local.yaml").resolve()
    monkeypatch.chdir(tmp_path)  # relative paths, as in `make run`: workers must not depend on the directory
    cfg = load_config(
        config,
        [
            "pipeline.workdir=out",
            f"models.cache_dir={cache}",
            "synth.n_lesions=240",
            "pipeline.shifted_lesions=40",
            "notes.strategy=M",
            "grounding.train.epochs=2",
            "classifier.train.epochs=1",
            "models.text_encoder=tiny",
            "grounding.train.cpus_per_worker=1",
            "classifier.train.cpus_per_worker=1",
            "diffusion.pretrain.steps=2",
            "diffusion.limit=64",
            "diffusion.train.epochs=1",
            "diffusion.train.cpus_per_worker=1",
            "diffusion_eval.images_per_class=2",
            "diffusion_eval.steps=2",
        ],
    )
    results = pipeline.run(cfg)
    tmp_path = tmp_path / "out"
    assert json.loads((tmp_path / "pipeline_summary.json").read_text()) == json.loads(json.dumps(results))
    for domain, n in (("clinic", 240), ("shifted", 40)):
        ingest = results[f"ingest/{domain}"]
        assert ingest["rows_in"] == n + cfg.synth.corrupt.duplicate_id
        assert ingest["rows_in"] == ingest["rows_out"] + ingest["rows_quarantined"]
        assert results[f"notes/{domain}"]["notes"] == ingest["rows_out"]
        assert results[f"notes/{domain}"]["hallucination_rate"] == 0.0
        for model in ("frozen", "grounded"):
            assert results[f"embeddings/{model}/{domain}"]["lesions"] == ingest["rows_out"]
    assert results["grounding"]["epochs"] == 2 and (tmp_path / "grounding" / "model" / "trainable.pt").is_file()
    report = (tmp_path / "reports" / "grounding" / "grounding_eval.md").read_text()
    assert "clinic held-out" in report and "shifted (domain shift" in report
    assert set(results["classifier"]["eval"]) == {"in-domain (test split)", "shifted domain"}
    assert results["classifier"]["lesions_without_note"] == 0
    assert (tmp_path / "diffusion" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert set(results["diffusion_eval"]) == {"base", "lora"} and all(0 <= v <= 1 for v in results["diffusion_eval"].values())
    assert (tmp_path / "reports" / "diffusion" / "grid_lora.png").is_file()
    page = (tmp_path / "reports" / "report.html").read_text()  # the last stage: every section has its stage's outputs
    assert results["report"] == str(tmp_path / "reports" / "report.html") and 'class="not-run"' not in page
    assert page.count("data:image/png;base64,") == 2 + 4 * (1 + 2 * 5)  # two diffusion grids, four gallery queries
    assert {"grounding", "classifier", "diffusion", "diffusion_eval", "report"} <= set(results["stage_seconds"])
