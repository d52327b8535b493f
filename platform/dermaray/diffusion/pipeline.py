"""Stable Diffusion building blocks: base pre-training, LoRA training, adapter files and sampling.

Two training stages share one denoising objective (DDPM epsilon MSE on VAE latents):

- `pretrain_base_step`: the tiny preset starts from random weights and would only ever make
  noise, so its VAE and UNet are first trained briefly on the synthetic lesions; the result is
  saved with `save_pretrained` and from then on treated exactly like a real base model.
- `lora_step_loss`: LoRA adapters on the UNet's attention projections, everything else frozen.

Adapters are written in the diffusers format (`pytorch_lora_weights.safetensors`, with the
LoRA config as metadata), so a plain `StableDiffusionPipeline.load_lora_weights(folder)` loads
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
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


def pretrain_base_step(
    pipe: Any, pixels: torch.Tensor, prompts: Sequence[str] | torch.Tensor, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Losses of one batch for base pre-training: {"vae", "unet", "loss" = vae + unet}.

    VAE: MSE of decode(sample of encode(x)) against x, plus KL_WEIGHT x KL. UNet: epsilon MSE
    on the latents x `vae.config.scaling_factor`. Both models get gradients from `loss`; the
    text encoder does not. `prompts` are strings or `tokenize` ids; `generator` draws the latent
    sample, the noise and the timesteps.
    """
    _check_batch(pixels, prompts)
    vae = pipe.vae
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=generator)
    reconstruction = vae.decode(latents).sample
    kl = posterior.kl().mean() / pixels[0].numel()  # kl() sums over a sample's latent values
    vae_loss = F.mse_loss(reconstruction.float(), pixels.float()) + KL_WEIGHT * kl.float()
    # Detached: the UNet learns to denoise the latent space as it is, and its loss must not
    # reshape the VAE (shrinking latents would make denoising trivially easy and hurt decoding).
    # The VAE is shaped by reconstruction alone, as in Stable Diffusion's two-stage training.
    unet_loss = _denoising_loss(pipe, latents.detach(), encode_prompts(pipe, prompts), generator)
    return {"vae": vae_loss, "unet": unet_loss, "loss": vae_loss + unet_loss}


def pretrain_base(
    path_in: str | Path,
    path_out: str | Path,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 50,
    device: str | torch.device | None = None,
    resolution: int | None = None,
) -> dict[str, float]:
    """Pre-train a base pipeline's VAE and UNet on (image, caption) pairs and save it to `path_out`.

    A single-process loop (AdamW, shuffled epochs) for the tiny preset; a distributed job
    would wrap `DiffusionObjective(pipe, "pretrain")` in a `Task` instead. Images are resized to
    `resolution` (default: the pipeline's native one). The VAE's scaling factor is first
    calibrated on up to CALIBRATION_IMAGES random images (`calibrate_latent_scale`) and saved
    with the model. Returns the mean losses over the last `log_every` steps.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps, batch_size and log_every must be >= 1, got {steps}, {batch_size}, {log_every}")
    if batch_size > len(images):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} images")
    pipe = load_pipeline(path_in, device=device)
    pixels = image_tensor(images, resolution or native_resolution(pipe))
    model = DiffusionObjective(pipe, "pretrain")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)  # calibration, batch order, latents, noise, timesteps
    calibration = torch.randperm(len(images), generator=generator)[:CALIBRATION_IMAGES]
    scale = calibrate_latent_scale(pipe, pixels[calibration], generator=generator, batch_size=batch_size)
    logger.info("pretrain: VAE scaling factor set to %.4f", scale)
    order: list[int] = []
    window: list[dict[str, float]] = []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:  # a new epoch; the tail of the last one starts the batch
            order += torch.randperm(len(images), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        losses = model(pixels[batch], [prompts[i] for i in batch], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        window = (window + [{k: float(v.detach()) for k, v in losses.items()}])[-log_every:]
        if step % log_every == 0 or step == steps:
            means = ", ".join(f"{k} {v:.4f}" for k, v in _mean(window).items())
            logger.info("pretrain step %d/%d: %s", step, steps, means)
    pipe.save_pretrained(str(path_out), safe_serialization=True)
    _copy_missing_tokenizer_files(Path(path_in), Path(path_out))
    return _mean(window)


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


def lora_step_loss(
    pipe: Any, pixels: torch.Tensor, prompts: Sequence[str] | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Epsilon MSE of one batch through the adapted UNet; VAE and text encoder run without gradients."""
    _check_batch(pixels, prompts)
    _require_adapter(pipe.unet)
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator=generator)
    return _denoising_loss(pipe, latents, encode_prompts(pipe, prompts), generator)


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
    """Write the adapter as `<folder>/pytorch_lora_weights.safetensors` in the diffusers format.

    Done as diffusers' text-to-image LoRA example does (peft state dict -> diffusers keys ->
    `save_lora_weights`), plus the LoRA config as metadata: without it, `load_lora_weights`
    assumes alpha == rank and an adapter trained with another alpha loads at the wrong scale.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    _require_adapter(unet)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
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
) -> list[Image.Image]:
    """`n_per_prompt` images per prompt at `resolution` (default: the native one), prompt-major.

    Image i (of prompts[i // n_per_prompt]) starts from its own generator seeded `seed + i`, so
    the same call with the same seed gives the same images. With `adapter_folder`, that adapter
    is loaded for this call and unloaded afterwards (the pipeline must then have no adapter of
    its own); without it, the pipeline runs as it is, e.g. with an adapter being trained.
    `should_stop` is asked after every denoising step; True ends the call with `GenerationStopped`
    (a served request that timed out or was cancelled: its work ends with it).
    """
    _check_prompts(prompts)
    if n_per_prompt < 1 or steps < 1:
        raise ValueError(f"n_per_prompt and steps must be >= 1, got {n_per_prompt}, {steps}")
    if adapter_folder is not None:
        if getattr(pipe.unet, "peft_config", None):
            raise ValueError("adapter_folder given but the pipeline already has an adapter; use a plain base pipeline")
        if not (Path(adapter_folder) / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {adapter_folder}")
        pipe.load_lora_weights(str(adapter_folder), weight_name=LORA_WEIGHT_NAME)
    try:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * n_per_prompt)]
        size = resolution or native_resolution(pipe)
        return pipe(
            prompt=list(prompts),
            num_images_per_prompt=n_per_prompt,
            generator=generators,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="pil",
            **({"callback_on_step_end": _stop_when(should_stop)} if should_stop else {}),
        ).images
    finally:
        if adapter_folder is not None:
            pipe.unload_lora_weights()


class DiffusionObjective(torch.nn.Module):
    """The pipeline's models as one module whose forward is a training loss ("pretrain" or "lora").

    For Ray Train: `prepare_model` moves it (and so the pipeline's models) to the device and
    wraps it in DDP, and calling the wrapper runs the loss with gradient sync. forward returns
    the dict of `pretrain_base_step`, or {"unet", "loss"} for "lora".
    """

    def __init__(self, pipe: Any, objective: str):
        super().__init__()
        if objective not in ("pretrain", "lora"):
            raise ValueError(f"objective must be 'pretrain' or 'lora', got {objective!r}")
        self.pipe, self.objective = pipe, objective
        self.vae, self.unet, self.text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
        self.text_encoder.requires_grad_(False)
        if objective == "lora":
            self.vae.requires_grad_(False)

    def forward(
        self, pixels: torch.Tensor, prompts: Sequence[str] | torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        if self.objective == "pretrain":
            return pretrain_base_step(self.pipe, pixels, prompts, generator)
        loss = lora_step_loss(self.pipe, pixels, prompts, generator)
        return {"unet": loss, "loss": loss}


def _denoising_loss(pipe: Any, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """DDPM epsilon MSE: noise the scaled latents at random timesteps, predict the noise."""
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    # Training noise comes from a DDPM scheduler with the pipeline's schedule (betas, number of
    # steps); the pipeline's own scheduler (DDIM here) is for sampling only. Built once per pipeline.
    noise_scheduler = getattr(pipe, "_training_noise_scheduler", None)
    if noise_scheduler is None:
        noise_scheduler = pipe._training_noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon-prediction bases are supported, got {noise_scheduler.config.prediction_type!r}")
    latents = latents * pipe.vae.config.scaling_factor
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0,
        noise_scheduler.config.num_train_timesteps,
        (latents.shape[0],),
        generator=generator,
        device=generator.device if generator is not None else latents.device,
    ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text.to(pipe.unet.dtype)).sample
    return F.mse_loss(prediction.float(), noise.float())


def _copy_missing_tokenizer_files(source: Path, target: Path) -> None:
    """Keep tokenizer files that save_pretrained does not rewrite (the tiny base's vocab.json and
    merges.txt for slow-tokenizer readers), so the trained base is a drop-in for its source."""
    if not (source / "tokenizer").is_dir():
        return  # a hub id: nothing local to keep
    for file in (source / "tokenizer").iterdir():
        if file.is_file() and not (target / "tokenizer" / file.name).exists():
            shutil.copy2(file, target / "tokenizer" / file.name)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


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


def _check_batch(pixels: torch.Tensor, prompts: Sequence[str] | torch.Tensor) -> None:
    _check_text(prompts)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    if pixels.shape[0] != len(prompts):
        raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
    if pixels.shape[2] % 8 or pixels.shape[3] % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {tuple(pixels.shape[2:])}")


def _require_adapter(unet: Any) -> None:
    if ADAPTER_NAME not in (getattr(unet, "peft_config", None) or {}):
        raise ValueError("the UNet has no LoRA adapter; call add_lora first")
