"""SLICE-3D-like synthetic lesions with exact ground truth.

Each lesion is drawn per diagnosis class (size, elongation, border harmonics, asymmetry,
colour inside and outside, colour spread), rendered as a 15 x 15 mm tile, and measured
with `measure_attributes` on the rendered mask and pixels. Class distributions overlap on
purpose, so no single attribute gives the diagnosis away. Everything is a pure function
of (seed, lesion index): any shard can be rendered anywhere, in any order.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dermaray.colour import lab_to_rgb
from dermaray.data.attributes import measure_attributes
from dermaray.schema import ANATOMIC_SITES, ATTRIBUTES, DIAGNOSES_BY_CODE, SEXES, TILE_FIELD_OF_VIEW_MM


@dataclass(frozen=True)
class ClassProfile:
    """Means and spreads of the drawn lesion parameters for one diagnosis."""

    radius_mm: tuple[float, float]  # mean, sd of the base radius
    elongation: tuple[float, float]  # minor / major axis ratio
    border: tuple[float, float]  # amplitude of even border harmonics (irregularity)
    asymmetry: tuple[float, float]  # amplitude of odd harmonics and one-sided colour
    lab: tuple[float, float, float]  # mean lesion colour
    lab_sd: float  # spread of the lesion colour between lesions
    variegation: tuple[float, float]  # in-lesion colour spread (L* units)
    softness_mm: float  # edge blur
    age: tuple[float, float]
    sites: tuple[float, ...]  # weights over ANATOMIC_SITES


CLASS_PROFILES: dict[str, ClassProfile] = {
    "MEL": ClassProfile(
        (2.6, 0.7), (0.70, 0.12), (0.16, 0.05), (0.16, 0.06), (38, 14, 20), 6, (12, 4), 0.15, (62, 13), (1, 2, 3, 2, 4, 0.2, 0.1)
    ),
    "NEV": ClassProfile(
        (1.6, 0.45),
        (0.85, 0.08),
        (0.03, 0.015),
        (0.03, 0.02),
        (48, 12, 22),
        6,
        (3, 1.2),
        0.12,
        (42, 15),
        (1, 2, 2, 3, 4, 0.3, 0.1),
    ),
    "BCC": ClassProfile(
        (2.2, 0.6), (0.78, 0.10), (0.06, 0.03), (0.07, 0.04), (60, 22, 12), 5, (6, 2), 0.30, (68, 11), (6, 1, 1, 2, 2, 0.1, 0.1)
    ),
    "SCC": ClassProfile(
        (2.4, 0.6), (0.75, 0.10), (0.11, 0.04), (0.11, 0.04), (55, 24, 16), 6, (7, 2), 0.25, (72, 10), (5, 3, 2, 1, 1, 0.1, 0.2)
    ),
    "ACK": ClassProfile(
        (1.9, 0.5), (0.72, 0.12), (0.10, 0.04), (0.06, 0.03), (58, 18, 18), 6, (5, 2), 0.35, (70, 10), (6, 3, 1, 1, 1, 0.1, 0.1)
    ),
    "SEK": ClassProfile(
        (2.3, 0.6), (0.78, 0.10), (0.05, 0.02), (0.05, 0.03), (44, 9, 24), 7, (6, 2), 0.10, (64, 12), (2, 1, 1, 3, 4, 0.1, 0.1)
    ),
    "DF": ClassProfile(
        (1.7, 0.4),
        (0.88, 0.06),
        (0.03, 0.015),
        (0.04, 0.02),
        (52, 16, 20),
        5,
        (4, 1.5),
        0.40,
        (45, 13),
        (0.5, 2, 5, 1, 1, 0.1, 0.1),
    ),
    "VASC": ClassProfile(
        (1.5, 0.45), (0.85, 0.08), (0.04, 0.02), (0.04, 0.02), (40, 34, 6), 5, (4, 1.5), 0.18, (40, 20), (3, 1, 1, 3, 2, 0.1, 0.2)
    ),
}
CLASSES: tuple[str, ...] = tuple(CLASS_PROFILES)


@dataclass(frozen=True)
class DomainProfile:
    """An acquisition setting: skin tones, lighting, noise and resolution."""

    name: str
    attribution: str
    image_size: int
    skin_L: tuple[float, float]
    skin_ab: tuple[float, float]
    lighting: float  # strength of a linear illumination gradient
    noise: float  # sensor noise sd in RGB units
    id_prefix: str


DOMAINS: dict[str, DomainProfile] = {
    "clinic": DomainProfile("clinic", "Synthetic clinic A (3D TBP)", 128, (68, 5), (12, 16), 0.06, 2.0, "ISIC_0"),
    "shifted": DomainProfile("shifted", "Synthetic clinic B (other device)", 96, (50, 9), (15, 20), 0.18, 5.0, "ISIC_9"),
}


@dataclass(frozen=True)
class LesionSpec:
    diagnosis: str
    radius_mm: float
    elongation: float
    angle: float
    centre_mm: tuple[float, float]
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase)
    lab: tuple[float, float, float]
    skin_lab: tuple[float, float, float]
    variegation: float
    asymmetry: float
    softness_mm: float
    texture: tuple[tuple[float, float, float, float], ...]  # (fy, fx, phase, weight) of colour waves


def lesion_rng(seed: int, index: int, stream: str = "lesion") -> np.random.Generator:
    key = int.from_bytes(hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(key)


def _draw(rng: np.random.Generator, mean_sd: tuple[float, float], low: float, high: float) -> float:
    return float(np.clip(rng.normal(*mean_sd), low, high))


def sample_spec(rng: np.random.Generator, diagnosis: str, domain: DomainProfile) -> LesionSpec:
    p = CLASS_PROFILES[diagnosis]
    radius = _draw(rng, p.radius_mm, 0.6, 4.5)
    border, asym = _draw(rng, p.border, 0.0, 0.25), _draw(rng, p.asymmetry, 0.0, 0.25)
    harmonics = tuple(
        (
            k,
            (asym if k % 2 else border) * rng.uniform(0.5, 1.0) / (1 + 0.25 * (k - 2) ** 2 if k > 2 else 1),
            rng.uniform(0, 2 * np.pi),
        )
        for k in (1, 2, 3, 4, 5, 6, 8, 11)
    )
    # Keep the whole lesion, with its border bumps, inside the 15 mm tile.
    reach = radius * (1 + sum(a for _, a, _ in harmonics))
    margin = max(0.0, TILE_FIELD_OF_VIEW_MM / 2 - reach - 0.5)
    lab = tuple(float(v) for v in rng.normal(p.lab, p.lab_sd))
    lab = (float(np.clip(lab[0], 15, 80)), lab[1], lab[2])
    skin = (
        _draw(rng, domain.skin_L, 25, 85),
        float(rng.normal(domain.skin_ab[0], 3)),
        float(rng.normal(domain.skin_ab[1], 3)),
    )
    texture = tuple((rng.uniform(0.8, 3.0), rng.uniform(0.8, 3.0), rng.uniform(0, 2 * np.pi), rng.normal()) for _ in range(4))
    return LesionSpec(
        diagnosis=diagnosis,
        radius_mm=radius,
        elongation=_draw(rng, p.elongation, 0.35, 1.0),
        angle=float(rng.uniform(0, np.pi)),
        centre_mm=tuple(float(v) for v in rng.uniform(-min(margin, 1.5), min(margin, 1.5), 2)),
        harmonics=harmonics,
        lab=lab,
        skin_lab=skin,
        variegation=_draw(rng, p.variegation, 0.5, 20),
        asymmetry=asym,
        softness_mm=p.softness_mm,
        texture=texture,
    )


def render_tile(spec: LesionSpec, size: int, domain: DomainProfile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 size x size x 3, lesion mask bool) of one tile."""
    px_mm = TILE_FIELD_OF_VIEW_MM / size
    coords = (np.arange(size) + 0.5) * px_mm - TILE_FIELD_OF_VIEW_MM / 2
    y, x = np.meshgrid(coords - spec.centre_mm[0], coords - spec.centre_mm[1], indexing="ij")
    cos, sin = np.cos(spec.angle), np.sin(spec.angle)
    u, v = x * cos + y * sin, (-x * sin + y * cos) / spec.elongation
    rho = np.hypot(u, v) / spec.radius_mm
    phi = np.arctan2(v, u)
    edge = 1 + sum(a * np.cos(k * phi + ph) for k, a, ph in spec.harmonics)
    depth = (edge - rho) * spec.radius_mm  # mm inside the border (negative outside)
    mask = depth > 0
    alpha = np.clip(0.5 + depth / (2 * spec.softness_mm), 0, 1)[..., None]

    waves = sum(w * np.sin(fy * y + fx * x + ph) for fy, fx, ph, w in spec.texture) / 2
    one_sided = spec.asymmetry * 4 * np.tanh(u / spec.radius_mm)  # darker on one side
    lesion = np.empty((size, size, 3))
    lesion[..., 0] = spec.lab[0] + spec.variegation * waves - spec.variegation * one_sided - 4 * np.clip(1 - rho, 0, 1)
    lesion[..., 1] = spec.lab[1] + 0.4 * spec.variegation * waves
    lesion[..., 2] = spec.lab[2] + 0.5 * spec.variegation * waves
    skin = np.empty_like(lesion)
    skin_texture = rng.normal(0, 1.0, (size, size))
    skin[..., 0] = spec.skin_lab[0] + skin_texture
    skin[..., 1] = spec.skin_lab[1] + 0.3 * skin_texture
    skin[..., 2] = spec.skin_lab[2]
    lab = alpha * lesion + (1 - alpha) * skin
    lab[..., 0] *= 1 + domain.lighting * (x + y) / TILE_FIELD_OF_VIEW_MM
    rgb = lab_to_rgb(lab).astype(np.float64) + rng.normal(0, domain.noise, (size, size, 3))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), mask


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def choose_diagnosis(rng: np.random.Generator, class_weights: dict[str, float] | None) -> str:
    weights = class_weights or {c: 1.0 for c in CLASSES}
    unknown = set(weights) - set(CLASSES)
    if unknown:
        raise ValueError(f"class_weights names unknown classes {sorted(unknown)}; known: {list(CLASSES)}")
    codes = list(weights)
    p = np.array([weights[c] for c in codes], dtype=float)
    return codes[int(rng.choice(len(codes), p=p / p.sum()))]


def patient_of(seed: int, domain: DomainProfile, index: int, lesions_per_patient: float) -> tuple[str, float, str]:
    """(patient id, base age, sex): consecutive lesion indices share a patient."""
    number = int(index // lesions_per_patient)
    rng = lesion_rng(seed, number, f"patient/{domain.name}")
    return f"IP_{domain.name[0].upper()}{seed:02d}{number:06d}", float(rng.normal(0, 6)), str(rng.choice(SEXES))


def synthesize_lesion(
    seed: int,
    index: int,
    domain: str = "clinic",
    image_size: int | None = None,
    lesions_per_patient: float = 4.0,
    class_weights: dict[str, float] | None = None,
    jpeg_quality: int = 90,
    unlabelled_fraction: float = 0.0,
) -> tuple[dict, bytes, np.ndarray, np.ndarray]:
    """One lesion: (ISIC 2024 metadata row, JPEG bytes, rendered rgb, mask).

    With probability `unlabelled_fraction` the row carries only iddx_1 (and iddx_full equal to it)
    and `target`, the finer iddx_* empty, as most rows of the real ISIC 2024 CSV do. The choice
    has its own random stream: the lesion itself is the same either way.
    """
    profile = DOMAINS[domain]
    rng = lesion_rng(seed, index, domain)
    diagnosis = choose_diagnosis(rng, class_weights)
    spec = sample_spec(rng, diagnosis, profile)
    rgb, mask = render_tile(spec, image_size or profile.image_size, profile, rng)
    attributes = measure_attributes(rgb, mask)
    patient_id, age_shift, sex = patient_of(seed, profile, index, lesions_per_patient)
    class_profile, dx = CLASS_PROFILES[diagnosis], DIAGNOSES_BY_CODE[diagnosis]
    site_weights = np.array(class_profile.sites) / sum(class_profile.sites)
    row = {
        "isic_id": f"{profile.id_prefix}{seed % 100:02d}{index:07d}",
        "patient_id": patient_id,
        "age_approx": float(np.clip(5 * round((rng.normal(*class_profile.age) + age_shift) / 5), 5, 90)),
        "sex": sex,
        "anatom_site_general": str(rng.choice(ANATOMIC_SITES, p=site_weights)),
        "image_type": "TBP tile: close-up",
        "tbp_tile_type": "3D: white",
        "attribution": profile.attribution,
        "copyright_license": "CC-0",
        **{a.isic_column: round(attributes[a.name], 5) for a in ATTRIBUTES},
        "target": int(dx.malignant),
        "lesion_id": f"IL_{profile.id_prefix[-1]}{seed % 100:02d}{index:07d}",
        "iddx_full": dx.hierarchy,
        "iddx_1": dx.superclass,
        "iddx_2": dx.family,
        "iddx_3": dx.name,
        "iddx_4": "",
        "iddx_5": "",
    }
    if unlabelled_fraction > 0 and lesion_rng(seed, index, f"unlabelled/{domain}").random() < unlabelled_fraction:
        row.update(iddx_full=dx.superclass, iddx_2="", iddx_3="")
    return row, encode_jpeg(rgb, jpeg_quality), rgb, mask


ISIC_METADATA_COLUMNS: tuple[str, ...] = (
    "isic_id", "patient_id", "age_approx", "sex", "anatom_site_general", "image_type", "tbp_tile_type",
    "attribution", "copyright_license", *[a.isic_column for a in ATTRIBUTES], "target", "lesion_id",
    "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5",
)  # fmt: skip
