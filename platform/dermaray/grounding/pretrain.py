"""Self-supervised pre-training of an image embedder (SimCLR), without attributes or diagnoses.

It makes the tiny tower a stand-in for a general-purpose pretrained MLLM: its features carry
generic visual information (what survives crops, flips and colour changes), so "frozen vs grounded"
compares grounding with a pretrained model, as the method's paper does, not with a random network.

    history = simclr_pretrain(embedder, images, steps=400)  # images: [N, 3, H, W] in [0, 1]

Torch only; the preset builder (dermaray.models.tiny) renders the unlabelled images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def random_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SimCLR's views of images in [0, 1]: a random resized crop (40-100% of the side, any place), flips,
    and colour jitter (brightness, contrast, saturation) with an occasional grey image."""
    n, device = len(images), images.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator).to(device)

    scale = uniform(0.4, 1.0)
    shift = (1 - scale)[:, None] * uniform(-1.0, 1.0, 2)
    flips = torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0).to(device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flips[:, 0], scale * flips[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    out = out * uniform(0.6, 1.4)[:, None, None, None]  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + (out - mean) * uniform(0.6, 1.4)[:, None, None, None]  # contrast
    grey = out.mean(dim=1, keepdim=True)
    saturation = uniform(0.4, 1.6)[:, None, None, None]
    saturation = torch.where(torch.rand(n, 1, 1, 1, generator=generator).to(device) < 0.2, 0.0, saturation)
    out = grey + (out - grey) * saturation
    return out.clamp(0, 1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner out of the 2N - 1 other views."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(a)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
    return F.cross_entropy(logits, partner)


def simclr_pretrain(
    embedder: nn.Module,
    images: torch.Tensor,
    normalize: tuple[Sequence[float], Sequence[float]],
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.2,
    seed: int = 0,
) -> list[float]:
    """Train `embedder` (pixels normalised by `normalize` = (mean, std) -> [B, D]) in place on `images`
    ([N, 3, H, W] in [0, 1]) with a projection head that is then dropped, as in SimCLR; returns the loss
    every 10 steps."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(normalize[0]).view(1, 3, 1, 1)
    std = torch.tensor(normalize[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        dim = embedder(torch.zeros(1, *images.shape[1:])).shape[-1]
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    parameters = [*embedder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    embedder.train()
    history = []
    for step in range(steps):
        rows = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        batch = images[rows]
        a, b = ((random_views(batch, generator) - mean) / std for _ in range(2))
        loss = nt_xent(head(embedder(a)), head(embedder(b)), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            history.append(round(loss.item(), 4))
    embedder.eval()
    return history
