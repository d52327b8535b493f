"""Stable Diffusion building blocks: base pre-training, LoRA training, adapter files and sampling.

Training runs in two stages, as Stable Diffusion itself was trained:

- the VAE alone (`vae_step_loss`, `pretrain_vae`): reconstruction with a weak KL term;
- then the denoiser on the VAE's latents, cached once per dataset (`encode_latents` keeps each
  image's posterior, `sample_latents` draws from it every step, as diffusers' `--cache_latents`
  does) with caption embeddings cached once per distinct caption (`CaptionStates`):
  `pretrain_unet` trains the whole UNet of the random tiny preset; LoRA adapters (on the UNet's
  attention projections, `LORA_TARGETS`, or its blocks' every linear and convolution layer,
  `LORA_TARGETS_ALL_LAYERS`) train on the same cached latents with everything else frozen.

Captions are replaced by the empty caption with probability `caption_dropout`, so the UNet also
learns the unconditional prediction that classifier-free guidance subtracts at sampling time
(`generate`'s `guidance_scale`); Min-SNR-gamma loss weighting (Hang et al. 2023) keeps the
near-noiseless timesteps from dominating training; a noise offset (`training_noise`) lets the
model set an image's overall colour from its caption.

Adapters are written through diffusers' `save_lora_weights` (`pytorch_lora_weights.safetensors`,
peft's key names, the LoRA config as metadata), so a plain `StableDiffusionPipeline.load_lora_weights(folder)` loads
them; `read_lora` + `load_lora_state` restore the same file into an adapter in training exactly.

Every function takes the pipeline (or anything with its `vae`, `unet`, `text_encoder`,
`tokenizer` and `scheduler`); `DiffusionObjective` wraps the models as one `nn.Module` whose
forward is the loss, which is what a Ray Train `Task` needs: DDP only all-reduces gradients
of a forward that goes through the wrapper.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dermaray.diffusion import denoising_steps
from dermaray.diffusion.ip_adapter import (
    IP_ADAPTER_FOLDER,
    add_ip_adapter,
    image_embeddings,
    ip_adapter_parameters,
    load_ip_adapter,
    save_ip_adapter,
)

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # attention, as diffusers' LoRA scripts adapt
# Attention and every other linear and convolution layer of the UNet's ResNet and transformer blocks: the transformer
# blocks' projections and feed-forwards, the ResNet blocks' convolutions and time-embedding projection (what
# LoCon-style adapters add; not the up/downsamplers, norms, conv_in/conv_out or the time-embedding MLP). On the tiny
# base an adapter on attention alone could not draw a vascular lesion's colour (1 of 16 read as vascular after 600
# steps on vascular tiles alone; 8 of 16 with these, 9 with the whole UNet). diffusers' `load_lora_weights` loads
# either.
LORA_TARGETS_ALL_LAYERS: tuple[str, ...] = (
    *LORA_TARGETS,
    *("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"),
)
ADAPTER_NAME = "default"  # what diffusers' add_adapter and peft's state-dict helpers assume

# The KL weight of the Stable Diffusion / LDM autoencoder (kl_weight=1e-6 against a per-sample
# *sum* of reconstruction errors). Our reconstruction term is a per-element mean, so the KL sum
# is divided by the number of pixel values to keep LDM's balance. That KL is deliberately weak:
# it keeps the posterior a distribution over long training but never trades reconstruction for
# N(0, 1) latents; the latent scale is set by `calibrate_latent_scale` instead.
KL_WEIGHT = 1e-6
CALIBRATION_IMAGES = 64  # images whose latents set the tiny base's scaling factor


def load_pipeline(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """A `StableDiffusionPipeline` from a local folder or hub id, without safety checker or progress bars.

    Only SD 1.x / 2.x layouts: SDXL and later add a second text encoder and size conditioning
    that neither training nor generation here provides, so they are refused by name."""
    from diffusers import StableDiffusionPipeline

    index = Path(path) / "model_index.json"
    kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if kind not in (None, "StableDiffusionPipeline"):
        raise NotImplementedError(
            f"{path} is a {kind}; the diffusion stage trains and serves StableDiffusionPipeline bases (SD 1.x / 2.x) only"
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def native_resolution(pipe: Any) -> int:
    """The image size the UNet was built for (latent size x VAE downscaling)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def image_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Center-cropped square, bicubic resize (PIL antialiases when shrinking); [B, 3, R, R] in [-1, 1]."""
    if not images:
        raise ValueError("images is empty")
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    arrays = []
    for image in images:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [B, max_length] (padded to the tokenizer's max length, truncated), as SD reads prompts.

    Ray Train batches hold tensors only, so a training job tokenizes captions in its Ray Data
    preprocessing and passes these ids wherever a step function takes `prompts`.
    """
    _check_prompts(prompts)
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(pipe: Any, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state, [B, max_length, hidden], for prompts or `tokenize` ids.

    Always without gradients: the text encoder is frozen in both training stages.
    """
    _check_text(prompts)
    ids = prompts if isinstance(prompts, torch.Tensor) else tokenize(pipe.tokenizer, prompts)
    with torch.no_grad():
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def vae_step_loss(pipe: Any, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The VAE's loss on one batch: MSE of decode(sample of encode(x)) against x, plus KL_WEIGHT x KL."""
    _check_pixels(pixels)
    vae = pipe.vae
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    kl = posterior.kl().mean() / pixels[0].numel()  # kl() sums over a sample's latent values
    return F.mse_loss(reconstruction.float(), pixels.float()) + KL_WEIGHT * kl.float()


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Each image's latent posterior (mean and log-variance stacked on the channels), [B, 2C, h, w].

    What the denoiser trains on, computed once per dataset: `sample_latents` draws a fresh latent
    from it at every step, so caching loses nothing of the VAE's sampling."""
    _check_pixels(pixels)
    return torch.cat(
        [vae.encode(chunk.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters for chunk in pixels.split(batch_size)]
    )


@torch.no_grad()
def vae_round_trip(vae: Any, images: Sequence[Image.Image], resolution: int, batch_size: int = 8) -> list[Image.Image]:
    """Each image at `resolution`, encoded and decoded by the VAE (its posterior's mean): about what image-guided
    generation returns as its strength goes to 0 (img2img encodes with a draw, not the mean), so how closely
    any result can follow its guide. Small batches: a VAE decoder's activations at 512 px are large."""
    pixels = image_tensor(images, resolution)
    decoded = torch.cat(
        [
            vae.decode(vae.encode(chunk.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()).sample.float().cpu()
            for chunk in pixels.split(batch_size)
        ]
    )
    if not torch.isfinite(decoded).all():  # a half-precision VAE can overflow; clamping would hide it as black pixels
        raise FloatingPointError(f"the VAE ({vae.dtype}) decoded non-finite pixels; run it in float32")
    return pixel_images(decoded)


def sample_latents(posterior: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A latent drawn from `encode_latents` posteriors, exactly as `vae.encode(x).latent_dist.sample` draws it."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if posterior.ndim != 4 or posterior.shape[1] % 2:
        raise ValueError(f"latent posteriors must be [B, 2C, h, w] (encode_latents), got {tuple(posterior.shape)}")
    return DiagonalGaussianDistribution(posterior).sample(generator=generator)


class CaptionStates:
    """The frozen text encoder's output per distinct caption, computed once: captions come from one
    template (a few dozen distinct ones per dataset), so encoding every caption at every step
    would repeat the same work thousands of times. Exact: the text encoder never trains."""

    def __init__(self, pipe: Any):
        self.pipe, self.states = pipe, {}
        # The empty caption: what caption dropout trains and what guidance subtracts at sampling.
        self.empty = pipe.tokenizer(
            [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids[0]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.pipe.text_encoder.device
        keys = [(str(device), tuple(row.tolist())) for row in ids.cpu()]
        new = list(dict.fromkeys(k for k in keys if k not in self.states))
        if new:
            encoded = encode_prompts(self.pipe, torch.tensor([k[1] for k in new]))
            self.states.update(zip(new, encoded, strict=True))
        return torch.stack([self.states[k] for k in keys])

    def drop(self, ids: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
        """`ids` with each caption replaced by the empty one with probability p (caption dropout)."""
        if p <= 0:
            return ids
        dropped = torch.rand(len(ids), generator=generator) < p
        return torch.where(dropped[:, None], self.empty.to(ids.device), ids)


def pretrain_vae(
    pipe: Any, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, generator: torch.Generator, log_every: int = 50
) -> float:
    """Train the VAE alone (`vae_step_loss`) on `pixels` for `steps` AdamW steps; the mean loss of the last `log_every`."""
    pipe.vae.requires_grad_(True).train()
    try:
        return train_steps(
            "VAE",
            list(pipe.vae.parameters()),
            lambda b: vae_step_loss(pipe, pixels[b], generator),
            len(pixels),
            steps,
            batch_size,
            lr,
            generator,
            log_every,
        )
    finally:
        pipe.vae.requires_grad_(False).eval()


def pretrain_unet(
    pipe: Any,
    posteriors: torch.Tensor,
    ids: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    caption_dropout: float = 0.0,
    snr_gamma: float | None = None,
    log_every: int = 50,
    noise_offset: float = 0.0,
) -> float:
    """Train the whole UNet on cached latent posteriors and caption ids; the mean loss of the last `log_every` steps."""
    model = DiffusionObjective(pipe, "unet", caption_dropout, snr_gamma, noise_offset).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return train_steps(
        "UNet",
        trainable,
        lambda b: model(posteriors[b], ids[b], generator)["loss"],
        len(posteriors),
        steps,
        batch_size,
        lr,
        generator,
        log_every,
    )


def train_ip_adapter(
    pipe: Any,
    posteriors: torch.Tensor,
    ids: torch.Tensor,
    embeds: torch.Tensor,
    unconditional: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    dropout: float = 0.0,
    snr_gamma: float | None = None,
    log_every: int = 50,
    noise_offset: float = 0.0,
) -> float:
    """Train the UNet's IP-Adapter (`ip_adapter.add_ip_adapter`) on cached latent posteriors, caption ids and image
    tokens (`ip_adapter.image_embeddings` of the same images, and its unconditional tokens): each image is denoised
    under its own caption and its own image prompt, as the paper trains it. As there, a sample loses its caption
    (the empty one), its image prompt (the unconditional tokens) or both, each with probability `dropout`: the
    last is what guidance subtracts at sampling (empty caption and unconditional tokens together), so it is
    trained as often as either alone, not at dropout squared. The mean loss of the last `log_every` steps."""
    if not len(posteriors) == len(ids) == len(embeds):
        raise ValueError(f"{len(posteriors)} latents, {len(ids)} captions and {len(embeds)} image embeddings")
    if not 0 <= dropout <= 1 / 3:
        raise ValueError(f"dropout is per case (caption, image prompt, both): at most 1/3, got {dropout}")
    if unconditional.shape != embeds.shape[1:]:
        raise ValueError(f"unconditional tokens {tuple(unconditional.shape)} do not match {tuple(embeds.shape[1:])}")
    params = ip_adapter_parameters(pipe.unet)
    captions = CaptionStates(pipe)
    pipe.vae.requires_grad_(False)

    def loss_of(batch: list[int]) -> torch.Tensor:
        no_caption, no_image = prompt_dropout(len(batch), dropout, generator)
        image = torch.where(no_image[:, None, None], unconditional, embeds[batch])
        text = captions(torch.where(no_caption[:, None], captions.empty, ids[batch]))
        latents = sample_latents(posteriors[batch].to(device=pipe.vae.device, dtype=pipe.vae.dtype), generator)
        return _denoising_loss(pipe, latents, text, generator, snr_gamma, image_embeds=image, noise_offset=noise_offset)

    pipe.unet.train()
    try:
        return train_steps("IP-Adapter", params, loss_of, len(posteriors), steps, batch_size, lr, generator, log_every)
    finally:
        pipe.unet.eval()


def prompt_dropout(n: int, p: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(no caption, no image prompt) masks of n samples: the caption alone, the image prompt alone and both are
    each dropped with probability p (IP-Adapter's training), so the unconditional case guidance subtracts is as
    frequent as either alone."""
    case = torch.rand(n, generator=generator)  # [0, p): caption, [p, 2p): image prompt, [2p, 3p): both
    return (case < p) | ((case >= 2 * p) & (case < 3 * p)), (case >= p) & (case < 3 * p)


def train_steps(
    name: str,
    params: list[torch.nn.Parameter],
    loss_of: Callable[[list[int]], torch.Tensor],
    n: int,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log_every: int,
) -> float:
    """`steps` AdamW steps on `loss_of(batch indices)` over shuffled epochs of n items; the last `log_every` losses' mean."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    window: list[float] = []
    for step, batch in enumerate(_batches(n, batch_size, steps, generator), start=1):
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window = (window + [float(loss.detach())])[-log_every:]
        if step % log_every == 0 or step == steps:
            logger.info("pretrain %s step %d/%d: loss %.4f", name, step, steps, np.mean(window))
    return float(np.mean(window))


def pretrain_base(
    path_in: str | Path,
    path_out: str | Path,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    vae_steps: int,
    unet_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    caption_dropout: float = 0.0,
    snr_gamma: float | None = None,
    log_every: int = 50,
    device: str | torch.device | None = None,
    resolution: int | None = None,
    ip_adapter_steps: int = 0,
    noise_offset: float = 0.0,
    zero_terminal_snr: bool = False,
) -> dict[str, float | None]:
    """Pre-train a base pipeline in two stages on (image, caption) pairs and save it to `path_out`.

    1. the VAE alone for `vae_steps`; then its scaling factor is calibrated on up to
       CALIBRATION_IMAGES random images (`calibrate_latent_scale`) and saved with the model;
    2. every image's latent posterior and every distinct caption are encoded once, and the UNet
       trains on them for `unet_steps` (caption dropout, Min-SNR weighting and noise offset as given; with
       `zero_terminal_snr`, on `zero_terminal_snr_scheduler`'s schedule, which the saved base keeps);
    3. with `ip_adapter_steps`, an IP-Adapter on the saved base (`train_ip_adapter`, the UNet frozen),
       each image its own prompt as the tiny image encoder (`models.tiny.build_image_encoder`) sees it
       at `resolution`, saved to `<path_out>/ip_adapter` (`ip_adapter.save_ip_adapter`).

    Single-process loops (AdamW, shuffled epochs) for the tiny preset. Images are resized to
    `resolution` (default: the pipeline's native one). Returns {"vae", "unet", "ip_adapter"}: the mean
    losses of each stage's last `log_every` steps (None for a stage with no steps).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if min(vae_steps, unet_steps, ip_adapter_steps) < 0 or batch_size < 1 or log_every < 1:
        raise ValueError(
            f"steps must be >= 0, batch_size and log_every >= 1; got {vae_steps}, {unet_steps}, {ip_adapter_steps}, "
            f"{batch_size}, {log_every}"
        )
    if batch_size > len(images):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} images")
    if zero_terminal_snr and not unet_steps:
        raise ValueError("zero_terminal_snr needs unet_steps: a UNet trained on another schedule cannot sample with it")
    pipe = load_pipeline(path_in, device=device)
    if zero_terminal_snr:
        pipe.scheduler = zero_terminal_snr_scheduler(pipe.scheduler)
    pixels = image_tensor(images, resolution or native_resolution(pipe))
    generator = torch.Generator().manual_seed(seed)  # batch order, latents, noise, timesteps, dropout
    losses: dict[str, float | None] = {"vae": None, "unet": None, "ip_adapter": None}
    if vae_steps:
        losses["vae"] = pretrain_vae(pipe, pixels, vae_steps, batch_size, lr, generator, log_every)
    pipe.vae.requires_grad_(False).eval()
    calibration = torch.randperm(len(images), generator=generator)[:CALIBRATION_IMAGES]
    scale = calibrate_latent_scale(pipe, pixels[calibration], generator=generator, batch_size=batch_size)
    logger.info("pretrain: VAE scaling factor set to %.4f", scale)
    if unet_steps or ip_adapter_steps:
        posteriors = encode_latents(pipe.vae, pixels, batch_size=max(batch_size, 64))
        ids = tokenize(pipe.tokenizer, prompts)
    if unet_steps:
        losses["unet"] = pretrain_unet(
            pipe, posteriors, ids, unet_steps, batch_size, lr, generator, caption_dropout, snr_gamma, log_every, noise_offset
        )
    pipe.save_pretrained(str(path_out), safe_serialization=True)  # the base alone, before any IP-Adapter joins it
    _copy_missing_tokenizer_files(Path(path_in), Path(path_out))
    if ip_adapter_steps:
        from transformers import CLIPVisionModelWithProjection

        from dermaray.models.tiny import build_image_encoder

        with tempfile.TemporaryDirectory(prefix="image-encoder-") as built:  # saved with the adapter, below
            build_image_encoder(Path(built), seed)
            encoder = CLIPVisionModelWithProjection.from_pretrained(built).to(pipe.unet.device).eval()
        embeds, unconditional = image_embeddings(encoder, pixel_images(pixels))
        add_ip_adapter(pipe, embeds.shape[-1], seed=seed)
        losses["ip_adapter"] = train_ip_adapter(
            pipe,
            posteriors,
            ids,
            embeds,
            unconditional,
            ip_adapter_steps,
            batch_size,
            lr,
            generator,
            caption_dropout,
            snr_gamma,
            log_every,
            noise_offset,
        )
        save_ip_adapter(pipe.unet, encoder, Path(path_out) / IP_ADAPTER_FOLDER)
    return losses


def pixel_images(pixels: torch.Tensor) -> list[Image.Image]:
    """`image_tensor` pixels ([B, 3, R, R] in [-1, 1]) back to PIL images."""
    arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """`steps` batches of indices from shuffled epochs; the tail of one epoch starts the next batch."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def calibrate_latent_scale(
    pipe: Any, pixels: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 16
) -> float:
    """Set the VAE's `scaling_factor` to 1 / std of its latents on `pixels` (LDM's scale_by_std); returns it.

    The UNet is trained on latents x scaling_factor and the noise schedule assumes those have
    unit variance. Stable Diffusion's 0.18215 fits only its own VAE; the tiny VAE's latents have
    a std near 1, so with 0.18215 the UNet would see a signal ~5x too weak (every timestep almost
    pure noise). Call it once, before the UNet trains: the factor is part of the base from then on.
    """
    if pixels.ndim != 4 or pixels.shape[0] < 2:
        raise ValueError(f"pixels must be [B >= 2, 3, H, W] to measure a spread, got {tuple(pixels.shape)}")
    vae = pipe.vae
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(chunk.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator=generator)
                for chunk in pixels.split(batch_size)
            ]
        )
    scale = 1.0 / float(latents.float().std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def add_lora(unet: Any, rank: int = 4, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS, seed: int = 0) -> None:
    """Freeze the UNet and add one LoRA adapter (peft, via diffusers' `add_adapter`); only it trains.

    `alpha` defaults to `rank` (scale 1). A and B start as in diffusers' training scripts
    ("gaussian": A ~ N(0, 1/rank), B = 0), so the adapted UNet starts equal to the base; the
    seed fixes A without touching the global RNG. Trainable weights are kept in float32.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not targets:
        raise ValueError("targets is empty")
    if getattr(unet, "peft_config", None):
        raise ValueError(f"the UNet already has adapters {list(unet.peft_config)}; LoRA training uses exactly one")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    for param in lora_parameters(unet):
        param.data = param.data.float()  # fp16 adapter updates underflow; diffusers' cast_training_params


def lora_parameters(unet: Any) -> list[torch.nn.Parameter]:
    """The adapter's weights (everything peft added), in module order."""
    return [p for name, p in unet.named_parameters() if ".lora_" in name]


def lora_state(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter weights (peft keys, no adapter name) as detached CPU copies, for checkpoints."""
    from peft.utils import get_peft_model_state_dict

    _require_adapter(unet)
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def load_lora_state(unet: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy `lora_state` (or `read_lora`) weights into the UNet's adapter; every key must match exactly.

    Strict on purpose: a partial restore (keys renamed between formats and silently skipped) is
    how LoRA training scripts resume with fresh adapter weights without noticing.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    _require_adapter(unet)
    current = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(f"adapter state does not match the UNet's adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k in current if current[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"adapter state has the wrong shapes for {wrong[:5]} (a different rank?)")
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)


def save_lora(pipe_or_unet: Any, folder: str | Path) -> Path:
    """Write the adapter as `<folder>/pytorch_lora_weights.safetensors`, the file `load_lora_weights` reads.

    The peft state dict as it is, through `save_lora_weights` (as diffusers' newer LoRA scripts write
    theirs), plus the LoRA config as metadata: without it, `load_lora_weights` assumes alpha == rank
    and an adapter trained with another alpha loads at the wrong scale. Not through
    `convert_state_dict_to_diffusers`, as the SD 1.5 text-to-image example does: it renames attention
    keys only, and a file that mixes both key styles (an adapter on convolutions too) loads without
    its attention half, silently.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    _require_adapter(unet)
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=layers,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
    )
    return Path(folder) / LORA_WEIGHT_NAME


def read_lora(folder: str | Path) -> dict[str, torch.Tensor]:
    """The UNet adapter weights of a `save_lora` folder, in `lora_state`'s keys (for exact resume)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = Path(folder) / LORA_WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {folder}")
    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)
    prefix = StableDiffusionPipeline.unet_name + "."
    unet_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return convert_unet_state_dict_to_peft(unet_state)


class GenerationStopped(Exception):
    """A generation ended before its last step because its caller no longer wants it."""


def _stop_when(should_stop: Callable[[], bool]) -> Callable[..., dict]:
    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if should_stop():
            raise GenerationStopped(f"stopped after denoising step {step + 1}")
        return tensors

    return on_step_end


def generate(
    pipe: Any,
    prompts: Sequence[str],
    n_per_prompt: int,
    seed: int,
    steps: int = 20,
    guidance_scale: float = 7.5,
    adapter_folder: str | Path | None = None,
    resolution: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    guides: Sequence[Image.Image] | None = None,
    strength: float = 0.6,
    ip_adapter_folder: str | Path | None = None,
    ip_adapter_scale: float = 1.0,
) -> list[Image.Image]:
    """`n_per_prompt` images per prompt at `resolution` (default: the native one), prompt-major.

    Image i (of prompts[i // n_per_prompt]) starts from its own generator seeded `seed + i`, so
    the same call with the same seed gives the same images. With `adapter_folder`, that adapter
    is loaded for this call and unloaded afterwards (the pipeline must then have no adapter of
    its own); without it, the pipeline runs as it is, e.g. with an adapter being trained.
    `guides` (one image per prompt) make it image-guided (img2img, SDEdit): each guide is noised
    to `strength` (0: the guide itself, 1: pure noise, as text-only generation) and denoised under
    its prompt, so the result keeps the guide's layout (size, shape, position) and takes the
    prompt's (the adapter's) appearance (img2img at strength 1 still starts from the guide noised to the
    scheduler's first step, so a trace of it stays). With `ip_adapter_folder` (`ip_adapter.save_ip_adapter`), each
    guide, at the generation size, is also its image's image prompt at `ip_adapter_scale` (as SkinGEN
    adds an IP-Adapter to the diagnosis' LoRA); at strength 1 the image then starts from noise, not from
    the guide, so the guide reaches it through the IP-Adapter alone.
    `should_stop` is asked after every denoising step; True ends the call with `GenerationStopped`
    (a served request that timed out or was cancelled: its work ends with it).
    """
    _check_prompts(prompts)
    if n_per_prompt < 1 or steps < 1:
        raise ValueError(f"n_per_prompt and steps must be >= 1, got {n_per_prompt}, {steps}")
    if guides is not None and len(guides) != len(prompts):
        raise ValueError(f"guides are one per prompt: {len(prompts)} prompts, {len(guides)} guides")
    if guides is not None and not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if guides is not None and denoising_steps(steps, strength) < 1:
        raise ValueError(f"strength {strength} of {steps} steps leaves no denoising step: raise either")
    if ip_adapter_folder is not None and guides is None:
        raise ValueError("ip_adapter_folder needs guides: they are the image prompts")
    if ip_adapter_folder is not None and getattr(pipe.unet, "encoder_hid_proj", None) is not None:
        raise ValueError("ip_adapter_folder given but the pipeline already has an IP-Adapter; use a plain base pipeline")
    if adapter_folder is not None:
        if getattr(pipe.unet, "peft_config", None):
            raise ValueError("adapter_folder given but the pipeline already has an adapter; use a plain base pipeline")
        if not (Path(adapter_folder) / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {adapter_folder}")
        pipe.load_lora_weights(str(adapter_folder), weight_name=LORA_WEIGHT_NAME)
    feature_extractor = getattr(pipe, "feature_extractor", None)
    try:
        if ip_adapter_folder is not None:
            load_ip_adapter(pipe, ip_adapter_folder, ip_adapter_scale)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * n_per_prompt)]
        size = resolution or native_resolution(pipe)
        common = {
            "generator": generators,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "output_type": "pil",
            **({"callback_on_step_end": _stop_when(should_stop)} if should_stop else {}),
        }
        if guides is None:
            return pipe(prompt=list(prompts), num_images_per_prompt=n_per_prompt, height=size, width=size, **common).images
        from diffusers import StableDiffusionImg2ImgPipeline

        # One guide per image, spelled out: img2img repeats a short image batch whole ([a, b, a, b])
        # while it repeats prompts each in place ([p, p, q, q]), which would pair guides with the wrong prompts.
        pixels = image_tensor(guides, size)
        guided = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # the same modules, adapters included
        guided.set_progress_bar_config(disable=True)
        if ip_adapter_folder is None:
            every = [prompt for prompt in prompts for _ in range(n_per_prompt)]
            image = (pixels.repeat_interleave(n_per_prompt, dim=0) + 1) / 2
            return guided(prompt=every, image=image, strength=strength, **common).images
        # A pipeline gives one image prompt to its whole batch, so each guide runs as a batch of its own.
        images = []
        for i, (prompt, guide) in enumerate(zip(prompts, pixel_images(pixels), strict=True)):
            own = {**common, "generator": generators[i * n_per_prompt : (i + 1) * n_per_prompt], "ip_adapter_image": guide}
            if strength == 1:
                images += pipe(prompt=prompt, num_images_per_prompt=n_per_prompt, height=size, width=size, **own).images
            else:
                image = (pixels[i : i + 1] + 1) / 2
                images += guided(prompt=prompt, image=image, num_images_per_prompt=n_per_prompt, strength=strength, **own).images
        return images
    finally:
        if ip_adapter_folder is not None:  # also after a failed load: diffusers sets the processors before the projection
            pipe.unload_ip_adapter()
            pipe.feature_extractor = feature_extractor
        if adapter_folder is not None:
            pipe.unload_lora_weights()


class DiffusionObjective(torch.nn.Module):
    """The denoising loss on cached latents as one module: "unet" trains the whole UNet, "lora" its adapter only.

    forward(posteriors, prompts) takes `encode_latents` posteriors and caption strings or
    `tokenize` ids, and returns {"loss"}. The VAE and the text encoder are frozen; caption
    states are cached per distinct caption (`CaptionStates`). For Ray Train: `prepare_model`
    moves it (and so the pipeline's models) to the device and wraps it in DDP, and calling the
    wrapper runs the loss with gradient sync.
    """

    def __init__(
        self,
        pipe: Any,
        objective: str,
        caption_dropout: float = 0.0,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
    ):
        super().__init__()
        if objective not in ("unet", "lora"):
            raise ValueError(f"objective must be 'unet' or 'lora', got {objective!r}")
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma}")
        if objective == "lora":
            _require_adapter(pipe.unet)
        else:
            pipe.unet.requires_grad_(True)
        self.pipe, self.objective = pipe, objective
        if noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0, got {noise_offset}")
        self.caption_dropout, self.snr_gamma, self.noise_offset = caption_dropout, snr_gamma, noise_offset
        self.vae, self.unet, self.text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.captions = CaptionStates(pipe)

    def forward(
        self, posteriors: torch.Tensor, prompts: Sequence[str] | torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        _check_text(prompts)
        if posteriors.shape[0] != len(prompts):
            raise ValueError(f"{posteriors.shape[0]} latents but {len(prompts)} prompts")
        ids = prompts if isinstance(prompts, torch.Tensor) else tokenize(self.pipe.tokenizer, prompts)
        if self.training:
            ids = self.captions.drop(ids.cpu(), self.caption_dropout, generator)
        latents = sample_latents(posteriors.to(device=self.vae.device, dtype=self.vae.dtype), generator)
        text = self.captions(ids)
        return {"loss": _denoising_loss(self.pipe, latents, text, generator, self.snr_gamma, noise_offset=self.noise_offset)}


def training_noise(latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0) -> torch.Tensor:
    """The noise a training step adds to `latents` [B, C, h, w]: standard normal, plus with `offset` one normal
    value x `offset` per image and channel, constant over the image (the noise offset of diffusers' training
    scripts' `--noise_offset`). Plain noise never moves an image's mean far from the clean image's, so a model
    trained on it barely learns to set a whole image's colour from its caption; here the diagnosis is largely a
    colour. Offset 0 draws exactly the plain noise (the same generator draws, so runs without it are unchanged)."""
    from diffusers.utils.torch_utils import randn_tensor

    if offset < 0:
        raise ValueError(f"noise offset must be >= 0, got {offset}")
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        shift = randn_tensor((*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + offset * shift
    return noise


def zero_terminal_snr_scheduler(scheduler: Any) -> Any:
    """`scheduler` with a noise schedule that ends in pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed"): the betas rescaled so the last timestep keeps none of the image, v-prediction (the
    noise alone says nothing of the image there) and sampling from that last timestep ("trailing"). SD 1.5's schedule
    keeps ~7% of the image at its last step, so training never shows the UNet an image whose overall colour is still
    to be chosen, and sampling starts from noise with a neutral one: a diagnosis that is largely a colour is then
    hard to draw. Only for a UNet (pre-)trained with it: a base's scheduler config carries it to every adapter."""
    return type(scheduler).from_config(
        scheduler.config, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )


def _denoising_loss(
    pipe: Any,
    latents: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator | None,
    snr_gamma: float | None = None,
    image_embeds: torch.Tensor | None = None,  # [B, T, D]
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """DDPM MSE: noise the scaled latents at random timesteps, predict what the base's scheduler says (the noise,
    or with v-prediction the velocity, `zero_terminal_snr_scheduler`).

    With `snr_gamma`, each sample's error is weighted min(SNR(t), gamma) / SNR(t) for epsilon, / (SNR(t) + 1)
    for v (Min-SNR-gamma), as diffusers' training scripts' `--snr_gamma`. `image_embeds` [B, D]:
    each sample's image tokens, for a UNet with an IP-Adapter. `noise_offset`: see `training_noise`."""
    from diffusers import DDPMScheduler

    # Training noise comes from a DDPM scheduler with the pipeline's schedule (betas, number of
    # steps); the pipeline's own scheduler (DDIM here) is for sampling only. Built once per pipeline.
    noise_scheduler = getattr(pipe, "_training_noise_scheduler", None)
    if noise_scheduler is None:
        noise_scheduler = pipe._training_noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kind = noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"only epsilon- and v-prediction bases are supported, got {kind!r}")
    latents = latents * pipe.vae.config.scaling_factor
    noise = training_noise(latents, generator, noise_offset)
    timesteps = torch.randint(
        0,
        noise_scheduler.config.num_train_timesteps,
        (latents.shape[0],),
        generator=generator,
        device=generator.device if generator is not None else latents.device,
    ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    image = {} if image_embeds is None else {"added_cond_kwargs": {"image_embeds": [image_embeds.to(latents)[:, None]]}}
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text.to(pipe.unet.dtype), **image).sample
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return errors.mean()
    alphas = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    # The paper's weights: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (finite at a zero terminal SNR).
    return (errors * torch.clamp(snr, max=snr_gamma) / (snr if kind == "epsilon" else snr + 1)).mean()


def _copy_missing_tokenizer_files(source: Path, target: Path) -> None:
    """Keep tokenizer files that save_pretrained does not rewrite (the tiny base's vocab.json and
    merges.txt for slow-tokenizer readers), so the trained base is a drop-in for its source."""
    if not (source / "tokenizer").is_dir():
        return  # a hub id: nothing local to keep
    for file in (source / "tokenizer").iterdir():
        if file.is_file() and not (target / "tokenizer" / file.name).exists():
            shutil.copy2(file, target / "tokenizer" / file.name)


def _check_text(prompts: Sequence[str] | torch.Tensor) -> None:
    """Prompt strings, or `tokenize` ids."""
    if not isinstance(prompts, torch.Tensor):
        _check_prompts(prompts)
    elif prompts.ndim != 2 or prompts.numel() == 0 or prompts.is_floating_point():
        raise ValueError(f"token ids must be a non-empty integer tensor [B, L], got {prompts.dtype} {tuple(prompts.shape)}")


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every prompt must be a non-empty string")


def _check_pixels(pixels: torch.Tensor) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    if pixels.shape[2] % 8 or pixels.shape[3] % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {tuple(pixels.shape[2:])}")


def _require_adapter(unet: Any) -> None:
    if ADAPTER_NAME not in (getattr(unet, "peft_config", None) or {}):
        raise ValueError("the UNet has no LoRA adapter; call add_lora first")
