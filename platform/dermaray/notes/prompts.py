"""Prompt strategies for synthetic clinical notes (arXiv 2511.21827: strategies M, P1, P2, P3).

Pure functions of one canonical lesion row (a dict with `LESION_SCHEMA` column names; any
value may be None). No model, no Ray: the note job sends `build_messages(...)` to the
engine, or takes `template_note(...)` as the note for strategy M. Sampling settings
(temperature 0.1-0.2, about 200 new tokens) live in the config, not here.

- M:  a fixed template filled from metadata, no LLM.
- P1: a structured ABCD form; the model picks one of fixed options per line and is told
      the superclass and the label.
- P2: a free description (lesion type, colour, border, symmetry) with the label injected.
- P3: no metadata at all; the model sees only the image and decides the class itself.
- LF: label-free: a free description from demographics, site and the measured attributes,
      never the diagnosis. These are the notes a classifier may read (the notes paper's
      image + note classifier), and the notes `make run` writes.

`MetadataSwitches` choose what metadata goes into M, P1, P2 and LF (P3 ignores them; LF
never takes the label). P1 and
P2 always receive the superclass and class name, because injecting the label is what
defines them; for those two, `label_hierarchy` only adds the full ISIC hierarchy
(superclass > family > class). For M, `label_hierarchy=False` leaves the diagnosis and
the malignancy statement out of the note altogether.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dermaray.schema import DIAGNOSES, DIAGNOSES_BY_CODE

STRATEGIES: tuple[str, ...] = ("M", "P1", "P2", "P3", "LF")
LABEL_FREE = "LF"

# --- Attribute -> word thresholds. audit.py imports the same constants and functions, so
# a note that uses the words of `describe_attributes` is never flagged by the audit.
# Size: the one definition that notes, diffusion captions and the audit share, on the long diameter
# (`lesion_diameter_mm`), the length notes state ("4 mm"). 6 mm is the D of ABCD, the clinical cut above
# which a lesion counts as large; 3 mm, half of it, keeps "small" to the lesions well inside the D. The
# P1 form states both cuts to the model, and the audit fixture's hand labels were made with them.
SIZE_SMALL_MAX_MM = 3.0  # long diameter below: "small"
SIZE_LARGE_MIN_MM = 6.0  # above: "large"; in between, both cuts included: "medium"
SIZE_BANDS_MM: dict[str, tuple[float, float]] = {
    "small": (0.0, SIZE_SMALL_MAX_MM),
    "medium": (SIZE_SMALL_MAX_MM, SIZE_LARGE_MIN_MM),
    "large": (SIZE_LARGE_MIN_MM, math.inf),
}
SIZE_CATEGORIES: tuple[str, ...] = tuple(SIZE_BANDS_MM)
ASYMMETRIC_MIN_SYMM_2AXIS = 0.05  # symm_2axis at or above: asymmetric (synthetic median ~0.04)
IRREGULAR_MIN_NORM_BORDER = 1.0  # norm_border at or above: irregular border (median ~0.9)
VARIEGATED_MIN_NORM_COLOR = 2.7  # norm_color at or above: variegated (median ~2.6)
CONTRAST_LOW_MAX = 10.0  # delta_lb_norm below: low contrast against the skin
CONTRAST_HIGH_MIN = 25.0  # at or above: high contrast (median ~20)
# Colour name from the mean lesion L*a*b*: hue angle atan2(b*, a*) and chroma hypot(a*, b*).
NEUTRAL_MAX_CHROMA = 8.0  # below: grey or skin-coloured (no clear hue)
RED_MAX_HUE_DEG = 20.0  # below: red-purple (a* dominates: vascular)
PINK_MAX_HUE_DEG = 40.0  # below: pink (light) or red-brown (dark)
PINK_MIN_L = 50.0
BLACK_MAX_L = 25.0
DARK_BROWN_MAX_L = 40.0
BROWN_MAX_L = 52.0
LIGHT_BROWN_MAX_L = 60.0  # above: tan

COLOUR_NAMES: tuple[str, ...] = (
    "black", "dark brown", "brown", "light brown", "tan", "red-brown", "pink", "red-purple", "grey", "skin-coloured",
)  # fmt: skip

# P1 form options, written into the prompt verbatim.
ASYMMETRY_OPTIONS: tuple[str, ...] = ("symmetric", "asymmetric in one axis", "asymmetric in two axes")
BORDER_OPTIONS: tuple[str, ...] = ("regular", "slightly irregular", "markedly irregular")
COLOUR_OPTIONS: tuple[str, ...] = COLOUR_NAMES
COLOUR_VARIATION_OPTIONS: tuple[str, ...] = ("uniform", "variegated")
DIAMETER_OPTIONS: tuple[str, ...] = (
    f"small (under {SIZE_SMALL_MAX_MM:g} mm)",
    f"medium (between {SIZE_SMALL_MAX_MM:g} and {SIZE_LARGE_MIN_MM:g} mm)",
    f"large (over {SIZE_LARGE_MIN_MM:g} mm)",
)
P1_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Asymmetry", ASYMMETRY_OPTIONS),
    ("Border", BORDER_OPTIONS),
    ("Colour", COLOUR_OPTIONS),
    ("Colour variation", COLOUR_VARIATION_OPTIONS),
    ("Diameter", DIAMETER_OPTIONS),
)

# How the M template names each canonical site (audit.py maps these phrases back).
SITE_PHRASES: dict[str, str] = {
    "head/neck": "head or neck",
    "upper extremity": "upper extremity",
    "lower extremity": "lower extremity",
    "anterior torso": "anterior torso",
    "posterior torso": "posterior torso",
    "palms/soles": "palm or sole",
    "oral/genital": "oral or genital mucosa",
}

SYSTEM_PROMPT = (
    "You are a dermatologist writing a short clinical note about one skin lesion. "
    "Write in a concise clinical register, as plain prose, in under 250 words."
)


def _faithful(with_image: bool) -> str:
    seen = " and what is visible in the image" if with_image else ""
    return (
        f"Use only the facts given here{seen}. Do not invent patient history, demographics, measurements, "
        "symptoms or findings that are not given."
    )


@dataclass(frozen=True)
class MetadataSwitches:
    """Which metadata goes into the prompt (strategies M, P1, P2; P3 ignores them)."""

    label_hierarchy: bool = True
    demographics_site: bool = True
    attributes: bool = True


ALL_METADATA = MetadataSwitches()
NO_METADATA = MetadataSwitches(False, False, False)


# --- Row access --------------------------------------------------------------------------


def finite_number(row: Mapping[str, Any], key: str) -> float | None:
    """A finite float, or None for missing / NaN (readers may leave either)."""
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def lesion_diameter_mm(row: Mapping[str, Any]) -> float | None:
    """Long diameter in mm; the disc-equivalent diameter of the area when it is missing."""
    diameter = finite_number(row, "long_diam_mm")
    if diameter is not None:
        return diameter
    area = finite_number(row, "area_mm2")
    return 2 * math.sqrt(area / math.pi) if area is not None and area >= 0 else None


def malignancy_word(row: Mapping[str, Any]) -> str | None:
    """ "benign" / "premalignant" / "malignant" from the label, or None when unknown."""
    dx = DIAGNOSES_BY_CODE.get(row.get("diagnosis") or "")
    superclass = row.get("diagnosis_superclass") or (dx.superclass if dx else None)
    malignant = row.get("malignant")
    if malignant is True or (malignant is None and superclass == "Malignant"):
        return "malignant"
    if superclass == "Indeterminate":  # ACK: not malignant, not benign either
        return "premalignant"
    if malignant is False or superclass == "Benign":
        return "benign"
    return None


# --- Attribute words ---------------------------------------------------------------------


def size_category(diameter_mm: float) -> str:
    """ "small" below 3 mm of long diameter, "large" above 6 mm, "medium" in between (SIZE_BANDS_MM)."""
    if not math.isfinite(diameter_mm) or diameter_mm < 0:
        raise ValueError(f"diameter_mm must be a finite, non-negative number, got {diameter_mm!r}")
    if diameter_mm < SIZE_SMALL_MAX_MM:
        return "small"
    return "large" if diameter_mm > SIZE_LARGE_MIN_MM else "medium"


def size_word(diameter_mm: float) -> str:
    """The note's word for `size_category`: "medium-sized" reads as English before a noun ("a medium-sized lesion")."""
    category = size_category(diameter_mm)
    return "medium-sized" if category == "medium" else category


def symmetry_word(symm_2axis: float) -> str:
    return "asymmetric" if symm_2axis >= ASYMMETRIC_MIN_SYMM_2AXIS else "symmetric"


def border_word(norm_border: float) -> str:
    return "irregular" if norm_border >= IRREGULAR_MIN_NORM_BORDER else "regular"


def colour_variation_word(norm_color: float) -> str:
    return "variegated" if norm_color >= VARIEGATED_MIN_NORM_COLOR else "uniform"


def contrast_word(delta_lb_norm: float) -> str:
    if delta_lb_norm < CONTRAST_LOW_MAX:
        return "low"
    return "high" if delta_lb_norm >= CONTRAST_HIGH_MIN else "moderate"


def colour_name(lightness: float, a: float, b: float) -> str:
    """A clinical colour word for a mean L*a*b* colour (one of COLOUR_NAMES)."""
    chroma, hue = math.hypot(a, b), math.degrees(math.atan2(b, a))
    if lightness < BLACK_MAX_L:
        return "black"
    if chroma < NEUTRAL_MAX_CHROMA:
        return "skin-coloured" if lightness >= LIGHT_BROWN_MAX_L else "grey"
    if hue < RED_MAX_HUE_DEG:  # includes negative b* (purple)
        return "red-purple"
    if hue < PINK_MAX_HUE_DEG:
        return "pink" if lightness >= PINK_MIN_L else "red-brown"
    if lightness < DARK_BROWN_MAX_L:
        return "dark brown"
    if lightness < BROWN_MAX_L:
        return "brown"
    return "light brown" if lightness < LIGHT_BROWN_MAX_L else "tan"


def describe_attributes(row: Mapping[str, Any]) -> dict[str, str]:
    """Clinical words for the quantitative attributes; an attribute that is None is left out.

    Keys: size, diameter ("4.2 mm"), symmetry, border, colour, colour_variation, contrast.
    """
    words: dict[str, str] = {}
    diameter = lesion_diameter_mm(row)
    if diameter is not None:
        words["size"] = size_word(diameter)
        words["diameter"] = f"{diameter:.1f} mm"
    for key, column, word in (
        ("symmetry", "symm_2axis", symmetry_word),
        ("border", "norm_border", border_word),
    ):
        value = finite_number(row, column)
        if value is not None:
            words[key] = word(value)
    lab = [finite_number(row, c) for c in ("lesion_L", "lesion_A", "lesion_B")]
    if None not in lab:
        words["colour"] = colour_name(*lab)
    for key, column, word in (
        ("colour_variation", "norm_color", colour_variation_word),
        ("contrast", "delta_lb_norm", contrast_word),
    ):
        value = finite_number(row, column)
        if value is not None:
            words[key] = word(value)
    return words


# --- Metadata pieces ---------------------------------------------------------------------


def _label(row: Mapping[str, Any]) -> tuple[str, str | None, str | None] | None:
    """(class name, superclass, family) of the row's diagnosis, or None when unlabelled."""
    dx = DIAGNOSES_BY_CODE.get(row.get("diagnosis") or "")
    if dx is None:
        return None
    superclass = row.get("diagnosis_superclass") or dx.superclass
    full = (row.get("diagnosis_full") or "").split("::")
    family = full[1] if len(full) >= 3 and full[1] else dx.family
    return dx.name, superclass, family


def _age_text(row: Mapping[str, Any]) -> str | None:
    age = finite_number(row, "age_approx")
    return f"{age:.0f}-year-old" if age is not None else None


def _patient_text(row: Mapping[str, Any]) -> str | None:
    """ "45-year-old male", "female", or None."""
    parts = [p for p in (_age_text(row), row.get("sex")) if p]
    return " ".join(parts) or None


def _site_text(row: Mapping[str, Any]) -> str | None:
    site = row.get("anatom_site")
    return SITE_PHRASES.get(site, site) if site else None


def _attribute_lines(row: Mapping[str, Any]) -> list[str]:
    words = describe_attributes(row)
    lines = []
    if "size" in words:
        lines.append(f"Size: {words['size']}, long diameter {words['diameter']}")
    for key, title in (("symmetry", "Symmetry"), ("border", "Border")):
        if key in words:
            lines.append(f"{title}: {words[key]}")
    colour = ", ".join(words[k] for k in ("colour", "colour_variation") if k in words)
    if colour:
        lines.append(f"Colour: {colour}")
    if "contrast" in words:
        lines.append(f"Contrast with the surrounding skin: {words['contrast']}")
    return lines


def metadata_lines(row: Mapping[str, Any], switches: MetadataSwitches, label_always: bool) -> list[str]:
    """The "Known facts" lines of a P1 / P2 prompt."""
    lines = []
    label = _label(row)
    if label and (label_always or switches.label_hierarchy):
        name, superclass, family = label
        lines.append(f"Diagnosis: {name}")
        if superclass:
            lines.append(f"Superclass: {superclass}")
        if switches.label_hierarchy and family:
            lines.append(f"Label hierarchy: {' > '.join(p for p in (superclass, family, name) if p)}")
    if switches.demographics_site:
        patient, site = _patient_text(row), row.get("anatom_site")
        if patient:
            lines.append(f"Patient: {patient}")
        if site:
            lines.append(f"Anatomic site: {site}")
    if switches.attributes:
        lines += [f"Measured {line[0].lower()}{line[1:]}" for line in _attribute_lines(row)]
    return lines


# --- Strategy M --------------------------------------------------------------------------


def _article(text: str) -> str:
    spoken_vowel = text[:1] in "aeiou8" or text.startswith(("11-", "18-"))
    return "An" if spoken_vowel else "A"


def template_note(row: Mapping[str, Any], switches: MetadataSwitches = ALL_METADATA) -> str:
    """Strategy M: the final note, filled from metadata with the words of `describe_attributes`."""
    sentences = []
    patient = _patient_text(row) if switches.demographics_site else None
    site = _site_text(row) if switches.demographics_site else None
    who = f"{patient} patient" if patient else "patient"
    where = f" on the {site}" if site else ""
    if patient or site:
        sentences.append(f"{_article(who)} {who} presents with a skin lesion{where}.")
    else:
        sentences.append("A skin lesion is documented.")

    if switches.attributes:
        words = describe_attributes(row)
        if "size" in words:
            sentences.append(f"It is a {words['size']} lesion with a long diameter of {words['diameter']}.")
        shape = [words["symmetry"]] if "symmetry" in words else []
        if "border" in words:
            shape.append(f"with {_article(words['border']).lower()} {words['border']} border")
        if shape:
            sentences.append(f"It is {', '.join(shape)}.")
        if "colour" in words:
            sentences.append(f"It is {words['colour']} in colour.")
        tone = []
        if "colour_variation" in words:
            tone.append(f"{words['colour_variation']} pigmentation")
        if "contrast" in words:
            tone.append(f"{words['contrast']} contrast against the surrounding skin")
        if tone:
            sentences.append(f"It shows {' and '.join(tone)}.")

    label = _label(row) if switches.label_hierarchy else None
    if label:
        name, superclass, family = label
        hierarchy = "; ".join(p for p in (superclass, family) if p)
        sentences.append(f"Diagnosis: {name}" + (f" ({hierarchy})." if hierarchy else "."))
    malignancy = malignancy_word(row) if switches.label_hierarchy else None
    if malignancy:
        sentences.append(f"The lesion is {malignancy}.")
    return " ".join(sentences)


# --- Strategies P1, P2, P3 ---------------------------------------------------------------


def _class_names() -> str:
    return ", ".join(d.name.removesuffix(", NOS") for d in DIAGNOSES)


def _user_text(row: Mapping[str, Any], strategy: str, switches: MetadataSwitches, with_image: bool) -> str:
    subject = "the skin lesion in the image" if with_image else "a skin lesion from the facts below"
    if strategy == LABEL_FREE:
        switches = MetadataSwitches(False, switches.demographics_site, switches.attributes)
    facts = metadata_lines(row, switches, label_always=strategy != LABEL_FREE) if strategy != "P3" else []
    known = "Known facts:\n" + "\n".join(f"- {line}" for line in facts) if facts else ""
    if strategy == "P1":
        form = "\n".join(f"{name}: {' | '.join(options)}" for name, options in P1_FIELDS)
        return "\n\n".join(
            p
            for p in (
                f"Complete a structured ABCD assessment of {subject}.",
                known,
                "Answer each of these lines with exactly one of its options, copied verbatim:\n" + form,
                'Then write "Summary:" and two to four sentences that describe the lesion and state '
                "the diagnosis and superclass given above. " + _faithful(with_image),
            )
            if p
        )
    if strategy == "P2":
        return "\n\n".join(
            p
            for p in (
                f"Write a free-text clinical note describing {subject}: lesion type, colour, border and "
                "symmetry, and state the diagnosis given below.",
                known,
                _faithful(with_image),
            )
            if p
        )
    if strategy == LABEL_FREE:
        return "\n\n".join(
            p
            for p in (
                f"Write a short clinical note describing {subject}: the patient, the anatomic site, size, "
                "colour, border and symmetry. Do not state or guess a diagnosis or whether it is benign or malignant.",
                known,
                _faithful(with_image),
            )
            if p
        )
    # P3: image only; the model decides the class itself.
    return (
        f"Write a clinical note describing {subject}: lesion type, colour, border, symmetry and "
        f"approximate size. Then give the most likely diagnosis, choosing one of: {_class_names()}; "
        "and say whether the lesion is benign, premalignant or malignant. No other information about "
        "the patient is available: do not invent history, demographics or symptoms."
    )


def build_messages(
    row: Mapping[str, Any],
    strategy: str,
    switches: MetadataSwitches = ALL_METADATA,
    *,
    with_image: bool = False,
) -> list[dict[str, Any]]:
    """Chat messages (system + user) in the OpenAI / Hugging Face chat format.

    With `with_image=True` the user content is [{"type": "image"}, {"type": "text", ...}]
    and the engine supplies the image. M has no model (use `template_note`), and P3 gives
    the model no metadata, so it needs the image.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)}")
    if strategy == "M":
        raise ValueError("strategy M uses no model: call template_note(row, switches)")
    if strategy == "P3" and not with_image:
        raise ValueError("strategy P3 gives the model no metadata, so it needs with_image=True")
    text = _user_text(row, strategy, switches, with_image)
    content: str | list[dict[str, str]] = [{"type": "image"}, {"type": "text", "text": text}] if with_image else text
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def states_label(prompt_id: str) -> bool:
    """Whether a prompt with this id stated the diagnosis (P1 and P2 always do; M and P3 only with +label; LF never)."""
    strategy, *switches = prompt_id.split("+")
    return strategy in ("P1", "P2") or "label" in switches


def prompt_id(strategy: str, switches: MetadataSwitches = ALL_METADATA) -> str:
    """A stable short name: "P2+label+demo+attr", "M+attr", "LF+demo+attr", "P3" (P3 ignores the switches).

    For P1 / P2 "+label" means the full hierarchy; the class name and superclass are always given.
    LF never has "+label".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)}")
    if strategy == "P3":
        return strategy
    on = [
        name
        for name, flag in (
            ("label", switches.label_hierarchy and strategy != LABEL_FREE),
            ("demo", switches.demographics_site),
            ("attr", switches.attributes),
        )
        if flag
    ]
    return "+".join([strategy, *on])
