"""Offline evaluation of generated images: KID, class relevance, lesion area, size faithfulness, grids."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from dermaray.colour import rgb_to_lab
from dermaray.data.synthetic import DOMAINS, lesion_rng, render_tile, sample_spec, synthesize_lesion
from dermaray.diffusion.evaluate import (
    class_relevance,
    estimate_lesion_mask,
    faithfulness,
    image_grid,
    kid,
    lesion_area_mm2,
    lesion_contrast,
    markdown,
    pixel_change,
    size_faithfulness,
)
from dermaray.schema import ATTRIBUTES_BY_NAME, TILE_FIELD_OF_VIEW_MM

AREA_COLUMN = ATTRIBUTES_BY_NAME["area_mm2"].isic_column


def _gaussians(seed, n=300, d=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, d))


# --- KID ---------------------------------------------------------------------------------


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(1, 1, size=(6, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    # One subset holding every sample: the estimate is the full-sample MMD² whatever the order.
    mean, std = kid(x, y, n_subsets=1, subset_size=m)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert std == 0.0


def test_kid_near_zero_for_one_distribution_and_growing_with_the_shift():
    real, fake = _gaussians(0)
    same, _ = kid(real, fake)
    assert abs(same) < 0.01
    shifted = [kid(real, fake + shift)[0] for shift in (0.25, 0.5, 1.0)]
    assert shifted[0] > 0.1 > 10 * abs(same)
    assert shifted[0] < shifted[1] < shifted[2]


def test_kid_is_deterministic_by_seed_and_clamps_the_subset():
    real, fake = _gaussians(1)
    assert kid(real, fake + 0.3, seed=7) == kid(real, fake + 0.3, seed=7)
    assert kid(real, fake + 0.3, seed=7) != kid(real, fake + 0.3, seed=8)
    mean, std = kid(real[:20], fake[:30] + 0.5, n_subsets=5, subset_size=1000)  # clamped to 20
    assert np.isfinite([mean, std]).all() and mean > 0


@pytest.mark.parametrize(
    "real, fake, match",
    [
        (np.zeros((10, 4)), np.zeros((10, 5)), "dimension"),
        (np.zeros(10), np.zeros((10, 1)), "2-D"),
        (np.zeros((1, 4)), np.zeros((10, 4)), "at least 2"),
        (np.full((10, 4), np.nan), np.zeros((10, 4)), "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), np.zeros((2, 2)), "numeric"),
    ],
)
def test_kid_rejects_bad_features(real, fake, match):
    with pytest.raises(ValueError, match=match):
        kid(real, fake)


def test_kid_rejects_bad_subsets():
    real, fake = _gaussians(2, n=10)
    with pytest.raises(ValueError, match="subset"):
        kid(real, fake, subset_size=1)
    with pytest.raises(ValueError, match="n_subsets"):
        kid(real, fake, n_subsets=0)


# --- class relevance -----------------------------------------------------------------------


def test_class_relevance_hand_case():
    prompted = ["MEL", "MEL", "MEL", "NEV", "NEV", "BCC"]
    predicted = ["MEL", "NEV", "MEL", "NEV", "NEV", "SCC"]
    out = class_relevance(prompted, predicted)
    assert out["relevance"] == pytest.approx(4 / 6)
    assert out["per_class"] == {"MEL": pytest.approx(2 / 3), "NEV": 1.0, "BCC": 0.0}
    assert out["n_per_class"] == {"MEL": 3, "NEV": 2, "BCC": 1}
    assert out["n"] == 6
    value, low, high = out["relevance_ci"]  # a 95% bootstrap interval over the images
    assert value == out["relevance"] and 0 <= low < value < high <= 1


def test_class_relevance_takes_numpy_indices_and_rejects_bad_input():
    out = class_relevance(np.array([0, 1, 1]), np.array([0, 1, 0]))
    assert out["per_class"] == {0: 1.0, 1: 0.5} and all(type(k) is int for k in out["per_class"])
    with pytest.raises(ValueError, match="length"):
        class_relevance([0, 1], [0])
    with pytest.raises(ValueError, match="at least one"):
        class_relevance([], [])


# --- lesion area ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clinic_lesions():
    """40 clinic tiles at 128 px with the generator's exact areas (mm²)."""
    lesions = [synthesize_lesion(0, i, "clinic") for i in range(40)]
    return [Image.fromarray(rgb) for _, _, rgb, _ in lesions], np.array([row[AREA_COLUMN] for row, *_ in lesions])


# Measured on these 40 tiles (Spearman, median relative error): 128 px 0.995, 1.9%;
# 64 px 0.996, 1.7%; 32 px 0.989, 4.0%. The bounds leave a margin for other platforms.
@pytest.mark.parametrize("size, min_spearman, max_median_error", [(128, 0.97, 0.05), (64, 0.97, 0.05), (32, 0.95, 0.10)])
def test_lesion_area_tracks_the_generators_ground_truth(clinic_lesions, size, min_spearman, max_median_error):
    images, true = clinic_lesions
    assert images[0].size == (128, 128)
    resized = [im if size == 128 else im.resize((size, size), Image.Resampling.LANCZOS) for im in images]
    estimated = np.array([lesion_area_mm2(im) for im in resized])
    assert stats.spearmanr(estimated, true).statistic >= min_spearman
    assert np.median(np.abs(estimated - true) / true) <= max_median_error


def test_lesion_mask_of_a_clean_disc_and_array_inputs():
    size, radius = 64, 12
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = np.hypot(yy - 30, xx - 36) < radius
    rgb = np.full((size, size, 3), (205, 160, 140), np.uint8)
    rgb[disc] = (110, 70, 55)
    assert np.array_equal(estimate_lesion_mask(rgb), disc)
    assert np.array_equal(estimate_lesion_mask(rgb / 255.0), disc)  # [0, 1] floats
    expected = disc.sum() * (TILE_FIELD_OF_VIEW_MM / size) ** 2
    assert lesion_area_mm2(Image.fromarray(rgb)) == pytest.approx(expected)
    assert lesion_area_mm2(rgb, field_of_view_mm=30.0) == pytest.approx(4 * expected)


def test_lesion_mask_keeps_the_central_component_and_fills_its_holes():
    rgb = np.full((64, 64, 3), 200, np.uint8)
    rgb[20:44, 20:44] = (90, 50, 40)
    rgb[28:36, 28:36] = 200  # a skin-coloured hole (e.g. regression) inside the lesion
    rgb[4:10, 50:58] = (90, 50, 40)  # a second, off-centre spot
    mask = estimate_lesion_mask(rgb)
    expected = np.zeros((64, 64), bool)
    expected[20:44, 20:44] = True
    assert np.array_equal(mask, expected)


def test_lesion_contrast_is_the_colour_difference_from_the_skin():
    size, skin, lesion = 64, (205, 160, 140), (110, 70, 55)
    yy, xx = np.mgrid[:size, :size] + 0.5
    rgb = np.full((size, size, 3), skin, np.uint8)
    rgb[np.hypot(yy - 32, xx - 32) < 12] = lesion
    lab = rgb_to_lab(np.array([[skin, lesion]], np.uint8))[0]
    assert lesion_contrast(rgb) == pytest.approx(float(np.linalg.norm(lab[0] - lab[1])), rel=1e-6)
    fainter = np.full((size, size, 3), skin, np.uint8)
    fainter[np.hypot(yy - 32, xx - 32) < 12] = (160, 115, 95)
    assert 5 < lesion_contrast(fainter) < lesion_contrast(rgb)
    assert lesion_contrast(np.full((size, size, 3), skin, np.uint8)) == 0.0  # no lesion found


def test_faithfulness_ranks_pairs_with_an_interval():
    rng = np.random.default_rng(0)
    guide = rng.uniform(1, 20, 40)
    close = faithfulness(guide, guide * 1.5 + rng.normal(0, 0.5, 40))
    assert close["spearman_ci"][0] > 0.95 and close["median_ratio"] == pytest.approx(1.5, abs=0.1) and close["n"] == 40
    unrelated = faithfulness(guide, rng.uniform(1, 20, 40))
    value, low, high = unrelated["spearman_ci"]
    assert abs(value) < 0.4 and low < value < high and low < 0 < high
    with pytest.raises(ValueError, match="same length"):
        faithfulness(guide, guide[:-1])
    with pytest.raises(ValueError, match="finite"):
        faithfulness([1.0, 2.0, np.nan], [1.0, 2.0, 3.0])


def test_pixel_change_is_zero_for_a_copy_and_the_mean_over_pairs():
    rng = np.random.default_rng(0)
    guides = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    assert pixel_change(guides, [g.resize((32, 32), Image.Resampling.LANCZOS) for g in guides]) == 0  # resized first
    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    assert pixel_change([black, white], [white, white]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one guide per image"):
        pixel_change(guides, guides[:2])


def _evaluation(rng: np.random.Generator, sweep: list[float]) -> dict:
    """A diffusion evaluation's results (jobs.diffusion_eval's keys), from this module's own functions."""
    codes = ["MEL", "NEV", "BCC"]
    prompted = [c for c in codes for _ in range(6)]

    def judged(p: float) -> dict:
        return class_relevance(prompted, [c if rng.random() < p else "DF" for c in prompted])

    guide = rng.uniform(1, 20, 18)

    def follow(noise: float) -> dict:
        return faithfulness(guide, guide + rng.normal(0, noise, 18))

    def guided(strength: float) -> dict:
        return {
            "strength": strength,
            "denoising_steps": int(20 * strength),
            "class_relevance": judged(0.5),
            "kid": {"mean": 0.001, "std": 0.0002},
            "pixel_change": strength / 4,
            "area": follow(10 * strength),
            "contrast": follow(10 * strength),
        }

    headline = guided(0.6)
    return {
        "real": {"class_relevance": judged(0.6)},
        "real_through_vae": {"class_relevance": judged(0.45)},
        "adapters": "shared",
        "base": {"class_relevance": judged(0.1), "kid": {"mean": 0.005, "std": 0.001}},
        "lora": {
            "class_relevance": judged(0.4),
            "kid": {"mean": 0.004, "std": 0.001},
            "size_faithfulness": size_faithfulness(rng.uniform(20, 40, 9), rng.uniform(5, 20, 9)),
            "guide_area": follow(20),
            "guide_contrast": follow(20),
            "guide_pixel_change": 0.3,
        },
        "chance": 1 / 9,
        "guided": headline,
        "guide_sweep": sorted([headline, *(guided(s) for s in sweep)], key=lambda row: row["strength"]),
        "vae_round_trip": {"area": follow(0.5), "contrast": follow(0.5), "pixel_change": 0.02},
    }


def test_markdown_shows_the_strength_table_only_with_a_sweep():
    rng = np.random.default_rng(0)
    swept = markdown(_evaluation(rng, [0.2, 0.4]))
    rows = [line for line in swept.splitlines() if line.startswith(("| -> 0", "| 0.", "| 1: diagnosis"))]
    # the ceiling first, then by strength (the headline marked as the grid's), then diagnosis only
    assert [row.split(" |")[0] for row in rows] == [
        "| -> 0: the guide through the VAE alone",
        "| 0.2 (4)",
        "| 0.4 (8)",
        "| 0.6 (12) (the grid)",
        "| 1: diagnosis only (paired with the same guides)",
    ]
    assert "0.020 | - |" in rows[0] and "| 0.050 | 0.0010 ± 0.0002 |" in rows[1]  # pixel change; KID
    assert swept.count("through the VAE alone") == 1 and "| guided (strength" not in swept  # no second table of them
    alone = markdown(_evaluation(np.random.default_rng(0), []))
    assert "By guide strength" not in alone and "guided by a held-out lesion (img2img, strength 0.6)" in alone
    assert "| guided (strength 0.6) |" in alone and alone.count("through the VAE alone") == 1
    skipped = _evaluation(np.random.default_rng(0), [])
    for key in ("guided", "guide_sweep", "vae_round_trip"):
        del skipped[key]
    skipped["guided_skipped"] = "2 held-out lesions of the generated diagnoses; a rank correlation needs 3"
    text = markdown(skipped)
    assert "not evaluated: 2 held-out lesions" in text and "guided by" not in text and "By guide strength" not in text
    assert "IP-Adapter" not in swept  # no IP-Adapter evaluated, no table of it


def test_markdown_shows_the_real_images_through_the_vae_beside_them():
    evaluation = _evaluation(np.random.default_rng(0), [])
    text = markdown(evaluation)
    through, real = (evaluation[k]["class_relevance"] for k in ("real_through_vae", "real"))
    row = next(line for line in text.splitlines() if line.startswith("| held-out real images through the base's VAE |"))
    assert f"| {through['relevance'] / real['relevance']:.2f} |" in row  # read against the real images' score
    assert "| diagnosis | base | LoRA | real images through the VAE | real images |" in text
    mel = next(line for line in text.splitlines() if line.startswith("| MEL |"))
    assert mel.endswith(f"| {through['per_class']['MEL']:.2f} | {real['per_class']['MEL']:.2f} |")
    del evaluation["real_through_vae"]  # an evaluation written before the row existed still renders
    older = markdown(evaluation)
    assert "through the base's VAE" not in older and "| diagnosis | base | LoRA | real images |" in older


def test_markdown_shows_the_ip_adapter_rows_by_scale_and_strength():
    evaluation = _evaluation(np.random.default_rng(0), [0.2])
    rows = [
        {**evaluation["guided"], "strength": strength, "ip_adapter_scale": scale} for scale, strength in ((1.0, 1.0), (0.5, 0.6))
    ]
    text = markdown({**evaluation, "ip_adapter": rows})
    shown = [line.split(" |")[0] for line in text.splitlines() if line.startswith(("| 1.0, ", "| 0.5, "))]
    assert shown == ["| 1.0, 1 (from noise)", "| 0.5, 0.6"]


def test_lesion_free_images_give_no_or_a_tiny_area():
    assert lesion_area_mm2(np.full((64, 64, 3), (205, 160, 140), np.uint8)) == 0.0
    # Skin only, with the generator's texture, lighting gradient and sensor noise.
    domain = DOMAINS["clinic"]
    for index in range(3):
        rng = lesion_rng(0, index, "no-lesion")
        spec = sample_spec(rng, "NEV", domain)
        spec = dataclasses.replace(spec, radius_mm=0.01, lab=spec.skin_lab, variegation=0.0, asymmetry=0.0)
        skin = Image.fromarray(render_tile(spec, 128, domain, rng)[0])
        for size in (128, 64, 32):
            # 0.5 mm² is 2 px at 32 px, a 12th of the "small" cut-off (6 mm²).
            assert lesion_area_mm2(skin.resize((size, size), Image.Resampling.LANCZOS)) < 0.5


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((32, 32)), "RGB"),
        (np.zeros((6, 6, 3), np.uint8), "too small"),
        (np.full((32, 32, 3), np.nan), "NaN"),
        (np.full((32, 32, 3), 2.0), r"\[0, 1.0\]"),
        (np.full((32, 32, 3), 300), r"\[0, 255\]"),
    ],
)
def test_lesion_mask_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        estimate_lesion_mask(image)


def test_lesion_area_rejects_bad_field_of_view():
    with pytest.raises(ValueError, match="field_of_view_mm"):
        lesion_area_mm2(np.zeros((32, 32, 3), np.uint8), field_of_view_mm=0.0)


# --- size faithfulness ---------------------------------------------------------------------


def test_size_faithfulness_separated_and_identical_samples():
    rng = np.random.default_rng(0)
    large, small = rng.uniform(14, 25, 30), rng.uniform(2, 6, 30)
    out = size_faithfulness(large, small)
    assert out["auc"] == 1.0 and out["p_value"] < 1e-6
    assert out["ratio"] == pytest.approx(large.mean() / small.mean())
    assert (out["mean_large_mm2"], out["mean_small_mm2"], out["n_large"], out["n_small"]) == (large.mean(), small.mean(), 30, 30)

    same = size_faithfulness(small, small)
    assert same["auc"] == 0.5 and same["ratio"] == 1.0 and same["p_value"] > 0.4
    assert size_faithfulness(small, large)["auc"] == 0.0  # the words followed backwards

    # The bootstrap interval holds the AUC and is narrow for separated samples, wide for overlapping ones.
    value, low, high = out["auc_ci"]
    assert value == 1.0 and low == high == 1.0
    mixed = size_faithfulness(rng.uniform(0, 10, 30), rng.uniform(0, 10, 30))
    assert mixed["auc_ci"][1] < mixed["auc"] < mixed["auc_ci"][2] and mixed["auc_ci"][2] - mixed["auc_ci"][1] > 0.1


def test_size_faithfulness_zero_areas_and_bad_input():
    assert size_faithfulness([3.0, 4.0], [0.0, 0.0])["ratio"] == float("inf")
    with pytest.raises(ValueError, match="non-empty"):
        size_faithfulness([], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        size_faithfulness([1.0, -2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        size_faithfulness([1.0, np.nan], [1.0])


# --- image grid ----------------------------------------------------------------------------


def _tiles(n, size=(24, 24)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def test_image_grid_layout_and_cells():
    tiles = _tiles(5)
    grid = image_grid(tiles, columns=3)
    assert grid.size == (3 * 24, 2 * 24)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, 3)
        assert np.array_equal(np.asarray(grid.crop((col * 24, row * 24, (col + 1) * 24, (row + 1) * 24))), np.asarray(tile))
    assert (np.asarray(grid.crop((48, 24, 72, 48))) == 255).all()  # the empty last cell stays white


def test_image_grid_resizes_cells_and_labels_rows():
    tiles = _tiles(4)
    plain = image_grid(tiles, columns=2, cell=40)
    labelled = image_grid(tiles, columns=2, labels=["large melanoma", "small"], cell=40)
    margin = labelled.width - 2 * 40
    assert plain.size == (80, 80) and labelled.height == 80 and margin > 0
    resized = np.asarray(tiles[3].resize((40, 40), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(plain.crop((40, 40, 80, 80))), resized)
    assert np.array_equal(np.asarray(labelled.crop((margin + 40, 40, margin + 80, 80))), resized)
    label_area = np.asarray(labelled.crop((0, 0, margin, 40)))
    assert (label_area < 128).any() and (label_area == 255).any()  # dark text on white


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        image_grid([], columns=2)
    with pytest.raises(ValueError, match="columns"):
        image_grid(_tiles(2), columns=0)
    with pytest.raises(ValueError, match="per row"):
        image_grid(_tiles(4), columns=2, labels=["only one"])
    with pytest.raises(TypeError, match="PIL"):
        image_grid([np.zeros((4, 4, 3))], columns=1)
