import io

import numpy as np
import pytest
from PIL import Image

from dermaray.colour import rgb_to_lab
from dermaray.data.attributes import measure_attributes
from dermaray.data.synthetic import CLASSES, synthesize_lesion
from dermaray.schema import ATTRIBUTE_NAMES, TILE_AREA_MM2, TILE_FIELD_OF_VIEW_MM


def _disc(size=200, radius_px=40.0, centre=(100, 100)):
    yy, xx = np.mgrid[:size, :size]
    mask = (yy + 0.5 - centre[0]) ** 2 + (xx + 0.5 - centre[1]) ** 2 < radius_px**2
    rgb = np.full((size, size, 3), 200, np.uint8)
    rgb[mask] = (90, 60, 40)
    return rgb, mask


def test_disc_attributes_match_geometry():
    rgb, mask = _disc()
    a = measure_attributes(rgb, mask)
    px = TILE_FIELD_OF_VIEW_MM / 200
    r_mm = 40 * px
    assert a["area_mm2"] == pytest.approx(np.pi * r_mm**2, rel=0.01)
    assert a["perimeter_mm"] == pytest.approx(2 * np.pi * r_mm, rel=0.03)
    assert a["minor_axis_mm"] == pytest.approx(2 * r_mm, rel=0.02)
    assert a["eccentricity"] < 0.1
    assert a["area_perim_ratio"] == pytest.approx(4 * np.pi, rel=0.06)
    assert a["symm_2axis"] < 0.02
    assert a["color_std_mean"] == pytest.approx(0, abs=1e-6)  # one flat colour inside


def test_asymmetric_shape_scores_higher_than_disc():
    rgb, disc = _disc()
    lopsided = disc.copy()
    lopsided[60:100, 100:160] = True  # a one-sided bulge
    assert measure_attributes(rgb, lopsided)["symm_2axis"] > 5 * measure_attributes(rgb, disc)["symm_2axis"]


def test_synthetic_area_is_the_rendered_mask_area():
    for index in range(20):
        row, jpeg, rgb, mask = synthesize_lesion(seed=1, index=index)
        assert row["tbp_lv_areaMM2"] == pytest.approx(mask.mean() * TILE_AREA_MM2, abs=1e-4)
        # The stored JPEG shows that lesion: segmenting it by colour distance to the skin
        # recovers the area within a few pixels' worth of border.
        decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        lab = rgb_to_lab(decoded)
        skin = np.array([row["tbp_lv_Lext"], row["tbp_lv_Aext"], row["tbp_lv_Bext"]])
        lesion = np.array([row["tbp_lv_L"], row["tbp_lv_A"], row["tbp_lv_B"]])
        nearer_lesion = np.linalg.norm(lab - lesion, axis=-1) < np.linalg.norm(lab - skin, axis=-1)
        border_px = row["tbp_lv_perimeterMM"] / (TILE_FIELD_OF_VIEW_MM / mask.shape[0])
        assert abs(int(nearer_lesion.sum()) - int(mask.sum())) <= 1.5 * border_px + 10, index


def test_same_seed_same_lesion_other_seed_other_lesion():
    a, b, c = synthesize_lesion(3, 17), synthesize_lesion(3, 17), synthesize_lesion(4, 17)
    assert a[0] == b[0] and a[1] == b[1]
    assert a[1] != c[1]


def test_domain_shift_changes_resolution_and_skin():
    clinic = [synthesize_lesion(0, i)[0] for i in range(40)]
    shifted = [synthesize_lesion(0, i, domain="shifted") for i in range(40)]
    assert shifted[0][2].shape[0] != 128
    assert not {r["isic_id"] for r in clinic} & {r[0]["isic_id"] for r in shifted}
    assert np.mean([r[0]["tbp_lv_Lext"] for r in shifted]) < np.mean([r["tbp_lv_Lext"] for r in clinic]) - 8


def test_classes_overlap_but_differ():
    rows = [synthesize_lesion(0, i)[0] for i in range(400)]
    by_class = {c: [r for r in rows if r["iddx_3"].startswith(c[:3])] for c in CLASSES}
    areas = {dx: np.array([r["tbp_lv_areaMM2"] for r in rows if r["iddx_3"] == dx]) for dx in {r["iddx_3"] for r in rows}}
    assert len(areas) == len(CLASSES) and all(len(v) > 10 for v in areas.values()), by_class.keys()
    mel, nev = areas["Melanoma, NOS"], areas["Nevus"]
    assert mel.mean() > 1.5 * nev.mean()  # melanomas are larger on average...
    assert (nev > np.median(mel)).any()  # ...but some nevi are larger than a typical melanoma


def test_every_attribute_is_present_and_finite():
    row = synthesize_lesion(0, 0)[0]
    from dermaray.schema import ATTRIBUTES

    assert len(ATTRIBUTES) == len(ATTRIBUTE_NAMES)
    assert all(np.isfinite(row[a.isic_column]) and a.lower <= row[a.isic_column] <= a.upper for a in ATTRIBUTES)
