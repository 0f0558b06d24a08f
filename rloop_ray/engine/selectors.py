"""Parsing of layer and token specs into concrete indices.

Specs are strings so one grid means the same thing on models of different depth
(`"50%:100%"`) and prompts of different length (`"last:25%"`). Resolution is pure
and needs only a number (depth or length), so `validate` can check a grid against a
model's config without loading weights. The one content-based spec, `match:<regex>`,
also needs the decoded text of each prefill token (`token_texts_of`), which the engine
and the pre-flight compute the same way.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

from rloop_ray.vocab import MATCH_PREFIX


class SpecError(ValueError):
    """A layer or token spec that cannot be resolved; the message says why."""


def _round_fraction(text: str, n: int) -> int:
    """`"p%"` of `n`, rounded half up; p must lie in 0..100."""
    try:
        frac = float(text[:-1]) / 100.0
    except ValueError as exc:
        raise SpecError(f"bad fraction {text!r}") from exc
    if not 0.0 <= frac <= 1.0:
        raise SpecError(f"fraction {text!r} is outside 0%..100%")
    return int(math.floor(frac * n + 0.5))


def _layer_point(text: str, n_layers: int, *, is_end: bool) -> int:
    text = text.strip()
    if text.endswith("%"):
        # round-half-up so 12.5% of 32 layers is layer 4 and 84% of 32 is 27
        return _round_fraction(text, n_layers)
    try:
        value = int(text)
    except ValueError as exc:
        raise SpecError(f"bad layer index {text!r} (use an int or a percentage)") from exc
    if value < 0:
        value += n_layers
    limit = n_layers if is_end else n_layers - 1
    if not 0 <= value <= limit:
        raise SpecError(f"layer {text} is out of range for a {n_layers}-layer model "
                        f"(allowed 0..{n_layers - 1})")
    return value


def resolve_layer(spec: str | int, n_layers: int) -> int:
    """One layer (for R_V): `"4"`, `"-1"` or `"84%"` of depth, clipped to the last layer."""
    return min(_layer_point(str(spec), n_layers, is_end=False), n_layers - 1)


def resolve_layers(spec: str | int | list[int] | tuple[int, ...], n_layers: int) -> list[int]:
    """Layer set: `"all"`, `"16:32"`, `"50%:100%"`, `"7"`, `"0,4,8"` or a list of ints."""
    if n_layers <= 0:
        raise SpecError("model has no layers")
    if isinstance(spec, (list, tuple)):
        out = sorted({_layer_point(str(s), n_layers, is_end=False) for s in spec})
        if not out:
            raise SpecError("empty layer list")
        return out
    text = str(spec).strip()
    if text in ("all", ":"):
        return list(range(n_layers))
    if "," in text:
        return resolve_layers([p for p in text.split(",") if p.strip()], n_layers)
    if ":" in text:
        lo_s, hi_s = text.split(":", 1)
        lo = _layer_point(lo_s, n_layers, is_end=False) if lo_s.strip() else 0
        hi = _layer_point(hi_s, n_layers, is_end=True) if hi_s.strip() else n_layers
        if hi <= lo:
            raise SpecError(f"layer range {text!r} is empty on a {n_layers}-layer model "
                            f"(resolves to {lo}:{hi})")
        return list(range(lo, hi))
    idx = _layer_point(text, n_layers, is_end=False)
    return [idx]


def _count(text: str, length: int) -> int:
    text = text.strip()
    if text.endswith("%"):
        return max(1, _round_fraction(text, length)) if length else 0
    try:
        n = int(text)
    except ValueError as exc:
        raise SpecError(f"bad token count {text!r}") from exc
    if n < 0:
        raise SpecError(f"negative token count {text!r}")
    return min(n, length)


def is_match_spec(spec: str) -> bool:
    """True for a content-based token spec (`match:<regex>`)."""
    return str(spec).strip().startswith(MATCH_PREFIX)


@functools.lru_cache(maxsize=256)
def match_pattern(spec: str) -> re.Pattern[str]:
    """The compiled regex of a `match:<regex>` spec; SpecError when it does not compile.

    Cached: one sweep has a handful of specs and every cell resolves one.
    """
    text = str(spec).strip()
    if not text.startswith(MATCH_PREFIX):
        raise SpecError(f"{text!r} is not a {MATCH_PREFIX}<regex> token spec")
    regex = text[len(MATCH_PREFIX):]
    if not regex:
        raise SpecError(f"empty regex in {text!r}; give a pattern, e.g. "
                        f"'{MATCH_PREFIX}(?i)\\bself\\b'")
    try:
        return re.compile(regex)
    except re.error as exc:
        raise SpecError(f"bad regex in token spec {text!r}: {exc}") from exc


def token_texts_of(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The decoded text of each token of `ids`, one string per id (what `match:` sees).

    Each token is decoded alone (`tokenizer.decode([id])`), so a word-start marker reads
    as a leading space (`" self"`) and special tokens keep their own text (`"<s>"`). The
    engine and the pre-flight both call this, so a spec selects the same positions in
    `validate` as in the run.
    """
    return [str(tokenizer.decode([int(i)])) for i in ids]


def resolve_tokens(spec: str, length: int, token_texts: Sequence[str] | None = None
                   ) -> list[int]:
    """Positions `0..length-1` selected by a token spec.

    `all`; absolute slices `"0:8"`, `"-16:"`; `first:N`, `last:N`, `mid:N` where N is a
    count or a percentage of `length`. `mid` is centred. Slices outside the prompt are
    clipped (a short prompt simply has fewer positions), never an error.
    `match:<regex>` selects the positions whose decoded token text (`token_texts`, one per
    position, see `token_texts_of`) the regex finds (`re.search`); it may select none.
    """
    text = str(spec).strip()
    if text.startswith(MATCH_PREFIX):
        pattern = match_pattern(text)
        if token_texts is None:
            raise ValueError(f"token spec {text!r} selects by token text, but no token texts "
                             "were given: pass token_texts (one decoded string per prefill "
                             "position, see selectors.token_texts_of)")
        if len(token_texts) != max(length, 0):
            raise ValueError(f"token spec {text!r}: {len(token_texts)} token texts for "
                             f"{length} positions; give one text per prefill position")
        return [p for p, tok in enumerate(token_texts) if pattern.search(tok)]
    if length <= 0:
        return []
    if text == "all":
        return list(range(length))
    for kind in ("first", "last", "mid"):
        if text.startswith(kind + ":"):
            n = _count(text[len(kind) + 1:], length)
            if kind == "first":
                return list(range(0, n))
            if kind == "last":
                return list(range(length - n, length))
            start = (length - n) // 2
            return list(range(start, start + n))
    if ":" in text:
        lo_s, hi_s = text.split(":", 1)
        try:
            lo = int(lo_s) if lo_s.strip() else None
            hi = int(hi_s) if hi_s.strip() else None
        except ValueError as exc:
            raise SpecError(f"bad token slice {text!r}; use all, 'a:b', first:N, "
                            "last:N, mid:N (N a count or a percentage)") from exc
        return list(range(length))[slice(lo, hi)]
    raise SpecError(f"unknown token spec {text!r}; use all, 'a:b', first:N, last:N, mid:N "
                    f"(N a count or a percentage) or {MATCH_PREFIX}<regex>")


def validate_token_spec(spec: str) -> None:
    """Raise SpecError if a token spec is malformed (checked without a prompt); a
    `match:` spec's regex must compile."""
    if is_match_spec(spec):
        match_pattern(str(spec).strip())
        return
    resolve_tokens(spec, 64)


def aligned_source_position(p: int, target_len: int, source_len: int, align: str) -> int | None:
    """Source position feeding target position `p`, or None when there is none.

    `start`: same index from the start. `end`: same distance from the end.
    """
    if align == "start":
        q = p
    elif align == "end":
        q = p - target_len + source_len
    else:
        raise SpecError(f"unknown align {align!r}; allowed: start, end")
    return q if 0 <= q < source_len else None
