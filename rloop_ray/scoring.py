"""Behaviour scorers over generated text, looked up by name in a small registry.

A scorer turns one generated text into one or more float columns of the result row
(``score_<name>``). Text scorers are pure and cheap, so the driver can run them on
every row and the stats stage can recompute them from stored text. The continuous
measure of docs/semantics.md (log-probability of a recursive minus a neutral continuation)
needs the model and the patched cache, so it lives in the engine, not here.

Two scorers are registered:

``keywords``
    The earlier work's 0-10 keyword count, kept so its figures can be re-tested with
    the same instrument. Column ``score_keywords``.
``regex``
    Phrase-level patterns, reported as matches per 100 words in two columns:
    ``score_self_ref`` (first-person reflexive phrases) and ``score_technical``
    (ML/transformer vocabulary), so that "the model talks about itself" and "the
    model talks about transformers" are no longer one number.

Every scorer returns a finite float for every string, the empty string included
(0.0): a generation that produced nothing is a behaviour, not a missing value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rloop_ray.lookup import unknown_message

__all__ = [
    "KEYWORDS",
    "KEYWORD_CAP",
    "SELF_REF_PATTERNS",
    "TECHNICAL_PATTERNS",
    "Scorer",
    "UnknownScorerError",
    "available_scorers",
    "count_words",
    "get_scorer",
    "keyword_count",
    "register_scorer",
    "score_columns",
    "score_text",
]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Scorer:
    """A named text scorer and the result columns it fills.

    ``columns`` is declared up front so the store can build its Arrow schema before
    any text exists, and so a scorer can never add a column the schema lacks.
    """

    name: str
    columns: tuple[str, ...]
    fn: Callable[[str], Mapping[str, float]]
    description: str = ""

    def __call__(self, text: str) -> dict[str, float]:
        if not isinstance(text, str):
            raise TypeError(
                f"scorer {self.name!r} scores text (str), got {type(text).__name__}; "
                "a failed generation should be recorded as a failure, not scored"
            )
        out = {col: float(v) for col, v in self.fn(text).items()}
        if tuple(out) != self.columns:
            raise RuntimeError(
                f"scorer {self.name!r} returned columns {tuple(out)}, declared {self.columns}"
            )
        return out


class UnknownScorerError(KeyError):
    """A scorer name that is not registered; the message lists the alternatives."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.message


_REGISTRY: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer) -> Scorer:
    """Add a scorer; a second scorer of the same name is refused rather than shadowing."""
    if scorer.name in _REGISTRY:
        raise ValueError(f"a scorer named {scorer.name!r} is already registered")
    taken = {col: s.name for s in _REGISTRY.values() for col in s.columns}
    for col in scorer.columns:
        if col in taken:
            raise ValueError(
                f"scorer {scorer.name!r} would write column {col!r}, already written by "
                f"scorer {taken[col]!r}"
            )
    _REGISTRY[scorer.name] = scorer
    return scorer


def available_scorers() -> list[str]:
    """Registered scorer names, sorted."""
    return sorted(_REGISTRY)


def get_scorer(name: str) -> Scorer:
    """Look a scorer up by name; a miss says what was probably meant and what exists."""
    try:
        return _REGISTRY[name]
    except KeyError:
        names = available_scorers()
        raise UnknownScorerError(
            unknown_message("scorer", name, names, n=3, cutoff=0.5)
        ) from None


def _names(names: str | Iterable[str]) -> list[str]:
    """Normalise a name or names; a bare string is one name, not a list of letters."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def score_columns(names: str | Iterable[str]) -> list[str]:
    """The result columns the given scorers fill, in order (for schemas)."""
    return [col for n in _names(names) for col in get_scorer(n).columns]


def score_text(text: str, names: str | Iterable[str]) -> dict[str, float]:
    """Run the named scorers on one text; returns ``{column: value}``.

    All names are looked up before any scoring, so a typo fails fast instead of after
    part of a row has been scored.
    """
    scorers = [get_scorer(n) for n in _names(names)]
    out: dict[str, float] = {}
    for scorer in scorers:
        out.update(scorer(text))
    return out


# --------------------------------------------------------------------------- words

_WORD_RE = re.compile(r"\w+(?:['\u2019-]\w+)*")


def count_words(text: str) -> int:
    """Words for the per-100-words rates.

    A word is a run of letters/digits/underscores, optionally joined by apostrophes or
    hyphens, so ``self-aware`` and ``don't`` are one word each; punctuation and symbols
    alone are not words.
    """
    return len(_WORD_RE.findall(text))


# --------------------------------------------------------------------------- keywords

# fmt: off
KEYWORDS: tuple[str, ...] = (
    "observe", "observes", "observed", "observing", "observer", "observation",
    "aware", "awareness",
    "conscious", "consciousness",
    "self", "itself", "myself",
    "recursive", "recursion", "recursively",
    "reflect", "reflecting", "reflection",
    "notice", "noticing",
    "attention", "attending",
    "process", "processing",
    "loop", "meta",
    "introspection",
)
# fmt: on
"""Self-referential keywords counted by ``keywords`` (whole words, any case)."""

KEYWORD_CAP = 10
"""The earlier work's score ran 0-10; counts above the cap are clipped to it."""

_KEYWORD_RE = re.compile(
    r"\b(?:" + "|".join(re.escape(k) for k in sorted(KEYWORDS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def keyword_count(text: str) -> int:
    """Uncapped number of keyword occurrences (for diagnostics and tests).

    Whole words only: ``selfish`` and ``processor`` do not count. ``\\b`` treats a
    hyphen as a boundary, so ``self-aware`` counts twice (``self`` and ``aware``).
    """
    return len(_KEYWORD_RE.findall(text))


def _score_keywords(text: str) -> dict[str, float]:
    """The earlier work's instrument, kept for comparability; weak by construction.

    Known weaknesses, and why the regex and log-probability scorers exist beside it:
    it counts words, not meaning, so a reply that echoes the recursive prompt's own
    vocabulary scores high whatever it says; ordinary words (``process``, ``self``,
    ``attention``) fire in non-reflective text ("the process of photosynthesis");
    negation is ignored ("I am not aware" counts); it is not length-normalised, so
    longer generations score higher; and the cap at 10 saturates, hiding differences
    between strongly recursive replies (the earlier recursive mean of 6.27 +- 4.76
    sits against that ceiling).
    """
    return {"score_keywords": float(min(keyword_count(text), KEYWORD_CAP))}


register_scorer(
    Scorer(
        name="keywords",
        columns=("score_keywords",),
        fn=_score_keywords,
        description="count of self-referential keywords, whole words, capped at 10",
    )
)


# --------------------------------------------------------------------------- regex

# Verbs of observing, as stems, shared by several self-reference patterns.
_OBS = r"(?:notic|observ|watch|examin|reflect|attend|monitor)\w*"

SELF_REF_PATTERNS: tuple[str, ...] = (
    # "I notice", "I can observe", "I now sense"
    r"\bI\s+(?:can\s+|now\s+|also\s+|just\s+)?(?:notice|observe|sense|watch)\b",
    # "I am aware", "I'm noticing", "I am observing"
    r"\bI(?:\s+am|['\u2019]m)\s+(?:now\s+|also\s+|just\s+)?"
    r"(?:aware|conscious|noticing|observing|watching|attending|reflecting)\b",
    # "my own"
    r"\bmy\s+own\b",
    # "my processing", "my thinking", "my awareness", ...
    r"\bmy\s+(?:processing|thinking|thoughts|awareness|attention|generation|observation)\b",
    # "observing myself", "watching itself", "reflecting on itself"
    r"\b" + _OBS + r"\s+(?:on\s+|upon\s+)?(?:myself|itself)\b",
    # "observing the observer", "noticing the noticing"
    r"\b" + _OBS + r"\s+(?:of\s+)?(?:the\s+)?" + _OBS,
    # "aware of being aware", "awareness of awareness", "attention to attention"
    r"\b(?:aware|awareness|attention)\s+(?:of|to)\s+(?:being\s+)?(?:aware|awareness|attention)\b",
    # "this very", "the observer", "the observed", "the watcher"
    r"\bthis\s+very\b",
    r"\bthe\s+(?:observer|observed|watcher|witness)\b",
    # "self-awareness", "self-reference", "self-observation", "self-reflection"
    r"\bself[-\s](?:aware|awareness|referen\w*|observ\w*|reflect\w*|recurs\w*|monitor\w*)",
)
"""First-person reflexive phrases counted by ``regex`` as ``score_self_ref``.

Matched case-insensitively as one alternation scanned left to right, so overlapping
phrases count once: "observing the observer" is one match, not three.
"""

TECHNICAL_PATTERNS: tuple[str, ...] = (
    r"\battention\s+(?:heads?|layers?|weights?|mechanisms?|scores?|patterns?|matri(?:x|ces))\b",
    r"\bself-attention\b",
    r"\bneural(?:\s+net(?:work)?s?)?\b",
    r"\btransformers?\b",
    r"\b(?:large\s+)?language\s+models?\b",
    r"\bLLMs?\b",
    r"\btokens?\b",
    r"\btokeni[sz]\w*",
    r"\blayers?\b",
    r"\bvectors?\b",
    r"\bembeddings?\b",
    r"\btensors?\b",
    r"\bmatri(?:x|ces)\b",
    r"\bgradients?\b",
    r"\blogits?\b",
    r"\bsoftmax\b",
    r"\bactivations?\b",
    r"\bneurons?\b",
    r"\bparameters?\b",
    r"\balgorithms?\b",
    r"\btraining\s+data\b",
    r"\bprobabilit(?:y|ies)\b",
)
"""ML/transformer vocabulary counted by ``regex`` as ``score_technical``.

Same scan rules as the self-reference patterns: "attention head" and "neural network"
are one match each.
"""


def _alternation(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


_SELF_REF_RE = _alternation(SELF_REF_PATTERNS)
_TECHNICAL_RE = _alternation(TECHNICAL_PATTERNS)


def _per_100_words(n_matches: int, n_words: int) -> float:
    """Rate per 100 words; 0.0 when there are no words (empty text is no evidence)."""
    return 100.0 * n_matches / n_words if n_words else 0.0


def _score_regex(text: str) -> dict[str, float]:
    """Separate self-reference and technical rates, per 100 words.

    Normalising by length removes the keyword count's bias towards long replies, and
    splitting the two vocabularies distinguishes a reply about itself from a reply
    about transformers, which the earlier single score conflated.
    """
    n_words = count_words(text)
    return {
        "score_self_ref": _per_100_words(len(_SELF_REF_RE.findall(text)), n_words),
        "score_technical": _per_100_words(len(_TECHNICAL_RE.findall(text)), n_words),
    }


register_scorer(
    Scorer(
        name="regex",
        columns=("score_self_ref", "score_technical"),
        fn=_score_regex,
        description="self-referential and technical phrase matches per 100 words",
    )
)
