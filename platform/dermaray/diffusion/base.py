"""The base model LoRA adapters adapt: where it is and the image size it was built for.

The diffusion job pre-trains the random `tiny` preset into `<diffusion.output>/base`; every other
base preset (SD 1.5) is adapted as it is. The job and its evaluation read the answer here.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dermaray.config import DermarayConfig, ModelsConfig
from dermaray.layout import DIFFUSION_BASE
from dermaray.models.registry import is_preset, model_folder
from dermaray.storage import absolute, join


def prepared_base_uri(cfg: DermarayConfig) -> str:
    """What the adapters adapt: the tiny preset pre-trained to <output>/base, or the base preset as it is."""
    pretrain = cfg.diffusion.pretrain
    tiny_pretrained = (
        cfg.models.diffusion_base == "tiny" and pretrain.vae_steps + pretrain.unet_steps + pretrain.ip_adapter_steps > 0
    )
    return absolute(join(cfg.diffusion.output, DIFFUSION_BASE)) if tiny_pretrained else cfg.models.diffusion_base


def base_resolution(base: str, models: ModelsConfig, storage_options: dict) -> int:
    """The base's native image size, from its UNet and VAE configs (the driver never loads a hub base)."""
    if base != "tiny" and is_preset("diffusion_base", base):
        raise ValueError(f"set diffusion.resolution for the hub base {base} (512 for SD 1.5)")
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder("diffusion_base", base, models, storage_options, scratch)
        unet = json.loads(Path(folder, "unet", "config.json").read_text())
        vae = json.loads(Path(folder, "vae", "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
