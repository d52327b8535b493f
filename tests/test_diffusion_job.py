"""The LoRA diffusion job on a real local Ray cluster: pre-trained tiny base, adapter training, resume, diffusers loading."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dermaray.config import ModelsConfig, load_config
from dermaray.diffusion.pipeline import LORA_WEIGHT_NAME, add_lora, generate, load_pipeline, lora_state, read_lora
from dermaray.storage import read_parquet
from jobs import diffusion
from jobs.diffusion_eval import adapters_by_class
from tests.helpers import kill_driver_after_first_checkpoint

LESIONS = "s3://dermaray/ingest/lesions"
FAST = [
    "diffusion.resolution=32",
    "diffusion.pretrain.vae_steps=6",
    "diffusion.pretrain.unet_steps=6",
    "diffusion.pretrain.batch_size=8",
    "diffusion.pretrain.max_images=64",
    "diffusion.train.batch_size=64",
    "diffusion.train.cpus_per_worker=1",
    "diffusion.lora_rank=4",
    "diffusion.limit=320",
]


def _config(s3_options, *overrides):
    cfg = load_config(None, [*FAST, f"diffusion.input={LESIONS}", *overrides])
    cfg.storage_options = s3_options
    return cfg


def _steps_per_epoch(s3_options) -> int:
    return math.ceil(min(320, read_parquet(LESIONS, s3_options, columns=["split"])["split"].to_pylist().count("train")) / 64)


@pytest.fixture(scope="module")
def trained(ingested_on_s3, s3_options, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion")
    return out, diffusion.run(_config(s3_options, f"diffusion.output={out}", "diffusion.train.epochs=2"))


def test_adapter_trains_and_loads_in_a_plain_diffusers_pipeline(trained, s3_options):
    out, summary = trained
    assert summary["epochs"] == 2 and summary["steps"] == 2 * _steps_per_epoch(s3_options)
    assert summary["pretrain"]["unet"] > 0 and (out / "base" / "model_index.json").is_file()
    adapter = out / "adapter"
    assert (adapter / LORA_WEIGHT_NAME).is_file() and all(k.startswith("unet.") for k in load_file(adapter / LORA_WEIGHT_NAME))

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = ["a dermoscopic photo of melanoma, skin lesion"]
    base_images = generate(pipe, prompt, 1, seed=3, steps=2)
    pipe.load_lora_weights(adapter)
    adapted = generate(pipe, prompt, 1, seed=3, steps=2)
    assert adapted[0].size == base_images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(adapted[0]), np.asarray(base_images[0]))  # the adapter changes the images


def test_killed_driver_resumes_with_the_adapter_weights_restored(trained, s3_options, ray_cluster, tmp_path):
    """Kill after the first checkpoint (every 2 steps, so inside an epoch); the resumed run ends where an
    uninterrupted one does, adapter included. The uninterrupted run is the module's `trained` one: the same
    settings, and checkpointing more often changes no weight."""
    base_out, reference = trained
    epochs, total = 2, 2 * _steps_per_epoch(s3_options)
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    (resumed_out / "base").symlink_to(base_out / "base", target_is_directory=True)  # only the adapter stage differs
    every = ["diffusion.train.checkpoint_every_steps=2", f"diffusion.train.epochs={epochs}"]

    args = [*FAST, f"diffusion.input={LESIONS}", f"diffusion.output={resumed_out}", *every]
    kill_driver_after_first_checkpoint("diffusion", args, resumed_out / "runs" / "lora", s3_options, ray_cluster)
    resumed = diffusion.run(_config(s3_options, f"diffusion.output={resumed_out}", *every))

    assert 2 <= resumed["resumed_from_step"] < total, "the kill must land mid-run"
    assert resumed["steps"] == reference["steps"] == total
    # Restarting the adapter from its initial weights (the failure this guards against) would leave
    # the resumed adapter at least a fifth of the training movement away from the uninterrupted one.
    ref, got = read_lora(base_out / "adapter"), read_lora(resumed_out / "adapter")
    pipe = load_pipeline(base_out / "base")
    add_lora(pipe.unet, rank=4, alpha=8, seed=0)
    start = lora_state(pipe.unet)
    assert ref.keys() == got.keys() == start.keys()
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    gap = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert moved > 0 and gap < 0.1 * moved, f"resumed adapter is {gap} from the uninterrupted one, which moved {moved}"


def test_per_diagnosis_adapters_each_load_and_serve_their_diagnosis(trained, s3_options, tmp_path):
    base_out, _ = trained
    out = tmp_path / "per_diagnosis"
    out.mkdir()
    (out / "base").symlink_to(base_out / "base", target_is_directory=True)
    summary = diffusion.run(
        _config(
            s3_options,
            f"diffusion.output={out}",
            "diffusion.adapters=per_diagnosis",
            "diffusion.diagnoses=[MEL,NEV]",
            "diffusion.train.epochs=1",
        )
    )
    table = read_parquet(LESIONS, s3_options, columns=["lesion_id", "split", "diagnosis"]).to_pylist()
    first = sorted(r["lesion_id"] for r in table if r["split"] == "train")[:320]  # diffusion.limit
    of_class = {c: sum(r["diagnosis"] == c for r in table if r["lesion_id"] in set(first)) for c in ("MEL", "NEV")}
    assert sorted(summary["per_diagnosis"]) == ["MEL", "NEV"] and not (out / "adapter").exists()
    for code, run in summary["per_diagnosis"].items():
        assert run["lesions_train"] == of_class[code] > 0  # each adapter saw its own diagnosis only
        assert run["steps"] == math.ceil(of_class[code] / 64)
    assert adapters_by_class(str(out / "adapters"), ["MEL", "NEV"]) == {c: str(out / "adapters" / c) for c in ("MEL", "NEV")}
    with pytest.raises(FileNotFoundError, match="BCC"):
        adapters_by_class(str(out / "adapters"), ["MEL", "BCC"])
    assert adapters_by_class(str(base_out / "adapter"), ["MEL", "BCC"]) == dict.fromkeys(
        ["MEL", "BCC"], str(base_out / "adapter")
    )

    pipe = load_pipeline(out / "base")
    images = {
        c: generate(
            pipe, ["a dermoscopic photo of melanoma, skin lesion"], 1, seed=3, steps=2, adapter_folder=out / "adapters" / c
        )
        for c in ("MEL", "NEV")
    }
    assert not np.array_equal(np.asarray(images["MEL"][0]), np.asarray(images["NEV"][0]))  # two different adapters
    with pytest.raises(ValueError, match="XYZ"):
        diffusion.run(
            _config(s3_options, f"diffusion.output={out}", "diffusion.adapters=per_diagnosis", "diffusion.diagnoses=[XYZ]")
        )


def test_per_diagnosis_adapters_share_one_encoding_pass_with_the_same_rows(trained, s3_options):
    from dermaray.diffusion.base import base_resolution

    base = str(trained[0] / "base")
    cfg = _config(s3_options, "diffusion.adapters=per_diagnosis")
    by_code, _ = diffusion.split_ids(cfg.diffusion, s3_options)
    by_code = {c: by_code[c] for c in ("MEL", "NEV")}
    resolution = base_resolution(base, cfg.models, s3_options)
    shared = diffusion.per_diagnosis_datasets(cfg.diffusion, by_code, base, cfg.models, resolution, s3_options)
    for split in ("train", "val"):
        assert shared["NEV"][split].count() == len(by_code["NEV"][split]) > 0
    alone = diffusion.split_datasets(cfg.diffusion, by_code["MEL"], base, cfg.models, resolution, s3_options)
    for split in ("train", "val"):
        got, want = shared["MEL"][split].take_all(), alone[split].take_all()
        assert len(got) == len(want) == len(by_code["MEL"][split]) > 0 and set(got[0]) == {diffusion.LATENTS, diffusion.IDS}
        for a, b in zip(got, want, strict=True):  # the same lesions in the same order: a resume skips by position
            assert np.array_equal(a[diffusion.IDS], b[diffusion.IDS])
            np.testing.assert_allclose(a[diffusion.LATENTS], b[diffusion.LATENTS], atol=1e-5)


def test_note_captions_follow_the_diagnosis_caption(trained, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.diffusion import DiffusionInputs

    base = trained[0] / "base"
    notes = tmp_path / "notes"
    notes.mkdir()
    pq.write_table(
        pa.table({"lesion_id": ["a", "b"], "note": ["brown plaque on the back", None], "error": [None, "prompt too long"]}),
        notes / "part-0.parquet",
    )
    rows = {
        "lesion_id": np.array(["a", "b"], dtype=object),
        "diagnosis": np.array(["MEL", "NEV"], dtype=object),
        "area_mm2": np.array([20.0, 3.0]),
        "image_bytes": np.array([_png(), _png()], dtype=object),
    }
    models = ModelsConfig(cache_dir=str(tmp_path / "cache"))
    out = DiffusionInputs(str(base), models, {}, 32, True, None, str(notes))(rows)
    tokenizer = DiffusionInputs(str(base), models, {}, 32, True).tokenizer
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out["input_ids"]]
    assert "melanoma" in texts[0] and "brown plaque on the back" in texts[0]  # caption first, then the note
    assert "nevus" in texts[1] and "plaque" not in texts[1]  # a note written with an error is not used
    # Each image's latent posterior from the base's VAE, as a fresh encode of the same pixels gives it.
    from diffusers import AutoencoderKL

    from dermaray.diffusion.pipeline import image_tensor
    from dermaray.images import decode_rgb

    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        fresh = vae.encode(image_tensor([decode_rgb(b) for b in rows["image_bytes"]], 32)).latent_dist.parameters
    assert out["latent_posteriors"].shape == (2, 8, 16, 16)
    np.testing.assert_allclose(out["latent_posteriors"], fresh.numpy(), rtol=1e-5, atol=1e-5)


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (180, 120, 100)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_base_pre_trained_with_other_settings_is_trained_again_not_reused(trained, s3_options, tmp_path):
    import json
    import shutil

    base_out, _ = trained
    out = tmp_path / "changed"
    shutil.copytree(base_out / "base", out / "base")
    cfg = _config(s3_options, f"diffusion.output={out}")
    record = out / "base" / diffusion.PRETRAIN_FILE
    assert json.loads(record.read_text())["settings"] == diffusion.pretrain_settings(cfg)  # the fixture's own
    marker = out / "base" / "kept.txt"
    marker.write_text("the base in place")
    assert diffusion.prepared_base(cfg)[0].endswith("base") and marker.is_file()  # same settings: reused as it is

    earlier_run = out / "runs" / "lora" / "checkpoint_000000"  # an adapter run on the old base: not to be resumed
    earlier_run.mkdir(parents=True)
    changed = _config(s3_options, f"diffusion.output={out}", "diffusion.pretrain.vae_steps=3")
    target, losses = diffusion.prepared_base(changed)
    assert not marker.exists(), "a base made with other settings must not be reused"
    assert not (out / "runs").exists(), "adapter runs on the old base must not resume on the new one"
    assert json.loads(record.read_text()) == {"losses": losses, "settings": diffusion.pretrain_settings(changed)}
    assert diffusion.pretrain_settings(changed)["pretrain"]["vae_steps"] == 3

    record.write_text(json.dumps({"vae": 0.1, "unet": 0.1, "ip_adapter": None}))  # a record from before settings were kept
    marker.write_text("the base in place")
    diffusion.prepared_base(changed)
    assert not marker.exists() and json.loads(record.read_text())["settings"] == diffusion.pretrain_settings(changed)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_input_rewritten_in_place_is_other_data_for_the_pre_trained_base(where, s3_options, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaray.storage import write_bytes

    table = f"{tmp_path}/lesions" if where == "local" else f"s3://dermaray/rewritten-{tmp_path.name}/lesions"

    def write(rows: list[int]) -> None:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"lesion_id": [str(r) for r in rows]}), buffer)
        write_bytes(f"{table}/part-0.parquet", buffer.getvalue(), s3_options)

    write([1, 2, 3])
    cfg = _config(s3_options, f"diffusion.input={table}")
    before = diffusion.pretrain_settings(cfg)
    assert before["input_version"][0][0] == "part-0.parquet"
    assert diffusion.pretrain_settings(cfg) == before  # left alone: the same table
    write([4, 5, 6, 7])  # re-ingested to the same path
    assert diffusion.pretrain_settings(cfg)["input_version"] != before["input_version"]
