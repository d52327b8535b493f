"""The lexicon of the notes audit (dermaray.notes.audit): what words a note may use for each fact, as data.

Every string is a regular-expression fragment; audit.py compiles them once, at import. In `FACTS`
and the other word lists each alternative is matched as whole words and regardless of case,
unless an entry says otherwise. Values are the audit's canonical words, each checked against
its source when audit.py compiles: diagnosis codes (dermaray.schema, plus "OTHER"), anatomic
sites by name (ANATOMIC_SITES), size categories (prompts.SIZE_CATEGORIES), colour names
(prompts.COLOUR_NAMES).

Plain Python rather than a YAML or JSON file: the entries are regular expressions, which read as
written in raw strings (JSON doubles every backslash), the module needs no loader and no
package-data entry, and a bad entry fails at import naming its line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Words:
    """The synonyms of one value of a fact."""

    value: str
    alternatives: tuple[str, ...]
    weak: bool = False  # a claim only when negated: "lack of symmetry" claims asymmetry, "symmetry" alone nothing
    near: str | None = None  # must stand within a few words of this pattern, in the same clause
    case_sensitive: bool = False


@dataclass(frozen=True)
class Fact:
    """A fact a note states in words. Of overlapping matches the longest wins, then the earlier entry."""

    kind: str
    words: tuple[Words, ...]
    negation: Mapping[str, str] = field(default_factory=dict)  # what a negated value claims ("not asymmetric")
    contradictions: tuple[tuple[str, str], ...] = ()  # values one note cannot both affirm


# Nouns that make a size word the lesion's ("a small papule", not "a small amount of scale").
LESION_NOUN = (
    r"\b(?:lesions?|macules?|papules?|nodules?|plaques?|patch(?:es)?|moles?|spots?|growths?|tumou?rs?|neoplasms?"
    r"|na?ev(?:us|i)|melanomas?|keratos[ei]s|carcinomas?|dermatofibromas?|\w*angiomas?|lentig\w*)\b"
)
# "Regular", "smooth" and "uneven" are a border's only next to one ("regular follow-up" is not); not
# "shape": outline irregularity is asymmetry as much.
BORDER_NOUN = r"\b(?:borders?|margins?|edges?|outlines?|contours?|periphery|circumscri\w*)\b"
_BORDER_NEXT = r"(?=\s+(?:borders?|margins?|edges?|outlines?)\b)"  # "a uniform border" is about the border

# Codes written as abbreviations, matched case-sensitively ("df" is not a diagnosis); one in brackets
# after a name ("(SK)") abbreviates that name, whatever it is, and claims nothing of its own.
_ABBREVIATIONS = {
    "MEL": "MEL", "BCC": "BCC", "SCC": "SCC", "AK": "ACK", "ACK": "ACK", "SK": "SEK", "SEK": "SEK", "DF": "DF",
    "VASC": "VASC", "BKL": "BKL", "NEV": "NEV",
}  # fmt: skip


def _either(a: str, b: str) -> dict[str, str]:
    """A two-valued attribute: a negated value claims the other one ("not asymmetric" = symmetric)."""
    return {a: b, b: a}


# The order sets the order of a note's self-contradictions (symmetry first).
FACTS: tuple[Fact, ...] = (
    Fact("diagnosis", (
        Words("MEL", (r"melanomas?", r"lentigo maligna")),
        Words("NEV", (r"na?ev(?:us|i|uses)", r"moles?")),
        Words("BCC", (r"basal[- ]cell carcinomas?", r"basaliomas?", r"rodent ulcers?")),
        Words("SCC", (r"squamous[- ]cell carcinomas?", r"bowen'?s disease")),
        # A garbled name keeps its class when it keeps the class's own word ("solar keratoderma").
        Words("ACK", (r"(?:actinic|solar) kerato(?:s[ei]s|derma\w*)",)),
        Words("SEK", (
            r"seb[oe]rr?h?o?eic (?:keratos[ei]s|keratoderma\w*)", r"seb[oe]rr?h?o?eic warts?",
            r"seb\w*[ -]?kerat\w*(?: kerat\w*)?",  # "sebumkeratosis", "sebrerokeratin keratoderma"
        )),
        Words("DF", (r"dermatofibromas?", r"(?:benign )?fibrous histiocytomas?")),
        Words("VASC", (
            r"ha?emangiomas?", r"(?:cherry )?angiomas?", r"angiokeratomas?", r"pyogenic granulomas?",
            r"vascular (?:lesion|malformation|tumou?r)s?",
        )),
        Words("BKL", (
            r"benign keratos[ei]s", r"(?:benign )?lichenoid keratos[ei]s", r"lichen planus[- ]like keratos[ei]s",
            r"solar lentig(?:o|ines)",
        )),
        # Not one of the classes: always a contradiction when affirmed.
        Words("OTHER", (
            r"[\w-]+ syndrome", r"\w*hyperplasias?", r"\w*sarcomas?", r"lymphomas?", r"psoriasis", r"eczema", r"\w*dermatitis",
            r"\w*keratoderma\w*", r"\w*sclerosis", r"epidermolysis",
            r"warts?", r"verruca\w*", r"cysts?", r"lipomas?", r"keratoacanthomas?", r"rosacea", r"vitiligo", r"acne",
        )),
        *(Words(code, (r"(?<!\()" + abbreviation + "s?",), case_sensitive=True) for abbreviation, code in _ABBREVIATIONS.items()),
    )),
    Fact(
        "symmetry",
        (
            Words("symmetric", (r"symmetric(?:al|ally)?", r"normal symmetry", r"(?<!moderate to )high degree of symmetry")),
            Words("asymmetric", (r"asymmetric(?:al|ally)?", r"asymmetry", r"asymmetries")),
            Words("symmetric", (r"symmetry",), weak=True),
            # Too vague to be a symmetry fact: "irregularly symmetrical", "a symmetrical border".
            Words("symmetric", (
                r"irregular(?:ly)? symmetr\w*",
                # "a symmetrical (triangular) shape", "a symmetrical asymmetrical border"
                r"(?:(?:a)?symmetric(?:al)?[ \t]+){1,2}(?:[\w-]+[ \t]+)?"
                r"(?:borders?|colou?r\w*|distribution|shape|proportions?|features?|pattern)",
                r"(?:combination|mix(?:ture)?) of (?:both )?(?:a)?symmetric(?:al)? and (?:a)?symmetric(?:al)?",
                r"symmetric(?:al)? (?:in|along|about) one axis",  # one axis only
            ), weak=True),
            Words("asymmetric", (
                r"(?:irregularly )?asymmetric(?:al)?[ \t]+(?:[\w-]+[ \t]+)?"
                r"(?:borders?|colou?r\w*|distribution|shape|proportions?|features?|pattern)",
            ), weak=True),
        ),
        negation=_either("symmetric", "asymmetric"),
        contradictions=(("symmetric", "asymmetric"),),
    ),
    Fact(
        "malignancy",
        (
            Words("premalignant", (
                r"pre-?malignan\w*", r"pre-?cancerous", r"potentially malignant", r"indeterminate superclass",
                r"superclass\W+indeterminate",
            )),
            Words("malignant", (r"malignan(?:t|cy|cies)", r"cancer(?:ous|s)?")),
            Words("not-malignant", (r"non-?malignant", r"non-?cancerous")),
            Words("benign", (r"benign(?:ly)?",)),
        ),
        negation={"malignant": "not-malignant"},  # "no signs of malignancy"
        contradictions=(("benign", "malignant"), ("not-malignant", "malignant")),
    ),
    Fact(
        "border",
        (
            Words("irregular", (r"irregular(?:ly|ity|ities)?", r"uneven"), near=BORDER_NOUN),
            Words("regular", (r"regular(?:ly|ity)?", r"smooth"), near=BORDER_NOUN),
            Words("irregular", (r"notched", r"jagged", r"scalloped")),
            Words("regular", (r"uniform" + _BORDER_NEXT,)),  # "a uniform border"
        ),
        negation=_either("regular", "irregular"),
        contradictions=(("regular", "irregular"),),
    ),
    Fact(
        "variation",
        (
            Words("uniform", (
                r"uniform(?:ly)?(?!" + _BORDER_NEXT[3:], r"homogene?ous(?:ly)?", r"evenly (?:pigmented|colou?red)",
                r"monochrom\w*", r"(?:single|one) colou?r", r"normal colou?r distribution",
            )),
            Words("variegated", (
                r"variegat\w*", r"(?:in|hetero)homogene?ous(?:ly)?", r"heterogene?ous(?:ly)?", r"non-?uniform(?:ly)?",
                r"multi-?colou?red", r"(?:multiple|several|two|three|many|various) colou?rs", r"mottled",
                r"unevenly (?:pigmented|colou?red)", r"irregular(?:ly)? pigment\w*", r"range of (?:shades|colou?rs)",
                r"variable (?:amount of )?colou?r(?: variation)?",
            )),
        ),
        negation=_either("uniform", "variegated"),
        contradictions=(("uniform", "variegated"),),
    ),
    Fact(
        "definition",
        (
            Words("well-defined", (
                r"well[- ](?:defined|circumscribed|demarcated)", r"(?:sharply|clearly) (?:defined|demarcated|circumscribed)",
            )),
            Words("ill-defined", (
                r"ill[- ]defined", r"poorly (?:defined|circumscribed|demarcated)", r"indistinct", r"blurred", r"fuzzy",
            )),
        ),
        negation=_either("well-defined", "ill-defined"),
        contradictions=(("well-defined", "ill-defined"),),
    ),
    # The size categories of prompts.size_category.
    Fact("size_word", (
        Words("small", (r"tiny", r"small")),
        Words("medium", (r"medium(?:-sized)?", r"mid-sized", r"moderate-sized")),
        Words("large", (r"large", r"big", r"sizea?ble")),
    )),
)  # fmt: skip

# Labels that mean the same class in practice (HAM10000's bkl includes seborrheic keratoses).
COMPATIBLE_DIAGNOSES: dict[str, frozenset[str]] = {
    "SEK": frozenset({"SEK", "BKL"}),
    "BKL": frozenset({"SEK", "BKL"}),
}

# --- Sites: words -> the ANATOMIC_SITES they allow --------------------------------------------

# "the back", but not "the back of the hand" (that is the hand).
_NOT_BACK_OF = (
    r"(?!\s+of\s+(?:the\s+|his\s+|her\s+|their\s+|a\s+)?"
    r"(?:hands?|neck|head|knees?|thighs?|legs?|(?:fore)?arms?|ears?|feet|foot|calf|calves|wrists?|scalp|fingers?)\b)"
)
SITE_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"head(?:\s*/\s*|\s+(?:and|or)\s+)neck", ("head/neck",)),
    (
        (
            r"head|face|facial|scalp|neck|forehead|temples?|cheeks?|nose|nasal|chin|jaw(?:line)?|ears?|eyelids?"
            r"|periorbital|(?:pre|post)auricular"
        ),
        ("head/neck",),
    ),
    (r"lips?|mouth", ("head/neck", "oral/genital")),
    (r"upper[- ](?:extremit(?:y|ies)|limbs?)", ("upper extremity",)),
    (r"(?:fore|upper )?arms?|elbows?|wrists?|antecubital", ("upper extremity",)),
    (r"(?<!other )hands?|fingers?|thumbs?|knuckles?", ("upper extremity", "palms/soles")),
    (r"shoulders?|deltoid", ("upper extremity",)),
    (r"lower[- ](?:extremit(?:y|ies)|limbs?)", ("lower extremity",)),
    (r"(?:lower )?legs?|thighs?|knees?|shins?|calf|calves|ankles?|pretibial|popliteal", ("lower extremity",)),
    (r"feet|foot|toes?|heels?", ("lower extremity", "palms/soles")),
    (r"hips?|buttocks?|gluteal", ("lower extremity", "anterior torso", "posterior torso")),
    (
        (
            r"anterior (?:torso|trunk)|(?:upper )?chest(?: wall)?|abdomen|abdominal|breasts?|sternal|sternum|belly"
            r"|inframammary|umbilic\w*|epigastri\w*"
        ),
        ("anterior torso",),
    ),
    (r"posterior (?:torso|trunk)|scapular?|interscapular|lumbar|sacral|(?:lower|upper|mid)[- ]back", ("posterior torso",)),
    (r"(?:the|his|her|their|patient's|left|right|on)\s+back" + _NOT_BACK_OF, ("posterior torso",)),
    (r"torso|trunk|flanks?", ("anterior torso", "posterior torso")),
    (r"palms?(?:\s*/\s*|\s+(?:and|or)\s+)soles?|acral", ("palms/soles",)),
    (r"palms?|palmar", ("palms/soles", "upper extremity")),  # a palm is the hand's
    (r"soles?(?=\s+of\b)|soles|plantar", ("palms/soles", "lower extremity")),
    (
        (
            r"oral(?:\s*/\s*|\s+(?:and|or)\s+)genital(?:\s+mucosa\w*)?|oral|genital\w*|vulva\w*|penile|penis"
            r"|scrot\w*|perianal|perineal|mucosa\w*"
        ),
        ("oral/genital",),
    ),
    (r"groin|inguinal", ("oral/genital", "lower extremity", "anterior torso")),
)

# A body part is where the lesion is when a location word leads to it ("a nevus on their back",
# "located in the abdomen", "Site: face"); "a large abdomen", "blood flow through their arms" describe
# the patient's body.
SITE_LEAD_BEFORE = (
    r"(?:\b(?:on|in|at|of|over|behind|around|across|along|to|located|involving|affecting|site|location)\b|:)"
    r"(?:[\s,]+(?:and\s+)?(?!near\b)[\w'-]+){0,6}?[\s,]*(?:and\s+)?$"  # "on the face, neck, arms and legs"
)

# --- Size words: when a size word is the lesion's size ------------------------------------------

SIZE_LABEL_BEFORE = r"\b(?:size|diameter)[\s*_]*:\s*$"  # "Size: small"
SIZE_COPULA_BEFORE = r"\b(?:is|was|are|were|appears?|appearing|seems?|be)\s+(?:\w+\s+)?$"  # "it is (very) small"
SIZE_NOUN_AFTER = r"\s*(?:[\s-]?sized|(?:in )?(?:size|diameter))\b"  # "large diameter 7 mm", "medium sized"

# --- Colours ---------------------------------------------------------------------------------

# Lesion colours: a stated word -> its canonical name; -ish forms count ("pinkish" = pink).
COLOUR_WORDS: dict[str, str] = {
    r"(?:red(?:dish)?|pink(?:ish)?)[- ]brown": "red-brown", r"dark[- ]brown": "dark brown",
    r"(?:light|tan)[- ]brown": "light brown",
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
# A colour is the lesion's when a lesion noun or a colour noun follows it ("pink papule", "pinkish
# hue"), or a copula or "colour" precedes it ("is red-brown", "colour: tan", "colour of light brown").
COLOUR_HEAD_AFTER = (
    r"^[\s,]*(?:(?:[\w-]+)\s+){0,2}?(?:colou?r(?:ed|ation)?|hue|tint|pigment(?:ed|ation)?|tones?|appearance|"
    r"lesions?|macules?|papules?|nodules?|plaques?|patch(?:es)?|moles?|spots?|blotch(?:es)?|growths?|na?ev(?:us|i))\b"
)
COLOUR_LEAD_BEFORE = (
    r"(?:\b(?:is|are|was|were|be|appears?|appearing|looks?|seems?)(?:\s+to\s+be)?|colou?r(?:ed)?(?:\s+(?:of|is|was))?\s*:?|"
    r"\bin\s+colou?r\s+(?:is)?)\s*[\"'“]?\s*(?:(?:a|an|mostly|predominantly|uniformly|slightly|light(?:ly)?|mainly)\s+)?$"
)
# Not the lesion's own colour: the skin around it, its border, structures inside it.
COLOUR_OTHER_AFTER = (
    r"^[\s,]*(?:[\w-]+\s+){0,1}?(?:dots?|globules?|streaks?|network|veil|scales?|crusts?|lines?|structures?|areas?|"
    r"borders?|rims?|halo|vessels?|cells?|skin|surrounding)\b"
)
SKIN_BEFORE = r"\b(?:skin|surrounding|background|halo|hair|eyes?)\b[^.;]{0,25}$"

# --- Contrast with the surrounding skin ------------------------------------------------------

# A contrast word -> the level of prompts.contrast_word.
CONTRAST_WORDS: dict[str, str] = {
    "low": "low", "weak": "low", "poor": "low", "faint": "low", "subtle": "low", "moderate": "moderate",
    "medium": "moderate", "intermediate": "moderate", "high": "high", "strong": "high", "marked": "high",
    "stark": "high", "sharp": "high",
}  # fmt: skip
CONTRAST_STATED = ("low", "moderate", "medium", "high")  # after "contrast is" / "contrast:"

# --- History -----------------------------------------------------------------------------------

# Patient history, symptoms, evolution and procedures: the lesion table holds none of them.
HISTORY_WORDS: tuple[str, ...] = (
    r"(?:medical |family |personal |past |previous |prior )?history of", r"has had", r"had (?:a |an )?(?:previous|prior)",
    # "diagnosed with melanoma" states the diagnosis (audited as such); who diagnosed it, and when, is history.
    r"previously (?:diagnosed|treated|had|been|excised|removed|biopsied)", r"diagnosed (?:by|earlier|in \d+)", r"underwent",
    r"undergone", r"biops(?:y|ies) (?:showed|revealed|confirmed|found)",
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
    r"confirmed (?:by|with|through|using|on)", r"(?:was|were|been|later) confirmed(?! as)", r"(?:had been|previously) diagnosed",
    r"(?:amount|traces?|drops?) of blood", r"blood (?:in|within|from)", r"(?:is|are) (?:currently )?treating", r"has treated",
    r"(?:was|were|been) referred", r"(?:initially|previously|first) (?:examined|seen|evaluated)",
    r"based on (?:the )?(?:results? of )?(?:a |the )?biops(?:y|ies)", r"undergo(?:es|ing)? (?:treatment|therapy)",
    r"(?:found|discovered|noticed) (?:during|at|on) (?:a |an |the )?(?:routine|recent|annual)",
    r"under (?:a|the) microscope", r"examined by (?:a|the) (?:dermatologist|doctor|physician|pathologist)",
)  # fmt: skip
# A procedure as a plan is not history: "excision is recommended", "biopsy to confirm".
PLAN_WORDS: tuple[str, ...] = (
    r"recommend\w*", r"advis\w*", r"should", r"consider\w*", r"plan\w*", r"warrant\w*",
    r"may need", r"needs?", r"schedul\w*", r"refer(?:ral|s)?", r"would", r"if",
)  # fmt: skip

# "confirmed by a thorough examination", "diagnosed by dermatoscopy": today's examination, not history.
EXAMINATION_AFTER = (
    r"\W*(?:by\s+)?(?:(?:a|an|the|this|their|his|her)\s+)?(?:(?:thorough|careful|clinical|physical|visual|skin|full)\s+)*"
    r"(?:examination|exam|inspection|dermatoscop\w*|dermoscop\w*|appearance)\b"
)
# A history cue followed by one of these states none: "symptoms include no visible signs of infection",
# "symptoms were non-specific", "their symptoms are unclear".
NO_HISTORY_AFTER = r"\W*(?:(?:a|an|the|any|were|was|are|is)\s+)?(?:no|none|nothing|non-?specific|unclear|unknown)\b"

# --- Polarity cues -----------------------------------------------------------------------------

# Words that end a clause (besides sentence ends): a cue before them does not reach a term after.
CLAUSE_BREAKS: tuple[str, ...] = (
    "but", "however", "although", "though", "yet", "whereas", "while", "which", "except", "apart from", "aside from",
)  # fmt: skip
NEGATION_CUES: tuple[str, ...] = (
    r"no", r"not", r"without", r"absence of", r"absent", r"lack of", r"lacks", r"lacking", r"loss of",
    r"free of", r"negative for", r"never", r"neither", r"nor", r"denies",
)  # fmt: skip
NEGATING_PREFIX = r"\bnon-?\s*$"  # "non-malignant", "non uniform"
# Hedges whose scope runs to the end of the sentence ("differential: DF, nevus, melanoma").
LIST_HEDGE_CUES: tuple[str, ...] = (r"differentials?", r"ddx", r"d/dx", r"versus", r"vs\.?")
# Hedges with a short scope that stops at a comma.
HEDGE_CUES: tuple[str, ...] = (
    r"rule[sd]? out", r"ruling out", r"r/o", r"to exclude", r"exclude[sd]?", r"excluding", r"rather than",
    r"instead of", r"unlikely to be", r"mimic\w*", r"other than", r"distinguish\w* (?:it )?from",
    r"(?:argu\w*|speaks?|points?) against", r"against", r"history of", r"risk of", r"potential for",
    r"progress\w* (?:to|into)", r"transform\w*", r"evolv\w* into",
    r"screen\w* for", r"monitor\w* for", r"surveillance for", r"if", r"whether", r"symptoms? includ\w*",
    r"possib(?:le|ly)", r"potential(?:ly)?", r"may (?:also )?(?:indicate|be|have|represent|suggest)", r"might", r"could",
    r"can (?:be|have)", r"(?:examined|assessed|checked|tested|evaluated|investigated) for",
    r"(?:tendency|predisposition|predisposed) to", r"characteristic (?:feature |sign )?of", r"associated with",
    r"development of", r"(?:normal|usual|typical) for", r"suspect(?:s|ed)?", r"rang(?:e|es|ing) from",
)  # fmt: skip
# After a term, up to two words ("malignant melanoma cannot be excluded"), then these verbs, then a
# negation ("... is absent") or a hedge ("... was ruled out").
POST_VERBS: tuple[str, ...] = (
    "is", "was", "were", "are", "be", "been", "has", "have", "cannot", "can't", "could", "can", "not", "appears?",
    "seems?", "considered", "thought",
)  # fmt: skip
POST_NEGATIONS: tuple[str, ...] = (r"absent", r"not (?:seen|present|observed|noted|identified|evident|apparent|visible|detected)")
POST_HEDGES: tuple[str, ...] = (
    r"ruled out", r"excluded", r"unlikely", r"less likely", r"not (?:suspected|favou?red|likely|considered|supported)",
)  # fmt: skip

# --- Statements about a condition in general ---------------------------------------------------

# From one of these to the end of its sentence a note describes the condition, not this lesion ("It
# is usually found on the legs", "They can occur anywhere on the body", "characterized by small,
# irregular lesions"): no claim about the lesion or the patient.
GENERIC_CUES: tuple[str, ...] = (
    r"usually", r"typically", r"often", r"commonly", r"generally", r"frequently", r"tends? to", r"most common",
    r"in general", r"anywhere on the body", r"are (?:a )?types? of", r"can be classified",
    r"(?:can|may) (?:also )?(?:occur|appear|be found|affect|develop|vary|range)",
    r"characteri[sz]ed by (?:[\w,-]+ ){0,4}(?:lesions?|spots?|patch(?:es)?|growths?)",
)  # fmt: skip

# A sentence whose subject is a condition in the plural speaks of the condition ("Melanomas are a type of
# skin cancer that ..."), from its start.
GENERIC_SUBJECT = (
    r"\W*(?:[\w-]+\s+){0,2}?(?:melanomas|na?evi|moles|carcinomas|keratoses|ha?emangiomas|angiomas|dermatofibromas"
    r"|lentigines)\s+(?:are|can|may|tend|often|usually|typically)\b"
)

# --- Conditions that are not this lesion's ---------------------------------------------------------

# A diagnosis, malignancy or site named after one of these, in the same sentence, is the patient's past or
# another condition, not a claim about this lesion: "a history of skin conditions such as acne",
# "14 years ago, diagnosed with a melanoma", "symptoms include ... acne".
PAST_CONDITION_CUES: tuple[str, ...] = (
    r"history of", r"has had", r"had been diagnosed", r"previously", r"experienc(?:e|es|ed|ing)",
    r"symptoms? (?:include|includes|included|such as|are|were)", r"treat(?:ed|ment) for", r"suffer(?:s|ed|ing)? from",
    r"(?:conditions?|disorders?|issues|problems|diseases?) (?:such as|like|including)", r"(?:years|months|weeks) ago",
)  # fmt: skip
# "no other identified malignancies", "no other visible signs of malignancy": another lesion.
OTHER_BEFORE = r"\bother\s+(?:[\w-]+\s+){0,3}$"
# A turn in the sentence ends a past-condition cue's reach: "had been diagnosed with X, but ... revealed Y".
TURN_WORDS: tuple[str, ...] = ("but", "however", "although", "though", "yet", "whereas")

# --- Patients: age and sex ---------------------------------------------------------------------

AGE_PATTERNS: tuple[str, ...] = (
    r"\b(\d{1,3})\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old\b",  # "45-year-old", "45 yrs old"
    r"\b(\d{1,3})\s*y/?o\b",  # "45yo", "45 y/o"
    r"\b(\d{1,3})\s+years?\s+of\s+age\b",
    r"\baged?\s*[:=]?\s*(?:about|approximately|approx\.?|around|~)?\s*(\d{1,3})\b(?!\s*(?:mm|cm|%|-?\s*year))",  # "age: 45"
)
DECADE = r"\bin\s+(?:his|her|their)\s+(?:early\s+|mid-?\s*|late\s+)?(\d)0'?s\b"  # "in her 40s": 40-49
# A sex word before these speaks of a population ("affecting only male patients"), not this patient.
POPULATION_AFTER = r"(?!\s+(?:patients|individuals|people|adults|children|subjects|populations?)\b)"
SEX_WORDS: dict[str, tuple[str, ...]] = {
    "male": (r"male", r"man", r"gentleman", r"boy", r"he", r"him", r"his"),
    "female": (r"female", r"woman", r"lady", r"girl", r"she", r"hers?"),
}

# --- Lengths: the lesion's long diameter ----------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_UNIT = r"(mm|millimet(?:er|re)s?|cm|centimet(?:er|re)s?|inch(?:es)?)"
_NOT_AREA = r"(?!\w|\s*(?:²|\^2|squared))"
# Groups: (number, unit) for a length; (number, unit or None, number, unit) for "4 x 3 mm".
DIMENSIONS = rf"{_NUMBER}\s*(?:{_UNIT}\s*)?(?:x|×|by)\s*{_NUMBER}\s*-?\s*{_UNIT}{_NOT_AREA}"
LENGTH = rf"{_NUMBER}\s*-?\s*{_UNIT}{_NOT_AREA}"
RANGE_START_BEFORE = rf"{_NUMBER}\s*(?:{_UNIT})?\s*(?:-|–|to|and)\s*$"
# A bound or a range before a length: "over 6 mm", "under 3 mm", "3 to 6 mm", "between 3 and 6 mm".
UPPER_BOUND_BEFORE = r"(?:[<≤]|\bunder|less than|smaller than|below|up to|at most|no (?:more|larger|bigger) than)\s*$"
LOWER_BOUND_BEFORE = r"(?:[>≥]|\bover|more than|greater than|larger than|bigger than|exceed\w*|above|at least)\s*$"
# Lengths that are not the lesion's long diameter, named just before or after the number.
# "a border of 1.8 mm", "8.5 cm tall" (the patient), "the average measurement of 3.8 mm for BCC" (other lesions).
OTHER_LENGTH = (
    r"\b(?:perimeter|circumference|minor|short|thick\w*|depth|deep|breslow|margins?|borders? of|away|apart|area|tall|height"
    r"|average|mean|typical|deviation)\b"
)
# A width is not the long diameter (the labelling rules): "5 mm wide", "4.7 cm (1 inch) wide", "a width of 1.4 cm";
# unless a length word leads to the number ("a length of 3.2 cm and a width of 1.4 cm").
WIDTH = r"\b(?:width|wide|broad)\b"
LENGTH_BEFORE = r"\b(?:length|long|diameter)(?:\s+of)?(?:\s+(?:about|approximately|around|roughly))?\s*$"
COMPARED_AFTER = r"^\W*(?:longer|shorter|larger|smaller|bigger|wider|more|less)\b"  # "1.4 mm longer than"
