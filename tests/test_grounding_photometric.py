"""Photometric augmentation: each transform leaves the attributes it is trained with unchanged, measured with
the project's own attribute code on rendered lesions; the loss reads only the attributes a view keeps."""

import numpy as np
import pytest
import torch

from dermaray.colour import rgb_to_lab
from dermaray.config import GROUNDED_ATTRIBUTES
from dermaray.data.attributes import measure_attributes
from dermaray.data.synthetic import synthesize_lesion
from dermaray.grounding import photometric
from dermaray.grounding.model import loss_fn

LESIONS = [synthesize_lesion(5, i)[2:] for i in range(12)]  # (rgb, mask) of rendered clinic tiles


def _only(transform: str) -> torch.Tensor:
    chosen = torch.zeros(1, len(photometric.TRANSFORMS), dtype=torch.bool)
    chosen[0, photometric.TRANSFORMS.index(transform)] = True
    return chosen


def _measured(transform: str, seed: int) -> list[tuple[dict, dict]]:
    """(attributes before, after `transform`) of every rendered lesion, with the lesion's own mask."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for rgb, mask in LESIONS:
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255
        changed = photometric.apply(pixels, _only(transform), generator)[0].permute(1, 2, 0).numpy()
        out.append((measure_attributes(rgb, mask), measure_attributes(np.round(changed * 255).astype(np.uint8), mask)))
    return out


def test_lab_conversion_is_the_projects():
    rgb = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    lab = photometric._rgb_to_lab(rgb)
    np.testing.assert_allclose(lab.permute(0, 2, 3, 1).numpy(), rgb_to_lab(rgb.permute(0, 2, 3, 1).numpy()), atol=1e-9)
    np.testing.assert_allclose(photometric._lab_to_rgb(lab).numpy(), rgb.numpy(), atol=1e-9)


def _lesion_vs_skin(a: dict) -> float:
    """ΔE between the lesion's and the skin's mean L*a*b*: how distinguishable the lesion still is."""
    return float(np.hypot(a["lesion_L"] - a["skin_L"], np.hypot(a["lesion_A"] - a["skin_A"], a["lesion_B"] - a["skin_B"])))


@pytest.mark.parametrize("transform", photometric.TRANSFORMS)
def test_each_transform_keeps_the_attributes_it_trains(transform):
    """Colour targets measured again on the changed pixels; mask-only targets are the mask's by definition, so
    what must hold for them is that the lesion is still there to be seen (contrast at least 0.3 of before)."""
    pairs = _measured(transform, seed=1)
    changed_images = 0
    for before, after in pairs:
        assert _lesion_vs_skin(after) >= 0.25 * _lesion_vs_skin(before), (transform, before, after)
        for name in GROUNDED_ATTRIBUTES:
            if photometric.keeps(transform, name):
                # Mask-only attributes exactly; L*a*b* differences within rounding to 8 bits and rare clipping.
                tolerance = 0 if name in photometric.MASK_ONLY else 0.06 * abs(before[name]) + 0.3
                assert abs(after[name] - before[name]) <= tolerance + 1e-9, (transform, name, before[name], after[name])
        changed_images += before != after
    assert changed_images >= 0.75 * len(pairs)  # the transform did change the images (a draw near identity may not)


@pytest.mark.parametrize("transform", ["contrast", "noise"])
def test_the_transforms_masked_for_colour_do_change_it(transform):
    """The other side of the table: these would teach wrong colour targets, so the loss must skip them."""
    pairs = _measured(transform, seed=2)
    name = "delta_lb_norm" if transform == "contrast" else "color_std_mean"
    assert not photometric.keeps(transform, name)
    relative = [abs(a[name] - b[name]) / b[name] for b, a in pairs]
    assert np.median(relative) > 0.03


def test_views_and_the_mask_of_kept_attributes():
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    pixels = (torch.rand(64, 3, 16, 16) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    names = ["area_mm2", "delta_lb_norm", "lesion_L"]
    views, keep = photometric.photometric_views(pixels, (mean, std), names, torch.Generator().manual_seed(0))
    assert views.shape == pixels.shape and keep.shape == (64, 3)
    assert keep[:, 0].all()  # area: every view
    assert 0 < keep[:, 1].sum() < 64  # delta_lb_norm: the views with at most a lab offset
    untouched = torch.isclose(views, pixels, atol=1e-3).all(dim=(1, 2, 3))
    assert 0 < keep[:, 2].sum() and keep[:, 2].bool().tolist() == untouched.tolist()  # absolute colour: untouched views only


def test_views_are_computed_in_float32_under_mixed_precision():
    """Training autocasts to bfloat16; the colour conversions must not: an untouched view stays the image."""
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    rgb = torch.from_numpy(LESIONS[0][0]).permute(2, 0, 1)[None].float().repeat(32, 1, 1, 1) / 255
    pixels = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views, keep = photometric.photometric_views(pixels, (mean, std), ["lesion_L"], torch.Generator().manual_seed(0))
    untouched = keep[:, 0].bool()
    assert views.dtype == torch.float32 and untouched.any()
    assert (views[untouched] - pixels[untouched]).abs().max() < 1e-3


def test_loss_reads_only_kept_attributes():
    predicted, target = torch.zeros(4, 2), torch.zeros(4, 2)
    predicted[0, 1] = 100.0  # a wrong prediction on a view that no longer shows attribute 1
    keep = torch.ones(4, 2)
    keep[0, 1] = 0
    assert float(loss_fn(predicted, target, keep=keep)) == 0.0
    assert float(loss_fn(predicted, target)) > 0.0
    predicted[1:, 0] = 1.0  # an error of 1 on attribute 0; attribute 1 kept by no view: it does not halve the loss
    keep[:, 1] = 0
    assert float(loss_fn(predicted, target, torch.tensor([1.0, 1.0]), keep)) == pytest.approx(0.5 * 3 / 4)
