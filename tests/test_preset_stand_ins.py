"""Every hub preset does its role here, with a tiny random model of its architecture in its cache folder.

On a cluster the preset's snapshot comes from the hub or the store into `models.cache_dir/<role>/<name>`;
here that folder is filled with the preset's offline stand-in (same architecture class, random
weights), so the preset's own code path runs: resolution by name, loading through
`from_pretrained`, the role's pooling, engine and pipeline.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dermaray.config import ModelsConfig, load_config
from dermaray.data.synthetic import synthesize_lesion
from dermaray.models import PRESETS, resolve_model
from dermaray.models.registry import TINY_SEED, _once, cache_root, get_preset
from tests.test_notes_core import canonical_row

HUB_PRESETS = sorted((role, name) for role, names in PRESETS.items() for name, p in names.items() if p.hub_id is not None)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ModelsConfig:
    """An offline cache holding every hub preset's stand-in, as `dermaray models pull` would hold the real one."""
    models = ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("models")), offline=True)
    for role, name in HUB_PRESETS:
        preset = get_preset(role, name)
        _once(
            cache_root(models) / role / name, lambda out, p=preset: p.stand_in(out, TINY_SEED), {"stand_in": name}, resume=False
        )
    return models


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        meta, jpeg = synthesize_lesion(seed=3, index=i)[:2]
        rows.append({**canonical_row(meta), "image_bytes": jpeg})
    return rows


def test_every_hub_preset_has_a_stand_in_of_its_architecture(models: ModelsConfig) -> None:
    assert HUB_PRESETS and all(get_preset(role, name).stand_in is not None for role, name in HUB_PRESETS)
    architectures = {
        ("note_writer", "qwen2.5-7b"): "Qwen2ForCausalLM",
        ("note_writer", "llava-1.5-7b"): "LlavaForConditionalGeneration",
        ("grounding_mllm", "llava-1.5-7b"): "LlavaForConditionalGeneration",
        ("text_encoder", "bge-base"): "BertModel",
    }
    assert set(architectures) | {("diffusion_base", "sd-1.5")} == set(HUB_PRESETS)
    for (role, name), architecture in architectures.items():
        config = json.loads((Path(resolve_model(role, name, models)) / "config.json").read_text())
        assert config["architectures"] == [architecture]
    index = json.loads((Path(resolve_model("diffusion_base", "sd-1.5", models)) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_qwen_note_writer_writes_notes_through_vllm(models: ModelsConfig) -> None:
    from dermaray.notes.engine import NoteWriter

    cfg = load_config(None, ["notes.strategy=LF", "notes.sampling.max_tokens=12", "notes.sampling.ignore_eos=true"])
    writer = NoteWriter(cfg.notes, resolve_model("note_writer", "qwen2.5-7b", models), "qwen2.5-7b")
    records = writer.write(_rows(3))
    assert [r["error"] for r in records] == [None] * 3 and all(r["note"] for r in records)


def test_llava_note_writer_with_the_image_in_the_prompt(models: ModelsConfig) -> None:
    from dermaray.notes.engine import NoteWriter

    cfg = load_config(
        None, ["notes.strategy=LF", "notes.with_image=true", "notes.sampling.max_tokens=12", "notes.sampling.ignore_eos=true"]
    )
    path = resolve_model("note_writer", "llava-1.5-7b", models)
    if importlib.util.find_spec("torchvision") is None:
        # vLLM's multimodal models import torchvision; the CPU install here cannot have it. The refusal is clear.
        with pytest.raises(RuntimeError, match="torchvision"):
            NoteWriter(cfg.notes, path, "llava-1.5-7b")
        return
    records = NoteWriter(cfg.notes, path, "llava-1.5-7b").write(_rows(2))
    assert [r["error"] for r in records] == [None] * 2


def test_llava_grounding_base_embeds_lesions_by_preset_name(models: ModelsConfig) -> None:
    from dermaray.grounding.embed import LesionEmbedder
    from dermaray.grounding.model import GroundingModel, GroundingSettings

    rows = _rows(4)
    embedder = LesionEmbedder("frozen", "llava-1.5-7b", models, device="cpu")
    table = embedder({"image_bytes": np.array([r["image_bytes"] for r in rows], dtype=object)})
    z = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert z.shape[0] == 4 and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    model = GroundingModel.from_settings(GroundingSettings(model="llava-1.5-7b", attributes=["area_mm2"], tune="lora"), models)
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_bge_text_encoder_pools_the_cls_token(models: ModelsConfig) -> None:
    from transformers import AutoModel, AutoTokenizer

    from dermaray.grounding.text import TextEncoder

    encoder = TextEncoder("bge-base", models, device="cpu")
    texts = ["a small brown macule on the back", "an irregular lesion"]
    assert encoder.pooling == "cls"
    path = resolve_model("text_encoder", "bge-base", models)
    tokens = AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = AutoModel.from_pretrained(path)(**tokens).last_hidden_state[:, 0]
    np.testing.assert_allclose(encoder.encode(texts), torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-5)


def test_sd15_base_trains_a_lora_step_and_generates(models: ModelsConfig) -> None:
    from dermaray.diffusion.pipeline import (
        DiffusionObjective,
        add_lora,
        encode_latents,
        generate,
        image_tensor,
        load_pipeline,
        lora_parameters,
    )

    pipe = load_pipeline(resolve_model("diffusion_base", "sd-1.5", models))
    add_lora(pipe.unet, rank=4)
    images = [r["image_bytes"] for r in _rows(2)]
    from dermaray.images import decode_rgb

    pixels = image_tensor([decode_rgb(b) for b in images], 64)
    objective = DiffusionObjective(pipe, "lora")
    loss = objective(encode_latents(pipe.vae, pixels), ["a dermoscopic photo of melanoma"] * 2, torch.Generator().manual_seed(0))[
        "loss"
    ]
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(pipe.unet))
    out = generate(pipe, ["a dermoscopic photo of melanoma"], n_per_prompt=1, seed=0, steps=2)
    assert out[0].size == (64, 64)


def test_sdxl_is_refused_by_name(tmp_path: Path) -> None:
    from dermaray.diffusion.pipeline import load_pipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(NotImplementedError, match=r"StableDiffusionXLPipeline.*\(SD 1\.x / 2\.x\) only"):
        load_pipeline(tmp_path)
    assert "sdxl" not in PRESETS["diffusion_base"]
