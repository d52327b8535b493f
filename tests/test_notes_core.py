"""Pure cores of the note pipeline: prompt strategies and the faithfulness audit (no Ray, no model)."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from dermaray.data.synthetic import synthesize_lesion
from dermaray.diffusion.captions import SIZE_WORDS, caption, lesion_size_word
from dermaray.notes import (
    ALL_METADATA,
    NO_METADATA,
    STRATEGIES,
    MetadataSwitches,
    Tolerance,
    audit_note,
    build_messages,
    describe_attributes,
    extract_facts,
    flag_counts,
    hallucination_rate,
    prompt_id,
    template_note,
)
from dermaray.notes.prompts import (
    P1_FIELDS,
    SITE_PHRASES,
    border_word,
    colour_variation_word,
    malignancy_word,
    size_word,
    symmetry_word,
)
from dermaray.schema import ANATOMIC_SITES, ATTRIBUTES, DIAGNOSES, DIAGNOSES_BY_CODE

N_LESIONS = 300
ALL_SWITCHES = [MetadataSwitches(*bits) for bits in itertools.product((True, False), repeat=3)]
_CODE_BY_NAME = {d.name: d.code for d in DIAGNOSES}


def canonical_row(isic: dict) -> dict:
    """A synthetic ISIC 2024 metadata row as a row of the canonical lesion table."""
    code = _CODE_BY_NAME[isic["iddx_3"]]
    return {
        "lesion_id": isic["lesion_id"],
        "age_approx": isic["age_approx"],
        "sex": isic["sex"],
        "anatom_site": isic["anatom_site_general"],
        "diagnosis": code,
        "diagnosis_superclass": isic["iddx_1"],
        "diagnosis_full": isic["iddx_full"],
        "malignant": bool(isic["target"]),
        **{a.name: isic[a.isic_column] for a in ATTRIBUTES},
    }


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [canonical_row(synthesize_lesion(seed=7, index=i)[0]) for i in range(N_LESIONS)]


def _row(**values) -> dict:
    """A hand-made canonical row: unspecified fields unknown (None)."""
    columns = ["age_approx", "sex", "anatom_site", "diagnosis", "diagnosis_superclass", "malignant"]
    row = dict.fromkeys(columns + [a.name for a in ATTRIBUTES])
    row.update(values)
    if row["diagnosis"]:
        dx = DIAGNOSES_BY_CODE[row["diagnosis"]]
        row["diagnosis_superclass"] = row["diagnosis_superclass"] or dx.superclass
        row["malignant"] = dx.malignant if row["malignant"] is None else row["malignant"]
    return row


# Realistic free-text notes, each faithful to its row.
HANDWRITTEN: list[tuple[str, dict]] = [
    (
        "A 45-year-old woman presents with a small, symmetric, light brown macule on her upper back, measuring "
        "2.5 mm. Borders are regular and well-defined, and the pigmentation is uniform. There is no evidence of "
        "malignancy. Findings are consistent with a benign melanocytic nevus; melanoma is unlikely. Routine follow-up.",
        _row(
            age_approx=45,
            sex="female",
            anatom_site="posterior torso",
            diagnosis="NEV",
            long_diam_mm=2.5,
            symm_2axis=0.02,
            norm_border=0.4,
            norm_color=2.0,
        ),
    ),
    (
        "Clinical note: 65-year-old man with a 7.8 mm asymmetric, dark brown to black lesion on the left thigh. "
        "The border is irregular and notched, with variegated pigmentation. Dermoscopic features are suspicious "
        "for melanoma. This is likely malignant; excision is recommended.",
        _row(
            age_approx=65,
            sex="male",
            anatom_site="lower extremity",
            diagnosis="MEL",
            long_diam_mm=7.8,
            symm_2axis=0.11,
            norm_border=2.2,
            norm_color=4.1,
        ),
    ),
    (
        "Aged 70, male. Pink, pearly papule on the nose measuring approximately 4 mm, with rolled, irregular "
        "borders and arborizing vessels. Not asymmetric. Impression: basal cell carcinoma, a malignant lesion. "
        "Rule out squamous cell carcinoma.",
        _row(
            age_approx=70,
            sex="male",
            anatom_site="head/neck",
            diagnosis="BCC",
            long_diam_mm=4.3,
            symm_2axis=0.03,
            norm_border=1.4,
            norm_color=3.0,
        ),
    ),
    (
        "The patient, a 38-year-old female, has a firm 3.5 mm tan-brown papule on the lower leg. It is symmetric "
        "with a regular border and uniform colour; no signs of ulceration, bleeding or malignancy. Dimple sign "
        "positive. Diagnosis: dermatofibroma (benign).",
        _row(
            age_approx=40,
            sex="female",
            anatom_site="lower extremity",
            diagnosis="DF",
            long_diam_mm=3.3,
            symm_2axis=0.025,
            norm_border=0.5,
            norm_color=2.1,
        ),
    ),
    (
        "70-year-old man with a rough, scaly pink patch on the scalp, 5 mm in diameter, with ill-defined borders. "
        "Symmetric and homogeneous. Clinically an actinic keratosis, a premalignant lesion; no features of "
        "invasive squamous cell carcinoma.",
        _row(
            age_approx=70,
            sex="male",
            anatom_site="head/neck",
            diagnosis="ACK",
            long_diam_mm=5.4,
            symm_2axis=0.04,
            norm_border=1.2,
            norm_color=2.2,
        ),
    ),
    (
        "A bright red to purple, well-circumscribed 2 mm papule on the chest of a 30-year-old female. Symmetric, "
        "regular borders, homogeneous colour. Cherry angioma; benign, not malignant. Melanoma was ruled out.",
        _row(
            age_approx=30,
            sex="female",
            anatom_site="anterior torso",
            diagnosis="VASC",
            long_diam_mm=2.1,
            symm_2axis=0.02,
            norm_border=0.3,
            norm_color=1.9,
        ),
    ),
    (
        "Stuck-on, waxy, light brown plaque on the back of a 68 year old male, 6.5 mm across, with a sharply "
        "demarcated but slightly irregular border and variegated colour. Asymmetric. Seborrheic keratosis, "
        "benign; the differential includes melanoma.",
        _row(
            age_approx=70,
            sex="male",
            anatom_site="posterior torso",
            diagnosis="SEK",
            long_diam_mm=6.6,
            symm_2axis=0.07,
            norm_border=1.3,
            norm_color=3.4,
        ),
    ),
    (
        "An 80-year-old male with a 9 x 6 mm keratotic nodule on the dorsum of his right hand. It is asymmetrical "
        "with irregular borders and variegated pink-red colour. Impression: invasive squamous cell carcinoma, "
        "malignant. No history of melanoma.",
        _row(
            age_approx=80,
            sex="male",
            anatom_site="upper extremity",
            diagnosis="SCC",
            long_diam_mm=9.2,
            symm_2axis=0.09,
            norm_border=1.9,
            norm_color=3.8,
        ),
    ),
    # What P1, P2 and P3 outputs look like.
    (
        "Asymmetry: asymmetric in two axes\nBorder: markedly irregular\nColour: dark brown\nColour variation: "
        "variegated\nDiameter: large (over 6 mm)\nSummary: An asymmetric, dark brown lesion with markedly irregular "
        "borders and variegated pigmentation, larger than 6 mm. These features are consistent with the given "
        "diagnosis of melanoma (superclass: Malignant).",
        _row(diagnosis="MEL", long_diam_mm=7.0, symm_2axis=0.1, norm_border=2.0, norm_color=4.0),
    ),
    (
        "This is a well-circumscribed, symmetric, dome-shaped papule with a smooth, regular border and homogeneous "
        "light brown pigmentation. The overall appearance is that of a benign melanocytic nevus, with no features "
        "suggestive of melanoma such as asymmetry, irregular borders, or colour variegation. No further "
        "intervention is required.",
        _row(diagnosis="NEV", long_diam_mm=3.1, symm_2axis=0.02, norm_border=0.4, norm_color=2.0),
    ),
    (
        "Clinical description: a small, round, evenly pigmented brown macule with sharply defined, regular borders. "
        "No asymmetry is seen. Most likely diagnosis: Nevus. The lesion appears benign.",
        _row(diagnosis="NEV", long_diam_mm=2.5, symm_2axis=0.03, norm_border=0.6, norm_color=2.2),
    ),
]

# --- Planting contradictions ---------------------------------------------------------------

_SEX_SWAP = {"male": "female", "female": "male", "man": "woman", "woman": "man", "he": "she", "she": "he",
             "his": "her", "her": "his", "him": "her"}  # fmt: skip
# Words the notes use for sites, with the canonical site they name; and replacements.
_SITE_WORDS = {phrase: site for site, phrase in SITE_PHRASES.items()} | {
    "upper back": "posterior torso", "thigh": "lower extremity", "nose": "head/neck", "lower leg": "lower extremity",
    "scalp": "head/neck", "chest": "anterior torso", "back": "posterior torso", "hand": "upper extremity",
}  # fmt: skip
_SITE_REPLACEMENTS = {"forearm": "upper extremity", "thigh": "lower extremity", "chest": "anterior torso",
                      "upper back": "posterior torso", "scalp": "head/neck"}  # fmt: skip
_DIAGNOSIS_WORDS = {d.code: [d.name] for d in DIAGNOSES} | {
    "NEV": ["Nevus", "nevus"], "MEL": ["Melanoma, NOS", "melanoma"], "BCC": ["Basal cell carcinoma", "basal cell carcinoma"],
    "DF": ["Dermatofibroma", "dermatofibroma"], "ACK": ["Solar or actinic keratosis", "actinic keratosis"],
    "VASC": ["Hemangioma", "angioma"], "SEK": ["Seborrheic keratosis"],
    "SCC": ["Squamous cell carcinoma, NOS", "squamous cell carcinoma"],
}  # fmt: skip
KINDS = ("sex", "age", "site", "diagnosis", "malignancy", "symmetry", "border", "diameter", "pair")
EXPECTED_CODE = {
    "sex": "sex_mismatch", "age": "age_mismatch", "site": "site_mismatch", "diagnosis": "diagnosis_mismatch",
    "malignancy": "malignancy_mismatch", "symmetry": "symmetry_mismatch", "border": "border_mismatch",
    "diameter": "size_mismatch", "pair": "self_contradiction",
}  # fmt: skip


def _swap_words(text: str, pattern: str, swap) -> str:
    def replace(m: re.Match) -> str:
        new = swap(m.group(0).lower())
        return new.capitalize() if m.group(0)[0].isupper() else new

    return re.sub(pattern, replace, text, flags=re.IGNORECASE)


def plant(note: str, row: dict, kind: str, rng: random.Random) -> str | None:
    """The note with one contradiction of `kind` planted, or None when the note gives no hold for it."""
    if kind == "sex":
        pattern = r"\b(?:" + "|".join(_SEX_SWAP) + r")\b"
        return _swap_words(note, pattern, _SEX_SWAP.get) if re.search(pattern, note, re.I) else None
    if kind == "age":
        m = re.search(r"\b(\d{1,3})(?=[- ]?year[- ]old|\s+year old)|(?<=Aged )\d+", note)
        if not m:
            return None
        age = int(m.group(0))
        return note[: m.start()] + str(age + 20 if age <= 70 else age - 20) + note[m.end() :]
    if kind == "site":
        for words in sorted(_SITE_WORDS, key=len, reverse=True):
            m = re.search(rf"\b{re.escape(words)}\b", note)
            if m:
                new = rng.choice([w for w, s in _SITE_REPLACEMENTS.items() if s != row["anatom_site"]])
                return note[: m.start()] + new + note[m.end() :]
        return None
    if kind == "diagnosis":
        for words in _DIAGNOSIS_WORDS[row["diagnosis"]]:
            if words in note:
                other = rng.choice([c for c in DIAGNOSES_BY_CODE if c not in (row["diagnosis"], "BKL", "SEK")])
                return note.replace(words, DIAGNOSES_BY_CODE[other].name, 1)
        return None
    if kind == "malignancy":
        pattern = r"\b(?:benign|malignant|premalignant)\b"
        swap = {"benign": "malignant", "malignant": "benign", "premalignant": "malignant"}.get
        return _swap_words(note, pattern, swap) if re.search(pattern, note, re.I) else None
    if kind == "symmetry":
        pattern = r"\ba?symmetric(?:al)?\b"

        def swap(w):
            return w[1:] if w.startswith("a") else "a" + w

        return _swap_words(note, pattern, swap) if re.search(pattern, note, re.I) else None
    if kind == "border":
        pattern = r"\b(?:ir)?regular\b"

        def swap(w):
            return w[2:] if w.startswith("ir") else "ir" + w

        return _swap_words(note, pattern, swap) if re.search(pattern, note, re.I) else None
    if kind == "diameter":
        pattern = r"\d+(?:\.\d+)?(?=\s*(?:x\s*\d+(?:\.\d+)?\s*)?mm)"

        def triple(m):
            return f"{float(m.group(0)) * 3:.1f}"

        return re.sub(pattern, triple, note) if re.search(pattern, note) else None
    # "pair": restate an attribute the note already states, with the opposite word.
    options = []
    for words, sentence in (
        (("symmetric", "asymmetric"), "On closer inspection it is {}."),
        (("regular", "irregular"), "The border is {}."),
        (("uniform", "variegated"), "The pigmentation is {}."),
        (("benign", "malignant"), "Overall the lesion is {}."),
    ):
        for said, other in (words, words[::-1]):
            if re.search(rf"\b{said}\b", note, re.I) and not re.search(rf"\b{other}\b", note, re.I):
                options.append(sentence.format(other))
    return f"{note} {rng.choice(options)}" if options else None


# --- Prompts -------------------------------------------------------------------------------


def test_word_thresholds():
    assert [size_word(d) for d in (2.99, 3.0, 6.0, 6.01)] == ["small", "medium-sized", "medium-sized", "large"]
    assert symmetry_word(0.049) == "symmetric" and symmetry_word(0.05) == "asymmetric"
    assert border_word(0.99) == "regular" and border_word(1.0) == "irregular"
    assert colour_variation_word(2.69) == "uniform" and colour_variation_word(2.7) == "variegated"


def test_a_caption_and_the_note_of_a_lesion_name_the_same_size(rows):
    # One definition of the size words: diffusion.notes puts a lesion's note after its caption.
    edges = [_row(long_diam_mm=d, area_mm2=50.0) for d in (2.99, 3.0, 6.0, 6.01)] + [_row(area_mm2=40.0)]
    seen = set()
    for row in rows + edges:
        word = lesion_size_word(row)
        note = template_note(row)
        assert caption("MEL", word).startswith(f"a dermoscopic photo of {word} melanoma")
        assert extract_facts(note).size_words == (word,), (row["long_diam_mm"], note)  # the audit reads the note's word
        assert describe_attributes(row)["size"] == {"medium": "medium-sized"}.get(word, word)
        assert not audit_note(f"A {word} lesion.", row).flags
        seen.add(word)
    assert seen == set(SIZE_WORDS)
    assert lesion_size_word(_row()) is None


def test_describe_attributes_covers_both_words_and_skips_unknowns(rows):
    described = [describe_attributes(r) for r in rows]
    for key in ("size", "symmetry", "border", "colour_variation", "contrast"):
        counts = {d[key] for d in described}
        assert len(counts) >= 2, (key, counts)
    assert {d["size"] for d in described} == {"small", "medium-sized", "large"}
    assert len({d["colour"] for d in described}) >= 4
    first = rows[0]
    assert describe_attributes(first)["diameter"] == f"{first['long_diam_mm']:.1f} mm"
    # Only the area known: the disc-equivalent diameter; nothing known: no words.
    assert describe_attributes(_row(area_mm2=28.274))["diameter"] == "6.0 mm"
    assert describe_attributes(_row()) == {}


def test_prompt_ids_are_stable_and_distinct():
    assert STRATEGIES == ("M", "P1", "P2", "P3", "LF")
    assert prompt_id("LF", ALL_METADATA) == "LF+demo+attr"  # never the label
    assert prompt_id("P2", ALL_METADATA) == "P2+label+demo+attr"
    assert prompt_id("M", MetadataSwitches(False, True, False)) == "M+demo"
    assert prompt_id("P1", NO_METADATA) == "P1"
    assert prompt_id("P3", ALL_METADATA) == prompt_id("P3", NO_METADATA) == "P3"
    ids = {prompt_id(s, sw) for s in ("M", "P1", "P2") for sw in ALL_SWITCHES}
    assert len(ids) == 24
    with pytest.raises(ValueError):
        prompt_id("P4")


def test_build_messages_formats_and_switches(rows):
    row = next(r for r in rows if r["diagnosis"] == "MEL")
    name = DIAGNOSES_BY_CODE["MEL"].name
    with pytest.raises(ValueError):
        build_messages(row, "M")
    with pytest.raises(ValueError):
        build_messages(row, "P3")  # nothing to go on without the image
    for strategy in ("P1", "P2", "P3"):
        system, user = build_messages(row, strategy, with_image=True)
        assert system["role"] == "system" and "250 words" in system["content"]
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert user["content"][1]["type"] == "text"
    for strategy in ("P1", "P2"):
        text = build_messages(row, strategy)[1]["content"]
        assert isinstance(text, str) and "do not invent" in text.lower()
        assert f"Diagnosis: {name}" in text and "Superclass: Malignant" in text and "Label hierarchy" in text
        assert f"{row['age_approx']:.0f}-year-old {row['sex']}" in text and row["anatom_site"] in text
        assert "Measured symmetry" in text
        bare = build_messages(row, strategy, NO_METADATA)[1]["content"]
        # The label defines P1 / P2, so it stays; the switches remove the rest.
        assert f"Diagnosis: {name}" in bare and "Superclass: Malignant" in bare
        assert "Label hierarchy" not in bare and "Patient:" not in bare and "Measured" not in bare
    p1 = build_messages(row, "P1")[1]["content"]
    for field, options in P1_FIELDS:
        assert f"{field}: {' | '.join(options)}" in p1
    p3 = build_messages(row, "P3", with_image=True)[1]["content"][1]["text"]
    assert f"{row['age_approx']:.0f}" not in p3 and row["sex"] not in p3.split() and "Measured" not in p3
    assert all(d.name.removesuffix(", NOS") in p3 for d in DIAGNOSES)  # the model picks among all classes


def test_template_note_obeys_switches(rows):
    row = next(r for r in rows if r["diagnosis"] == "NEV")
    full = template_note(row)
    assert "Nevus" in full and "benign" in full and row["anatom_site"] in full and "mm" in full
    assert len(full.split()) < 250
    bare = template_note(row, NO_METADATA)
    assert not re.search(r"nevus|benign|year|male|mm|torso|extremity|neck", bare, re.I)
    no_label = template_note(row, MetadataSwitches(False, True, True))
    assert "Nevus" not in no_label and "benign" not in no_label


# --- Audit: clean notes --------------------------------------------------------------------


def test_template_notes_audit_clean_for_every_lesion_and_switch(rows):
    results = [audit_note(template_note(r, sw), r) for r in rows for sw in ALL_SWITCHES]
    assert hallucination_rate(results) == 0.0, [r.flag_strings() for r in results if r.flags][:5]
    # And the audit does read them: every full note yields every fact.
    for r in rows[:50]:
        facts = extract_facts(template_note(r))
        assert facts.diagnoses == (r["diagnosis"],) and facts.malignancy == (malignancy_word(r),)
        assert facts.sexes == (r["sex"],) and facts.ages == ((r["age_approx"],) * 2,)
        assert [allowed for _, allowed in facts.sites] == [frozenset({r["anatom_site"]})]
        assert len(facts.diameters_mm) == 1 and len(facts.size_words) == 1
        assert facts.symmetry == (symmetry_word(r["symm_2axis"]),) and facts.borders == (border_word(r["norm_border"]),)


def test_handwritten_notes_audit_clean():
    for note, row in HANDWRITTEN:
        result = audit_note(note, row)
        assert not result.flags, (note, result.flag_strings())
        facts = result.facts
        assert facts.diagnoses == (row["diagnosis"],), (note, facts)
        assert facts.symmetry == (symmetry_word(row["symm_2axis"]),), (note, facts)
        if row["sex"]:
            assert facts.sexes == (row["sex"],) and facts.ages and facts.sites and facts.diameters_mm


def test_unknown_truth_and_unstated_facts_are_not_flagged(rows):
    note = template_note(rows[0])
    assert not audit_note(note, _row()).flags  # every truth unknown
    assert not audit_note("A skin lesion was photographed.", rows[0]).flags  # nothing stated


# --- Audit: planted contradictions ---------------------------------------------------------


def test_planted_contradictions_are_caught(rows):
    rng = random.Random(0)
    planted: list[tuple[str, str, dict]] = []  # (kind, note, row)
    switch_choices = [sw for sw in ALL_SWITCHES if sw != NO_METADATA]
    for row in rows:
        note = template_note(row, rng.choice(switch_choices))
        assert not audit_note(note, row).flags  # unmodified: no flag
        kinds = [k for k in KINDS if plant(note, row, k, random.Random(0)) is not None]
        if kinds:
            kind = rng.choice(kinds)
            planted.append((kind, plant(note, row, kind, rng), row))
    for note, row in HANDWRITTEN:
        assert not audit_note(note, row).flags
        for kind in KINDS:
            changed = plant(note, row, kind, rng)
            if changed is not None:
                planted.append((kind, changed, row))
    assert len(planted) >= 300
    assert len({kind for kind, _, _ in planted}) == len(KINDS)
    caught = [EXPECTED_CODE[kind] in audit_note(note, row).codes for kind, note, row in planted]
    missed = [(kind, note) for (kind, note, _), ok in zip(planted, caught, strict=True) if not ok]
    assert sum(caught) / len(caught) >= 0.95, missed[:10]
    assert not missed, missed[:10]  # today every planted contradiction is caught


# --- Audit: tricky phrasing ----------------------------------------------------------------

NEV = dict(diagnosis="NEV", symm_2axis=0.02, norm_border=0.4, norm_color=2.0)
PINK = dict(lesion_L=65.0, lesion_A=25.0, lesion_B=12.0, delta_lb_norm=30.0)


@pytest.mark.parametrize(
    ("note", "row", "facts", "codes"),
    [
        ("No evidence of malignancy. Melanocytic nevus.", NEV, {"malignancy": ("not-malignant",), "diagnoses": ("NEV",)}, ()),
        ("No evidence of malignancy.", dict(diagnosis="MEL"), {"malignancy": ("not-malignant",)}, ("malignancy_mismatch",)),
        ("No evidence of malignancy.", dict(diagnosis="ACK"), {"malignancy": ("not-malignant",)}, ()),
        ("No signs of ulceration, bleeding, or malignancy.", NEV, {"malignancy": ("not-malignant",), "history": ()}, ()),
        ("Dermoscopy to rule out melanoma; clinically a benign nevus.", NEV, {"diagnoses": ("NEV",)}, ()),
        (
            "Family history of melanoma. Nevus on the back.",
            NEV,
            {"diagnoses": ("NEV",), "history": ("family history of",)},
            ("invented_history",),
        ),
        ("Melanoma is unlikely; features of a benign nevus.", NEV, {"diagnoses": ("NEV",)}, ()),
        ("Melanoma was ruled out.", NEV, {"diagnoses": ()}, ()),
        ("Differential diagnosis includes dermatofibroma, melanoma and angioma. Final: nevus.", NEV, {"diagnoses": ("NEV",)}, ()),
        ("Non-malignant lesion.", NEV, {"malignancy": ("not-malignant",)}, ()),
        # Colours against the mean L*a*b* (PINK: L 65, a* 25, b* 12 is "pink"); not the skin's, not a dot's.
        ("A pinkish papule with brown dots; the surrounding skin is white.", PINK, {"colours": ("pink",)}, ()),
        ("The lesion is dark brown in colour.", PINK, {"colours": ("dark brown",)}, ("colour_mismatch",)),
        ('It was found to be "light brown, uniform".', PINK, {"colours": ("light brown",)}, ("colour_mismatch",)),
        ("A red to purple macule.", PINK, {"colours": ("red", "purple")}, ("colour_mismatch",)),
        ("Colour: pink. Not black.", PINK, {"colours": ("pink",)}, ()),
        # Contrast against delta_lb_norm (PINK: 30, high).
        ("High contrast with the surrounding skin.", PINK, {"contrasts": ("high",)}, ()),
        ("Contrast with the surrounding skin: low.", PINK, {"contrasts": ("low",)}, ("contrast_mismatch",)),
        # History, symptoms and procedures are never in the metadata; plans and negations are not history.
        (
            "The lesion has been bleeding and is rapidly growing.",
            NEV,
            {"history": ("bleeding", "rapidly growing")},
            ("invented_history",),
        ),
        ("The patient underwent a biopsy last year.", NEV, {"history": ("underwent", "last year")}, ("invented_history",)),
        ("No itching or bleeding. Excision is recommended to confirm.", NEV, {"history": ()}, ()),
        ("Diagnosed with melanoma.", dict(diagnosis="MEL"), {"history": (), "diagnoses": ("MEL",)}, ()),
        # Lengths in other units, widths, comparisons.
        ("About 18 inches (45 cm) across.", dict(long_diam_mm=3.0), {"diameters_mm": (457.2, 450.0)}, ("size_mismatch",)),
        ("It is 9 mm wide.", dict(long_diam_mm=3.3), {"diameters_mm": (), "diameter_bounds_mm": ()}, ()),  # not the long one
        ("About 4.7 cm (1 inch) wide.", dict(long_diam_mm=4.7), {"diameters_mm": (), "diameter_bounds_mm": ()}, ()),
        ("3.3 mm, which is 1.4 mm longer than usual.", dict(long_diam_mm=3.3), {"diameters_mm": (3.3,)}, ()),
        # Diagnoses outside the classes, and misspelt ones.
        ("A benign prostatic hyperplasia.", NEV, {"diagnoses": ("OTHER",)}, ("diagnosis_mismatch",)),
        ("Benign seberrheic keratoses.", dict(diagnosis="SEK"), {"diagnoses": ("SEK",)}, ()),
        ("The lesion is not asymmetric.", NEV, {"symmetry": ("symmetric",)}, ()),
        ("The lesion is not asymmetric.", dict(NEV, symm_2axis=0.12), {}, ("symmetry_mismatch",)),
        (
            "Asymmetry: symmetric\nBorder: regular\nColour variation: uniform",
            NEV,
            {"symmetry": ("symmetric",), "borders": ("regular",), "colour_variation": ("uniform",)},
            (),
        ),
        (
            "There is no asymmetry, border irregularity or colour variegation.",
            NEV,
            {"symmetry": ("symmetric",), "borders": ("regular",), "colour_variation": ("uniform",)},
            (),
        ),
        (
            "Not asymmetric, with an irregular border.",
            NEV,
            {"symmetry": ("symmetric",), "borders": ("irregular",)},
            ("border_mismatch",),
        ),
        ("Lack of symmetry is noted.", NEV, {"symmetry": ("asymmetric",)}, ("symmetry_mismatch",)),
        ("Regular follow-up in a small number of cases.", NEV, {"borders": (), "size_words": ()}, ()),
        ("Non-uniform pigmentation.", NEV, {"colour_variation": ("variegated",)}, ("colour_variation_mismatch",)),
        ("Non-melanoma skin cancer.", dict(diagnosis="BCC"), {"diagnoses": (), "malignancy": ("malignant",)}, ()),
        ("A potentially malignant lesion.", dict(diagnosis="ACK"), {"malignancy": ("premalignant",)}, ()),
        ("Malignant lesion.", dict(diagnosis="ACK"), {}, ("malignancy_mismatch",)),
        ("A woman in her 40s.", dict(age_approx=45, sex="female"), {"ages": ((40.0, 49.0),)}, ()),
        ("A woman in her 40s.", dict(age_approx=70, sex="female"), {}, ("age_mismatch",)),
        (
            "On the other hand, the lesion on the back of his hand is small.",
            dict(anatom_site="upper extremity"),
            {"sexes": ("male",)},
            (),
        ),
        (
            "Area 12.5 mm², Diameter: small (under 3 mm).",
            dict(long_diam_mm=2.4),
            {"diameters_mm": (), "diameter_bounds_mm": ((0.0, 3.0),), "size_words": ("small",)},
            (),
        ),
        (
            "Diameter: medium (between 3 and 6 mm).",
            dict(long_diam_mm=4.0),
            {"diameters_mm": (), "diameter_bounds_mm": ((3.0, 6.0),), "size_words": ("medium",)},
            (),
        ),
        ("Larger than 18 mm.", dict(long_diam_mm=7.0), {"diameter_bounds_mm": ((18.0, float("inf")),)}, ("size_mismatch",)),
        ("Measuring 2-3 mm.", dict(long_diam_mm=7.0), {"diameter_bounds_mm": ((2.0, 3.0),)}, ("size_mismatch",)),
        ("A 4 mm lesion with 2 mm margins, 0.4 mm thick.", dict(long_diam_mm=4.1), {"diameters_mm": (4.0,)}, ()),
        ("A large lesion.", dict(long_diam_mm=2.0), {}, ("size_mismatch",)),
        ("Measures 0.5 cm.", dict(long_diam_mm=5.2), {"diameters_mm": (5.0,)}, ()),
        (
            "Symmetric lesion. It is asymmetric on the left.",
            NEV,
            {"contradictions": ("symmetric/asymmetric",)},
            ("symmetry_mismatch", "self_contradiction"),
        ),
        (
            "Benign features; however, it is malignant.",
            NEV,
            {"contradictions": ("benign/malignant",)},
            ("malignancy_mismatch", "self_contradiction"),
        ),
        (
            "Well-defined and ill-defined borders.",
            NEV,
            {"contradictions": ("well-defined/ill-defined",)},
            ("self_contradiction",),
        ),
        ("Lesion on the left shin.", dict(anatom_site="upper extremity"), {}, ("site_mismatch",)),
        ("The lesion came back after cryotherapy.", dict(anatom_site="upper extremity"), {"sites": ()}, ()),
        ("Seborrheic keratosis.", dict(diagnosis="BKL"), {"diagnoses": ("SEK",)}, ()),
        # What a condition usually is, from the general word to the end of the sentence, is not this lesion.
        (
            "It is usually found on the legs and is typically large. This lesion, on the arm, is small.",
            dict(anatom_site="upper extremity", long_diam_mm=2.0),
            {"sites": (("arm", frozenset({"upper extremity"})),), "size_words": ("small",)},
            (),
        ),
        (
            "A benign melanoma, which is a type of skin cancer that is often curable.",
            dict(diagnosis="NEV"),
            {"malignancy": ("benign", "malignant")},
            ("diagnosis_mismatch", "malignancy_mismatch", "self_contradiction"),
        ),
        ("The condition affects only male patients.", dict(sex="female"), {"sexes": ()}, ()),
        # Values offered as alternatives choose none; "uniform border" is the border's.
        ("It may be small, medium, or large, and benign or malignant.", dict(long_diam_mm=2.0), {"size_words": ()}, ()),
        (
            "A brown lesion with a uniform border.",
            dict(NEV, norm_border=1.4),
            {"borders": ("regular",), "colour_variation": ()},
            ("border_mismatch",),
        ),
        (
            "A normal colour distribution.",
            dict(NEV, norm_color=4.0),
            {"colour_variation": ("uniform",)},
            ("colour_variation_mismatch",),
        ),
        ("The diagnosis was confirmed by a biopsy.", NEV, {"history": ("was confirmed",)}, ("invented_history",)),
        # The patient's past and other lesions are not this lesion's diagnosis, malignancy or site.
        (
            "A history of skin conditions such as acne and eczema. The lesion is a benign nevus.",
            NEV,
            {"diagnoses": ("NEV",)},
            ("invented_history",),
        ),
        ("14 years ago, diagnosed with a melanoma.", NEV, {"diagnoses": ()}, ("invented_history",)),
        # "4.5" ends no sentence: the cue still reaches "acne"
        ("Symptoms include a 4.5 mm rash, acne and eczema. A nevus.", NEV, {"diagnoses": ("NEV",)}, ("invented_history",)),
        ("No other identified malignancies were present.", dict(diagnosis="MEL"), {"malignancy": ()}, ()),
        ("Her hair was examined for cancer cells.", NEV, {"malignancy": ()}, ()),
        ("A benign sebrerokeratin keratoderma.", dict(diagnosis="SEK"), {"diagnoses": ("SEK",)}, ()),
        (
            "She has a large abdomen; the nevus is on her back.",
            dict(anatom_site="posterior torso"),
            {"sites": (("her back", frozenset({"posterior torso"})),)},
            (),
        ),
        ("A rash on the face, neck, arms and legs.", dict(anatom_site="head/neck"), {}, ("site_mismatch",)),
        ("A history of skin lesions on the legs.", dict(anatom_site="head/neck"), {"sites": ()}, ("invented_history",)),
        # Other lengths: a border's, the patient's, an average.
        ("It measures 6.1 mm and has a border of 3 mm.", dict(long_diam_mm=6.1), {"diameters_mm": (6.1,)}, ()),
        ("The patient is 19 cm tall.", dict(long_diam_mm=4.8), {"diameters_mm": ()}, ()),
        ("2.1 mm against an average measurement of 4.9 mm.", dict(long_diam_mm=2.1), {"diameters_mm": (2.1,)}, ()),
        ("The patient's symptoms include no visible signs of infection.", NEV, {"history": ()}, ()),
        ("It has a combination of symmetrical and asymmetrical features.", NEV, {"symmetry": ()}, ()),
        ("It was symmetrical in one axis. It has an asymmetric border.", NEV, {"symmetry": (), "borders": ()}, ()),
        (
            "Marked by a symmetrical asymmetry.",
            NEV,
            {"symmetry": ("symmetric", "asymmetric")},
            ("symmetry_mismatch", "self_contradiction"),
        ),
        ("No other visible signs of malignancy were found.", dict(diagnosis="BCC"), {"malignancy": ()}, ()),
        (
            "Previously diagnosed with a benign nevus, but evaluation revealed a melanoma.",
            dict(diagnosis="MEL"),
            {"diagnoses": ("MEL",)},
            ("invented_history",),
        ),
        ("Melanomas are a type of skin cancer. This lesion is a nevus.", NEV, {"diagnoses": ("NEV",)}, ()),
        ("A tendency to have moles and a predisposition to cancer.", dict(diagnosis="BCC"), {"diagnoses": ()}, ()),
        ("The diagnosis was confirmed by a thorough examination.", NEV, {"history": ()}, ()),
        ("On the palm of the hand.", dict(anatom_site="upper extremity"), {}, ()),
        ("On the posterior torso, near the abdomen.", dict(anatom_site="posterior torso"), {}, ()),
        ("Measured with a standard deviation of 1.5 mm.", dict(long_diam_mm=5.7), {"diameters_mm": ()}, ()),
    ],
)
def test_tricky_phrasing(note, row, facts, codes):
    result = audit_note(note, _row(**row))
    for name, expected in facts.items():
        assert getattr(result.facts, name) == expected, (note, name, result.facts)
    assert result.codes == codes, (note, result.flag_strings())


def test_flags_serialize_and_aggregate():
    row = _row(age_approx=45, sex="male", diagnosis="NEV")
    result = audit_note("A 45-year-old woman with a nevus.", row)
    assert result.flag_strings() == ["sex_mismatch:stated=female,true=male"]
    clean = audit_note("A 45-year-old man with a nevus.", row)
    results = [result, clean, audit_note("A 70-year-old woman with melanoma.", row)]
    assert hallucination_rate(results) == pytest.approx(2 / 3)
    assert flag_counts(results) == {"sex_mismatch": 2, "age_mismatch": 1, "diagnosis_mismatch": 1}
    assert all(s.count(":") == 1 and s.count(",") == 1 for r in results for s in r.flag_strings())


def test_threshold_band_accepts_either_word_near_a_threshold():
    row = _row(symm_2axis=0.052)  # just above the asymmetry threshold 0.05
    assert audit_note("Symmetric.", row).codes == ("symmetry_mismatch",)
    assert audit_note("Symmetric.", row, Tolerance(threshold_band=0.1)).codes == ()


def test_sites_cover_the_schema():
    for site in ANATOMIC_SITES:
        facts = extract_facts(f"A lesion on the {SITE_PHRASES[site]}.")
        assert [allowed for _, allowed in facts.sites] == [frozenset({site})]


def test_the_lexicon_names_only_sites_codes_and_words_that_exist():
    from dermaray.notes.audit import _compile_terms
    from dermaray.notes.lexicon import Fact, Words

    with pytest.raises(ValueError, match="upper limb"):  # sites are looked up by name
        _compile_terms((), [(r"arm", ("upper limb",))])
    with pytest.raises(ValueError, match="XYZ"):
        _compile_terms([Fact("diagnosis", (Words("XYZ", (r"xyz",)),))], ())
    with pytest.raises(ValueError, match="huge"):  # size words are the size categories of prompts.py
        _compile_terms([Fact("size_word", (Words("huge", (r"huge",)),))], ())
    with pytest.raises(ValueError, match="asymmetric"):
        _compile_terms(
            [Fact("symmetry", (Words("symmetric", (r"symmetric",)),), contradictions=(("symmetric", "asymmetric"),))], ()
        )
