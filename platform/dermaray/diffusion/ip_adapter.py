"""IP-Adapter (Ye et al. 2023): an image prompt for a Stable Diffusion UNet, as SkinGEN adds to a diagnosis' LoRA.

A frozen CLIP image encoder reads the guiding lesion; a small MLP turns every token of its penultimate
layer (the class token and each patch's) into an extra context token, and every cross-attention layer
attends to those through its own key and value projections (`to_k_ip`, `to_v_ip`) beside the
caption's, the result added at `scale`. Only the MLP and those key/value weights train, on the base
with the UNet frozen, so one IP-Adapter serves every LoRA adapter of that base.

Patch tokens, not only the pooled embedding of the plain IP-Adapter: what a reference has to keep from its
guide is where the lesion is and how large, which the patch tokens hold. In a trial on the study's base the
two followed the guide's area about equally from noise (Spearman 0.43 pooled, 0.45 every token), so the
choice rests on that argument more than on a measured gain. This is the layout of the published
ip-adapter-full-face_sd15.

The modules are diffusers' own (`IPAdapterFullImageProjection`, `IPAdapterAttnProcessor2_0`), put on
the UNet through `load_ip_adapter`, and the saved folder is laid out as the published SD 1.5 adapters
are (`ip-adapter.safetensors` with `image_proj.*` / `ip_adapter.*` keys, the encoder in
`image_encoder/`), so a plain `pipe.load_ip_adapter(folder, subfolder="", weight_name=...)` loads it.
Training runs on cached latents and cached image tokens: both the VAE and the encoder are frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IP_ADAPTER_FOLDER = "ip_adapter"  # in a pre-trained tiny base's folder: the IP-Adapter trained with it
IP_ADAPTER_WEIGHT_NAME = "ip-adapter.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"
# The published files' keys of the projection (an MLP and a LayerNorm) and diffusers' module names for them.
PROJECTION_KEYS = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2", "proj.3": "norm"}


def base_ip_adapter(base_folder: str | Path) -> Path | None:
    """The IP-Adapter a pre-trained base carries (`<base>/ip_adapter`, trained with it), or None."""
    folder = Path(base_folder) / IP_ADAPTER_FOLDER
    return folder if (folder / IP_ADAPTER_WEIGHT_NAME).is_file() else None


def image_processor(encoder: Any) -> Any:
    """The encoder's preprocessing (at its own input size, as diffusers builds it for a pipeline without a feature
    extractor), in training and at generation (`load_ip_adapter` sets it): both embed the lesions alike."""
    from transformers import CLIPImageProcessor

    side = encoder.config.image_size
    return CLIPImageProcessor(size=side, crop_size=side)


@torch.no_grad()
def image_embeddings(encoder: Any, images: Sequence[Image.Image], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's tokens from the encoder's penultimate layer, [B, T, D]; the unconditional tokens, [T, D]).

    What a pipeline's `encode_image` gives an IP-Adapter of this kind: the unconditional tokens are the
    encoding of an all-zero input, which guidance subtracts and which training's image dropout stands in."""
    if not images:
        raise ValueError("images is empty")
    processor = image_processor(encoder)
    device, dtype = encoder.device, encoder.dtype

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        return encoder(pixels.to(device, dtype), output_hidden_states=True).hidden_states[-2].float().cpu()

    chunks = [
        tokens(processor(images=list(images[i : i + batch_size]), return_tensors="pt").pixel_values)
        for i in range(0, len(images), batch_size)
    ]
    side = encoder.config.image_size
    return torch.cat(chunks), tokens(torch.zeros(1, 3, side, side))[0]


def add_ip_adapter(pipe: Any, image_embed_dim: int, seed: int = 0) -> None:
    """Put a new IP-Adapter on the pipeline's UNet through diffusers' `load_ip_adapter`; only its weights train.

    As in the paper, each layer's `to_k_ip` / `to_v_ip` start as copies of its caption `to_k` / `to_v`;
    the MLP starts as seeded `nn.Linear` layers (the global RNG untouched) and an identity LayerNorm."""
    unet = pipe.unet
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ValueError("the UNet already has an IP-Adapter (or another encoder_hid_proj)")
    cross = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden, out = torch.nn.Linear(image_embed_dim, image_embed_dim), torch.nn.Linear(image_embed_dim, cross)
    projection = {
        "proj.0.weight": hidden.weight.detach(),
        "proj.0.bias": hidden.bias.detach(),
        "proj.2.weight": out.weight.detach(),
        "proj.2.bias": out.bias.detach(),
        "proj.3.weight": torch.ones(cross),
        "proj.3.bias": torch.zeros(cross),
    }
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": projection, "ip_adapter": {}}
    for key, name in _layer_keys(_cross_attention_layers(unet)):
        attention = unet.get_submodule(name)
        state["ip_adapter"][f"{key}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        state["ip_adapter"][f"{key}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
    # Training passes image tokens, not images: diffusers' warning that no encoder was loaded is moot here.
    loader_log = logging.getLogger("diffusers.loaders.ip_adapter")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None, low_cpu_mem_usage=False)
    finally:
        loader_log.setLevel(level)
    unet.requires_grad_(False)
    for param in ip_adapter_parameters(unet):
        param.data = param.data.float()
        param.requires_grad_(True)


def ip_adapter_parameters(unet: Any) -> list[torch.nn.Parameter]:
    """The IP-Adapter's weights: the image projection, then each cross-attention layer's to_k_ip / to_v_ip."""
    _require_ip_adapter(unet)
    params = list(unet.encoder_hid_proj.parameters())
    for processor in _ip_processors(unet):
        params += list(processor.parameters())
    return params


def ip_adapter_state(unet: Any) -> dict[str, torch.Tensor]:
    """Copies of the IP-Adapter's weights under the keys of the published files (`image_proj.proj.0.weight`,
    `ip_adapter.1.to_k_ip.weight`, ...).

    Layer keys count 1, 3, 5, ... over the cross-attention layers in the UNet's order, as diffusers reads them."""
    _require_ip_adapter(unet)
    layers = unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1:
        raise ValueError(f"the UNet carries {len(layers)} IP-Adapters; one is saved at a time")
    projection = layers[0].state_dict()
    state = {
        f"image_proj.{key}.{w}": projection[f"{name}.{w}"] for key, name in PROJECTION_KEYS.items() for w in ("weight", "bias")
    }
    for key, processor in _layer_keys(_ip_processors(unet)):
        state[f"ip_adapter.{key}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        state[f"ip_adapter.{key}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in state.items()}


def save_ip_adapter(unet: Any, encoder: Any, folder: str | Path) -> Path:
    """Write `<folder>/ip-adapter.safetensors` and the image encoder to `<folder>/image_encoder/`; the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state(unet), str(folder / IP_ADAPTER_WEIGHT_NAME), metadata={"format": "pt"})
    encoder.save_pretrained(folder / IMAGE_ENCODER_FOLDER, safe_serialization=True)
    return folder


def load_ip_adapter(pipe: Any, folder: str | Path, scale: float) -> None:
    """Load a `save_ip_adapter` folder (or a published one laid out the same way, its weights renamed to
    IP_ADAPTER_WEIGHT_NAME) onto the pipeline at `scale`, with the encoder's own preprocessing: a base that
    brings a feature extractor of its own (SD 1.5's, 224 px) would otherwise keep it."""
    if not (Path(folder) / IP_ADAPTER_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"no {IP_ADAPTER_WEIGHT_NAME} in {folder}")
    if not (Path(folder) / IMAGE_ENCODER_FOLDER / "config.json").is_file():
        raise FileNotFoundError(f"no image encoder in {Path(folder) / IMAGE_ENCODER_FOLDER}")
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=IP_ADAPTER_WEIGHT_NAME, image_encoder_folder=IMAGE_ENCODER_FOLDER)
    pipe.set_ip_adapter_scale(scale)
    pipe.feature_extractor = image_processor(pipe.image_encoder)


def _layer_keys(layers: list[Any]) -> list[tuple[int, Any]]:
    """(key id, layer) over the cross-attention layers: the files number them 1, 3, 5, ... as diffusers reads them."""
    return [(2 * i + 1, layer) for i, layer in enumerate(layers)]


def _cross_attention_layers(unet: Any) -> list[str]:
    """The attention modules diffusers gives IP-Adapter processors, in its order (every one but self-attention)."""
    return [name.removesuffix(".processor") for name in unet.attn_processors if not name.endswith("attn1.processor")]


def _ip_processors(unet: Any) -> list[Any]:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    return [p for p in unet.attn_processors.values() if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))]


def _require_ip_adapter(unet: Any) -> None:
    if getattr(unet, "encoder_hid_proj", None) is None or not _ip_processors(unet):
        raise ValueError("the UNet has no IP-Adapter; call add_ip_adapter or load_ip_adapter first")
