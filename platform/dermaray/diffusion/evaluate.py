"""Offline evaluation of generated lesion images: class relevance, KID, size faithfulness, grids.

A LoRA adapter is useful only if its images show the prompted diagnosis (class relevance,
judged by an independent classifier), look like real tiles as a set (KID on encoder
features), and follow attribute words such as "large" / "small" (size faithfulness, judged
on lesion areas measured from the pixels). Everything here is pure numpy/scipy/PIL and works
on arrays the caller produced, so it runs anywhere, without a GPU or a model hub; the feature
encoder and the classifier are the caller's choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage, stats

from dermaray.colour import rgb_to_lab
from dermaray.schema import TILE_FIELD_OF_VIEW_MM
from dermaray.stats import bootstrap_ci, format_ci, mean_ci


def _features(name: str, x: np.ndarray) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric (n, d) feature matrix: {err}") from None
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (n, d) feature matrix, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for the unbiased estimate, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size samples under k(a, b) = (a·b / d + 1)³."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    # The diagonals (each sample with itself) are dropped; that makes the estimate unbiased.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, n_subsets: int = 50, subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): (mean, std) of the unbiased MMD² over subsets.

    `real` (n, d) and `fake` (m, d) are features of the two image sets from one encoder. Each of
    `n_subsets` rounds draws `subset_size` rows of each without replacement (clamped to the
    smaller set) and scores them with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³, as
    torchmetrics and clean-fid do. The std is the population std (ddof=0) over the subsets, as
    in torchmetrics. The estimate is unbiased, so it can be slightly negative for equal
    distributions. Deterministic for a given `seed`.
    """
    real, fake = _features("real", real), _features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    if n_subsets < 1 or subset_size < 2:
        raise ValueError(f"n_subsets must be >= 1 and subset_size >= 2, got {n_subsets}, {subset_size}")
    size = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    scores = [
        _unbiased_mmd2(real[rng.choice(len(real), size, replace=False)], fake[rng.choice(len(fake), size, replace=False)])
        for _ in range(n_subsets)
    ]
    return float(np.mean(scores)), float(np.std(scores))


def _label(value: int | str) -> int | str:
    # numpy scalars become plain Python values, so dict keys print and serialise cleanly.
    return value.item() if isinstance(value, np.generic) else value


def class_relevance(prompted: Sequence[int | str], predicted: Sequence[int | str]) -> dict:
    """Share of generated images that the classifier assigns to the prompted diagnosis.

    Returns `relevance` (over all images) with its 95% bootstrap interval `relevance_ci` (value,
    low, high), `per_class` {prompted label: share},
    `n_per_class` {prompted label: number of images} and `n`. Labels are compared with ``==``,
    so prompts and predictions must use the same coding (both codes or both indices).
    """
    prompted, predicted = [_label(p) for p in prompted], [_label(p) for p in predicted]
    if len(prompted) != len(predicted):
        raise ValueError(f"prompted and predicted differ in length: {len(prompted)} vs {len(predicted)}")
    if not prompted:
        raise ValueError("class_relevance needs at least one image")
    hits = np.array([a == b for a, b in zip(prompted, predicted, strict=True)])
    labels = np.array(prompted, dtype=object)
    per_class, n_per_class = {}, {}
    for label in dict.fromkeys(prompted):  # first-appearance order
        of_class = labels == label
        per_class[label] = float(hits[of_class].mean())
        n_per_class[label] = int(of_class.sum())
    return {
        "relevance": float(hits.mean()),
        "relevance_ci": mean_ci(hits),
        "per_class": per_class,
        "n_per_class": n_per_class,
        "n": len(prompted),
    }


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 or [0, 1] float RGB array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array or a PIL image, got shape {rgb.shape}")
    if not (np.issubdtype(rgb.dtype, np.integer) or np.issubdtype(rgb.dtype, np.floating)):
        raise ValueError(f"image must hold integer (0-255) or float (0-1) values, got dtype {rgb.dtype}")
    if np.issubdtype(rgb.dtype, np.floating) and not np.isfinite(rgb).all():
        raise ValueError("image holds NaN or infinite values")
    top = 255 if np.issubdtype(rgb.dtype, np.integer) else 1.0
    if rgb.size and (rgb.min() < 0 or rgb.max() > top):
        raise ValueError(f"{rgb.dtype} image values must lie in [0, {top}], got [{rgb.min()}, {rgb.max()}]")
    return rgb


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of a 1-D sample (Otsu 1979)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]  # pixels at or below each candidate cut
    w1 = counts.sum() - w0
    s0 = np.cumsum(counts * centres)[:-1]
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] + counts[-1] * centres[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:-1][np.argmax(between)])


# Colour difference (ΔE, CIE76) from the skin below which a pixel is never lesion: about twice
# the just-noticeable difference (~2.3), above smoothed sensor noise, so a lesion-free tile gives
# an empty or near-empty mask rather than half the image. Higher floors lose the faint parts of
# low-contrast lesions (on the synthetic tiles 8 ΔE cut Spearman from 0.99 to 0.95).
MIN_CONTRAST_DELTA_E = 5.0


def _lab_and_skin(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tile in CIE L*a*b* and the skin colour: the per-channel median of a border ring (1/32 of the side, >= 2 px)."""
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    ring = max(2, round(min(h, w) / 32))
    if min(h, w) <= 2 * ring + 2:
        raise ValueError(f"image of {w} x {h} px is too small to separate a border ring from a lesion")
    lab = rgb_to_lab(rgb)
    border = np.ones((h, w), dtype=bool)
    border[ring:-ring, ring:-ring] = False
    return lab, np.median(lab[border], axis=0)


def estimate_lesion_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean (H, W) lesion mask of one tile, estimated from the pixels alone.

    Method: convert to CIE L*a*b*; take the skin colour as the per-channel median of a border
    ring (1/32 of the side, at least 2 px wide); score every pixel by its colour distance ΔE
    (CIE76) to that skin colour, Gaussian-smoothed (sigma = side / 128, at least 0.5 px) to damp
    noise; threshold the score with Otsu's method, but never below `MIN_CONTRAST_DELTA_E`; keep
    the connected component nearest the image centre and fill its holes.

    Accuracy on 40 synthetic clinic tiles against the generator's exact areas (Spearman, median
    relative error): 128 px 0.995, 2%; 64 px 0.996, 2%; 32 px 0.989, 4%. A uniform image gives
    an empty mask; a lesion-free clinic tile (texture, lighting gradient, noise) 0 to 0.1 mm².

    Limits: it assumes one lesion, roughly central, on skin that fills most of the border (true
    of SLICE-3D-like tiles). A lesion reaching the border shifts the skin estimate; hair, rulers
    and vignetting can be scored as lesion; parts of a lesion within ~5 ΔE of the skin are lost
    and a lesion that faint is missed. A strong illumination gradient breaks the flat skin
    model: on the synthetic "shifted" domain (dark skin, ±18% lighting, heavy noise) Spearman
    falls to 0.83 at 96 px, and lesion-free tiles at 32 px give a median of 27 mm².
    """
    return _mask_of(*_lab_and_skin(image))


def _mask_of(lab: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """`estimate_lesion_mask` of a tile already in L*a*b*, given its skin colour."""
    h, w = lab.shape[:2]
    score = ndimage.gaussian_filter(np.linalg.norm(lab - skin, axis=-1), sigma=max(0.5, min(h, w) / 128))
    mask = score > max(_otsu_threshold(score), MIN_CONTRAST_DELTA_E)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    # Distance of each component's closest pixel to the centre: a component covering the
    # centre wins (distance < 1 px), and a ring-shaped lesion still counts as central.
    yy, xx = np.mgrid[:h, :w]
    distance = np.hypot(yy + 0.5 - h / 2, xx + 0.5 - w / 2)
    nearest = 1 + int(np.argmin(ndimage.minimum(distance, labels, np.arange(1, n + 1))))
    return ndimage.binary_fill_holes(labels == nearest)


def lesion_area_mm2(image: Image.Image | np.ndarray, field_of_view_mm: float = TILE_FIELD_OF_VIEW_MM) -> float:
    """Lesion area in mm² from `estimate_lesion_mask`: lesion pixels x (field_of_view_mm / width)².

    `field_of_view_mm` is the width of the tile (15 mm for SLICE-3D tiles), so the area does
    not depend on the image resolution.
    """
    if not (math.isfinite(field_of_view_mm) and field_of_view_mm > 0):
        raise ValueError(f"field_of_view_mm must be a positive number, got {field_of_view_mm!r}")
    mask = estimate_lesion_mask(image)
    return float(mask.sum() * (field_of_view_mm / mask.shape[1]) ** 2)


def lesion_contrast(image: Image.Image | np.ndarray) -> float:
    """ΔE (CIE76) between the lesion's median colour (`estimate_lesion_mask`) and the skin's; 0 when no lesion is found."""
    lab, skin = _lab_and_skin(image)
    mask = _mask_of(lab, skin)
    if not mask.any():
        return 0.0
    return float(np.linalg.norm(np.median(lab[mask], axis=0) - skin))


def faithfulness(guide: Sequence[float], generated: Sequence[float], seed: int = 0) -> dict:
    """How closely generated images follow their guides in one measure (area, contrast, ...): Spearman's rho
    of the pairs with its 95% bootstrap interval over pairs, and the median ratio generated / guide."""
    a, b = np.asarray(guide, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 3:
        raise ValueError(f"guide and generated must be 1-D of the same length >= 3, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("guide and generated must hold finite values")

    def rho(i: np.ndarray) -> float:
        return float(stats.spearmanr(a[i], b[i]).statistic) if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0 else math.nan

    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.nanmedian(np.where(a > 0, b / a, np.nan))) if (a > 0).any() else math.nan
    return {"spearman_ci": bootstrap_ci(rho, len(a), seed=seed), "median_ratio": ratio, "n": len(a)}


def pixel_change(guides: Sequence[Image.Image], images: Sequence[Image.Image]) -> float:
    """Mean absolute difference between each image and its guide (resized to the image), in [0, 1] of the RGB
    range: 0 is the guide copied, and how far an image-guided result strays from its guide."""
    if len(guides) != len(images) or not images:
        raise ValueError(f"one guide per image, at least one: {len(guides)} guides, {len(images)} images")
    changes = [
        np.abs(
            np.asarray(image.convert("RGB"), dtype=np.float64)
            - np.asarray(guide.convert("RGB").resize(image.size, Image.Resampling.LANCZOS), dtype=np.float64)
        ).mean()
        / 255
        for guide, image in zip(guides, images, strict=True)
    ]
    return float(np.mean(changes))


def _areas(name: str, values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of areas, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative areas")
    return a


def size_faithfulness(areas_large: Sequence[float], areas_small: Sequence[float]) -> dict:
    """Do "large" prompts give larger lesions than "small" prompts?

    Returns the mean areas, `ratio` (mean large / mean small; inf when the small mean is 0 and
    the large one is not, nan when both are 0), `auc` = P(large area > small area) + ½ P(tie)
    over all pairs (0.5: the size word is ignored, 1: always followed) with its 95% bootstrap
    interval `auc_ci`, and `p_value` of the
    one-sided Mann-Whitney U test that "large" areas are stochastically greater.
    """
    large, small = _areas("areas_large", areas_large), _areas("areas_small", areas_small)
    mean_large, mean_small = float(large.mean()), float(small.mean())
    if mean_small > 0:
        ratio = mean_large / mean_small
    else:
        ratio = math.inf if mean_large > 0 else math.nan
    test = stats.mannwhitneyu(large, small, alternative="greater")
    both = np.concatenate([large, small])

    def auc(i: np.ndarray) -> float:  # on a resample of the pooled images, each keeping its prompt
        a, b = both[i[i < len(large)]], both[i[i >= len(large)]]
        if not len(a) or not len(b):
            return math.nan
        return float(((a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()) / (len(a) * len(b)))

    return {
        "auc_ci": bootstrap_ci(auc, len(both)),
        "mean_large_mm2": mean_large,
        "mean_small_mm2": mean_small,
        "ratio": ratio,
        "auc": float(test.statistic) / (len(large) * len(small)),
        "p_value": float(test.pvalue),
        "n_large": len(large),
        "n_small": len(small),
    }


def image_grid(
    images: Sequence[Image.Image], columns: int, labels: Sequence[str] | None = None, cell: int | None = None
) -> Image.Image:
    """Images in rows of `columns` cells on white, optionally with one label per row in a left margin.

    Cells are `cell` x `cell` px (default: the first image's size); images of another size are
    resized with Lanczos. Labels use PIL's default font; the margin is as wide as the widest.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if not all(isinstance(image, Image.Image) for image in images):
        raise TypeError("image_grid takes PIL images")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if cell is not None and cell < 1:
        raise ValueError(f"cell must be a positive number of pixels, got {cell}")
    rows = math.ceil(len(images) / columns)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"labels are per row: {rows} rows need {rows} labels, got {len(labels)}")
    cell_w, cell_h = (cell, cell) if cell is not None else images[0].size

    font = ImageFont.load_default()
    pad = 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(t), font=font) for t in labels or ()]
    margin = 2 * pad + max(right for _, _, right, _ in boxes) if boxes else 0

    grid = Image.new("RGB", (margin + columns * cell_w, rows * cell_h), "white")
    for i, image in enumerate(images):
        image = image.convert("RGB")
        if image.size != (cell_w, cell_h):
            image = image.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
        row, col = divmod(i, columns)
        grid.paste(image, (margin + col * cell_w, row * cell_h))
    if labels is not None:
        draw = ImageDraw.Draw(grid)
        for row, (text, (_, top, _, bottom)) in enumerate(zip(labels, boxes, strict=True)):
            # Centred on the row by its measured box: bitmap fonts do not support text anchors.
            draw.text((pad, row * cell_h + (cell_h - (bottom - top)) // 2 - top), str(text), fill="black", font=font)
    return grid


def _kid(m: dict[str, Any]) -> str:
    return "-" if m.get("kid") is None else f"{m['kid']['mean']:.4f} ± {m['kid']['std']:.4f}"


def _strength_row(row: dict[str, Any], in_grid: bool) -> str:
    return (
        f"| {row['strength']} ({row['denoising_steps']}){' (the grid)' if in_grid else ''} | "
        f"{format_ci(row['class_relevance']['relevance_ci'])} | {format_ci(row['area']['spearman_ci'])} | "
        f"{format_ci(row['contrast']['spearman_ci'])} | {row['pixel_change']:.3f} | {_kid(row)} |"
    )


def markdown(r: dict[str, Any]) -> str:
    """The diffusion evaluation (jobs.diffusion_eval) as Markdown: base vs LoRA vs image-guided class relevance and
    KID, per diagnosis, the LoRA's size faithfulness, how closely generated lesions follow a guiding image and,
    with a guide_sweep, what following it more closely costs at each strength."""
    real = r["real"]["class_relevance"]
    lora = "LoRA (shared adapter)" if r["adapters"] == "shared" else "LoRA (one adapter per diagnosis)"
    runs = [("base", "base"), ("lora", lora)]
    if "guided" in r:
        runs.append(("guided", f"{lora}, guided by a held-out lesion (img2img, strength {r['guided']['strength']})"))
    lines = ["| images | class relevance [95% CI] | of the real images' | KID (mean ± sd) |", "|---|---|---|---|"]
    for name, label in runs:
        m = r[name]
        relevance = m["class_relevance"]["relevance"]
        of_real = f"{relevance / real['relevance']:.2f}" if real["relevance"] else "-"
        shown = format_ci(m["class_relevance"]["relevance_ci"])
        lines.append(f"| {label} | {shown} | {of_real} | {_kid(m)} |")
    vae = r.get("real_through_vae", {}).get("class_relevance")  # absent from evaluations written before it
    if vae is not None:
        of_real = f"{vae['relevance'] / real['relevance']:.2f}" if real["relevance"] else "-"
        lines.append(f"| held-out real images through the base's VAE | {format_ci(vae['relevance_ci'])} | {of_real} | - |")
    lines.append(f"| held-out real images | {format_ci(real['relevance_ci'])} | 1.00 | - |")
    bound = (
        " Every generated image is a decode of the base's VAE, so the real images through it (encoded and decoded) "
        "bound what any adapter on this base can score."
    )
    columns = ["base", "LoRA", *(["real images through the VAE"] if vae else []), "real images"]
    lines += [
        "",
        f"Chance level for the classifier: {r['chance']:.3f}. The judge is the image head of the classifier "
        "trained on real lesions; its accuracy on held-out real images at the generation size bounds what a "
        "generator can score." + (bound if vae else ""),
        "",
        "| diagnosis | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for code, share in r["lora"]["class_relevance"]["per_class"].items():
        shares = [r["base"]["class_relevance"]["per_class"].get(code, 0), share]
        shares += [m["per_class"].get(code, float("nan")) for m in ([vae] if vae else []) + [real]]
        lines.append(f"| {code} | " + " | ".join(f"{x:.2f}" for x in shares) + " |")
    s = r["lora"]["size_faithfulness"]
    lines += [
        "",
        f"Size faithfulness (LoRA): 'large' prompts {s['mean_large_mm2']:.1f} mm² vs 'small' {s['mean_small_mm2']:.1f} mm² "
        f"(ratio {s['ratio']:.2f}, AUC {format_ci(s['auc_ci'], digits=2)}, one-sided Mann-Whitney p = {s['p_value']:.3g}).",
    ]
    swept = len(r.get("guide_sweep", ())) > 1
    if "guided" in r:
        g = r["guided"]
        lines += [
            "",
            f"Following a guiding lesion ({g['area']['n']} held-out lesions, each paired with one image of its "
            "diagnosis): Spearman's rho between the guide's and the generated lesion's measure, both measured on "
            "the pixels (`lesion_area_mm2`, `lesion_contrast`).",
        ]
    if "guided" in r and not swept:  # with a sweep, these rows are the strength table's first, headline and last
        lines += [
            "",
            "| images | area [95% CI] | contrast ΔE [95% CI] |",
            "|---|---|---|",
            f"| {lora}, diagnosis only | {format_ci(r['lora']['guide_area']['spearman_ci'])} | "
            f"{format_ci(r['lora']['guide_contrast']['spearman_ci'])} |",
            f"| guided (strength {g['strength']}) | {format_ci(g['area']['spearman_ci'])} | "
            f"{format_ci(g['contrast']['spearman_ci'])} |",
        ]
        if "vae_round_trip" in r:
            v = r["vae_round_trip"]
            lines.append(
                f"| the guide through the VAE alone (strength -> 0: the ceiling) | {format_ci(v['area']['spearman_ci'])} | "
                f"{format_ci(v['contrast']['spearman_ci'])} |"
            )
    if swept:
        v = r["vae_round_trip"]
        lines += [
            "",
            "By guide strength (the share of the denoising redone, and the steps that makes): a result that keeps "
            "more of its guide follows it more closely and is less of a new image. Pixel change: mean absolute "
            "difference from the guide, in [0, 1] of the RGB range; KID against the real images that guide nothing.",
            "",
            "| strength (steps) | class relevance [95% CI] | area [95% CI] | contrast ΔE [95% CI] | pixel change | KID |",
            "|---|---|---|---|---|---|",
            f"| -> 0: the guide through the VAE alone | - | {format_ci(v['area']['spearman_ci'])} | "
            f"{format_ci(v['contrast']['spearman_ci'])} | {v['pixel_change']:.3f} | - |",
            *(_strength_row(row, row["strength"] == r["guided"]["strength"]) for row in r["guide_sweep"]),
            f"| 1: diagnosis only (paired with the same guides) | - | {format_ci(r['lora']['guide_area']['spearman_ci'])} | "
            f"{format_ci(r['lora']['guide_contrast']['spearman_ci'])} | {r['lora']['guide_pixel_change']:.3f} | - |",
        ]
    if r.get("ip_adapter"):
        lines += [
            "",
            "Through the IP-Adapter (the guide as an image prompt to the diagnosis' LoRA), drawn from noise (strength 1) "
            "or with img2img from the guide as well, by IP-Adapter scale:",
            "",
            "| IP-Adapter scale, strength | class relevance [95% CI] | area [95% CI] | contrast ΔE [95% CI] "
            "| pixel change | KID |",
            "|---|---|---|---|---|---|",
            *(
                f"| {row['ip_adapter_scale']}, {'1 (from noise)' if row['strength'] == 1 else row['strength']} | "
                f"{format_ci(row['class_relevance']['relevance_ci'])} | "
                f"{format_ci(row['area']['spearman_ci'])} | {format_ci(row['contrast']['spearman_ci'])} | "
                f"{row['pixel_change']:.3f} | {_kid(row)} |"
                for row in r["ip_adapter"]
            ),
        ]
    if "guided_skipped" in r:
        lines += ["", f"Image-guided references not evaluated: {r['guided_skipped']}."]
    return "\n".join(lines) + "\n"
