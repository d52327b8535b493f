"""Quantitative lesion attributes measured from a lesion mask and its pixels.

The definitions follow SLICE-3D's `tbp_lv_*` columns (see `dermaray.schema.ATTRIBUTES`);
the synthetic generator measures its rendered tiles with them, so its ground truth is
exact, and generated images are measured the same way.
"""

from __future__ import annotations

import numpy as np

from dermaray.colour import rgb_to_lab
from dermaray.schema import ATTRIBUTE_NAMES, TILE_FIELD_OF_VIEW_MM


def _boundary_edges(mask: np.ndarray) -> int:
    """Pixel edges between lesion and non-lesion, the tile border counting as non-lesion."""
    padded = np.pad(mask, 1)
    return int(np.count_nonzero(padded[1:, :] != padded[:-1, :]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1]))


def _reflection_asymmetry(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, axis: np.ndarray, centre: np.ndarray) -> float:
    """Share of lesion pixels whose mirror image across `axis` (through `centre`) is not lesion."""
    offsets = np.stack([ys, xs], axis=1) - centre
    along = offsets @ axis
    mirrored = centre + 2 * along[:, None] * axis - offsets
    my, mx = np.round(mirrored).astype(int).T
    inside = (my >= 0) & (my < mask.shape[0]) & (mx >= 0) & (mx < mask.shape[1])
    hits = np.zeros(len(ys), dtype=bool)
    hits[inside] = mask[my[inside], mx[inside]]
    return float(1.0 - hits.mean())


def measure_attributes(rgb: np.ndarray, mask: np.ndarray, field_of_view_mm: float = TILE_FIELD_OF_VIEW_MM) -> dict[str, float]:
    """All attributes of `ATTRIBUTE_NAMES` for one tile (rgb uint8 HxWx3, mask bool HxW)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or rgb.shape[:2] != mask.shape:
        raise ValueError(f"rgb {rgb.shape} and mask {mask.shape} do not match")
    n = int(mask.sum())
    if n < 3 or n == mask.size:
        raise ValueError("the lesion mask must cover some but not all of the tile")
    px_mm = field_of_view_mm / mask.shape[1]

    area = n * px_mm**2
    # Horizontal + vertical edge count overestimates a smooth contour by 4/pi (Cauchy-Crofton).
    perimeter = _boundary_edges(mask) * px_mm * np.pi / 4

    ys, xs = np.nonzero(mask)
    centre = np.array([ys.mean(), xs.mean()])
    cov = np.cov(np.stack([ys, xs]))
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    minor_var, major_var = max(eigvals[0], 1e-12), max(eigvals[1], 1e-12)

    lab = rgb_to_lab(rgb)
    inside, outside = lab[mask], lab[~mask]
    lesion_lab, skin_lab = inside.mean(axis=0), outside.mean(axis=0)
    colour_std = float(inside.std(axis=0).mean())

    asymmetry = np.mean([_reflection_asymmetry(mask, ys, xs, eigvecs[:, i], centre) for i in (0, 1)])
    perim_ratio = perimeter**2 / area
    jaggedness = max(0.0, 1.0 - 4 * np.pi / perim_ratio)  # 0 for a disc

    values = {
        "area_mm2": area,
        "perimeter_mm": perimeter,
        "minor_axis_mm": 4 * np.sqrt(minor_var) * px_mm,
        "long_diam_mm": 4 * np.sqrt(major_var) * px_mm,
        "eccentricity": np.sqrt(1 - minor_var / major_var),
        "area_perim_ratio": perim_ratio,
        "color_std_mean": colour_std,
        "delta_lb_norm": np.hypot(lesion_lab[0] - skin_lab[0], lesion_lab[2] - skin_lab[2]),
        "symm_2axis": asymmetry,
        "norm_border": np.clip(10 * (jaggedness + asymmetry), 0, 10),
        "norm_color": 10 * (1 - np.exp(-colour_std / 10)),
        "lesion_L": lesion_lab[0],
        "lesion_A": lesion_lab[1],
        "lesion_B": lesion_lab[2],
        "skin_L": skin_lab[0],
        "skin_A": skin_lab[1],
        "skin_B": skin_lab[2],
    }
    return {name: float(values[name]) for name in ATTRIBUTE_NAMES}
