"""The prompt bank (`prompts/*.yaml`): loading, group/level lookup and seeded pairing.

Prompts live in YAML files so their wording and provenance are reviewed like code.
Every choice made here (which targets, which source feeds which target, which
"other" prompt) is a pure function of the bank, the seed and prompt ids, computed
by hashing rather than by a random generator, so it is identical across Python
versions and adding a prompt does not reshuffle the pairs of the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rloop_ray.lookup import did_you_mean
from rloop_ray.spec import (
    RECURSIVE_GROUP,
    Issue,
    SpecValidationError,
    format_loc,
    issues_from_validation_error,
    read_yaml,
)

__all__ = [
    "LEVELS",
    "Prompt",
    "PromptBank",
    "PromptLookupError",
    "pair_prompts",
    "pick_other",
    "seeded_order",
    "text_hash",
]

logger = logging.getLogger(__name__)

LEVELS = (1, 2, 3, 4, 5)
"""Recursion levels: 1 a hint of self-observation .. 5 terse, math-like recursion."""


class PromptLookupError(LookupError):
    """An unknown group or prompt id, or a selection that leaves nothing; lists alternatives."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError key
        return self.message


def text_hash(text: str) -> str:
    """First 16 hex chars of sha256 of the UTF-8 text: a prompt's identity in cell ids."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- file format


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[str, Field(pattern=r"^\S+$")]
    group: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    level: Annotated[int, Field(ge=1, le=5)] | None = None
    category: str | None = None
    text: Annotated[str, Field(min_length=1)]
    n_tokens: dict[str, Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def recursive_needs_level(self) -> _Record:
        if self.group == RECURSIVE_GROUP and self.level is None:
            raise ValueError(f"prompt {self.id!r} of group {RECURSIVE_GROUP!r} needs a `level` "
                             "(1..5)")
        if not self.text.strip():
            raise ValueError(f"prompt {self.id!r} has an empty text")
        return self


class _PromptFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    provenance: dict[str, Any]
    prompts: Annotated[list[_Record], Field(min_length=1)]


@dataclass(frozen=True)
class Prompt:
    """One prompt of the bank. `n_tokens` maps a model name to the prompt's token count."""

    id: str
    group: str
    text: str
    level: int | None = None
    category: str | None = None
    n_tokens: tuple[tuple[str, int], ...] = ()
    file: str = "<memory>"
    line: int | None = None
    index: int | None = None  # position in its file, for error messages

    @property
    def text_hash(self) -> str:
        return text_hash(self.text)

    def tokens_for(self, *names: str) -> int | None:
        """Recorded token count under the first of `names` present (model id, then path)."""
        table = dict(self.n_tokens)
        for name in names:
            if name in table:
                return table[name]
        return None


# --------------------------------------------------------------------------- the bank


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class PromptBank:
    """All prompts of a bank, by id and by group; ids are unique across files."""

    def __init__(self, prompts: Iterable[Prompt], root: str | None = None) -> None:
        self.root = root
        self._by_id: dict[str, Prompt] = {}
        for p in prompts:
            if p.id in self._by_id:
                first = self._by_id[p.id]
                raise SpecValidationError(
                    f"duplicate prompt id {p.id!r}: also in {first.file}"
                    + (f" (line {first.line})" if first.line else "")
                    + "; prompt ids must be unique across the bank",
                    file=p.file, field=f"prompts[{p.index if p.index is not None else '?'}].id",
                    line=p.line,
                )
            self._by_id[p.id] = p

    @classmethod
    def load(cls, path: str | Path) -> PromptBank:
        """Load a bank directory (every `*.yaml`/`*.yml` under it) or a single prompt file."""
        path = Path(path)
        if path.is_dir():
            files = sorted(
                f for f in path.rglob("*")
                if f.is_file() and f.suffix in (".yaml", ".yml")
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not files:
                raise SpecValidationError(f"prompt bank directory has no *.yaml files: {path}",
                                          file=_display(path))
        elif path.is_file():
            files = [path]
        else:
            raise SpecValidationError("prompt bank not found", file=_display(path))
        prompts: list[Prompt] = []
        for f in files:
            prompts.extend(_load_file(f))
        bank = cls(prompts, root=_display(path))
        logger.debug("loaded %d prompts from %d files under %s", len(bank), len(files), path)
        return bank

    # -- lookup -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self._by_id.values())

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._by_id

    def get(self, prompt_id: str) -> Prompt:
        try:
            return self._by_id[prompt_id]
        except KeyError:
            ids = sorted(self._by_id)
            shown = ", ".join(ids[:20]) + (", ..." if len(ids) > 20 else "")
            raise PromptLookupError(
                f"Unknown prompt id {prompt_id!r}.{did_you_mean(prompt_id, ids)} "
                f"Available: {shown}"
            ) from None

    def groups(self) -> dict[str, int]:
        """Group name -> number of prompts, sorted by name."""
        counts: dict[str, int] = {}
        for p in self._by_id.values():
            counts[p.group] = counts.get(p.group, 0) + 1
        return dict(sorted(counts.items()))

    def levels(self, group: str) -> list[int]:
        return sorted({p.level for p in self.group(group) if p.level is not None})

    def group(self, name: str, levels: Sequence[int] | None = None) -> list[Prompt]:
        """Prompts of `name` in bank order; `levels` keeps leveled prompts at those levels.

        Prompts without a level (baseline, controls) are never filtered out by `levels`.
        """
        members = [p for p in self._by_id.values() if p.group == name]
        if not members:
            avail = list(self.groups())
            raise PromptLookupError(
                f"Unknown group {name!r}.{did_you_mean(name, avail)} "
                f"Available: {', '.join(avail) or '(none)'}"
            )
        if levels is not None:
            wanted = set(levels)
            members = [p for p in members if p.level is None or p.level in wanted]
            if not members:
                have = sorted({p.level for p in self._by_id.values()
                               if p.group == name and p.level is not None})
                raise PromptLookupError(
                    f"group {name!r} has no prompts at levels {sorted(wanted)}; "
                    f"its levels are {', '.join(map(str, have))}"
                )
        return members

    def texts(self) -> dict[str, str]:
        return {pid: p.text for pid, p in self._by_id.items()}

    def summary(self) -> str:
        groups = ", ".join(f"{g} {n}" for g, n in self.groups().items())
        return f"{len(self)} prompts ({groups})"


def _load_file(path: Path) -> list[Prompt]:
    shown = _display(path)
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecValidationError(
            "a prompt file must be a mapping with `provenance` and `prompts`", file=shown,
            line=lines.line(()),
        )
    try:
        parsed = _PromptFile.model_validate(data)
    except ValidationError as exc:
        issues = issues_from_validation_error(exc, data, lines, _PromptFile)
        raise SpecValidationError(file=shown, issues=issues) from None
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(parsed.prompts):
        loc = ("prompts", i, "id")
        if r.id in seen:
            raise SpecValidationError(
                file=shown,
                issues=[Issue(format_loc(loc), f"duplicate prompt id {r.id!r} (also "
                              f"prompts[{seen[r.id]}]); ids must be unique", lines.line(loc))],
            )
        seen[r.id] = i
        out.append(Prompt(
            id=r.id, group=r.group, text=r.text, level=r.level, category=r.category,
            n_tokens=tuple(sorted((r.n_tokens or {}).items())), file=shown,
            line=lines.line(("prompts", i)), index=i,
        ))
    return out


# --------------------------------------------------------------------------- seeded choices


def _rank(seed: int, salt: Sequence[Any], prompt_id: str) -> str:
    payload = json.dumps([seed, list(salt), prompt_id], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def seeded_order(prompts: Iterable[Prompt], seed: int, *salt: Any) -> list[Prompt]:
    """A seeded permutation: prompts sorted by sha256(seed, salt, id).

    Stable under additions: a new prompt slots in without moving the others' relative order.
    """
    return sorted(prompts, key=lambda p: (_rank(seed, salt, p.id), p.id))


def pair_prompts(
    targets: Sequence[Prompt],
    sources: Sequence[Prompt],
    *,
    n_pairs: int | None,
    seed: int,
    all_by_default: bool = False,
) -> list[tuple[Prompt, Prompt, int]]:
    """Seeded (target, source, rank) pairs; never a prompt with itself.

    Targets are taken in the given order, round-robin: first every target with its
    rank-0 source, then with its rank-1 source, and so on, each target having its own
    seeded order of sources. So `n_pairs <= len(targets)` uses the first `n_pairs`
    targets once each, and raising `n_pairs` only appends pairs. The default is one pair
    per target, or every combination when `all_by_default`.
    """
    per_target = [
        (t, seeded_order([s for s in sources if s.id != t.id], seed, "source", t.id))
        for t in targets
    ]
    n_max = sum(len(c) for _, c in per_target)
    if n_pairs is None:
        n_pairs = n_max if all_by_default else min(len(targets), n_max)
    if n_pairs > n_max:
        raise PromptLookupError(
            f"n_pairs={n_pairs} but only {n_max} distinct (target, source) pairs exist "
            f"({len(targets)} targets, {len(sources)} sources)"
        )
    out: list[tuple[Prompt, Prompt, int]] = []
    rank = 0
    while len(out) < n_pairs:
        for t, cands in per_target:
            if rank < len(cands) and len(out) < n_pairs:
                out.append((t, cands[rank], rank))
        rank += 1
    return out


def pick_other(target: Prompt, pool: Sequence[Prompt], *, seed: int, index: int = 0) -> Prompt:
    """The `index`-th seeded pick from `pool` other than `target` (the `other` control)."""
    cands = seeded_order([p for p in pool if p.id != target.id], seed, "other", target.id)
    if not cands:
        raise PromptLookupError(
            f"control 'other' needs another prompt of group {target.group!r} than "
            f"{target.id!r}, and there is none"
        )
    return cands[index % len(cands)]
