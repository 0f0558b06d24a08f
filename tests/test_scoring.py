"""Exact behaviour of the text scorers on hand-counted examples.

The scores feed every behaviour comparison of a sweep, so each example below is
counted by hand in its comment; a change to a word list or pattern that moves a
count must show up here.
"""

from __future__ import annotations

import math

import pytest

from rloop_ray import scoring
from rloop_ray.scoring import (
    KEYWORD_CAP,
    Scorer,
    UnknownScorerError,
    count_words,
    get_scorer,
    keyword_count,
    register_scorer,
    score_columns,
    score_text,
)

# --------------------------------------------------------------------------- registry


def test_registry_lists_the_builtin_scorers() -> None:
    assert scoring.available_scorers() == ["keywords", "regex"]
    assert get_scorer("keywords").columns == ("score_keywords",)
    assert get_scorer("regex").columns == ("score_self_ref", "score_technical")


def test_registry_miss_suggests_and_lists() -> None:
    with pytest.raises(UnknownScorerError) as err:
        get_scorer("regexp")
    assert (
        str(err.value)
        == "Unknown scorer 'regexp'. Did you mean 'regex'? Available: keywords, regex"
    )


def test_registry_miss_without_close_match_still_lists() -> None:
    with pytest.raises(KeyError) as err:  # UnknownScorerError is a KeyError
        get_scorer("zzz")
    assert str(err.value) == "Unknown scorer 'zzz'. Available: keywords, regex"


def test_score_text_checks_every_name_before_scoring() -> None:
    with pytest.raises(
        UnknownScorerError, match="Unknown scorer 'keyword'. Did you mean 'keywords'"
    ):
        score_text("observe", ["regex", "keyword"])


def test_score_text_columns_and_order() -> None:
    out = score_text("I notice the token.", ["keywords", "regex"])
    assert list(out) == ["score_keywords", "score_self_ref", "score_technical"]
    assert score_columns(["keywords", "regex"]) == list(out)


def test_score_text_accepts_a_single_name_and_dedupes() -> None:
    assert score_text("observe", "keywords") == {"score_keywords": 1.0}
    assert score_text("observe", ["keywords", "keywords"]) == {"score_keywords": 1.0}


def test_non_text_is_refused_not_scored() -> None:
    with pytest.raises(TypeError, match="scores text"):
        score_text(None, ["keywords"])  # type: ignore[arg-type]


def test_register_refuses_duplicates() -> None:
    dup = Scorer(name="keywords", columns=("score_other",), fn=lambda t: {"score_other": 0.0})
    with pytest.raises(ValueError, match="already registered"):
        register_scorer(dup)
    clash = Scorer(name="other", columns=("score_keywords",), fn=lambda t: {"score_keywords": 0})
    with pytest.raises(ValueError, match="already written by scorer 'keywords'"):
        register_scorer(clash)
    assert scoring.available_scorers() == ["keywords", "regex"]


# --------------------------------------------------------------------------- keywords


def test_keywords_exact_count() -> None:
    text = (
        "I observe my own processing. Awareness of the process is a loop: "
        "attention attending to itself, a recursive reflection."
    )
    # observe, processing, Awareness, process, loop, attention, attending, itself,
    # recursive, reflection
    assert keyword_count(text) == 10
    assert score_text(text, ["keywords"]) == {"score_keywords": 10.0}


def test_keywords_case_insensitive() -> None:
    assert keyword_count("OBSERVE Observe observe oBsErVe") == 4


def test_keywords_whole_words_only() -> None:
    # none of these contain a keyword as a whole word
    assert keyword_count("selfish processor loops metadata unaware observers noticed") == 0
    # hyphens and punctuation are word boundaries: self, aware, meta, loop
    assert keyword_count("self-aware, (meta) loop.") == 4


def test_keywords_are_capped_at_ten() -> None:
    text = " ".join(["awareness"] * 25)
    assert keyword_count(text) == 25
    assert score_text(text, "keywords") == {"score_keywords": float(KEYWORD_CAP)}


def test_keywords_zero_for_plain_text() -> None:
    assert score_text("Bread needs flour, water, salt and yeast.", "keywords") == {
        "score_keywords": 0.0
    }


# --------------------------------------------------------------------------- regex


def test_count_words() -> None:
    assert count_words("") == 0
    assert count_words("  ... !!! ") == 0
    # I / don't / know / self-aware / AI / 42 / times
    assert count_words("I don't know; self-aware AI, 42 times.") == 7


def test_regex_self_ref_exact() -> None:
    text = (
        "I notice my own thoughts. I am aware of this very moment, "
        "observing myself and the observer."
    )
    # 17 words; matches: "I notice", "my own", "I am aware", "this very",
    # "observing myself", "the observer" -> 6
    assert count_words(text) == 17
    out = score_text(text, "regex")
    assert out["score_self_ref"] == pytest.approx(100 * 6 / 17)
    assert out["score_technical"] == 0.0


def test_regex_technical_exact() -> None:
    text = (
        "The attention head in layer 3 maps each token to a vector; "
        "neural networks use transformers."
    )
    # 16 words; matches: "attention head", "layer", "token", "vector",
    # "neural networks", "transformers" -> 6
    out = score_text(text, "regex")
    assert out == {"score_self_ref": 0.0, "score_technical": pytest.approx(100 * 6 / 16)}


def test_regex_overlapping_phrases_count_once() -> None:
    # "observing the observer" is one match, not "observer" + "the observer"
    out = score_text("observing the observer", "regex")
    assert out["score_self_ref"] == pytest.approx(100 * 1 / 3)


def test_regex_case_and_word_boundaries() -> None:
    assert score_text("i NOTICE My Own", "regex")["score_self_ref"] == pytest.approx(100 * 2 / 4)
    # "Tokens" and "Layers" count; "player", "prelayer" and "mytoken" contain the
    # words but not as whole words. 7 words, 2 matches.
    text = "Tokens and Layers, not player prelayer mytoken."
    assert score_text(text, "regex")["score_technical"] == pytest.approx(100 * 2 / 7)


def test_regex_plain_text_scores_zero() -> None:
    out = score_text("Mix the flour with water and knead the dough for ten minutes.", "regex")
    assert out == {"score_self_ref": 0.0, "score_technical": 0.0}


@pytest.mark.parametrize("text", ["", "   ", "... !!! ?"])
def test_empty_text_is_zero_never_nan(text: str) -> None:
    out = score_text(text, ["keywords", "regex"])
    assert out == {"score_keywords": 0.0, "score_self_ref": 0.0, "score_technical": 0.0}
    assert all(math.isfinite(v) for v in out.values())
