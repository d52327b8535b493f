"""Diagnosis-conditioned Stable Diffusion: captions, base pre-training, LoRA adapters and sampling."""
