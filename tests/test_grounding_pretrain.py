"""The self-supervised pretrained tiny tower: SimCLR's pieces, and the preset it makes, loaded through
`from_pretrained` as a hub MLLM is."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dermaray.config import ModelsConfig
from dermaray.data.synthetic import synthesize_lesion
from dermaray.grounding.pretrain import nt_xent, random_views
from dermaray.grounding.vision import ImageEmbedder, read_weights
from dermaray.models import resolve_model
from dermaray.models.tiny import PRETRAIN_RECORD


def test_nt_xent_rewards_matching_views():
    a = torch.nn.functional.one_hot(torch.arange(8), 16).float()  # eight orthogonal "images"
    assert float(nt_xent(a, a.clone(), temperature=0.1)) < 0.01  # each view finds its partner
    unrelated = float(nt_xent(a, torch.roll(a, 1, dims=0), temperature=0.1))
    assert unrelated > math.log(2 * 8 - 1) - 0.5  # no better than a guess among the 15 others


def test_random_views_change_images_within_range():
    images = torch.rand(16, 3, 32, 32)
    views = random_views(images, torch.Generator().manual_seed(0))
    assert views.shape == images.shape and float(views.min()) >= 0 and float(views.max()) <= 1
    assert (views - images).abs().mean(dim=(1, 2, 3)).min() > 0.01


@pytest.fixture(scope="module")
def presets():
    """Both towers through the shared cache (CI builds the pretrained one once, for this and the main job)."""
    models = ModelsConfig(cache_dir=str(Path(".cache/models").resolve()))
    return {name: resolve_model("grounding_mllm", name, models) for name in ("tiny", "tiny-pretrained")}


def test_pretrained_preset_loads_and_carries_features(presets):
    folder = Path(presets["tiny-pretrained"])
    model = LlavaForConditionalGeneration.from_pretrained(folder)  # the whole MLLM, as any hub checkout
    assert model.config.vision_config.image_size == 64 and AutoProcessor.from_pretrained(folder) is not None
    record = json.loads((folder / PRETRAIN_RECORD).read_text())
    losses = record["loss_every_10_steps"]
    assert record["method"] == "SimCLR" and losses[-1] < losses[0] - 0.5

    parts = ("vision_tower", "language_model")
    weights = {name: read_weights(Path(path), parts, torch.float32) for name, path in presets.items()}
    random, pretrained = weights["tiny"], weights["tiny-pretrained"]
    assert any(not torch.equal(t, random["vision_tower"][k]) for k, t in pretrained["vision_tower"].items())
    assert all(torch.equal(t, random["language_model"][k]) for k, t in pretrained["language_model"].items())  # untouched

    # The random tower maps every lesion to nearly one direction; the pretrained one tells lesions apart.
    tiles = [synthesize_lesion(9, i)[2] for i in range(64)]
    median_cosine = {}
    for name, path in presets.items():
        embedder = ImageEmbedder.from_pretrained(path)
        pixels = AutoProcessor.from_pretrained(path).image_processor(images=tiles, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            z = torch.nn.functional.normalize(embedder(pixels), dim=1)
        cosine = (z @ z.T).numpy()
        median_cosine[name] = float(np.median(cosine[np.triu_indices(len(tiles), 1)]))
    assert median_cosine["tiny"] > 0.98 and median_cosine["tiny-pretrained"] < 0.9, median_cosine
