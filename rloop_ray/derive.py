"""Cells that are natural by construction: written from their natural twin, not decoded.

A greedy cell whose intervention provably leaves the target's computation unchanged
produces exactly the natural run of its target: a `mix` at alpha 0 (any source, any
control: `(1 - 0) * target + 0 * source` is the target in float32), and a `self` control
at alpha 0, 0.5 or 1 or as a transplant (the target mixed with itself, where the float32
arithmetic is exact). The same holds for a patch during generation (`during:
generation | both`) at alpha 0, a `self` patch during generation only (the engine runs
no companion decode for it: there is nothing to mix in), and a `steer` at alpha 0 or by
the `self` control (the target group minus itself is the zero vector, and `x + a * 0`
is `x`). The engine's oracles prove these identities; decoding such cells
again spends compute on rows we already have (30 of the quickstart's 54 cells). So the
driver writes them as copies of their natural twin's row, marked `derived_from`, and
keeps an honest check: a seeded sample of them (`SENTINEL_FRACTION`, at least one per
model) is still decoded, and a sentinel whose tokens differ from its twin's fails loudly
(`SentinelMismatch`), which says the derivation is unsafe for that model (rerun with
`--no-derive`). Sampled cells (temperature > 0) are never derived: their seeds differ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rloop_ray.store import RUNNER_COLUMNS
from rloop_ray.vocab import (
    BOTH,
    CACHE_SITES,
    COORDINATE_COLUMNS,
    DERIVED_FROM,
    GENERATION,
    NATURAL,
    NONE,
    PREFILL,
    SELF,
    STATUS_OK,
    STEER,
    TRANSPLANT,
)

SENTINEL_FRACTION = 0.1
"""Share of derivable cells that are decoded anyway and compared with their twin."""
SELF_EXACT_ALPHAS = (0.0, 0.5, 1.0)
"""Alphas at which `(1 - a) * x + a * x == x` holds exactly in binary floating point."""
SENTINEL_MISMATCH = "SentinelMismatch"

PATCH_KEYS = frozenset({"n_source_tokens", "n_patched_positions", "n_unpatched_positions",
                        "patched_layers", "query_position", "rope_consistent",
                        "alpha_extrapolated", "n_matched_positions",
                        "n_generation_patched_steps", "steer_id", "steer_norm",
                        "attn_mass_patched"})
"""What a patch would have reported; unknown for a cell that was not run (left null)."""
ZERO_FOR_DERIVED = ("kl_from_natural",)
"""Measures that are exactly 0 for a cell that is its natural run (KL to itself)."""


def provably_natural(cell: Any) -> bool:
    """True when `cell` computes exactly its target's natural run (see module docstring)."""
    if cell.control == NATURAL or cell.site == NONE or cell.temperature != 0:
        return False
    during = getattr(cell, "during", PREFILL)
    if cell.mode == TRANSPLANT:
        return cell.control == SELF and cell.site in CACHE_SITES and during == PREFILL
    if cell.alpha == 0.0:
        return True  # (1 - 0) * target + 0 * anything, and target + 0 * vector
    if cell.mode == STEER:
        return cell.control == SELF  # the zero vector
    if cell.control != SELF:
        return False
    if during == GENERATION:
        return True  # no companion decode: the engine does not mix a row with itself
    return during in (PREFILL, BOTH) and cell.alpha in SELF_EXACT_ALPHAS


def natural_twin_id(cell: Any) -> str:
    """The id of the natural cell of `cell`'s target (same model, sample, settings)."""
    twin = replace(cell, control=NATURAL, site=NONE, mode=NONE, layers=NONE, tokens=NONE,
                   align=NONE, alpha=None, source_id=None, source_group=None,
                   source_level=None, source_text_hash=None, pair_index=None, cell_id="",
                   **_later_natural_fields(cell))
    return twin.cell_id


def _later_natural_fields(cell: Any) -> dict[str, Any]:
    """The natural values of the cell fields added later (during, steering groups), for
    cells that have them."""
    names = {"during": NONE, "steer_source_prompts": None, "steer_target_prompts": None}
    return {k: v for k, v in names.items() if hasattr(cell, k)}


@dataclass(frozen=True)
class Derivations:
    """Which planned cells are copied from which natural cell, and which are sentinels."""

    derived: Mapping[str, str] = field(default_factory=dict)
    """cell id -> natural twin id: written as a copy, never decoded."""
    sentinels: Mapping[str, str] = field(default_factory=dict)
    """cell id -> natural twin id: decoded, and must equal the twin token for token."""

    @property
    def twins(self) -> set[str]:
        return set(self.derived.values()) | set(self.sentinels.values())

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for cid, twin in self.derived.items():
            out.setdefault(twin, []).append(cid)
        return out


def _rank(seed: int, cell_id: str) -> str:
    return hashlib.sha256(f"{seed}:{cell_id}".encode()).hexdigest()


def plan_derivations(cells: Iterable[Any], *, sentinel_fraction: float = SENTINEL_FRACTION,
                     seed: int = 0) -> Derivations:
    """Derivable cells of a grid whose natural twin is planned too, with seeded sentinels."""
    cells = list(cells)
    planned = {c.cell_id for c in cells}
    by_model: dict[str, list[tuple[str, str]]] = {}
    for cell in cells:
        if provably_natural(cell):
            twin = natural_twin_id(cell)
            if twin in planned:
                by_model.setdefault(cell.model, []).append((cell.cell_id, twin))
    derived: dict[str, str] = {}
    sentinels: dict[str, str] = {}
    for pairs in by_model.values():
        ranked = sorted(pairs, key=lambda p: _rank(seed, p[0]))
        n_sentinels = max(1, math.ceil(sentinel_fraction * len(ranked)))
        sentinels.update(ranked[:n_sentinels])
        derived.update(ranked[n_sentinels:])
    return Derivations(derived, sentinels)


def derived_row(twin_row: Mapping[str, Any], coordinates: Mapping[str, Any],
                twin_id: str, finished_at: Any) -> dict[str, Any]:
    """The row of a derived cell: its own coordinates, its twin's generation and measures."""
    keep = {k: v for k, v in twin_row.items()
            if k not in RUNNER_COLUMNS and k not in PATCH_KEYS and k not in COORDINATE_COLUMNS}
    zero = {k: 0.0 for k in ZERO_FOR_DERIVED if twin_row.get(k) is not None}
    return {**keep, **{k: None for k in PATCH_KEYS}, **zero, **coordinates,
            "status": STATUS_OK, DERIVED_FROM: twin_id, "attempt": 1, "seconds": 0.0,
            "finished_at": finished_at}


def check_sentinel(row: dict[str, Any], twin_row: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded sentinel row, failed loudly if its tokens differ from its twin's."""
    if row.get("status") != STATUS_OK or twin_row.get("status") != STATUS_OK:
        return row
    mine, theirs = list(row.get("generated_ids") or []), list(twin_row.get("generated_ids") or [])
    if mine == theirs:
        return row
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
              min(len(mine), len(theirs)))
    return {**row, "status": "failed", "error_type": SENTINEL_MISMATCH,
            "error": (f"this cell is natural by construction but its tokens differ from its "
                      f"natural twin from step {at} ({len(mine)} vs {len(theirs)} tokens): "
                      f"deriving such cells is unsafe on this model; rerun with --no-derive")}
