"""The main job, small: every stage that exists, chained through its outputs on a local Ray cluster; a
driver killed during grounding, and the re-run that resumes it; a changed setting."""

import json
import math
from pathlib import Path

from dermaray.completion import STAGE_RECORD
from dermaray.config import load_config
from dermaray.storage import read_parquet
from jobs import pipeline
from tests.helpers import kill_driver_after_first_checkpoint

BEFORE_GROUNDING = ["synth/clinic", "ingest/clinic", "notes/clinic", "synth/shifted", "ingest/shifted", "notes/shifted"]


def _stamps(root: Path, folders: list[str]) -> dict[str, int]:
    """Modification times of every file under the folders: unchanged means not written again."""
    return {str(f): f.stat().st_mtime_ns for folder in folders for f in (root / folder).rglob("*") if f.is_file()}


def test_pipeline_resumes_and_chains_every_stage(ray_cluster, tmp_path, monkeypatch):
    cache = Path(".cache/models").resolve()
    config = Path("configs/local.yaml").resolve()
    overrides = [
        f"models.cache_dir={cache}",
        "synth.n_lesions=240",
        "pipeline.shifted_lesions=40",
        "notes.strategy=M",
        "grounding.train.epochs=2",
        "classifier.train.epochs=1",
        "models.text_encoder=tiny",
        "grounding.train.cpus_per_worker=1",
        "classifier.train.cpus_per_worker=1",
        "diffusion.pretrain.vae_steps=2",
        "diffusion.pretrain.unet_steps=2",
        "diffusion.pretrain.ip_adapter_steps=2",
        "diffusion.limit=64",
        "diffusion.train.epochs=1",
        "diffusion.train.cpus_per_worker=1",
        "diffusion_eval.images_per_class=2",
        "diffusion_eval.steps=4",
        "diffusion_eval.guide_sweep=[0.25, 0.3, 0.5]",  # 1, 1 and 2 steps of 4: 0.5 runs guide_strength's 2
    ]
    # The driver killed once grounding has its first checkpoint (of two epochs). It runs from the repository,
    # as `ray job submit --working-dir .` would: Ray's workers import jobs/ from the driver's directory.
    workdir = tmp_path / "out"
    kill_driver_after_first_checkpoint(
        "pipeline",
        ["--config", str(config), f"pipeline.workdir={workdir}", *overrides],
        workdir / "grounding/runs/grounding",
        {},
        ray_cluster,
    )
    killed = json.loads((workdir / "grounding" / STAGE_RECORD).read_text())
    assert killed["state"] == "running" and not (workdir / "embeddings").exists()

    monkeypatch.chdir(tmp_path)  # the re-run: relative paths, as in `make run` (workers must not depend on the directory)
    overrides = ["pipeline.workdir=out", *overrides]
    cfg = load_config(config, overrides)
    done_before = _stamps(tmp_path / "out", ["synthetic", "ingest", "notes"])

    results = pipeline.run(cfg)
    assert results["resumed"] == BEFORE_GROUNDING  # complete before the kill: skipped, not written again
    assert _stamps(tmp_path / "out", ["synthetic", "ingest", "notes"]) == done_before
    assert not set(BEFORE_GROUNDING) & set(results["stage_seconds"])
    train = read_parquet("out/ingest/clinic/lesions", {}, columns=["split"]).column("split").to_pylist().count("train")
    steps_per_epoch = math.ceil(train / cfg.grounding.train.batch_size)
    grounded = results["grounding"]  # resumed from the checkpoint of epoch 1, ended where one run would
    assert grounded["resumed_from_epoch"] == 1 and grounded["epochs"] == 2 and grounded["steps"] == 2 * steps_per_epoch
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
    evaluated = json.loads((tmp_path / "reports" / "diffusion" / "diffusion_eval.json").read_text())
    sweep = evaluated["guide_sweep"]  # one strength per number of denoising steps, by strength; 0.6 is the headline
    assert [(row["strength"], row["denoising_steps"]) for row in sweep] == [(0.25, 1), (0.6, 2)]
    assert sweep[1] == evaluated["guided"]  # (how far each strays depends on a trained VAE: not this 2-step one)
    assert all(0 < row["pixel_change"] < 1 and row["area"]["n"] == evaluated["guided"]["area"]["n"] for row in sweep)
    assert "| 0.25 (1) |" in (tmp_path / "reports" / "diffusion" / "diffusion_eval.md").read_text()
    # The same real images judged again after the base's VAE: the bound on any adapter, over the same images.
    assert evaluated["real_through_vae"]["class_relevance"]["n"] == evaluated["real"]["class_relevance"]["n"] > 0
    table = (tmp_path / "reports" / "diffusion" / "diffusion_eval.md").read_text()
    assert "| held-out real images through the base's VAE |" in table
    # The base's IP-Adapter (trained with it, in base/ip_adapter) guides from noise, scored on the same guides.
    assert (tmp_path / "diffusion" / "base" / "ip_adapter" / "ip-adapter.safetensors").is_file()
    ip = evaluated["ip_adapter"]  # from noise, and with img2img at guide_strength
    assert [(row["ip_adapter_scale"], row["strength"]) for row in ip] == [(1.0, 1.0), (1.0, 0.6)]
    assert all(row["area"]["n"] == evaluated["guided"]["area"]["n"] for row in ip)
    assert "| 1.0, 1 (from noise) |" in (tmp_path / "reports" / "diffusion" / "diffusion_eval.md").read_text()
    page = (tmp_path / "reports" / "report.html").read_text()  # the last stage: every section has its stage's outputs
    assert results["report"] == str(tmp_path / "reports" / "report.html") and 'class="not-run"' not in page
    # four diffusion grids (base, LoRA, guided, IP-Adapter), four gallery queries
    assert page.count("data:image/png;base64,") == 4 + 4 * (1 + 2 * 5)
    assert {"grounding", "classifier", "diffusion", "diffusion_eval", "report"} <= set(results["stage_seconds"])

    # A changed setting runs that stage again (and what reads it: here only the report); the rest is skipped.
    again = pipeline.run(load_config(config, [*overrides, "grounding_eval.tau_std=0.2"]))
    assert set(again["stage_seconds"]) == {"ray start", "grounding_eval", "report"}
    assert again["resumed"] == [*BEFORE_GROUNDING, "grounding", "embeddings", "classifier", "diffusion", "diffusion_eval"]
    unchanged = {k: v for k, v in results.items() if k not in ("stage_seconds", "resumed", "report")}
    assert json.loads(json.dumps({k: again[k] for k in unchanged})) == json.loads(json.dumps(unchanged))


def test_mixed_clinics_train_on_the_shifted_clinic_and_score_its_test_split(tmp_path):
    cfg = load_config("configs/local.yaml", [f"pipeline.workdir={tmp_path}", "pipeline.mixed_clinics=true"])
    at = pipeline.Layout(str(tmp_path))
    steps = {s.key: s for s in pipeline.plan(cfg, at)}
    assert steps["grounding"].inputs == ("ingest/clinic", "ingest/shifted")  # a re-ingested clinic re-trains it
    assert steps["grounding"].settings["grounding"]["mixed_inputs"] == [at.lesions("shifted")]
    assert steps["grounding_eval"].settings["grounding_eval"]["trained_on"] == ["shifted"]
    plain = {s.key: s for s in pipeline.plan(load_config("configs/local.yaml", [f"pipeline.workdir={tmp_path}"]), at)}
    assert plain["grounding"].inputs == ("ingest/clinic",)
    assert plain["grounding_eval"].settings["grounding_eval"]["trained_on"] == []
