"""Faithfulness audit of a clinical note against its lesion's metadata.

`extract_facts` reads what a note claims with keyword rules (the paper's check is keyword based
too), from the word lists of `dermaray.notes.lexicon`. `audit_note` compares each claim with the
lesion row, using the thresholds and words of prompts.py, so a strategy-M note is never flagged.
A fact the note does not state, or whose truth in the row is None, is never flagged.

What is audited, by flag code:

- diagnosis_mismatch: an affirmed diagnosis name or abbreviation ("melanoma", "SK") other than the
  row's diagnosis (SEK and BKL stand for each other), or any affirmed condition outside the
  classes ("psoriasis", "cyst", "wart").
- malignancy_mismatch: an affirmed benign / premalignant / malignant word other than
  `malignancy_word(row)`; "not malignant" contradicts a malignant lesion only.
- age_mismatch: a stated age ("45-year-old", "aged 45", "in her 40s") more than
  `Tolerance.age_years` from age_approx.
- sex_mismatch: a sex word or pronoun ("woman", "he", "her") of the other sex.
- site_mismatch: a site word none of whose anatomic sites (lexicon.SITE_WORDS) is anatom_site.
- size_mismatch: a stated long diameter (mm, cm or inches; "4 x 3 mm" counts its larger side), a
  bound ("over 6 mm"), a range ("3 to 6 mm") or a size word (small /
  medium / large, prompts.SIZE_BANDS_MM) that misses `lesion_diameter_mm(row)` by more than the
  tolerance, max(`size_absolute_mm`, `size_relative` x the true diameter).
- symmetry_mismatch, border_mismatch, colour_variation_mismatch: symmetric / asymmetric,
  regular / irregular border, uniform / variegated against symm_2axis, norm_border and
  norm_color at the thresholds of prompts.py (within `Tolerance.threshold_band` of one, both).
- colour_mismatch: a colour stated for the lesion that is neither the colour name of its mean
  L*a*b* (prompts.colour_name) nor a neighbouring shade (lexicon.COMPATIBLE_COLOURS).
- contrast_mismatch: a stated contrast with the skin other than `contrast_word(delta_lb_norm)`.
- invented_history: any affirmed history, symptom, evolution or procedure ("rapidly growing",
  "bleeding", "underwent a biopsy"): the lesion table holds none; plans ("excision is
  recommended") are not history.
- self_contradiction: one note affirming both values of a pair (lexicon.FACTS: symmetric and
  asymmetric, benign or not malignant and malignant, regular and irregular border, uniform and
  variegated, well- and ill-defined).

How claims are read: a term within a short window after a negation cue ("no", "not", "without",
"absence of", ...) is negated: for the two-valued attributes that is a claim of the opposite
("not asymmetric" = symmetric); for the rest it is no claim. A term after a hedge ("rule out",
"differential", "history of", ...) or followed by "was ruled out" / "is unlikely" is no claim. A
term followed by ":" is a field label ("Asymmetry: symmetric"), not a claim, and a line listing a
form's options ("Border: regular | slightly irregular | markedly irregular") claims nothing; nor do
values offered as alternatives ("small, medium, or large"). From a word that speaks of the condition
in general ("usually", "typically", "can occur", lexicon.GENERIC_CUES) to the end of its sentence,
nothing is a claim about this lesion ("It is usually found on the legs"). A diagnosis, malignancy or
site after a word of the patient's past in its sentence ("a history of skin conditions such as acne",
"14 years ago, diagnosed with", lexicon.PAST_CONDITION_CUES), or after "other" ("no other
malignancies"), is not this lesion's. A site word is the lesion's only when a location word leads
to it ("on their back", "located in the abdomen", "Site: face"; not "a large abdomen").

Not audited: lesion type words (macule, papule, nodule), dermoscopic structures (dots, globules,
vessels), border sharpness (well- / ill-defined: recorded, and audited only for
self-contradiction), colours of anything but the lesion, vague qualifiers ("normal colour",
"moderate symmetry"), numbers other than ages and the lesion's long diameter (areas, perimeters,
margins, thicknesses, a border's width, the patient's height, averages), and anything the rules
above do not read (a paraphrase outside the lexicon).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from dermaray.notes.lexicon import (
    AGE_PATTERNS,
    CLAUSE_BREAKS,
    COLOUR_HEAD_AFTER,
    COLOUR_LEAD_BEFORE,
    COLOUR_OTHER_AFTER,
    COLOUR_WORDS,
    COMPARED_AFTER,
    COMPATIBLE_COLOURS,
    COMPATIBLE_DIAGNOSES,
    CONTRAST_STATED,
    CONTRAST_WORDS,
    DECADE,
    DIMENSIONS,
    EXAMINATION_AFTER,
    FACTS,
    GENERIC_CUES,
    GENERIC_SUBJECT,
    HEDGE_CUES,
    HISTORY_WORDS,
    LENGTH,
    LENGTH_BEFORE,
    LESION_NOUN,
    LIST_HEDGE_CUES,
    LOWER_BOUND_BEFORE,
    NEGATING_PREFIX,
    NEGATION_CUES,
    NO_HISTORY_AFTER,
    OTHER_BEFORE,
    OTHER_LENGTH,
    PAST_CONDITION_CUES,
    PLAN_WORDS,
    POPULATION_AFTER,
    POST_HEDGES,
    POST_NEGATIONS,
    POST_VERBS,
    RANGE_START_BEFORE,
    SEX_WORDS,
    SITE_LEAD_BEFORE,
    SITE_WORDS,
    SIZE_COPULA_BEFORE,
    SIZE_LABEL_BEFORE,
    SIZE_NOUN_AFTER,
    SKIN_BEFORE,
    TURN_WORDS,
    UPPER_BOUND_BEFORE,
    WIDTH,
    Fact,
)
from dermaray.notes.prompts import (
    ASYMMETRIC_MIN_SYMM_2AXIS,
    COLOUR_NAMES,
    IRREGULAR_MIN_NORM_BORDER,
    SIZE_BANDS_MM,
    SIZE_CATEGORIES,
    VARIEGATED_MIN_NORM_COLOR,
    colour_name,
    contrast_word,
    finite_number,
    lesion_diameter_mm,
    malignancy_word,
)
from dermaray.schema import ANATOMIC_SITES, DIAGNOSES_BY_CODE

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

NEGATION_WINDOW_WORDS = 6
HEDGE_WINDOW_WORDS = 5
LIST_HEDGE_WINDOW_WORDS = 14
LIST_WINDOW_WORDS = 12  # a negated list
NEAR_WORDS = 4  # a term's `near` pattern: within this many words

# --- The lexicon, compiled once --------------------------------------------------------------

_I = re.IGNORECASE


def _words(*alternatives: str) -> str:
    return r"\b(?:" + "|".join(alternatives) + r")(?!\w)"


def _alternatives(*alternatives: str) -> str:
    return "(?:" + "|".join(alternatives) + ")"


def _check(values: Iterable[str], known: Iterable[str], what: str) -> None:
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"lexicon: unknown {what} {sorted(unknown)}; known: {sorted(known)}")


@dataclass(frozen=True)
class _Term:
    """One lexicon entry, compiled: its fact, its value and how a match of it counts."""

    kind: str
    value: str
    pattern: re.Pattern[str]
    weak: bool = False
    near: re.Pattern[str] | None = None
    sites: frozenset[str] = frozenset()  # site terms: the anatomic sites the words allow


def _compile_terms(facts: Iterable[Fact], site_words: Iterable[tuple[str, tuple[str, ...]]]) -> tuple[_Term, ...]:
    """Every fact's words as terms, each value checked against its source (diagnosis codes, size categories, sites)."""
    known = {"diagnosis": {*DIAGNOSES_BY_CODE, "OTHER"}, "size_word": SIZE_CATEGORIES}
    terms = []
    for fact in facts:
        values = [w.value for w in fact.words]
        _check(values, known.get(fact.kind, values), f"{fact.kind} value")
        named = [*fact.negation, *fact.negation.values(), *(v for pair in fact.contradictions for v in pair)]
        _check(named, values, f"{fact.kind} value in negation or contradictions")
        for w in fact.words:
            pattern = re.compile(_words(*w.alternatives), 0 if w.case_sensitive else _I)
            near = re.compile(w.near, _I) if w.near else None
            terms.append(_Term(fact.kind, w.value, pattern, w.weak, near))
    for pattern, sites in site_words:
        _check(sites, ANATOMIC_SITES, "anatomic site")
        terms.append(_Term("site", "", re.compile(_words(pattern), _I), sites=frozenset(sites)))
    return tuple(terms)


_TERMS = _compile_terms(FACTS, SITE_WORDS)
_NEGATED = {f.kind: dict(f.negation) for f in FACTS}
_CONTRADICTIONS = tuple((f.kind, a, b) for f in FACTS for a, b in f.contradictions)
_LESION_NOUN = re.compile(LESION_NOUN, _I)
_SIZE_LABEL_BEFORE = re.compile(SIZE_LABEL_BEFORE, _I)
_SIZE_COPULA_BEFORE = re.compile(SIZE_COPULA_BEFORE, _I)
_SIZE_NOUN_AFTER = re.compile(SIZE_NOUN_AFTER, _I)

_check(COMPATIBLE_COLOURS, COLOUR_NAMES, "measured colour name")
_check(COLOUR_NAMES, COMPATIBLE_COLOURS, "colour name without compatible colours")
_check((c for compatible in COMPATIBLE_COLOURS.values() for c in compatible), COLOUR_WORDS.values(), "compatible colour")
_check(CONTRAST_STATED, CONTRAST_WORDS, "stated contrast word")
_COLOUR_ALTERNATIVES = "|".join(f"(?:{p})" for p in COLOUR_WORDS)
_COLOUR = re.compile(rf"\b({_COLOUR_ALTERNATIVES})(?:\s*(?:-|to|and|/)\s*({_COLOUR_ALTERNATIVES}))?(?!\w)", _I)
_COLOUR_NAMES = tuple((re.compile(p, _I), name) for p, name in COLOUR_WORDS.items())
_COLOUR_HEAD = re.compile(COLOUR_HEAD_AFTER, _I)
_COLOUR_LEAD = re.compile(COLOUR_LEAD_BEFORE, _I)
_COLOUR_OTHER = re.compile(COLOUR_OTHER_AFTER, _I)
_SKIN_BEFORE = re.compile(SKIN_BEFORE, _I)
_CONTRAST = re.compile(
    rf"\b({'|'.join(CONTRAST_WORDS)})(?:[- ](?:degree|level)\s+of)?[- ]contrast\b"
    rf"|\bcontrast\b[^.;:]{{0,40}}?(?::|\bis\b|\bwas\b)\s*({'|'.join(CONTRAST_STATED)})\b",
    _I,
)
_HISTORY = re.compile(_words(*HISTORY_WORDS), _I)
_PLAN = re.compile(_words(*PLAN_WORDS), _I)
_NO_HISTORY_AFTER = re.compile(NO_HISTORY_AFTER, _I)
_EXAMINATION_AFTER = re.compile(EXAMINATION_AFTER, _I)
_CONFIRMED = re.compile(r"confirm|diagnos", _I)  # a history cue that today's examination answers

# Sentence and clause ends; "4.2" and "vs." are not sentence ends.
_SENTENCE_END = r"(?<!\bvs)(?<!e\.g)(?<!i\.e)(?<!approx)\.(?=\s|$)|[;!?\n]"
_TERMINATOR = re.compile(_SENTENCE_END + r"|\b" + _alternatives(*CLAUSE_BREAKS) + r"\b", _I)
# Where a past-condition cue stops reaching: a sentence end or a turn ("diagnosed with X, but ... revealed Y").
_TURN = re.compile(_SENTENCE_END + "|" + _words(*TURN_WORDS), _I)
_NEGATION = re.compile(_words(*NEGATION_CUES) + r"|n't\b", _I)
_NEGATING_PREFIX = re.compile(NEGATING_PREFIX, _I)
_LIST_HEDGE = re.compile(_words(*LIST_HEDGE_CUES), _I)
_HEDGE = re.compile(_words(*HEDGE_CUES), _I)
_POST_VERBS = r"^[\s*]*(?:[\w-]+\s+){0,2}?(?:" + _alternatives(*POST_VERBS) + r"\s+)*"
_POST_NEGATION = re.compile(_POST_VERBS + _alternatives(*POST_NEGATIONS) + r"\b", _I)
_POST_HEDGE = re.compile(_POST_VERBS + _alternatives(*POST_HEDGES) + r"\b", _I)

_AGES = tuple(re.compile(p, _I) for p in AGE_PATTERNS)
_DECADE = re.compile(DECADE, _I)
_SEXES = tuple((sex, re.compile(_words(*words) + POPULATION_AFTER, _I)) for sex, words in SEX_WORDS.items())
_DIMENSIONS = re.compile(DIMENSIONS, _I)
_LENGTH = re.compile(LENGTH, _I)
_UPPER_BOUND = re.compile(UPPER_BOUND_BEFORE, _I)
_LOWER_BOUND = re.compile(LOWER_BOUND_BEFORE, _I)
_RANGE_START = re.compile(RANGE_START_BEFORE, _I)
_OTHER_LENGTH = re.compile(OTHER_LENGTH, _I)
_COMPARED = re.compile(COMPARED_AFTER, _I)
_WIDTH = re.compile(WIDTH, _I)
_LENGTH_BEFORE = re.compile(LENGTH_BEFORE, _I)

# Text structure, not words.
_WORD = re.compile(r"\w+")
_LABEL = re.compile(r"^[\s*_]*:")  # "Asymmetry: ..."
_OR = re.compile(r"\b(?:or|nor)\b", _I)
_PHRASE_END = re.compile(r"[,.;:!?\n(]")
_SEPARATOR = re.compile(r"[,=:]")  # of a flag string
# A line offering options ("Border: regular | slightly irregular | markedly irregular"), as P1 notes copy
# the form back: it chooses nothing.
_OPTION_LIST = re.compile(r"^[^\n|]*(?:\|[^\n|]*)+$", re.MULTILINE)
# A sentence: up to a full stop that is not a decimal point, "!", "?" or a line end.
_SENTENCE = re.compile(r"(?:[^.!?\n]|\.(?=\d))+(?:[.!?]+|\n|$)")
_GENERIC = re.compile(_words(*GENERIC_CUES), _I)
_GENERIC_SUBJECT = re.compile(GENERIC_SUBJECT, _I)
_PAST_CONDITION = re.compile(_words(*PAST_CONDITION_CUES), _I)
_OTHER_BEFORE = re.compile(OTHER_BEFORE, _I)
_SITE_LEAD = re.compile(SITE_LEAD_BEFORE, _I)
# Values of one kind offered as alternatives ("small, medium, or large", "benign or malignant").
_ALTERNATIVE_GAP = re.compile(r"^\s*(?:,\s*)?(?:(?:or|and/or)\s+)?$|^\s*/\s*$", _I)


# --- Results ---------------------------------------------------------------------------------


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
        # Separators replaced: the string stays parseable.
        return f"{self.code}:stated={_SEPARATOR.sub(';', self.stated)},true={_SEPARATOR.sub(';', self.true)}"


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


# --- Reading a note --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hit:
    term: _Term
    start: int
    end: int


def _terms(text: str) -> list[_Hit]:
    """Every lexicon hit; within one kind the longest of overlapping hits wins, then the earlier entry."""
    hits = [_Hit(term, m.start(), m.end()) for term in _TERMS for m in term.pattern.finditer(text)]
    hits.sort(key=lambda h: (h.start, -(h.end - h.start)))
    kept: list[_Hit] = []
    for hit in hits:
        if not any(k.term.kind == hit.term.kind and k.start < hit.end and hit.start < k.end for k in kept):
            kept.append(hit)
    return kept


def _clause_start(text: str, position: int, ends: re.Pattern[str] = _TERMINATOR) -> int:
    start = 0
    for m in ends.finditer(text, 0, position):
        start = m.end()
    return start


def _clause_end(text: str, position: int) -> int:
    m = _TERMINATOR.search(text, position)
    return m.start() if m else len(text)


def _word_count(text: str) -> int:
    return len(_WORD.findall(text))


def _polarity(text: str, start: int, end: int, hits: Sequence[_Hit] = ()) -> str:
    """The polarity of the words at [start, end): "affirmed", "negated" or "hedged". `hits`: the note's
    lexicon hits (a negation does not carry past another claim)."""
    after = _PHRASE_END.split(text[end : end + 60], maxsplit=1)[0]
    if _POST_HEDGE.match(after):
        return "hedged"
    if _POST_NEGATION.match(after):
        return "negated"
    clause_start = _clause_start(text, start)
    before = text[clause_start:start]
    if _NEGATING_PREFIX.search(before):
        return "negated"
    for cue, window, stop_at_comma in ((_LIST_HEDGE, LIST_HEDGE_WINDOW_WORDS, False), (_HEDGE, HEDGE_WINDOW_WORDS, True)):
        cues = list(cue.finditer(before))
        if cues:
            gap = before[cues[-1].end() :]
            if _word_count(gap) <= window and not (stop_at_comma and "," in gap):
                return "hedged"
    cues = list(_NEGATION.finditer(before))
    if cues:
        cue_end = clause_start + cues[-1].end()
        gap = text[cue_end:start]
        between = any(cue_end <= h.start and h.end <= start for h in hits)
        # Past a comma or another claim, a negation carries on only through a list with
        # "or" / "nor" ("no asymmetry, border irregularity or colour variegation").
        if not ("," in gap or between):
            if _word_count(gap) <= NEGATION_WINDOW_WORDS:
                return "negated"
        elif _word_count(gap) <= LIST_WINDOW_WORDS and _OR.search(text, cue_end, _clause_end(text, cue_end)):
            return "negated"
    return "affirmed"


def _near(text: str, hit: _Hit, pattern: re.Pattern[str], words: int) -> bool:
    """`pattern` within `words` words before or after the hit, in the same clause."""
    before = text[_clause_start(text, hit.start) : hit.start]
    after = text[hit.end : _clause_end(text, hit.end)]
    before = " ".join(_WORD.findall(before)[-words:])
    after = " ".join(_WORD.findall(after)[:words])
    return bool(pattern.search(before) or pattern.search(after))


def _is_claim_in_context(text: str, hit: _Hit) -> bool:
    """Context a word needs to be the claim we audit."""
    if hit.term.near:
        return _near(text, hit, hit.term.near, NEAR_WORDS)  # "irregular border", not "regular follow-up"
    if hit.term.kind == "size_word":
        # "a small, symmetric macule", "medium-sized", "Size: small"; not "a small amount of scale"
        before, after = text[max(0, hit.start - 30) : hit.start], text[hit.end : _clause_end(text, hit.end)]
        return bool(
            _SIZE_LABEL_BEFORE.search(before)
            or _SIZE_COPULA_BEFORE.search(before)
            or _SIZE_NOUN_AFTER.match(after)
            or _LESION_NOUN.search(" ".join(_WORD.findall(after)[:5]))
        )
    if hit.term.kind == "site":
        before = text[_clause_start(text, hit.start) : hit.start]
        return bool(_SITE_LEAD.search(before) or not before.strip())
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
            words_before, words_after = _WORD.findall(before), _WORD.findall(after)
            if _OTHER_LENGTH.search(" ".join(words_before[-3:] + words_after[:2])) or _COMPARED.match(after):
                continue
            if _WIDTH.search(" ".join(words_before[-3:] + words_after[:3])) and not _LENGTH_BEFORE.search(before):
                continue  # a width ("5 mm wide"), unless a length word leads ("a length of 3 cm and a width of 1 cm")
            groups = m.groups()
            unit = groups[-1].lower()
            scale = 10.0 if unit.startswith("c") else 25.4 if unit.startswith("inch") else 1.0
            value = scale * max(float(g) for g in (groups[0], groups[2] if pattern is _DIMENSIONS else None) if g)
            if _UPPER_BOUND.search(before):
                found.append((0.0, value))
            elif _LOWER_BOUND.search(before):
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
        if _polarity(text, m.start(), m.end()) != "affirmed":
            continue
        for part in m.groups():
            if part:
                found.append(next(name for pattern, name in _COLOUR_NAMES if pattern.fullmatch(part)))
    return found


def _contrasts(text: str) -> list[str]:
    return [
        CONTRAST_WORDS[(m.group(1) or m.group(2)).lower()]
        for m in _CONTRAST.finditer(text)
        if _polarity(text, m.start(), m.end()) == "affirmed"
    ]


def _history(text: str) -> list[str]:
    """Affirmed history, symptoms and procedures (not negated, hedged or planned)."""
    found = []
    for m in _HISTORY.finditer(text):
        clause = text[_clause_start(text, m.start()) : _clause_end(text, m.end())]
        if _PLAN.search(clause) or _NO_HISTORY_AFTER.match(text, m.end()) or _polarity(text, m.start(), m.end()) != "affirmed":
            continue
        if _CONFIRMED.search(m.group(0)) and _EXAMINATION_AFTER.match(text, m.end()):
            continue
        found.append(re.sub(r"\s+", " ", m.group(0).lower()))
    return found


def _without_generic_part(sentence: re.Match[str]) -> str:
    """A sentence up to its first generic cue: what follows describes the condition, not this lesion. A
    sentence whose subject is a condition in the plural is generic throughout."""
    if _GENERIC_SUBJECT.match(sentence.group(0)):
        return "."
    cue = _GENERIC.search(sentence.group(0))
    return sentence.group(0)[: cue.start()] + "." if cue else sentence.group(0)


def _another_condition(text: str, hit: _Hit) -> bool:
    """A diagnosis, malignancy or site word about the patient's past or another lesion, not this one."""
    start = _clause_start(text, hit.start, _TURN)
    return bool(_PAST_CONDITION.search(text, start, hit.start) or _OTHER_BEFORE.search(text[start : hit.start]))


def _alternatives_offered(text: str, hits: Sequence[_Hit]) -> set[_Hit]:
    """Hits in a list of values of one kind joined by "or" ("small, medium, or large"): none is chosen."""
    by_kind: dict[str, list[_Hit]] = {}
    for hit in hits:
        by_kind.setdefault(hit.term.kind, []).append(hit)
    offered: set[_Hit] = set()
    for same in by_kind.values():
        runs = [[same[0]]]
        for previous, hit in pairwise(same):
            if _ALTERNATIVE_GAP.match(text[previous.end : hit.start]):
                runs[-1].append(hit)
            else:
                runs.append([hit])
        for run in runs:
            between = " ".join(text[a.end : b.start] for a, b in pairwise(run))
            if len({h.term.value for h in run}) > 1 and (_OR.search(between) or "/" in between):
                offered.update(run)
    return offered


def extract_facts(note: str) -> Facts:
    """The claims of a note (see the module docstring for the rules)."""
    note = _OPTION_LIST.sub("", note)
    note = _SENTENCE.sub(_without_generic_part, note)
    hits = _terms(note)
    offered = _alternatives_offered(note, hits)
    claims: dict[str, list[str]] = {}
    sites: list[tuple[str, frozenset[str]]] = []
    for hit in hits:
        term = hit.term
        if hit in offered:
            continue
        if _LABEL.match(note[hit.end : hit.end + 4]):
            continue  # a field label, "Asymmetry: symmetric"
        if not _is_claim_in_context(note, hit):
            continue
        if term.kind in ("diagnosis", "malignancy", "site") and _another_condition(note, hit):
            continue
        polarity = _polarity(note, hit.start, hit.end, hits)
        value = term.value
        negated = _NEGATED.get(term.kind, {})
        if polarity == "negated" and value in negated:
            value = negated[value]
        elif polarity != "affirmed" or term.weak:
            continue
        if term.kind == "site":
            sites.append((note[hit.start : hit.end].strip(), term.sites))
        else:
            claims.setdefault(term.kind, []).append(value)

    diameters = _diameters(note)
    ages = [(float(m.group(1)),) * 2 for pattern in _AGES for m in pattern.finditer(note)]
    ages += [(float(m.group(1)) * 10, float(m.group(1)) * 10 + 9) for m in _DECADE.finditer(note)]
    sexes = [(sex, m.start()) for sex, pattern in _SEXES for m in pattern.finditer(note)]
    contradictions = [f"{a}/{b}" for kind, a, b in _CONTRADICTIONS if a in claims.get(kind, ()) and b in claims.get(kind, ())]
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
# Two-valued attributes: flag code, Facts field, row column, threshold, the word below it and the word from it on.
_THRESHOLD_CHECKS = (
    ("symmetry_mismatch", "symmetry", "symm_2axis", ASYMMETRIC_MIN_SYMM_2AXIS, "symmetric", "asymmetric"),
    ("border_mismatch", "borders", "norm_border", IRREGULAR_MIN_NORM_BORDER, "regular", "irregular"),
    ("colour_variation_mismatch", "colour_variation", "norm_color", VARIEGATED_MIN_NORM_COLOR, "uniform", "variegated"),
)


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


def _size_flags(facts: Facts, true_diameter: float, tolerance: Tolerance) -> list[tuple[str, str]]:
    """(stated, true) for each stated diameter, bound, range or size word the true diameter misses."""
    true = f"{true_diameter:.1f}mm"
    missed = [(f"{d:g}mm", true) for d in facts.diameters_mm if not _within(true_diameter, d, d, tolerance)]
    for low, high in facts.diameter_bounds_mm:
        if not _within(true_diameter, low, high, tolerance):
            missed.append((f"<{high:g}mm" if low == 0 else f">{low:g}mm" if high == _INF else f"{low:g}-{high:g}mm", true))
    missed += [(w, true) for w in facts.size_words if not _within(true_diameter, *SIZE_BANDS_MM[w], tolerance)]
    return missed


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
            if code not in COMPATIBLE_DIAGNOSES.get(true_dx, frozenset({true_dx})):
                flag("diagnosis_mismatch", code, true_dx)
    true_malignancy = malignancy_word(row)
    if true_malignancy:
        for stated in facts.malignancy:
            if stated != true_malignancy and (stated != "not-malignant" or true_malignancy == "malignant"):
                flag("malignancy_mismatch", stated, true_malignancy)
    true_age = finite_number(row, "age_approx")
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
        for stated, true in _size_flags(facts, true_diameter, tolerance):
            flag("size_mismatch", stated, true)
    for code, field, column, threshold, low, high in _THRESHOLD_CHECKS:
        value = finite_number(row, column)
        holds = _binary_truth(value, threshold, low, high, tolerance.threshold_band)
        for stated in getattr(facts, field):
            if holds and stated not in holds:
                flag(code, stated, f"{'/'.join(sorted(holds))}({value:.3g})")
    lab = [finite_number(row, c) for c in ("lesion_L", "lesion_A", "lesion_B")]
    if None not in lab:
        true_colour = colour_name(*lab)
        for stated in facts.colours:
            if stated not in COMPATIBLE_COLOURS[true_colour]:
                flag("colour_mismatch", stated, true_colour)
    contrast = finite_number(row, "delta_lb_norm")
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
