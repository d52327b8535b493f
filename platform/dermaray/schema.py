"""The canonical lesion table and the quantitative lesion attributes.

Every reader (ISIC 2024 / SLICE-3D, HAM10000, PAD-UFES-20, canonical Parquet) produces
rows of `LESION_SCHEMA`; every row it cannot accept goes to `QUARANTINE_SCHEMA` with a
reason code, so rows in = rows out + rows quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# One SLICE-3D tile covers a 15 x 15 mm field of view.
TILE_FIELD_OF_VIEW_MM = 15.0
TILE_AREA_MM2 = TILE_FIELD_OF_VIEW_MM**2


@dataclass(frozen=True)
class Attribute:
    """A quantitative lesion attribute: canonical column, ISIC 2024 column, unit, meaning."""

    name: str
    isic_column: str
    unit: str
    description: str
    lower: float = 0.0  # values below are physically impossible
    upper: float = float("inf")


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("area_mm2", "tbp_lv_areaMM2", "mm²", "lesion area", 0.0),
    Attribute("perimeter_mm", "tbp_lv_perimeterMM", "mm", "lesion perimeter", 0.0),
    Attribute("minor_axis_mm", "tbp_lv_minorAxisMM", "mm", "minor axis of the moment-equivalent ellipse", 0.0),
    Attribute("long_diam_mm", "clin_size_long_diam_mm", "mm", "major axis of the moment-equivalent ellipse", 0.0),
    Attribute("eccentricity", "tbp_lv_eccentricity", "", "eccentricity of the moment-equivalent ellipse", 0.0, 1.0),
    Attribute("area_perim_ratio", "tbp_lv_area_perim_ratio", "", "border jaggedness: perimeter² / area (4π for a disc)", 0.0),
    Attribute(
        "color_std_mean", "tbp_lv_color_std_mean", "", "colour irregularity: mean per-channel L*a*b* std inside the lesion", 0.0
    ),
    Attribute("delta_lb_norm", "tbp_lv_deltaLBnorm", "", "contrast: L*b* distance between lesion and surrounding skin", 0.0),
    Attribute(
        "symm_2axis", "tbp_lv_symm_2axis", "", "border asymmetry about the principal axes (0 symmetric, 1 disjoint)", 0.0, 1.0
    ),
    Attribute("norm_border", "tbp_lv_norm_border", "", "border irregularity, 0-10 scale", 0.0, 10.0),
    Attribute("norm_color", "tbp_lv_norm_color", "", "colour variation, 0-10 scale", 0.0, 10.0),
    Attribute("lesion_L", "tbp_lv_L", "", "mean L* inside the lesion", 0.0, 100.0),
    Attribute("lesion_A", "tbp_lv_A", "", "mean a* inside the lesion", -128.0, 128.0),
    Attribute("lesion_B", "tbp_lv_B", "", "mean b* inside the lesion", -128.0, 128.0),
    Attribute("skin_L", "tbp_lv_Lext", "", "mean L* of the surrounding skin", 0.0, 100.0),
    Attribute("skin_A", "tbp_lv_Aext", "", "mean a* of the surrounding skin", -128.0, 128.0),
    Attribute("skin_B", "tbp_lv_Bext", "", "mean b* of the surrounding skin", -128.0, 128.0),
)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES)
ATTRIBUTES_BY_NAME: dict[str, Attribute] = {a.name: a for a in ATTRIBUTES}


@dataclass(frozen=True)
class Diagnosis:
    """A diagnosis class with its ISIC-style label hierarchy (iddx_1 > iddx_2 > iddx_3)."""

    code: str
    name: str
    superclass: str  # iddx_1: Benign / Malignant / Indeterminate
    family: str  # iddx_2

    @property
    def malignant(self) -> bool:
        return self.superclass == "Malignant"

    @property
    def hierarchy(self) -> str:
        """The `iddx_full` string of ISIC 2024."""
        return f"{self.superclass}::{self.family}::{self.name}"


DIAGNOSES: tuple[Diagnosis, ...] = (
    Diagnosis("MEL", "Melanoma, NOS", "Malignant", "Malignant melanocytic proliferations (Melanoma)"),
    Diagnosis("BCC", "Basal cell carcinoma", "Malignant", "Malignant adnexal epithelial proliferations - Follicular"),
    Diagnosis("SCC", "Squamous cell carcinoma, NOS", "Malignant", "Malignant epidermal proliferations"),
    Diagnosis("ACK", "Solar or actinic keratosis", "Indeterminate", "Indeterminate epidermal proliferations"),
    Diagnosis("NEV", "Nevus", "Benign", "Benign melanocytic proliferations"),
    Diagnosis("SEK", "Seborrheic keratosis", "Benign", "Benign epidermal proliferations"),
    Diagnosis("DF", "Dermatofibroma", "Benign", "Benign soft tissue proliferations - Fibro-histiocytic"),
    Diagnosis("VASC", "Hemangioma", "Benign", "Benign soft tissue proliferations - Vascular"),
    Diagnosis("BKL", "Benign keratosis", "Benign", "Benign epidermal proliferations"),
)
DIAGNOSES_BY_CODE: dict[str, Diagnosis] = {d.code: d for d in DIAGNOSES}
# ISIC's iddx_1, the coarsest level: most ISIC 2024 lesions carry only this (and `target`), no finer diagnosis.
SUPERCLASSES: tuple[str, ...] = ("Benign", "Indeterminate", "Malignant")

SEXES = ("male", "female")
ANATOMIC_SITES = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "anterior torso",
    "posterior torso",
    "palms/soles",
    "oral/genital",
)
SPLITS = ("train", "val", "test")

LESION_SCHEMA = pa.schema(
    [
        pa.field("lesion_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # isic2024, ham10000, pad_ufes_20, parquet
        pa.field("domain", pa.string()),  # acquisition site / attribution, for domain-shift splits
        pa.field("patient_id", pa.string()),
        pa.field("age_approx", pa.float32()),
        pa.field("sex", pa.string()),
        pa.field("anatom_site", pa.string()),
        pa.field("diagnosis", pa.string()),  # class code, see DIAGNOSES
        pa.field("diagnosis_superclass", pa.string()),  # iddx_1
        pa.field("diagnosis_full", pa.string()),  # iddx_full hierarchy
        pa.field("malignant", pa.bool_()),
        *[pa.field(name, pa.float32()) for name in ATTRIBUTE_NAMES],
        pa.field("image_bytes", pa.binary()),  # encoded JPEG / PNG, as stored at the source
        pa.field("image_format", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("split", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),  # <source uri>#<row index>
        pa.field("source", pa.string(), nullable=False),
        pa.field("lesion_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),  # a code from QUARANTINE_REASONS
        pa.field("detail", pa.string()),
    ]
)

QUARANTINE_REASONS = {
    "empty_image": "the image file or blob has zero bytes",
    "not_an_image": "the bytes are not a decodable image format",
    "truncated_image": "the image data ends early or is corrupt",
    "decompression_bomb": "the declared image size exceeds max_image_pixels",
    "image_too_large": "the encoded image exceeds max_image_bytes",
    "image_missing": "no image was found for the row (absent from the HDF5 / unreadable URI)",
    "missing_value": "a required field is empty",
    "invalid_value": "a field has the wrong type or an impossible value (NaN, negative, out of range)",
    "duplicate_id": "the lesion id appeared earlier in the same source",
}

NOTES_SCHEMA = pa.schema(
    [
        pa.field("lesion_id", pa.string(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),  # M, P1, P2, P3
        pa.field("prompt_id", pa.string(), nullable=False),  # strategy + metadata switches
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("sampling_params", pa.string()),  # JSON
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("note", pa.string()),  # null when the row failed
        pa.field("error", pa.string()),  # why no note was written; null on success
        pa.field("audit_flags", pa.list_(pa.string())),
        pa.field("hallucinated", pa.bool_()),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)


def written_notes(notes: pa.Table) -> pa.Table:
    """The rows of a notes table (`NOTES_SCHEMA` columns) that hold a note: written without error, with text.

    What every reader of notes uses (the classifier, diffusion captions): a failed row is never read as a note."""
    return notes.filter(pc.and_(pc.is_null(notes["error"]), pc.is_valid(notes["note"])))
