"""Faithfulness audit of a clinical note against its lesion's metadata.

`extract_facts` reads what a note claims with keyword rules (the paper's check is keyword
based too): diagnosis, malignancy, age, sex, site, size, colour, contrast, border, symmetry,
colour variation and patient history, each claim with its polarity. A term within a short window after a
negation cue ("no", "not", "without", "absence of", ...) is negated: for the two-valued
attributes that is a claim of the opposite ("not asymmetric" = symmetric); for the rest it
is no claim. A term after a hedge ("rule out", "differential", "history of", ...) or
followed by "was ruled out" / "is unlikely" is no claim. A term followed by ":" is a field
label ("Asymmetry: symmetric"), not a claim, and a line listing a form's options ("Border:
regular | slightly irregular | markedly irregular") claims nothing.

`audit_note` compares the claims with the row, using the thresholds of prompts.py, so a
strategy-M note is never flagged. A fact the note does not state, or whose truth is None,
is never flagged. Colours are compared with the colour word of the lesion's mean L*a*b*
(neighbouring shades accepted, `COMPATIBLE_COLOURS`), contrast with the word of
delta_lb_norm. The lesion table holds no history, symptoms or procedures, so any affirmed
one ("rapidly growing", "bleeding", "underwent a biopsy") is `invented_history`; plans
("excision is recommended") are not history.

Not audited: lesion type words (macule, papule, nodule), dermoscopic structures (dots,
globules, vessels), border sharpness (well- / ill-defined: recorded, not compared), colours of
anything but the lesion, vague qualifiers ("normal colour", "moderate symmetry"), and numbers
other than ages and the lesion's length (areas, perimeters, margins).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from dermaray.notes.prompts import (
    ASYMMETRIC_MIN_SYMM_2AXIS,
    colour_name,
    contrast_word,
    IRREGULAR_MIN_NORM_BORDER,
    SIZE_BANDS_MM,
    VARIEGATED_MIN_NORM_COLOR,
    _number,
    lesion_diameter_mm,
    malignancy_word,
)
from dermaray.schema import ANATOMIC_SITES

FLAG_CODES: tuple[str, ...] = (
    "diagnosis_mismatch",
    "malignancy_mismatch",
    "age_mismatch",
    "sex_mismatch",
    "site_mismatch",
    "size_mismatch",
    "symmetry_mismatch",
    "border_mismatch",
    "colour_variation_mismatch",
    "colour_mismatch",
    "contrast_mismatch",
    "invented_history",
    "self_contradiction",
)

_I = re.IGNORECASE


def _words(*alternatives: str) -> str:
    return r"\b(?:" + "|".join(alternatives) + r")(?!\w)"


# --- Lexicon: (kind, value, pattern) -------------------------------------------------------

_DIAGNOSIS_TERMS: dict[str, tuple[str, ...]] = {
    "MEL": (r"melanomas?", r"lentigo maligna"),
    "NEV": (r"na?ev(?:us|i|uses)", r"moles?"),
    "BCC": (r"basal[- ]cell carcinomas?", r"basaliomas?", r"rodent ulcers?"),
    "SCC": (r"squamous[- ]cell carcinomas?", r"bowen'?s disease"),
    "ACK": (r"(?:actinic|solar) keratos[ei]s",),
    "SEK": (r"seb[oe]rr?h?o?eic keratos[ei]s", r"seb[oe]rr?h?o?eic warts?"),
    "DF": (r"dermatofibromas?", r"(?:benign )?fibrous histiocytomas?"),
    "VASC": (
        r"ha?emangiomas?", r"(?:cherry )?angiomas?", r"angiokeratomas?", r"pyogenic granulomas?",
        r"vascular (?:lesion|malformation|tumou?r)s?",
    ),  # fmt: skip
    "BKL": (
        r"benign keratos[ei]s", r"(?:benign )?lichenoid keratos[ei]s", r"lichen planus[- ]like keratos[ei]s",
        r"solar lentig(?:o|ines)",
    ),  # fmt: skip
    # Not one of the classes: always a contradiction when affirmed.
    "OTHER": (
        r"[\w-]+ syndrome", r"\w*hyperplasias?", r"\w*sarcomas?", r"lymphomas?", r"psoriasis", r"eczema", r"\w*dermatitis",
        r"\w*keratoderma\w*", r"epidermolysis",
        r"warts?", r"verruca\w*", r"cysts?", r"lipomas?", r"keratoacanthomas?", r"rosacea", r"vitiligo", r"acne",
    ),  # fmt: skip
}
# Codes written as abbreviations, matched case-sensitively ("df" is not a diagnosis).
_ABBREVIATIONS = {
    "MEL": "MEL", "BCC": "BCC", "SCC": "SCC", "AK": "ACK", "ACK": "ACK", "SK": "SEK", "SEK": "SEK", "DF": "DF",
    "VASC": "VASC", "BKL": "BKL", "NEV": "NEV",
}  # fmt: skip
# Labels that mean the same class in practice (HAM10000's bkl includes seborrheic keratoses).
_COMPATIBLE_DIAGNOSES: dict[str, frozenset[str]] = {
    "SEK": frozenset({"SEK", "BKL"}),
    "BKL": frozenset({"SEK", "BKL"}),
}

_MALIGNANCY_TERMS = (
    (
        "premalignant",
        (
            r"pre-?malignan\w*", r"pre-?cancerous", r"potentially malignant", r"indeterminate superclass",
            r"superclass\W+indeterminate",
        ),  # fmt: skip
    ),
    ("malignant", (r"malignan(?:t|cy|cies)", r"cancer(?:ous|s)?")),
    ("not-malignant", (r"non-?malignant", r"non-?cancerous")),
    ("benign", (r"benign(?:ly)?",)),
)

_LESION_NOUN = (
    r"\b(?:lesions?|macules?|papules?|nodules?|plaques?|patch(?:es)?|moles?|spots?|growths?|tumou?rs?|neoplasms?"
    r"|na?ev(?:us|i)|melanomas?|keratos[ei]s|carcinomas?|dermatofibromas?|\w*angiomas?|lentig\w*)\b"
)
_NEEDS_BORDER_NOUN = re.compile(r"(?:ir)?regular|smooth|uneven", re.IGNORECASE)  # unlike "notched"
_BORDER_NOUN = r"\b(?:borders?|margins?|edges?|outlines?|contours?|periphery|circumscri\w*)\b"  # not "shape": outline irregularity is asymmetry as much

H, U, L, A, P, PS, OG = ANATOMIC_SITES
# "the back", but not "the back of the hand" (that is the hand).
_BACK_EXCLUDED = (
    r"(?!\s+of\s+(?:the\s+|his\s+|her\s+|their\s+|a\s+)?"
    r"(?:hands?|neck|head|knees?|thighs?|legs?|(?:fore)?arms?|ears?|feet|foot|calf|calves|wrists?|scalp|fingers?)\b)"
)
_SITE_TERMS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (pattern, frozenset(sites))
    for pattern, sites in (
        (r"head(?:\s*/\s*|\s+(?:and|or)\s+)neck", {H}),
        (
            r"head|face|facial|scalp|neck|forehead|temples?|cheeks?|nose|nasal|chin|jaw(?:line)?|ears?|eyelids?"
            r"|periorbital|(?:pre|post)auricular",
            {H},
        ),
        (r"lips?", {H, OG}),
        (r"upper[- ](?:extremit(?:y|ies)|limbs?)", {U}),
        (r"(?:fore|upper )?arms?|elbows?|wrists?|antecubital", {U}),
        (r"(?<!other )hands?|fingers?|thumbs?|knuckles?", {U, PS}),
        (r"shoulders?|deltoid", {U}),
        (r"lower[- ](?:extremit(?:y|ies)|limbs?)", {L}),
        (r"(?:lower )?legs?|thighs?|knees?|shins?|calf|calves|ankles?|pretibial|popliteal", {L}),
        (r"feet|foot|toes?|heels?", {L, PS}),
        (r"hips?|buttocks?|gluteal", {L, A, P}),
        (
            r"anterior (?:torso|trunk)|(?:upper )?chest(?: wall)?|abdomen|abdominal|breasts?|sternal|sternum|belly"
            r"|inframammary|umbilic\w*|epigastri\w*",
            {A},
        ),
        (r"posterior (?:torso|trunk)|scapular?|interscapular|lumbar|sacral|(?:lower|upper|mid)[- ]back", {P}),
        (r"(?:the|his|her|their|patient's|left|right|on)\s+back" + _BACK_EXCLUDED, {P}),
        (r"torso|trunk|flanks?", {A, P}),
        (r"palms?(?:\s*/\s*|\s+(?:and|or)\s+)soles?|palms?|palmar|soles?(?=\s+of\b)|soles|plantar|acral", {PS}),
        (
            r"oral(?:\s*/\s*|\s+(?:and|or)\s+)genital(?:\s+mucosa\w*)?|oral|mouth|genital\w*|vulva\w*|penile|penis"
            r"|scrot\w*|perianal|perineal|mucosa\w*",
            {OG},
        ),
        (r"groin|inguinal", {OG, L, A}),
    )
)

# kind, value, pattern, weak (a weak term is a claim only when negated: "lack of symmetry").
_TERMS: list[tuple[str, str, re.Pattern[str], bool]] = []


def _add(kind: str, value: str, alternatives: Iterable[str], weak: bool = False, flags: int = _I) -> None:
    _TERMS.append((kind, value, re.compile(_words(*alternatives), flags), weak))


for _code, _alternatives in _DIAGNOSIS_TERMS.items():
    _add("diagnosis", _code, _alternatives)
for _abbreviation, _code in _ABBREVIATIONS.items():  # "(SK)" after a name abbreviates it, whatever it is
    _add("diagnosis", _code, [r"(?<!\()" + _abbreviation + "s?"], flags=0)
for _value, _alternatives in _MALIGNANCY_TERMS:
    _add("malignancy", _value, _alternatives)
_add("symmetry", "symmetric", [r"symmetric(?:al|ally)?", r"normal symmetry"])
_add("symmetry", "asymmetric", [r"asymmetric(?:al|ally)?", r"asymmetry", r"asymmetries"])
_add("symmetry", "symmetric", [r"symmetry"], weak=True)
_add("border", "irregular", [r"irregular(?:ly|ity|ities)?", r"uneven"])  # needs a border noun nearby
_add("border", "regular", [r"regular(?:ly|ity)?", r"smooth"])
_add("border", "irregular", [r"notched", r"jagged", r"scalloped"])
_add(
    "definition",
    "well-defined",
    [r"well[- ](?:defined|circumscribed|demarcated)", r"(?:sharply|clearly) (?:defined|demarcated|circumscribed)"],
)
_add(
    "definition",
    "ill-defined",
    [r"ill[- ]defined", r"poorly (?:defined|circumscribed|demarcated)", r"indistinct", r"blurred", r"fuzzy"],
)
_add(
    "variation",
    "uniform",
    [
        r"uniform(?:ly)?", r"homogene?ous(?:ly)?", r"evenly (?:pigmented|colou?red)", r"monochrom\w*",
        r"(?:single|one) colou?r",
    ],  # fmt: skip
)
_add(
    "variation",
    "variegated",
    [
        r"variegat\w*", r"(?:in|hetero)homogene?ous(?:ly)?", r"heterogene?ous(?:ly)?", r"non-?uniform(?:ly)?",
        r"multi-?colou?red", r"(?:multiple|several|two|three|many|various) colou?rs", r"mottled",
        r"unevenly (?:pigmented|colou?red)", r"irregular(?:ly)? pigment\w*",
    ],
)  # fmt: skip
_add("size_word", "small", [r"tiny", r"small"])
_add("size_word", "medium", [r"medium(?:-sized)?", r"mid-sized", r"moderate-sized"])
_add("size_word", "large", [r"large", r"big", r"sizea?ble"])
for _pattern, _sites in _SITE_TERMS:
    _add("site", "|".join(sorted(_sites)), [_pattern])
# Lesion colours: a stated word -> its canonical name; -ish forms count ("pinkish" = pink).
_COLOUR_TERMS: dict[str, str] = {
    r"red(?:dish)?[- ]brown": "red-brown", r"dark[- ]brown": "dark brown", r"(?:light|tan)[- ]brown": "light brown",
    r"brown(?:ish)?": "brown", r"black(?:ish)?": "black", r"tan": "tan", r"pink(?:ish)?": "pink",
    r"red(?:dish)?": "red", r"purpl(?:e|ish)": "purple", r"violaceous": "violaceous", r"red-purple": "red-purple",
    r"blu(?:e|ish)(?:-gr[ae]y)?": "blue", r"gr[ae]y(?:ish)?": "grey", r"white|whitish": "white",
    r"yellow(?:ish)?": "yellow", r"(?:skin|flesh)[- ]colou?red": "skin-coloured",
}  # fmt: skip
# Which stated colours a lesion of each measured colour (prompts.colour_name) may be called: its own
# name and neighbouring shades.
COMPATIBLE_COLOURS: dict[str, frozenset[str]] = {
    name: frozenset({name, *others})
    for name, others in (
        ("black", ("dark brown",)),
        ("dark brown", ("brown", "black")),
        ("brown", ("dark brown", "light brown", "red-brown", "tan")),
        ("light brown", ("brown", "tan")),
        ("tan", ("light brown", "brown", "skin-coloured")),
        ("red-brown", ("brown", "dark brown", "red", "pink")),
        ("pink", ("red", "red-brown", "skin-coloured")),
        ("red-purple", ("red", "purple", "violaceous", "pink", "red-brown")),
        ("grey", ("blue", "black")),
        ("skin-coloured", ("tan", "pink", "white")),
    )
}
_COLOUR = re.compile(
    r"\b(" + "|".join(f"(?:{p})" for p in _COLOUR_TERMS) + r")(?:\s*(?:-|to|and|/)\s*(" +
    "|".join(f"(?:{p})" for p in _COLOUR_TERMS) + r"))?(?!\w)", _I,
)
# A colour is the lesion's when a lesion noun or a colour noun follows it ("pink papule", "pinkish
# hue"), or a copula or "colour" precedes it ("is red-brown", "colour: tan", "colour of light brown").
_COLOUR_HEAD = re.compile(
    r"^[\s,]*(?:(?:[\w-]+)\s+){0,2}?(?:colou?r(?:ed|ation)?|hue|tint|pigment(?:ed|ation)?|tones?|appearance|"
    r"lesions?|macules?|papules?|nodules?|plaques?|patch(?:es)?|moles?|spots?|blotch(?:es)?|growths?|na?ev(?:us|i))\b", _I)
_COLOUR_LEAD = re.compile(
    r"(?:\b(?:is|are|was|were|be|appears?|appearing|looks?|seems?)(?:\s+to\s+be)?|colou?r(?:ed)?(?:\s+(?:of|is|was))?\s*:?|"
    r"\bin\s+colou?r\s+(?:is)?)\s*[\"'“]?\s*(?:(?:a|an|mostly|predominantly|uniformly|slightly|light(?:ly)?|mainly)\s+)?$", _I)
# Not the lesion's own colour: the skin around it, its border, structures inside it.
_COLOUR_OTHER = re.compile(
    r"^[\s,]*(?:[\w-]+\s+){0,1}?(?:dots?|globules?|streaks?|network|veil|scales?|crusts?|lines?|structures?|areas?|"
    r"borders?|rims?|halo|vessels?|cells?|skin|surrounding)\b", _I)
_SKIN_BEFORE = re.compile(r"\b(?:skin|surrounding|background|halo|hair|eyes?)\b[^.;]{0,25}$", _I)

_CONTRAST = re.compile(
    r"\b(low|weak|poor|faint|subtle|moderate|medium|intermediate|high|strong|marked|stark|sharp)(?:[- ](?:degree|level)\s+of)?"
    r"[- ]contrast\b|\bcontrast\b[^.;:]{0,40}?(?::|\bis\b|\bwas\b)\s*(low|moderate|medium|high)\b", _I)
_CONTRAST_WORDS = {"low": "low", "weak": "low", "poor": "low", "faint": "low", "subtle": "low", "moderate": "moderate",
                   "medium": "moderate", "intermediate": "moderate", "high": "high", "strong": "high", "marked": "high",
                   "stark": "high", "sharp": "high"}  # fmt: skip

# Patient history, symptoms, evolution and procedures: the lesion table holds none of them.
_HISTORY = re.compile(_words(
    r"(?:medical |family |personal |past |previous |prior )?history of", r"has had", r"had (?:a |an )?(?:previous|prior)",
    # "diagnosed with melanoma" states the diagnosis (audited as such); who diagnosed it, and when, is history.
    r"previously (?:diagnosed|treated|had|been|excised|removed|biopsied)", r"diagnosed (?:by|earlier|in \d+)", r"underwent", r"undergone", r"biops(?:y|ies) (?:showed|revealed|confirmed|found)",
    r"(?:was|were|been|has been) (?:excised|removed|treated|biopsied|operated)", r"treated (?:a|the|this) patient",
    r"bleed(?:s|ing)?", r"bled", r"itch(?:es|ing|y)?", r"pruritic", r"pruritus", r"painful", r"pain", r"tender(?:ness)?",
    r"(?:rapid(?:ly)?|quickly|recently) (?:grow\w*|enlarg\w*|chang\w*)", r"grow(?:s|ing|n) (?:rapidly|quickly|in size)",
    r"(?:recent|rapid) (?:growth|change|enlargement)", r"chang(?:ed|ing) in (?:size|shape|colou?r)", r"ulcerat(?:ed|ion|ing)",
    r"ooz(?:es|ing)", r"crust(?:ed|ing)", r"symptoms? (?:include|includes|included|of|such as|are|were)",
    r"complain(?:s|ed|ing|t)?(?: of)?", r"(?:patient |he |she |they )?reports?", r"reported", r"sunburns?",
    r"sun[- ]exposure", r"tanning", r"allergic reaction", r"medications?", r"surgery", r"surgical (?:excision|removal)",
    r"for (?:the (?:past|last) )?(?:several |many |a few |\d+ )(?:days|weeks|months|years)", r"since (?:childhood|birth)",
    r"(?:earlier|last) (?:this )?(?:year|month|week)", r"(?:years|months|weeks) ago", r"experienc(?:e|es|ed|ing)",
    r"bone density", r"lifestyle", r"(?:radiographic |medical )?imaging", r"x-?rays?", r"blood tests?", r"blood on",
    r"prior (?:medical|skin) (?:conditions?|history)",
), _I)
# A procedure as a plan is not history: "excision is recommended", "biopsy to confirm".
_PLAN = re.compile(_words(r"recommend\w*", r"advis\w*", r"should", r"consider\w*", r"plan\w*", r"warrant\w*",
                          r"may need", r"needs?", r"schedul\w*", r"refer\w*", r"would", r"if"), _I)

_OPPOSITE = {
    "symmetric": "asymmetric", "asymmetric": "symmetric", "regular": "irregular", "irregular": "regular",
    "uniform": "variegated", "variegated": "uniform", "well-defined": "ill-defined", "ill-defined": "well-defined",
    "malignant": "not-malignant",  # "no signs of malignancy"
}  # fmt: skip
_CONTRADICTIONS = (
    ("symmetry", "symmetric", "asymmetric"),
    ("malignancy", "benign", "malignant"),
    ("malignancy", "not-malignant", "malignant"),
    ("border", "regular", "irregular"),
    ("variation", "uniform", "variegated"),
    ("definition", "well-defined", "ill-defined"),
)

# --- Polarity cues -------------------------------------------------------------------------

# Sentence and clause ends; "4.2" and "vs." are not sentence ends.
_TERMINATOR = re.compile(
    r"(?<!\bvs)(?<!e\.g)(?<!i\.e)(?<!approx)\.(?=\s|$)|[;!?\n]"
    r"|\b(?:but|however|although|though|yet|whereas|while|which|except|apart from|aside from)\b",
    _I,
)
_NEGATION = re.compile(
    _words(
        r"no", r"not", r"without", r"absence of", r"absent", r"lack of", r"lacks", r"lacking", r"loss of",
        r"free of", r"negative for", r"never", r"neither", r"nor", r"denies",
    ) + r"|n't\b",
    _I,
)  # fmt: skip
# Hedges whose scope runs to the end of the sentence ("differential: DF, nevus, melanoma").
_LIST_HEDGE = re.compile(_words(r"differentials?", r"ddx", r"d/dx", r"versus", r"vs\.?"), _I)
# Hedges with a short scope that stops at a comma.
_HEDGE = re.compile(
    _words(
        r"rule[sd]? out", r"ruling out", r"r/o", r"to exclude", r"exclude[sd]?", r"excluding", r"rather than",
        r"instead of", r"unlikely to be", r"mimic\w*", r"other than", r"distinguish\w* (?:it )?from",
        r"(?:argu\w*|speaks?|points?) against", r"against", r"history of", r"risk of", r"potential for",
        r"progress\w* (?:to|into)", r"transform\w*", r"evolv\w* into",
        r"screen\w* for", r"monitor\w* for", r"surveillance for", r"if", r"whether", r"symptoms? includ\w*",
        r"possib(?:le|ly)", r"potential(?:ly)?", r"may (?:indicate|be|have|represent|suggest)", r"might", r"could",
    ),
    _I,
)  # fmt: skip
# After the term, up to two words ("malignant melanoma cannot be excluded"), then verbs.
_POST_BE = (
    r"^[\s*]*(?:[\w-]+\s+){0,2}?"
    r"(?:(?:is|was|were|are|be|been|has|have|cannot|can't|could|can|not|appears?|seems?|considered|thought)\s+)*"
)
_POST_NEGATION = re.compile(
    _POST_BE + r"(?:absent|not (?:seen|present|observed|noted|identified|evident|apparent|visible|detected))\b", _I
)
_POST_HEDGE = re.compile(
    _POST_BE + r"(?:ruled out|excluded|unlikely|less likely|not (?:suspected|favou?red|likely|considered|supported))\b",
    _I,
)
_LABEL = re.compile(r"^[\s*_]*:")
_OR = re.compile(r"\b(?:or|nor)\b", _I)
_WORD = re.compile(r"\w+")
NEGATION_WINDOW_WORDS = 6
HEDGE_WINDOW_WORDS = 5
LIST_HEDGE_WINDOW_WORDS = 14
LIST_WINDOW_WORDS = 12  # a negated list

# --- Non-lexicon facts ---------------------------------------------------------------------

_AGES = (
    re.compile(r"\b(\d{1,3})\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old\b", _I),
    re.compile(r"\b(\d{1,3})\s*y/?o\b", _I),
    re.compile(r"\b(\d{1,3})\s+years?\s+of\s+age\b", _I),
    re.compile(
        r"\baged?\s*[:=]?\s*(?:about|approximately|approx\.?|around|~)?\s*(\d{1,3})\b(?!\s*(?:mm|cm|%|-?\s*year))", _I
    ),
)
_DECADE = re.compile(r"\bin\s+(?:his|her|their)\s+(?:early\s+|mid-?\s*|late\s+)?(\d)0'?s\b", _I)
_MALE = re.compile(_words(r"male", r"man", r"gentleman", r"boy", r"he", r"him", r"his"), _I)
_FEMALE = re.compile(_words(r"female", r"woman", r"lady", r"girl", r"she", r"hers?"), _I)

_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"(mm|millimet(?:er|re)s?|cm|centimet(?:er|re)s?|inch(?:es)?)"
_NOT_AREA = r"(?!\w|\s*(?:²|\^2|squared))"
_DIMENSIONS = re.compile(rf"{_NUM}\s*(?:{_UNIT}\s*)?(?:x|×|by)\s*{_NUM}\s*-?\s*{_UNIT}{_NOT_AREA}", _I)
_LENGTH = re.compile(rf"{_NUM}\s*-?\s*{_UNIT}{_NOT_AREA}", _I)
# A bound or a range before a length: "over 6 mm", "under 3 mm", "3 to 6 mm", "between 3 and 6 mm".
_UPPER_BOUND = re.compile(
    r"(?:[<≤]|\bunder|less than|smaller than|below|up to|at most|no (?:more|larger|bigger) than)\s*$", _I
)
_LOWER_BOUND = re.compile(
    r"(?:[>≥]|\bover|more than|greater than|larger than|bigger than|exceed\w*|above|at least)\s*$", _I
)
_RANGE_START = re.compile(rf"{_NUM}\s*(?:{_UNIT})?\s*(?:-|–|to|and)\s*$", _I)
_OTHER_LENGTH = re.compile(
    r"\b(?:perimeter|circumference|minor|short|thick\w*|depth|deep|breslow|margins?|away|apart|area)\b", _I
)
_COMPARED = re.compile(r"^\W*(?:longer|shorter|larger|smaller|bigger|wider|more|less)\b", _I)  # "1.4 mm longer than"
_WIDTH = re.compile(r"\b(?:width|wide|broad)\b", _I)  # a width is at most the long diameter: a lower bound on it


@dataclass(frozen=True)
class Facts:
    """What a note claims (affirmed, after negation and hedges), in order of first mention."""

    diagnoses: tuple[str, ...] = ()  # class codes
    malignancy: tuple[str, ...] = ()  # benign / premalignant / malignant
    ages: tuple[tuple[float, float], ...] = ()  # stated age ranges (a single age: lo == hi)
    sexes: tuple[str, ...] = ()
    sites: tuple[tuple[str, frozenset[str]], ...] = ()  # (words, the canonical sites they allow)
    diameters_mm: tuple[float, ...] = ()  # measurements
    diameter_bounds_mm: tuple[tuple[float, float], ...] = ()  # "over 6 mm": (6, inf); "3 to 6 mm": (3, 6)
    size_words: tuple[str, ...] = ()  # small / medium / large
    colours: tuple[str, ...] = ()  # the lesion's colour, as stated ("pink", "dark brown")
    contrasts: tuple[str, ...] = ()  # low / moderate / high contrast with the surrounding skin
    history: tuple[str, ...] = ()  # history, symptoms, procedures (the words)
    borders: tuple[str, ...] = ()  # regular / irregular
    border_definition: tuple[str, ...] = ()  # well-defined / ill-defined (recorded, not audited)
    symmetry: tuple[str, ...] = ()
    colour_variation: tuple[str, ...] = ()  # uniform / variegated
    contradictions: tuple[str, ...] = ()  # "symmetric/asymmetric", ...


@dataclass(frozen=True)
class Flag:
    code: str
    stated: str
    true: str

    def __str__(self) -> str:
        clean = lambda s: re.sub(r"[,=:]", ";", s)  # noqa: E731 - keep the string parseable
        return f"{self.code}:stated={clean(self.stated)},true={clean(self.true)}"


@dataclass(frozen=True)
class AuditResult:
    facts: Facts
    flags: tuple[Flag, ...] = ()

    @property
    def hallucinated(self) -> bool:
        return bool(self.flags)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.code for f in self.flags))

    def flag_strings(self) -> list[str]:
        """Short strings for a Parquet list column: "sex_mismatch:stated=female,true=male"."""
        return [str(f) for f in self.flags]


@dataclass(frozen=True)
class Tolerance:
    age_years: float = 5.0  # ages are 5-year bins
    size_relative: float = 0.35
    size_absolute_mm: float = 1.0
    # Relative band around each word threshold (symmetry, border, colour variation) where
    # either word is accepted; 0 = exactly the thresholds of prompts.py.
    threshold_band: float = 0.0


@dataclass(frozen=True)
class _Hit:
    kind: str
    value: str
    start: int
    end: int
    weak: bool


def _terms(text: str) -> list[_Hit]:
    """Every lexicon hit; within one kind the longest of overlapping hits wins."""
    hits = [
        _Hit(kind, value, m.start(), m.end(), weak)
        for kind, value, pattern, weak in _TERMS
        for m in pattern.finditer(text)
    ]
    hits.sort(key=lambda h: (h.start, -(h.end - h.start)))
    kept: list[_Hit] = []
    for hit in hits:
        if not any(k.kind == hit.kind and k.start < hit.end and hit.start < k.end for k in kept):
            kept.append(hit)
    return kept


def _clause_start(text: str, position: int) -> int:
    start = 0
    for m in _TERMINATOR.finditer(text, 0, position):
        start = m.end()
    return start


def _clause_end(text: str, position: int) -> int:
    m = _TERMINATOR.search(text, position)
    return m.start() if m else len(text)


def _word_count(text: str) -> int:
    return len(_WORD.findall(text))


def _polarity(text: str, hit: _Hit, hits: list[_Hit], hedges: bool = True) -> str:
    """"affirmed", "negated" or "hedged" (`hedges=False`: hedge cues are not looked for)."""
    after = re.split(r"[,.;:!?\n(]", text[hit.end : hit.end + 60], maxsplit=1)[0]
    if _POST_HEDGE.match(after):
        return "hedged"
    if _POST_NEGATION.match(after):
        return "negated"
    start = _clause_start(text, hit.start)
    before = text[start : hit.start]
    if re.search(r"\bnon-?\s*$", before, _I):
        return "negated"
    cues_of_hedges = ((_LIST_HEDGE, LIST_HEDGE_WINDOW_WORDS, False), (_HEDGE, HEDGE_WINDOW_WORDS, True)) if hedges else ()
    for cue, window, stop_at_comma in cues_of_hedges:
        cues = list(cue.finditer(before))
        if cues:
            gap = before[cues[-1].end() :]
            if _word_count(gap) <= window and not (stop_at_comma and "," in gap):
                return "hedged"
    cues = list(_NEGATION.finditer(before))
    if cues:
        cue_end = start + cues[-1].end()
        gap = text[cue_end : hit.start]
        between = any(cue_end <= h.start and h.end <= hit.start for h in hits if h is not hit)
        # Past a comma or another claim, a negation carries on only through a list with
        # "or" / "nor" ("no asymmetry, border irregularity or colour variegation").
        if not ("," in gap or between):
            if _word_count(gap) <= NEGATION_WINDOW_WORDS:
                return "negated"
        elif _word_count(gap) <= LIST_WINDOW_WORDS and _OR.search(text, cue_end, _clause_end(text, cue_end)):
            return "negated"
    return "affirmed"


def _near(text: str, hit: _Hit, pattern: str, words: int) -> bool:
    """`pattern` within `words` words before or after the hit, in the same clause."""
    before = text[_clause_start(text, hit.start) : hit.start]
    after = text[hit.end : _clause_end(text, hit.end)]
    before = " ".join(_WORD.findall(before)[-words:])
    after = " ".join(_WORD.findall(after)[:words])
    return bool(re.search(pattern, before, _I) or re.search(pattern, after, _I))


def _is_claim_in_context(text: str, hit: _Hit) -> bool:
    """Context a word needs to be the claim we audit."""
    if hit.kind == "border" and _NEEDS_BORDER_NOUN.match(text, hit.start):
        return _near(text, hit, _BORDER_NOUN, 4)  # "irregular border", not "regular follow-up"
    if hit.kind == "size_word":
        # "a small, symmetric macule", "medium-sized", "Size: small"; not "a small amount of scale"
        before, after = text[max(0, hit.start - 30) : hit.start], text[hit.end : _clause_end(text, hit.end)]
        return bool(
            re.search(r"\b(?:size|diameter)[\s*_]*:\s*$", before, _I)
            or re.search(r"\b(?:is|was|are|were|appears?|appearing|seems?|be)\s+(?:\w+\s+)?$", before, _I)
            # "large diameter 7 mm", "a small size of 5 mm", "medium sized"
            or re.match(r"\s*(?:[\s-]?sized|(?:in )?(?:size|diameter))\b", after, _I)
            or re.search(_LESION_NOUN, " ".join(_WORD.findall(after)[:5]), _I)
        )
    return True


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def _diameters(text: str) -> list[tuple[float, float]]:
    """Stated long diameters in mm as (low, high): a measurement has low == high, a bound or
    a range does not. Areas and other lengths (width, margins, thickness) are left out."""
    found: list[tuple[float, float]] = []
    taken: list[tuple[int, int]] = []
    for pattern in (_DIMENSIONS, _LENGTH):
        for m in pattern.finditer(text):
            if any(s < m.end() and m.start() < e for s, e in taken):
                continue
            taken.append(m.span())
            before, after = text[max(0, m.start() - 40) : m.start()], text[m.end() : m.end() + 25]
            if _OTHER_LENGTH.search(" ".join(_WORD.findall(before)[-3:] + _WORD.findall(after)[:2])) or _COMPARED.match(after):
                continue
            groups = m.groups()
            unit = groups[-1].lower()
            scale = 10.0 if unit.startswith("c") else 25.4 if unit.startswith("inch") else 1.0
            value = scale * max(float(g) for g in (groups[0], groups[2] if pattern is _DIMENSIONS else None) if g)
            if _UPPER_BOUND.search(before):
                found.append((0.0, value))
            elif _LOWER_BOUND.search(before) or _WIDTH.search(" ".join(_WORD.findall(before)[-2:] + _WORD.findall(after)[:1])):
                found.append((value, float("inf")))
            elif start := _RANGE_START.search(before):
                found.append((scale * float(start.group(1)), value))
            else:
                found.append((value, value))
    return found


def _colours(text: str) -> list[str]:
    """The lesion's stated colours: "pink papule", "is red-brown", "colour: tan"; not the skin's, a border's or a dot's."""
    found = []
    for m in _COLOUR.finditer(text):
        after, before = text[m.end() : m.end() + 40], text[max(0, m.start() - 40) : m.start()]
        if _COLOUR_OTHER.match(after) or _SKIN_BEFORE.search(before):
            continue
        if not (_COLOUR_HEAD.match(after) or _COLOUR_LEAD.search(before)):
            continue
        hit = _Hit("colour", "", m.start(), m.end(), False)
        if _polarity(text, hit, []) != "affirmed":
            continue
        for part in m.groups():
            if part:
                found.append(next(name for pattern, name in _COLOUR_TERMS.items() if re.fullmatch(pattern, part, _I)))
    return found


def _contrasts(text: str) -> list[str]:
    found = []
    for m in _CONTRAST.finditer(text):
        hit = _Hit("contrast", "", m.start(), m.end(), False)
        if _polarity(text, hit, []) == "affirmed":
            found.append(_CONTRAST_WORDS[(m.group(1) or m.group(2)).lower()])
    return found


def _history(text: str) -> list[str]:
    """Affirmed history, symptoms and procedures (not negated, hedged or planned)."""
    found = []
    for m in _HISTORY.finditer(text):
        hit = _Hit("history", "", m.start(), m.end(), False)
        clause = text[_clause_start(text, m.start()) : _clause_end(text, m.end())]
        if _PLAN.search(clause) or _polarity(text, hit, []) != "affirmed":
            continue
        found.append(re.sub(r"\s+", " ", m.group(0).lower()))
    return found


# A line offering options ("Border: regular | slightly irregular | markedly irregular"), as P1 notes copy
# the form back: it chooses nothing.
_OPTION_LIST = re.compile(r"^[^\n|]*(?:\|[^\n|]*)+$", re.MULTILINE)


def extract_facts(note: str) -> Facts:
    """The claims of a note (see the module docstring for the rules)."""
    note = _OPTION_LIST.sub("", note)
    hits = _terms(note)
    claims: dict[str, list[str]] = {}
    sites: list[tuple[str, frozenset[str]]] = []
    for hit in hits:
        if _LABEL.match(note[hit.end : hit.end + 4]):
            continue  # a field label, "Asymmetry: symmetric"
        if not _is_claim_in_context(note, hit):
            continue
        polarity = _polarity(note, hit, hits)
        value = hit.value
        if polarity == "negated" and value in _OPPOSITE:
            value = _OPPOSITE[value]
        elif polarity != "affirmed" or hit.weak:
            continue
        if hit.kind == "site":
            sites.append((note[hit.start : hit.end].strip(), frozenset(value.split("|"))))
        else:
            claims.setdefault(hit.kind, []).append(value)

    diameters = _diameters(note)
    ages = [(float(m.group(1)),) * 2 for pattern in _AGES for m in pattern.finditer(note)]
    ages += [(float(m.group(1)) * 10, float(m.group(1)) * 10 + 9) for m in _DECADE.finditer(note)]
    sexes = [(sex, m.start()) for sex, pattern in (("male", _MALE), ("female", _FEMALE)) for m in pattern.finditer(note)]
    contradictions = [
        f"{a}/{b}" for kind, a, b in _CONTRADICTIONS if a in claims.get(kind, ()) and b in claims.get(kind, ())
    ]
    return Facts(
        diagnoses=_unique(claims.get("diagnosis", ())),
        malignancy=_unique(claims.get("malignancy", ())),
        ages=_unique(ages),
        sexes=_unique(s for s, _ in sorted(sexes, key=lambda x: x[1])),
        sites=_unique(sites),
        diameters_mm=_unique(low for low, high in diameters if low == high),
        diameter_bounds_mm=_unique((low, high) for low, high in diameters if low != high),
        size_words=_unique(claims.get("size_word", ())),
        colours=_unique(_colours(note)),
        contrasts=_unique(_contrasts(note)),
        history=_unique(_history(note)),
        borders=_unique(claims.get("border", ())),
        border_definition=_unique(claims.get("definition", ())),
        symmetry=_unique(claims.get("symmetry", ())),
        colour_variation=_unique(claims.get("variation", ())),
        contradictions=tuple(contradictions),
    )


# --- Audit ---------------------------------------------------------------------------------


_INF = float("inf")


def _within(true: float, low: float, high: float, tolerance: Tolerance) -> bool:
    """The true diameter lies within the size tolerance of [low, high] (a size word's band, a bound, a range)."""
    distance = max(low - true, true - high, 0.0)
    return distance <= max(tolerance.size_absolute_mm, tolerance.size_relative * true)


def _binary_truth(value: float | None, threshold: float, low: str, high: str, band: float) -> set[str]:
    """The words that hold for a value: one, or both inside the threshold band."""
    if value is None:
        return set()
    if band and abs(value - threshold) <= band * threshold:
        return {low, high}
    return {high} if value >= threshold else {low}


def audit_note(note: str, row: Mapping[str, Any], tolerance: Tolerance = Tolerance()) -> AuditResult:
    """Flags for every stated fact that the row contradicts, and for self-contradictions."""
    facts = extract_facts(note)
    flags: list[Flag] = []

    def flag(code: str, stated: Any, true: Any) -> None:
        item = Flag(code, str(stated), str(true))
        if item not in flags:
            flags.append(item)

    true_dx = row.get("diagnosis")
    if true_dx:
        for code in facts.diagnoses:
            if code not in _COMPATIBLE_DIAGNOSES.get(true_dx, frozenset({true_dx})):
                flag("diagnosis_mismatch", code, true_dx)
    true_malignancy = malignancy_word(row)
    if true_malignancy:
        for stated in facts.malignancy:
            if stated != true_malignancy and (stated != "not-malignant" or true_malignancy == "malignant"):
                flag("malignancy_mismatch", stated, true_malignancy)
    true_age = _number(row, "age_approx")
    if true_age is not None:
        for low, high in facts.ages:
            if true_age < low - tolerance.age_years or true_age > high + tolerance.age_years:
                flag("age_mismatch", f"{low:g}" if low == high else f"{low:g}-{high:g}", f"{true_age:g}")
    true_sex = row.get("sex")
    if true_sex:
        for stated in facts.sexes:
            if stated != true_sex:
                flag("sex_mismatch", stated, true_sex)
    true_site = row.get("anatom_site")
    if true_site:
        for words, allowed in facts.sites:
            if true_site not in allowed:
                flag("site_mismatch", words.lower(), true_site)
    true_diameter = lesion_diameter_mm(row)
    if true_diameter is not None:
        for stated in facts.diameters_mm:
            if not _within(true_diameter, stated, stated, tolerance):
                flag("size_mismatch", f"{stated:g}mm", f"{true_diameter:.1f}mm")
        for low, high in facts.diameter_bounds_mm:
            if not _within(true_diameter, low, high, tolerance):
                stated = f"<{high:g}mm" if low == 0 else f">{low:g}mm" if high == _INF else f"{low:g}-{high:g}mm"
                flag("size_mismatch", stated, f"{true_diameter:.1f}mm")
        for word in facts.size_words:
            if not _within(true_diameter, *SIZE_BANDS_MM[word], tolerance):  # the notes' and captions' size words
                flag("size_mismatch", word, f"{true_diameter:.1f}mm")
    band = tolerance.threshold_band
    for code, stated_values, column, threshold, low, high in (
        ("symmetry_mismatch", facts.symmetry, "symm_2axis", ASYMMETRIC_MIN_SYMM_2AXIS, "symmetric", "asymmetric"),
        ("border_mismatch", facts.borders, "norm_border", IRREGULAR_MIN_NORM_BORDER, "regular", "irregular"),
        ("colour_variation_mismatch", facts.colour_variation, "norm_color", VARIEGATED_MIN_NORM_COLOR, "uniform", "variegated"),  # noqa: E501
    ):
        value = _number(row, column)
        holds = _binary_truth(value, threshold, low, high, band)
        for stated in stated_values:
            if holds and stated not in holds:
                flag(code, stated, f"{'/'.join(sorted(holds))}({value:.3g})")
    lab = [_number(row, c) for c in ("lesion_L", "lesion_A", "lesion_B")]
    if None not in lab:
        true_colour = colour_name(*lab)
        for stated in facts.colours:
            if stated not in COMPATIBLE_COLOURS[true_colour]:
                flag("colour_mismatch", stated, true_colour)
    contrast = _number(row, "delta_lb_norm")
    if contrast is not None:
        for stated in facts.contrasts:
            if stated != contrast_word(contrast):
                flag("contrast_mismatch", stated, f"{contrast_word(contrast)}({contrast:.3g})")
    for words in facts.history:
        flag("invented_history", words, "not in the metadata")
    for pair in facts.contradictions:
        flag("self_contradiction", pair.replace("/", "+"), "-")
    return AuditResult(facts=facts, flags=tuple(flags))


def hallucination_rate(results: Iterable[AuditResult]) -> float:
    """Share of notes with at least one flag (NaN for no notes)."""
    results = list(results)
    return sum(r.hallucinated for r in results) / len(results) if results else float("nan")


def flag_counts(results: Iterable[AuditResult]) -> Counter[str]:
    """Per flag code, the number of notes with at least one flag of that code."""
    return Counter(code for r in results for code in r.codes)
