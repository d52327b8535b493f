"""Diffusion core on the tiny base: captions, pixels, base pre-training, LoRA files and sampling.

Training steps run on 16 px images (8 px latents; the UNet takes any size its downsampling
divides) so the file stays fast on a CPU; sampling runs at the native 64 px.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers import: never reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dermaray.config import ModelsConfig
from dermaray.data.synthetic import synthesize_lesion
from dermaray.diffusion.captions import caption, size_word
from dermaray.diffusion.pipeline import (
    LORA_TARGETS_ALL_LAYERS,
    LORA_WEIGHT_NAME,
    CaptionStates,
    DiffusionObjective,
    _denoising_loss,
    add_lora,
    calibrate_latent_scale,
    encode_latents,
    encode_prompts,
    generate,
    image_tensor,
    load_lora_state,
    load_pipeline,
    lora_parameters,
    lora_state,
    pretrain_base,
    read_lora,
    sample_latents,
    save_lora,
    tokenize,
    training_noise,
    vae_round_trip,
    vae_step_loss,
    zero_terminal_snr_scheduler,
)
from dermaray.images import decode_rgb
from dermaray.models import resolve_model
from dermaray.schema import DIAGNOSES

CODE_OF_NAME = {d.name: d.code for d in DIAGNOSES}
TRAIN_PX = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy CPU their spin-waits
    make every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_model("diffusion_base", "tiny", ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("model-cache"))))


@pytest.fixture(scope="module")
def lesions() -> tuple[list[Image.Image], list[str]]:
    images, prompts = [], []
    for index in range(4):
        row, jpeg, _, _ = synthesize_lesion(0, index, image_size=64)
        images.append(decode_rgb(jpeg))
        prompts.append(caption(CODE_OF_NAME[row["iddx_3"]], size_word(row["clin_size_long_diam_mm"])))
    return images, prompts


@pytest.fixture(scope="module")
def pretrained(base: str, lesions, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny base after two pre-training steps: the base every LoRA test adapts."""
    out = tmp_path_factory.mktemp("pretrained") / "base"
    images, prompts = lesions
    losses = pretrain_base(
        base, out, images, prompts, vae_steps=2, unet_steps=2, batch_size=2, lr=1e-3, seed=0, log_every=1, resolution=TRAIN_PX
    )
    return out, losses


@pytest.fixture(scope="module")
def lora(pretrained, lesions, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pipeline with a LoRA adapter (alpha != rank) after two steps, its snapshots and saved folder."""
    pipe = load_pipeline(pretrained[0])
    add_lora(pipe.unet, rank=4, alpha=8, seed=0)
    base_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".lora_" not in n}
    lora_before = [p.detach().clone() for p in lora_parameters(pipe.unet)]
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters(pipe.unet), lr=1e-2)
    posteriors = encode_latents(pipe.vae, image_tensor(lesions[0][:2], TRAIN_PX))
    objective = DiffusionObjective(pipe, "lora")
    for step in range(2):
        loss = objective(posteriors, lesions[1][:2], torch.Generator().manual_seed(step))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    save_lora(pipe, folder)
    return {
        "pipe": pipe,
        "base_before": base_before,
        "lora_before": lora_before,
        "trainable": trainable,
        "folder": folder,
        "loss": float(loss.detach()),
    }


def unet_probe(pipe) -> torch.Tensor:
    """UNet output on a fixed latent, timestep and prompt."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        text = encode_prompts(pipe, [caption("MEL", "large")])
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


# --- captions and pixels ----------------------------------------------------------------------


def test_captions_name_the_diagnosis_and_size() -> None:
    assert caption("MEL") == "a dermoscopic photo of melanoma, skin lesion"
    assert caption("MEL", "large") == "a dermoscopic photo of large melanoma, skin lesion"
    assert caption(None, "large") == "a dermoscopic photo of large lesion, skin lesion"  # the base's, diagnosis-free
    assert caption("SCC", "small", ["irregular border", "blue-white veil"]) == (
        "a dermoscopic photo of small squamous cell carcinoma, skin lesion, irregular border, blue-white veil"
    )
    assert caption("BCC", extra="ulcerated").endswith("skin lesion, ulcerated")
    assert len({caption(d.code) for d in DIAGNOSES}) == len(DIAGNOSES)
    assert [size_word(d) for d in (0.0, 2.99, 3.0, 4.5, 6.0, 6.01, 40.0)] == (  # long diameter, mm
        ["small", "small", "medium", "medium", "medium", "large", "large"]
    )
    with pytest.raises(ValueError, match="MEL"):
        caption("melanoma")
    with pytest.raises(ValueError, match="size_word"):
        caption("MEL", "huge")
    with pytest.raises(ValueError, match="extra"):
        caption("MEL", extra=["", "x"])
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="diameter_mm"):
            size_word(bad)


def test_image_tensor_crops_resizes_and_scales() -> None:
    wide = Image.new("RGB", (120, 40), (255, 255, 255))
    wide.paste((0, 0, 0), (40, 0, 80, 40))  # the centre square is black, the sides white
    gray = Image.new("L", (50, 50), 128)  # not RGB: converted
    pixels = image_tensor([wide, gray], 16)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[0], torch.full((3, 16, 16), -1.0))  # the white sides were cropped away
    assert torch.allclose(pixels[1], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        image_tensor([], 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        image_tensor([gray], 30)


# --- base pre-training ------------------------------------------------------------------------


def test_vae_step_trains_the_vae_alone(base: str, lesions) -> None:
    pipe = load_pipeline(base)
    pixels = image_tensor(lesions[0][:2], TRAIN_PX)
    loss = vae_step_loss(pipe, pixels, torch.Generator().manual_seed(0))
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    assert all(p.grad is not None for p in pipe.vae.parameters())  # every weight: DDP needs that
    assert all(p.grad is None for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae_step_loss(pipe, pixels[:, :, :12, :12])


def test_cached_latents_equal_fresh_encodes(base: str, lesions) -> None:
    pipe = load_pipeline(base)
    pixels = image_tensor(lesions[0], TRAIN_PX)
    cached = encode_latents(pipe.vae, pixels, batch_size=3)  # two chunks: 3 + 1
    assert cached.shape == (4, 2 * pipe.vae.config.latent_channels, TRAIN_PX // 2, TRAIN_PX // 2)
    with torch.no_grad():
        fresh = pipe.vae.encode(pixels).latent_dist
        drawn = fresh.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cached, fresh.parameters, rtol=1e-5, atol=1e-5)
    # A draw from the cache is the draw a fresh encode gives with the same generator.
    torch.testing.assert_close(sample_latents(cached, torch.Generator().manual_seed(3)), drawn, rtol=1e-5, atol=1e-5)
    assert not torch.equal(sample_latents(cached, torch.Generator().manual_seed(4)), drawn)  # still a sample
    with pytest.raises(ValueError, match="2C"):
        sample_latents(cached[:, :3])


def test_vae_round_trip_decodes_the_posterior_mean(pretrained, lesions) -> None:
    pipe = load_pipeline(pretrained[0])
    images = vae_round_trip(pipe.vae, lesions[0], TRAIN_PX, batch_size=3)  # two chunks: 3 + 1
    assert [i.size for i in images] == [(TRAIN_PX, TRAIN_PX)] * 4 and all(i.mode == "RGB" for i in images)
    with torch.no_grad():
        pixels = image_tensor(lesions[0], TRAIN_PX)
        by_hand = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    got = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(got, by_hand, atol=1 / 127.5 + 1e-4, rtol=0)  # one 8-bit level: the rounding


def test_caption_states_are_computed_once_and_equal_fresh_ones(base: str, lesions) -> None:
    pipe = load_pipeline(base)
    captions = CaptionStates(pipe)
    prompts = [lesions[1][0], lesions[1][1], lesions[1][0]]
    ids = tokenize(pipe.tokenizer, prompts)
    states = captions(ids)
    torch.testing.assert_close(states, encode_prompts(pipe, prompts))
    assert len(captions.states) == len(set(prompts))
    captions(ids[:1])
    assert len(captions.states) == len(set(prompts))  # seen already: not encoded again

    # Caption dropout: each caption becomes the empty one with probability p, and only then.
    many = ids[[0] * 2000]
    dropped = captions.drop(many, 0.25, torch.Generator().manual_seed(0))
    empty = (dropped == captions.empty).all(dim=1)
    assert 0.2 < float(empty.float().mean()) < 0.3
    assert torch.equal(dropped[~empty], many[~empty])
    assert torch.equal(captions.drop(many, 0.0, None), many)
    assert pipe.tokenizer.decode(captions.empty, skip_special_tokens=True).strip() == ""


def test_unet_objective_trains_the_unet_alone_and_lowers_the_loss(base: str, lesions) -> None:
    pipe = load_pipeline(base)
    posteriors = encode_latents(pipe.vae, image_tensor(lesions[0][:2], TRAIN_PX))
    prompts = lesions[1][:2]
    model = DiffusionObjective(pipe, "unet", snr_gamma=5.0)
    loss = model(posteriors, prompts, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert all(p.grad is not None for p in pipe.unet.parameters())
    assert all(p.grad is None for p in [*pipe.vae.parameters(), *pipe.text_encoder.parameters()])  # frozen

    # Token ids (what a Ray Train batch can carry) give the same loss as the strings.
    ids = tokenize(pipe.tokenizer, prompts)
    assert ids.shape == (2, pipe.tokenizer.model_max_length) and ids.dtype == torch.long
    assert torch.equal(model(posteriors, ids, torch.Generator().manual_seed(0))["loss"], loss)
    # Min-SNR weights are 1 where SNR <= gamma and below 1 at the least noisy timesteps, so over 64
    # timesteps (some of them below t ~ 150, where SNR > 5) the weighted loss is below the plain one.
    with torch.no_grad():
        many = (posteriors[[0, 1] * 32], ids[[0, 1] * 32])
        weighted = model(*many, torch.Generator().manual_seed(0))["loss"]
        plain = DiffusionObjective(pipe, "unet")(*many, torch.Generator().manual_seed(0))["loss"]
    assert float(weighted) < float(plain)

    # On a fixed batch, noise and timesteps, a few AdamW steps lower it.
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-3)
    first = float(loss.detach())
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(posteriors, ids, torch.Generator().manual_seed(0))["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        assert float(model(posteriors, ids, torch.Generator().manual_seed(0))["loss"]) < first

    # A noise offset changes the noise drawn, so the loss; the objective rejects a negative one.
    with torch.no_grad():
        offset = DiffusionObjective(pipe, "unet", snr_gamma=5.0, noise_offset=0.5)(*many, torch.Generator().manual_seed(0))
    assert float(offset["loss"]) != float(weighted)
    with pytest.raises(ValueError, match="noise_offset"):
        DiffusionObjective(pipe, "unet", noise_offset=-0.1)

    with pytest.raises(ValueError, match="prompts"):
        model(posteriors, prompts[:1])
    with pytest.raises(ValueError, match="non-empty"):
        model(posteriors, [])
    with pytest.raises(ValueError, match="token ids"):
        model(posteriors, ids.float())
    with pytest.raises(ValueError, match="objective"):
        DiffusionObjective(pipe, "dreambooth")
    with pytest.raises(ValueError, match="caption_dropout"):
        DiffusionObjective(pipe, "unet", caption_dropout=1.0)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        DiffusionObjective(pipe, "lora")


def test_noise_offset_shifts_each_image_and_channel_by_one_value() -> None:
    latents = torch.zeros(256, 4, 8, 8)
    plain = training_noise(latents, torch.Generator().manual_seed(0))
    # Offset 0 is the plain draw: runs without an offset are what they were.
    assert torch.equal(training_noise(latents, torch.Generator().manual_seed(0), 0.0), plain)
    shifted = training_noise(latents, torch.Generator().manual_seed(0), 0.5)
    shift = shifted - plain  # the plain draw comes first from the same generator
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # one value per image and channel
    assert float(shift[:, :, 0, 0].std()) == pytest.approx(0.5, rel=0.1)
    # The offset moves an image's mean: per image and channel, the means spread by sqrt(1 / 64 + 0.25), not 1 / 8.
    assert float(shifted.mean(dim=(2, 3)).std()) == pytest.approx(math.sqrt(1 / 64 + 0.25), rel=0.1)
    assert float(plain.mean(dim=(2, 3)).std()) == pytest.approx(1 / 8, rel=0.1)
    with pytest.raises(ValueError, match="offset"):
        training_noise(latents, None, -0.1)


class Oracle(torch.nn.Module):
    """A stand-in UNet that knows the clean latents, so it returns exactly the noise or the velocity of each
    noisy input: the denoising loss is zero only against the target it was built for."""

    dtype = torch.float32

    def __init__(self, clean: torch.Tensor, alphas_cumprod: torch.Tensor, predicts: str):
        super().__init__()
        self.clean, self.alphas, self.predicts = clean, alphas_cumprod, predicts

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        a = self.alphas[t].view(-1, 1, 1, 1)
        noise = (noisy - a.sqrt() * self.clean) / (1 - a).sqrt()
        return SimpleNamespace(sample=noise if self.predicts == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * self.clean)


def test_zero_terminal_snr_schedule_ends_in_pure_noise_and_trains_velocity(base: str) -> None:
    from diffusers import DDPMScheduler

    original = load_pipeline(base).scheduler
    zero = zero_terminal_snr_scheduler(original)
    assert (zero.config.prediction_type, zero.config.timestep_spacing) == ("v_prediction", "trailing")
    alphas = DDPMScheduler.from_config(zero.config).alphas_cumprod
    assert float(alphas[-1]) == 0.0  # the last timestep keeps none of the image
    assert float(DDPMScheduler.from_config(original.config).alphas_cumprod[-1].sqrt()) > 0.05  # SD 1.5's keeps ~7%

    clean = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(64, 77, 32)

    def loss(scheduler, predicts: str) -> float:
        unet = Oracle(clean, DDPMScheduler.from_config(scheduler.config).alphas_cumprod, predicts)
        pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)), scheduler=scheduler, unet=unet)
        return float(_denoising_loss(pipe, clean, text, torch.Generator().manual_seed(1), snr_gamma=5.0))

    # Each schedule's loss is zero against its own target only, and finite with Min-SNR weights at zero SNR.
    assert loss(zero, "v_prediction") == pytest.approx(0.0, abs=1e-6)
    assert loss(zero, "epsilon") > 0.1
    assert loss(original, "epsilon") == pytest.approx(0.0, abs=1e-6)
    assert loss(original, "v_prediction") > 0.1


def test_pretrain_base_with_zero_terminal_snr_saves_its_schedule_and_samples(base: str, lesions, tmp_path: Path) -> None:
    images, prompts = lesions
    common = {"images": images, "prompts": prompts, "batch_size": 2, "lr": 1e-3, "seed": 0, "zero_terminal_snr": True}
    with pytest.raises(ValueError, match="unet_steps"):
        pretrain_base(base, tmp_path / "none", vae_steps=1, unet_steps=0, **common)
    out = tmp_path / "base"
    pretrain_base(base, out, vae_steps=0, unet_steps=2, resolution=TRAIN_PX, **common)
    pipe = load_pipeline(out)  # the schedule travels with the base, to every adapter and generation
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    # Sampling starts at the last timestep, where a v-prediction base still gives a finite image (epsilon would not).
    image = np.asarray(generate(pipe, [prompts[0]], 1, seed=0, steps=2, guidance_scale=1.0)[0], dtype=float)
    assert pipe.scheduler.timesteps[0] == 999 and image.std() > 0


def test_calibrated_scale_gives_unit_variance_latents(base: str, lesions) -> None:
    pipe = load_pipeline(base)
    pixels = image_tensor(lesions[0], TRAIN_PX)
    scale = calibrate_latent_scale(pipe, pixels, torch.Generator().manual_seed(0))
    assert pipe.vae.config.scaling_factor == scale and scale != pytest.approx(0.18215, rel=0.5)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert float((latents * scale).std()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="B >= 2"):
        calibrate_latent_scale(pipe, pixels[:1])


def test_pretrain_base_saves_a_plain_diffusers_base(base: str, pretrained) -> None:
    from diffusers import StableDiffusionPipeline

    out, losses = pretrained
    assert set(losses) == {"vae", "unet", "ip_adapter"} and all(math.isfinite(losses[k]) for k in ("vae", "unet"))
    assert losses["ip_adapter"] is None and not (out / "ip_adapter").exists()  # none asked for
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / part).is_dir()
    assert (out / "tokenizer" / "vocab.json").is_file()  # kept from the tiny base
    trained = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    original = load_pipeline(base)
    assert trained.vae.config.scaling_factor != original.vae.config.scaling_factor  # calibrated, saved
    assert not torch.equal(trained.unet.conv_in.weight, original.unet.conv_in.weight)
    assert not torch.equal(trained.vae.decoder.conv_out.weight, original.vae.decoder.conv_out.weight)
    assert torch.equal(  # frozen
        trained.text_encoder.get_input_embeddings().weight, original.text_encoder.get_input_embeddings().weight
    )


# --- LoRA -------------------------------------------------------------------------------------


def test_add_lora_trains_only_the_adapter(lora: dict) -> None:
    pipe = lora["pipe"]
    assert lora["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in lora["trainable"])
    assert len(lora["trainable"]) == len(lora_parameters(pipe.unet))
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora["trainable"]}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert math.isfinite(lora["loss"])
    after = dict(pipe.unet.named_parameters())
    assert all(torch.equal(after[n], before) for n, before in lora["base_before"].items())
    changed = [not torch.equal(p, before) for p, before in zip(lora_parameters(pipe.unet), lora["lora_before"], strict=True)]
    assert all(changed)
    with pytest.raises(ValueError, match="already has adapters"):
        add_lora(pipe.unet)


def test_saved_adapter_loads_in_plain_diffusers_with_the_same_output(pretrained, lora: dict) -> None:
    from diffusers import StableDiffusionPipeline

    assert (lora["folder"] / LORA_WEIGHT_NAME).is_file()
    fresh = StableDiffusionPipeline.from_pretrained(pretrained[0], safety_checker=None, requires_safety_checker=False)
    adapted, plain = unet_probe(lora["pipe"]), unet_probe(fresh)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the UNet
    fresh.load_lora_weights(lora["folder"])
    # Equal only if alpha (8, not the rank 4) came back from the file's metadata.
    torch.testing.assert_close(unet_probe(fresh), adapted, rtol=1e-5, atol=1e-6)


def test_an_adapter_on_every_layer_loads_in_plain_diffusers_with_the_same_output(pretrained, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(pretrained[0])
    add_lora(pipe.unet, rank=4, alpha=8, targets=LORA_TARGETS_ALL_LAYERS, seed=0)
    adapted_kinds = {n.split(".lora_")[0] for n, _ in pipe.unet.named_parameters() if ".lora_" in n}
    # Convolutions, feed-forwards and the time embedding too, not only attention.
    assert all(any(name.endswith(t) for name in adapted_kinds) for t in LORA_TARGETS_ALL_LAYERS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero (the adapter is a no-op until trained): give it weights, as training would
        for name, param in pipe.unet.named_parameters():
            if ".lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    save_lora(pipe, tmp_path / "adapter")
    fresh = StableDiffusionPipeline.from_pretrained(pretrained[0], safety_checker=None, requires_safety_checker=False)
    adapted, plain = unet_probe(pipe), unet_probe(fresh)
    assert (adapted - plain).abs().max() > 1e-3
    fresh.load_lora_weights(tmp_path / "adapter")
    torch.testing.assert_close(unet_probe(fresh), adapted, rtol=1e-4, atol=1e-5)
    assert read_lora(tmp_path / "adapter").keys() == lora_state(pipe.unet).keys()


def test_lora_state_restores_the_adapter_exactly(pretrained, lora: dict) -> None:
    state = lora_state(lora["pipe"].unet)
    assert state and all(t.device.type == "cpu" for t in state.values())
    from_file = read_lora(lora["folder"])
    assert set(from_file) == set(state) and all(torch.equal(from_file[k], state[k]) for k in state)

    resumed = load_pipeline(pretrained[0])
    add_lora(resumed.unet, rank=4, alpha=8, seed=1)  # different initial weights
    assert not all(torch.equal(v, state[k]) for k, v in lora_state(resumed.unet).items())
    load_lora_state(resumed.unet, from_file)
    restored = lora_state(resumed.unet)
    assert set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(unet_probe(resumed), unet_probe(lora["pipe"]))

    with pytest.raises(ValueError, match="missing"):
        load_lora_state(resumed.unet, dict(list(state.items())[1:]))
    other_rank = load_pipeline(pretrained[0])
    add_lora(other_rank.unet, rank=2)
    with pytest.raises(ValueError, match="shapes"):
        load_lora_state(other_rank.unet, state)
    with pytest.raises(ValueError, match="add_lora"):
        lora_state(load_pipeline(pretrained[0]).unet)


# --- sampling ---------------------------------------------------------------------------------


def test_generate_is_seeded_and_loads_and_unloads_adapters(pretrained, lora: dict) -> None:
    pipe = load_pipeline(pretrained[0])
    prompts = [caption("MEL", "large"), caption("NEV", "small")]
    images = generate(pipe, prompts, n_per_prompt=2, seed=0, steps=1)
    assert len(images) == 4 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # same prompt, seeds 0 and 1

    plain = generate(pipe, prompts[:1], n_per_prompt=1, seed=0, steps=1)
    adapted = generate(pipe, prompts[:1], n_per_prompt=1, seed=0, steps=1, adapter_folder=lora["folder"])
    assert len(adapted) == 1 and adapted[0].tobytes() != plain[0].tobytes()
    assert not getattr(pipe.unet, "peft_config", None)  # unloaded again: the base as it was
    # Same seed, same images: and the base is bit-for-bit back after the adapter.
    assert generate(pipe, prompts[:1], n_per_prompt=1, seed=0, steps=1)[0].tobytes() == plain[0].tobytes()

    with pytest.raises(ValueError, match="already has an adapter"):
        generate(lora["pipe"], prompts, 1, seed=0, adapter_folder=lora["folder"])
    with pytest.raises(ValueError, match="n_per_prompt"):
        generate(pipe, prompts, 0, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        generate(pipe, "a prompt", 1, seed=0)


def _pixel_difference(a, b) -> tuple[int, float]:
    """(largest, mean) absolute difference of two images' pixel levels."""
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return int(diff.max()), float(diff.mean())


def test_guided_generation_keeps_each_guide_with_its_prompt(pretrained, lesions, lora: dict) -> None:
    pipe = load_pipeline(pretrained[0])
    prompts = [caption("MEL", "large"), caption("NEV", "small")]
    guides = [lesions[0][0], lesions[0][1].resize((80, 64))]
    run = dict(steps=4, strength=0.5, adapter_folder=lora["folder"])
    images = generate(pipe, prompts, n_per_prompt=2, seed=0, guides=guides, **run)
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)
    # Each prompt keeps its own guide: the batch equals each (prompt, guide) pair generated alone,
    # with the seeds it had in the batch (img2img's own repetition would pair guide 1 with prompt 0).
    # Equal up to rounding: a batch of 4 and one of 2 may take other CPU kernels, whose float sums differ in the
    # last bits (a pixel level at most, on some CPUs), where a swapped guide moves pixels by tens of levels.
    first = generate(pipe, prompts[:1], n_per_prompt=2, seed=0, guides=guides[:1], **run)
    second = generate(pipe, prompts[1:], n_per_prompt=2, seed=2, guides=guides[1:], **run)
    assert max(_pixel_difference(a, b)[0] for a, b in zip(images, first + second, strict=True)) <= 2
    # The guide decides the result: another guide, same prompt and seed, another image.
    swapped = generate(pipe, prompts[:1], n_per_prompt=1, seed=0, guides=guides[1:], **run)
    assert _pixel_difference(swapped[0], images[0])[1] > 5
    assert not getattr(pipe.unet, "peft_config", None)  # the adapter unloaded from the shared UNet too

    with pytest.raises(ValueError, match="one per prompt"):
        generate(pipe, prompts, 1, seed=0, guides=guides[:1])
    with pytest.raises(ValueError, match="strength"):
        generate(pipe, prompts, 1, seed=0, guides=guides, strength=0.0)
    with pytest.raises(ValueError, match="no denoising step"):
        generate(pipe, prompts, 1, seed=0, steps=2, guides=guides, strength=0.3)
