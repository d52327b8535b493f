"""Diagnosis-conditioned Stable Diffusion: captions, base pre-training, LoRA adapters and sampling."""


def denoising_steps(steps: int, strength: float) -> int:
    """The denoising steps image-guided generation runs at `strength` of `steps`: diffusers' img2img runs
    int(steps x strength), none below 1 / steps. Here, free of torch, for config validation too."""
    return int(steps * strength)
