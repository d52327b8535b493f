"""Photometric augmentation that never teaches a wrong attribute value.

Another clinic photographs the same lesions under other skin tones, light, sensors and resolutions.
Each transform here imitates one of those changes, and each attribute is trained on a view only when
every transform applied to that view leaves its value unchanged (the others are masked out of that
view's loss, not applied "to it"):

- mask-only attributes (area, perimeter, axes, eccentricity, area/perimeter ratio, symmetry, border)
  are measured from the lesion mask alone: every transform keeps them;
- lesion-vs-skin colour differences and spreads in L*a*b* (delta_lb_norm, color_std_mean, norm_color)
  are kept by a uniform L*a*b* offset (a skin tone or white-balance change moves lesion and skin
  alike) and changed by the rest (contrast scales the difference, a lighting gradient and noise add spread);
- absolute colours (lesion_L, skin_L, ...) are kept by none.

`tests/test_grounding_photometric.py` measures this with the project's attribute code on rendered
lesions. Torch only, on batches of normalised pixels, on the training workers.

    pixels, keep = photometric_views(pixel_values, normalization, attributes, generator)
    loss = loss_fn(model(pixels)["attributes"], targets, weights, keep)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from dermaray.colour import _EPS, _KAPPA, _RGB_TO_XYZ, _WHITE_D65, _XYZ_TO_RGB  # one definition of the conversion

TRANSFORMS: tuple[str, ...] = ("lab_offset", "contrast", "lighting", "noise", "resolution")
MASK_ONLY: frozenset[str] = frozenset(
    {
        "area_mm2",
        "perimeter_mm",
        "minor_axis_mm",
        "long_diam_mm",
        "eccentricity",
        "area_perim_ratio",
        "symm_2axis",
        "norm_border",
    }
)
LAB_DIFFERENCES: frozenset[str] = frozenset({"delta_lb_norm", "color_std_mean", "norm_color"})


def keeps(transform: str, attribute: str) -> bool:
    """Whether `transform` leaves `attribute`'s value unchanged."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; known: {TRANSFORMS}")
    return attribute in MASK_ONLY or (transform == "lab_offset" and attribute in LAB_DIFFERENCES)


# Ranges: the lab offset spans skin tones from light to dark; contrast down to 0.3 covers a lesion on darker
# skin, where it stands out less. In a one-off in-process trial on the study's lesions (20 epochs), 0.3-1.4 and
# +-20 L* gave the shifted clinic an area Spearman of 0.72 against 0.57 with 0.7-1.3 and +-10 (0.39 with no
# photometric view), in-domain figures within 0.05; the study's arms measure these views on against off.
LAB_OFFSET = (20.0, 4.0, 6.0)  # +- L*, a*, b*
L_MARGIN = 14.0  # the offset keeps every pixel's L* this far from black and white (few colours then leave the gamut)
CONTRAST = (0.3, 1.4)  # L* scaled about the image's mean
LIGHTING = 0.25  # the most L* changes across the tile, as a fraction
NOISE = 6 / 255  # the most sensor-noise sd, in [0, 1] RGB
RESOLUTION = (0.5, 1.0)  # the tile resampled to this fraction of its side and back


def _rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> L*a*b* (dermaray.colour's conversion, in torch)."""
    m = torch.as_tensor(_RGB_TO_XYZ / _WHITE_D65[:, None], dtype=rgb.dtype, device=rgb.device)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    f = torch.where(xyz > _EPS, xyz.clamp(min=1e-12) ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def _lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of `_rgb_to_lab`, out-of-gamut colours clipped into [0, 1]."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    white = torch.as_tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    xyz = torch.where(f**3 > _EPS, f**3, (116 * f - 16) / _KAPPA) * white
    m = torch.as_tensor(_XYZ_TO_RGB, dtype=lab.dtype, device=lab.device)
    linear = torch.einsum("ij,bjhw->bihw", m, xyz).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055)


def apply(rgb: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`rgb` [B, 3, H, W] in [0, 1] with, for each image, the transforms marked in `chosen` [B, len(TRANSFORMS)]."""
    n, device = len(rgb), rgb.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, *shape, generator=generator)).to(device)

    on = {t: chosen[:, i].to(device).view(n, 1, 1, 1) for i, t in enumerate(TRANSFORMS)}
    out = rgb
    if chosen[:, TRANSFORMS.index("resolution")].any():
        side = rgb.shape[-1]
        fraction = RESOLUTION[0] + (RESOLUTION[1] - RESOLUTION[0]) * float(torch.rand((), generator=generator))
        low = int(round(side * fraction))  # one size per batch: the resize is batched
        resampled = F.interpolate(F.interpolate(out, size=(low, low), mode="area"), size=rgb.shape[-2:], mode="bilinear")
        out = torch.where(on["resolution"], resampled, out)
    lab = _rgb_to_lab(out)
    shift = torch.stack([uniform(-b, b) for b in LAB_OFFSET], dim=1).view(n, 3, 1, 1)
    # Kept off black and white: a clipped pixel would no longer move with the rest.
    low, high = lab[:, 0].amin(dim=(1, 2)), lab[:, 0].amax(dim=(1, 2))
    shift[:, 0, 0, 0] = torch.minimum(
        torch.maximum(shift[:, 0, 0, 0], (L_MARGIN - low).clamp(max=0)), (100 - L_MARGIN - high).clamp(min=0)
    )
    lab = lab + shift * on["lab_offset"]
    mean_l = lab[:, :1].mean(dim=(2, 3), keepdim=True)
    contrast = uniform(*CONTRAST).view(n, 1, 1, 1)
    lab_l = torch.where(on["contrast"], mean_l + (lab[:, :1] - mean_l) * contrast, lab[:, :1])
    h, w = rgb.shape[-2:]
    angle = uniform(0, 2 * torch.pi)
    ys = torch.linspace(-0.5, 0.5, h, device=device).view(1, h, 1)
    xs = torch.linspace(-0.5, 0.5, w, device=device).view(1, 1, w)
    ramp = (torch.cos(angle).view(n, 1, 1) * xs + torch.sin(angle).view(n, 1, 1) * ys)[:, None]
    gradient = 1 + uniform(0, LIGHTING).view(n, 1, 1, 1) * ramp
    lab_l = torch.where(on["lighting"], lab_l * gradient, lab_l)
    out = _lab_to_rgb(torch.cat([lab_l, lab[:, 1:]], dim=1))
    noise = torch.randn(out.shape, generator=generator).to(device) * uniform(0, NOISE).view(n, 1, 1, 1)
    return torch.where(on["noise"], out + noise, out).clamp(0, 1)


def choose(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which transforms each of `n` views gets: half the views only a lab offset (or nothing), so colour
    attributes keep about half the batch; the other half any mix of every transform."""
    p = torch.rand(n, len(TRANSFORMS), generator=generator) < 0.5
    colour_safe = torch.rand(n, generator=generator) < 0.5
    p[colour_safe, 1:] = False
    return p


def kept(chosen: torch.Tensor, attributes: Sequence[str]) -> torch.Tensor:
    """[B, A] float: 1 where every transform chosen for view b keeps attribute a."""
    table = torch.tensor([[keeps(t, a) for a in attributes] for t in TRANSFORMS], dtype=torch.bool)  # [T, A]
    broken = chosen[:, :, None] & ~table[None]  # [B, T, A]
    return (~broken.any(dim=1)).float()


def photometric_views(
    pixel_values: torch.Tensor,
    normalization: tuple[Sequence[float], Sequence[float]] | None,
    attributes: Sequence[str],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented normalised pixels, [B, A] mask of the attributes each view still shows truly)."""
    if normalization is None:
        raise ValueError("photometric views need the image processor's mean and std; the base model has no image processor")
    device = pixel_values.device
    # In float32 even under mixed precision: colour conversions in bfloat16 would move L* by about 0.5.
    with torch.autocast(device.type, enabled=False):
        pixels = pixel_values.float()
        mean = torch.tensor(normalization[0], device=device).view(1, 3, 1, 1)
        std = torch.tensor(normalization[1], device=device).view(1, 3, 1, 1)
        chosen = choose(len(pixels), generator)
        rgb = apply(pixels * std + mean, chosen, generator)
        views = ((rgb - mean) / std).to(pixel_values.dtype)
    return views, kept(chosen, attributes).to(device)
