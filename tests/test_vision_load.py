"""The grounding embedder reads only the vision tower and projector of an MLLM checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file, save_file

from dermaray.config import ModelsConfig
from dermaray.grounding.model import ImageEmbedder
from dermaray.models import resolve_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(resolve_model("grounding_mllm", "tiny", ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("models")))))


def _reference_embedding(folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The embedding from transformers' own full load of the checkpoint."""
    from transformers import AutoModelForImageTextToText

    inner = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).model
    return ImageEmbedder(inner.vision_tower, inner.multi_modal_projector, -2, True).eval()(pixels)


def test_vision_only_load_matches_the_full_model_and_holds_no_language_model(tiny: Path) -> None:
    embedder = ImageEmbedder.from_pretrained(str(tiny))
    names = [n for n, _ in embedder.named_modules()] + list(embedder.state_dict())
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("projector.") for n in names)
    assert not any("language_model" in n or "lm_head" in n or "embed_tokens" in n for n in names)
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(embedder(pixels), _reference_embedding(tiny, pixels))


def test_a_hub_layout_sharded_checkpoint_loads_the_same(tiny: Path, tmp_path: Path) -> None:
    """llava-hf's repositories nest the tower in `vision_tower.vision_model.` and shard the weights
    with an index; the language model's shard is never opened."""
    weights = load_file(tiny / "model.safetensors")
    hub = {}
    for key, tensor in weights.items():
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        hub[key] = tensor
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for key, tensor in hub.items():
        shards["model-00002-of-00002.safetensors" if key.startswith("language_model.") else "model-00001-of-00002.safetensors"][
            key
        ] = tensor
    for name, part in shards.items():
        save_file(part, tmp_path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for file in tiny.glob("*.json"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    # The language model's shard is unreadable: loading must not need it.
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            ImageEmbedder.from_pretrained(str(tmp_path))(pixels), ImageEmbedder.from_pretrained(str(tiny))(pixels)
        )


def test_a_checkpoint_without_safetensors_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        ImageEmbedder.from_pretrained(str(tmp_path))


# VmHWM, not ru_maxrss: the latter carries over the forked parent's (this test process's) memory into the child.
PEAK = (
    "import re, sys, torch, transformers, dermaray.grounding.model as m; "
    "from transformers import AutoModelForImageTextToText as M; path = sys.argv[2]; "
    "_ = M.from_pretrained(path, dtype=torch.float32) if sys.argv[1] == 'full' else m.ImageEmbedder.from_pretrained(path); "
    "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
)


def test_peak_memory_of_the_vision_only_load_is_that_of_the_tower_not_the_language_model(tmp_path: Path) -> None:
    """A LLaVA whose language model is 96% of its weights (about 460 MB in float32), stored in float16
    as hub checkpoints are and loaded in float32: the vision-only load's peak RSS is lower than the
    full load's by at least most of the language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    text = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8, vocab_size=32000)
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2, image_token_id=31999)
    )
    language = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n and "projector" not in n)
    model.to(torch.float16).save_pretrained(tmp_path)
    del model

    def peak(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK, mode, str(tmp_path)], check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1]) * 1024

    full, vision_only = peak("full"), peak("vision-only")
    assert language * 4 > 400e6
    assert full - vision_only > 0.75 * language * 4, (full, vision_only)
