"""IP-Adapter on the tiny base: trained with the base, saved as the published adapters are, loaded by plain
diffusers, and used as each generated image's own image prompt.

Training steps run on 16 px images, as in test_diffusion_core; sampling at 32 px.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers import: never reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dermaray.config import ModelsConfig
from dermaray.data.synthetic import synthesize_lesion
from dermaray.diffusion.captions import caption
from dermaray.diffusion.ip_adapter import (
    IMAGE_ENCODER_FOLDER,
    IP_ADAPTER_FOLDER,
    IP_ADAPTER_WEIGHT_NAME,
    add_ip_adapter,
    image_embeddings,
    ip_adapter_parameters,
    ip_adapter_state,
)
from dermaray.diffusion.pipeline import (
    add_lora,
    encode_latents,
    generate,
    image_tensor,
    load_pipeline,
    pretrain_base,
    prompt_dropout,
    save_lora,
    tokenize,
    train_ip_adapter,
)
from dermaray.images import decode_rgb
from dermaray.models import resolve_model

TRAIN_PX, SAMPLE_PX = 16, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lesions() -> tuple[list[Image.Image], list[str]]:
    images = [decode_rgb(synthesize_lesion(0, index, image_size=64)[1]) for index in range(4)]
    return images, [caption(None, "large")] * 4


@pytest.fixture(scope="module")
def pretrained(lesions, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny base after two VAE, two UNet and two IP-Adapter steps."""
    base = resolve_model("diffusion_base", "tiny", ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("model-cache"))))
    out = tmp_path_factory.mktemp("pretrained") / "base"
    losses = pretrain_base(
        base,
        out,
        *lesions,
        vae_steps=2,
        unet_steps=2,
        ip_adapter_steps=2,
        batch_size=2,
        lr=1e-3,
        seed=0,
        log_every=1,
        resolution=TRAIN_PX,
    )
    return out, losses


def test_pretraining_saves_the_base_plain_and_the_ip_adapter_beside_it(pretrained) -> None:
    out, losses = pretrained
    assert set(losses) == {"vae", "unet", "ip_adapter"} and all(math.isfinite(v) for v in losses.values())
    folder = out / IP_ADAPTER_FOLDER
    assert (folder / IP_ADAPTER_WEIGHT_NAME).is_file() and (folder / IMAGE_ENCODER_FOLDER / "config.json").is_file()
    pipe = load_pipeline(out)  # the base itself carries no trace of the adapter
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    keys = set(load_file(folder / IP_ADAPTER_WEIGHT_NAME))
    layers = sum(not name.endswith("attn1.processor") for name in pipe.unet.attn_processors)
    assert {k for k in keys if k.startswith("image_proj.")} == {
        f"image_proj.proj.{i}.{w}" for i in (0, 2, 3) for w in ("weight", "bias")
    }

    assert {k for k in keys if k.startswith("ip_adapter.")} == {
        f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight" for i in range(layers) for kv in "kv"
    }


@pytest.fixture(scope="module")
def trained(pretrained, lesions, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A new IP-Adapter on the pre-trained base, its weights before and after three steps, and its saved folder."""
    from transformers import CLIPVisionModelWithProjection

    from dermaray.diffusion.ip_adapter import save_ip_adapter

    pipe = load_pipeline(pretrained[0])
    encoder = CLIPVisionModelWithProjection.from_pretrained(pretrained[0] / IP_ADAPTER_FOLDER / IMAGE_ENCODER_FOLDER)
    images, prompts = lesions
    embeds, unconditional = image_embeddings(encoder, images)
    unet_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    add_ip_adapter(pipe, embeds.shape[-1], seed=0)
    initial = ip_adapter_state(pipe.unet)
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    posteriors = encode_latents(pipe.vae, image_tensor(images, TRAIN_PX))
    ids = tokenize(pipe.tokenizer, prompts)
    train_ip_adapter(pipe, posteriors, ids, embeds, unconditional, 3, 2, 1e-2, torch.Generator().manual_seed(0), dropout=0.3)
    folder = save_ip_adapter(pipe.unet, encoder, tmp_path_factory.mktemp("ip") / "adapter")
    return {
        "pipe": pipe,
        "encoder": encoder,
        "unet_before": unet_before,
        "initial": initial,
        "trainable": trainable,
        "embeds": embeds,
        "folder": folder,
    }


def test_only_the_ip_adapter_trains_and_its_keys_start_as_the_captions(trained) -> None:
    pipe, initial = trained["pipe"], trained["initial"]
    ip_names = {id(p) for p in ip_adapter_parameters(pipe.unet)}
    named = dict(pipe.unet.named_parameters())
    assert {id(named[n]) for n in trained["trainable"]} == ip_names
    for name, before in trained["unet_before"].items():  # the UNet itself is frozen
        assert torch.equal(named[name], before), name
    first = pipe.unet.get_submodule(
        next(n for n in pipe.unet.attn_processors if not n.endswith("attn1.processor")).removesuffix(".processor")
    )
    assert torch.equal(initial["ip_adapter.1.to_k_ip.weight"], first.to_k.weight)  # the paper's initialisation
    assert torch.equal(initial["ip_adapter.1.to_v_ip.weight"], first.to_v.weight)
    after = ip_adapter_state(pipe.unet)
    assert all(not torch.equal(after[k], initial[k]) for k in after)


def test_saved_ip_adapter_loads_in_plain_diffusers_exactly(pretrained, trained) -> None:
    fresh = load_pipeline(pretrained[0])
    fresh.load_ip_adapter(str(trained["folder"]), subfolder="", weight_name=IP_ADAPTER_WEIGHT_NAME)
    loaded, saved = ip_adapter_state(fresh.unet), ip_adapter_state(trained["pipe"].unet)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    # The pipeline embeds an image prompt exactly as training embedded the lesions.
    images = [
        im.resize((SAMPLE_PX, SAMPLE_PX)) for im in [decode_rgb(synthesize_lesion(0, i, image_size=64)[1]) for i in range(4)]
    ]
    with torch.no_grad():
        pipeline_tokens, pipeline_unconditional = fresh.encode_image(images, "cpu", 1, output_hidden_states=True)
    tokens, unconditional = image_embeddings(trained["encoder"], images)
    assert tokens.shape == (4, 1 + (64 // 8) ** 2, 32)  # the class token and every 8 px patch of the 64 px input
    assert torch.allclose(pipeline_tokens, tokens, atol=1e-5)
    assert torch.allclose(pipeline_unconditional, unconditional.expand_as(tokens), atol=1e-5)  # what guidance subtracts


def test_prompt_dropout_drops_the_caption_the_image_and_both_equally_often() -> None:
    no_caption, no_image = prompt_dropout(30_000, 0.1, torch.Generator().manual_seed(0))
    shares = [float(m.float().mean()) for m in (no_caption & ~no_image, no_image & ~no_caption, no_caption & no_image)]
    assert all(abs(share - 0.1) < 0.01 for share in shares)  # guidance's case (both) is not 0.1 squared
    assert prompt_dropout(5, 0.0, None)[0].sum() == prompt_dropout(5, 0.0, None)[1].sum() == 0
    with pytest.raises(ValueError, match="at most 1/3"):
        train_ip_adapter(None, torch.zeros(1), torch.zeros(1), torch.zeros(1, 2, 3), torch.zeros(2, 3), 1, 1, 1e-3, None, 0.5)


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def test_generation_takes_each_guide_as_its_own_image_prompt(pretrained, trained, lesions, tmp_path: Path) -> None:
    pipe = load_pipeline(pretrained[0])
    lora = tmp_path / "lora"
    add_lora(pipe.unet, rank=2, seed=0)
    save_lora(pipe, lora)
    pipe = load_pipeline(pretrained[0])
    guides = [lesions[0][0], Image.new("RGB", (64, 64), (40, 20, 10))]  # a lesion, and an image of none
    prompts = [caption("MEL"), caption("NEV")]
    run = dict(steps=3, resolution=SAMPLE_PX, guides=guides, strength=1.0, ip_adapter_folder=trained["folder"])
    images = generate(pipe, prompts, n_per_prompt=1, seed=0, adapter_folder=lora, **run)
    assert len(images) == 2 and images[0].size == (SAMPLE_PX, SAMPLE_PX)
    # Both adapters are gone afterwards: the shared pipeline is the plain base again.
    assert pipe.unet.encoder_hid_proj is None and not getattr(pipe.unet, "peft_config", None)
    # Seeded, and each image follows its own guide: the batch equals each pair alone (up to kernel rounding).
    again = generate(pipe, prompts[:1], 1, seed=0, adapter_folder=lora, **{**run, "guides": guides[:1]})
    assert _mean_difference(again[0], images[0]) < 1
    # At strength 1 the image starts from noise: the guide reaches it only through the IP-Adapter.
    swapped = generate(pipe, prompts[:1], 1, seed=0, adapter_folder=lora, **{**run, "guides": guides[1:]})
    unguided = generate(pipe, prompts[:1], 1, seed=0, adapter_folder=lora, steps=3, resolution=SAMPLE_PX)
    assert _mean_difference(swapped[0], images[0]) > 1 and _mean_difference(unguided[0], images[0]) > 1
    # With img2img as well (strength < 1): the image prompt changes what img2img alone draws from the same guides.
    both = generate(pipe, prompts, 1, seed=0, **{**run, "strength": 0.7})
    img2img = generate(pipe, prompts, 1, seed=0, steps=3, resolution=SAMPLE_PX, guides=guides, strength=0.7)
    assert len(both) == 2 and all(_mean_difference(a, b) > 0.5 for a, b in zip(both, img2img, strict=True))
    assert pipe.unet.encoder_hid_proj is None and pipe.feature_extractor is None  # the base's own state again

    with pytest.raises(ValueError, match="needs guides"):
        generate(pipe, prompts, 1, seed=0, ip_adapter_folder=trained["folder"])
    with pytest.raises(FileNotFoundError, match=IP_ADAPTER_WEIGHT_NAME):
        generate(pipe, prompts, 1, seed=0, guides=guides, ip_adapter_folder=tmp_path)
    # A load that fails halfway (diffusers sets the attention processors before the projection) leaves nothing behind.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / IP_ADAPTER_WEIGHT_NAME).write_bytes((trained["folder"] / IP_ADAPTER_WEIGHT_NAME).read_bytes())
    (broken / IMAGE_ENCODER_FOLDER).mkdir()
    (broken / IMAGE_ENCODER_FOLDER / "config.json").write_text("{}")  # no weights: the encoder cannot load
    with pytest.raises(Exception):  # noqa: B017 - transformers' error for a config without a model type
        generate(pipe, prompts, 1, seed=0, guides=guides, ip_adapter_folder=broken)
    after = generate(pipe, prompts[:1], 1, seed=0, adapter_folder=lora, steps=3, resolution=SAMPLE_PX)
    assert _mean_difference(after[0], unguided[0]) < 1 and pipe.unet.encoder_hid_proj is None


def test_serving_bank_passes_the_guide_to_the_ip_adapter(pretrained, lesions, tmp_path: Path) -> None:
    """Serve's generation replica: with a scale and an IP-Adapter beside the base, the guide is also the image prompt."""
    import io
    import shutil

    from dermaray.serving.adapters import AdapterBank

    shutil.copytree(pretrained[0], tmp_path / "base")
    pipe = load_pipeline(tmp_path / "base")
    add_lora(pipe.unet, rank=2, seed=0)
    save_lora(pipe, tmp_path / "adapter")
    bank = AdapterBank(tmp_path, resolution=SAMPLE_PX)
    assert bank.ip_adapter == tmp_path / "base" / IP_ADAPTER_FOLDER
    run = dict(count=1, seed=0, steps=3, guidance_scale=7.5, guide=lesions[0][0], strength=0.7)
    with_prompt, info = bank.generate("MEL", ip_adapter_scale=1.0, **run)
    without, plain = bank.generate("MEL", ip_adapter_scale=None, **run)
    assert info["ip_adapter_scale"] == 1.0 and plain["ip_adapter_scale"] is None
    images = [Image.open(io.BytesIO(png[0])).convert("RGB") for png in (with_prompt, without)]
    assert _mean_difference(*images) > 0.5  # the image prompt reached the pipeline
    unguided = bank.generate("MEL", 1, 0, 3, 7.5, ip_adapter_scale=1.0)[1]  # no guide: no image prompt either
    assert unguided["ip_adapter_scale"] is None and bank.pipe.unet.encoder_hid_proj is None
