"""Cells that equal their natural run by construction, checked cell by cell.

An alpha = 0 mix keeps none of the source and the `self` control patches a prompt with
its own cache: both run the unpatched computation. Tested like interventions they yield
"effects" of floating-point noise (R_V 0.673033 against 0.673034, a d_z of anything, an
efficiency of 3.5e-07 with an interval of [-15, 4]) that look like findings and mean
nothing. So the report treats them as what they are, checks of the intervention code:
each such cell is set beside the natural cell of its target and counted as reproducing
it exactly (the same generated tokens, every metric equal within `TOLERANCE`) or not.
Only when cells do differ is the statistical comparison consulted, to say whether the
difference is systematic (a bug) or scattered (batch-dependent numerics).

The comparisons follow the same rule (analysis/comparisons.py): an identity condition
whose every value equals natural within `TOLERANCE` gets no test at all, because its
differences are noise, and noise that is never negative (KL) would test "significant".

A sweep may not decode most of these cells at all: the driver writes them as copies of
their natural twin (`derived_from`, docs/architecture.md) and decodes a seeded sample as
sentinels. A copy matches by construction, so the check counts the decoded cells apart:
they are the evidence, the copies are bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.analysis.comparisons import CONTROL_VS_PATCH_PREFIX, SOURCE_NATURAL
from rloop_ray.analysis.labels import (
    ALPHA_ZERO,
    SELF_CONTROL,
    TOLERANCE,
    identity_kind,
    numeric,
)
from rloop_ray.vocab import DERIVED_FROM, STATUS_OK

__all__ = ["ALPHA_ZERO", "KIND_LABELS", "SELF_CONTROL", "TOLERANCE", "IdentityCheck",
           "identity_checks", "identity_kind", "identity_mask"]

KIND_LABELS = {ALPHA_ZERO: "alpha = 0 mix", SELF_CONTROL: "'self' control"}
"""The two kinds of identity cell, as the report names them (an alpha = 0 steer, the zero
vector, counts with the alpha = 0 mixes)."""


def identity_mask(frame: pd.DataFrame) -> pd.Series:
    """Rows (cells, conditions or comparisons) that are identities by construction.

    A comparison row counts when its `a` side is the identity condition (its `control`,
    `mode` and `alpha` columns describe that side).
    """
    if frame.empty:
        return pd.Series(False, index=frame.index, dtype=bool)
    kinds = [identity_kind(c, m, a) for c, m, a in
             zip(frame["control"], frame["mode"], frame["alpha"], strict=True)]
    return pd.Series([k is not None for k in kinds], index=frame.index, dtype=bool)


@dataclass(frozen=True)
class IdentityCheck:
    """How the identity cells of one kind and model compare with their natural runs."""

    model: str
    kind: str
    n: int
    """Identity cells that ran ok."""
    n_matched: int
    """Those with a natural cell of the same target to compare with."""
    n_same_tokens: int
    """Matched cells whose generated tokens equal the natural cell's."""
    n_exact: int
    """Matched cells with the same tokens and every metric within `TOLERANCE`."""
    n_derived: int = 0
    """Matched cells written as copies of their natural twin (not decoded)."""
    n_derived_exact: int = 0
    """Of those, how many match (all, unless the copy itself went wrong)."""
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    """Per metric, the largest |identity - natural| over the matched cells."""
    n_tests: int = 0
    """Comparisons of these conditions against natural with a p-value."""
    n_significant: int = 0
    """Of those, how many have p_fdr < q (a systematic difference)."""

    @property
    def label(self) -> str:
        return KIND_LABELS[self.kind]

    @property
    def exact(self) -> bool:
        """Every identity cell reproduces its natural run."""
        return self.n_matched > 0 and self.n_exact == self.n_matched

    @property
    def suspect(self) -> bool:
        """The identity cells differ from natural systematically: the code is suspect."""
        return not self.exact and self.n_significant > 0

    def largest_diff(self) -> tuple[str, float] | None:
        """The metric with the largest difference, for the sentence."""
        finite = {m: d for m, d in self.max_abs_diff.items() if np.isfinite(d)}
        if not finite:
            return None
        metric = max(finite, key=lambda m: finite[m])
        return metric, finite[metric]

    @property
    def n_decoded(self) -> int:
        """Matched cells the engine actually ran: the ones that test the code."""
        return self.n_matched - self.n_derived

    @property
    def n_decoded_exact(self) -> int:
        return self.n_exact - self.n_derived_exact

    def short(self) -> str:
        """`12/12 cells exact`, or `3/3 decoded cells exact, 9 copied from natural`."""
        if not self.n_derived:
            return f"{self.label} {self.n_exact}/{self.n_matched} cells exact"
        return (f"{self.label} {self.n_decoded_exact}/{self.n_decoded} decoded cells exact, "
                f"{self.n_derived} copied from natural")

    def sentence(self, q: float) -> str:
        """One line the report states for this check."""
        head = f"{self.model}, {self.label}:"
        if self.n_matched == 0:
            return f"{head} {self.n} cells, none with a natural run of the same target to check."
        big = self.largest_diff()
        diff = "" if big is None else f"; largest |difference| {big[0]} {big[1]:.1e}"
        copies = ("" if not self.n_derived else
                  f" {self.n_derived} more were not decoded but copied from their natural run "
                  f"(derived cells; {self.n_derived_exact} match it).")
        if self.exact:
            return (f"{head} {self.n_decoded_exact} of {self.n_decoded} decoded cells reproduce "
                    f"their natural run exactly (same tokens, metrics within {TOLERANCE:g}"
                    f"{diff}).{copies}")
        text = (f"{head} {self.n_decoded_exact} of {self.n_decoded} decoded cells reproduce "
                f"their natural run exactly, {self.n_same_tokens - self.n_derived_exact} "
                f"generate the same tokens{diff}.{copies}")
        if self.suspect:
            return (text + f" {self.n_significant} of {self.n_tests} comparisons with natural "
                    f"have p_fdr < {q}: they must not differ; suspect the intervention code.")
        return (text + f" The differences are not systematic (none of {self.n_tests} "
                f"comparisons has p_fdr < {q}): indistinguishable from natural. A "
                f"deterministic engine reproduces natural token for token, so scattered "
                f"differences point to batch-dependent numerics (GPU kernels, low precision).")


def _same_tokens(a: Any, b: Any) -> bool | None:
    """Whether two generations are the same; None when either is missing."""
    def missing(x: Any) -> bool:
        return x is None or (isinstance(x, float) and math.isnan(x))

    if missing(a) or missing(b):
        return None
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _close(x: float, y: float) -> bool:
    if not (np.isfinite(x) and np.isfinite(y)):
        return not np.isfinite(x) and not np.isfinite(y)
    return abs(x - y) <= TOLERANCE * max(1.0, abs(y))


def identity_checks(
    cells: pd.DataFrame, metrics: Sequence[str], comparisons: pd.DataFrame | None = None,
    q: float = 0.05,
) -> list[IdentityCheck]:
    """One check per model and identity kind present, in model order (`self` first)."""
    if cells.empty:
        return []
    ok = cells[cells["status"] == STATUS_OK]
    kinds = pd.Series([identity_kind(c, m, a) for c, m, a in
                       zip(ok["control"], ok["mode"], ok["alpha"], strict=True)],
                      index=ok.index, dtype=object)
    token_col = next((c for c in ("generated_ids", "generated_text") if c in ok), None)
    values = {m: numeric(ok, m) for m in metrics}
    checks: list[IdentityCheck] = []
    for model, mine in ok.groupby("model", sort=True):
        natural = mine[mine["is_natural"]].drop_duplicates("target_id").set_index("target_id")
        for kind in (SELF_CONTROL, ALPHA_ZERO):
            idx = kinds.index[(kinds == kind) & (ok["model"] == model)]
            if not len(idx):
                continue
            matched = same = exact = derived = derived_exact = 0
            biggest = dict.fromkeys(metrics, math.nan)
            for i in idx:
                target = ok.at[i, "target_id"]
                if target not in natural.index:
                    continue
                matched += 1
                copy = DERIVED_FROM in ok and isinstance(ok.at[i, DERIVED_FROM], str)
                derived += copy
                nat_row = natural.loc[target]
                tokens = (None if token_col is None
                          else _same_tokens(ok.at[i, token_col], nat_row[token_col]))
                same += bool(tokens)
                close = True
                for m in metrics:
                    x = float(values[m].at[i])
                    y = float(pd.to_numeric(pd.Series([nat_row[m]]), errors="coerce").iloc[0])
                    if np.isfinite(x) and np.isfinite(y):
                        biggest[m] = np.nanmax([biggest[m], abs(x - y)])
                    close &= _close(x, y)
                good = bool(close and tokens is not False)
                exact += good
                derived_exact += bool(copy and good)
            n_tests, n_sig = _tests(comparisons, model, kind, q)
            checks.append(IdentityCheck(
                model=str(model), kind=kind, n=len(idx), n_matched=matched,
                n_same_tokens=same, n_exact=exact, max_abs_diff=biggest,
                n_tests=n_tests, n_significant=n_sig, n_derived=derived,
                n_derived_exact=derived_exact,
            ))
    return checks


def _tests(comparisons: pd.DataFrame | None, model: str, kind: str, q: float
           ) -> tuple[int, int]:
    """Comparisons of the identity conditions with natural: how many, how many significant."""
    if comparisons is None or comparisons.empty:
        return 0, 0
    rows = comparisons[(comparisons["model"] == model)
                       & ~comparisons["comparison"].str.startswith(CONTROL_VS_PATCH_PREFIX)
                       & (comparisons["comparison"] != SOURCE_NATURAL)]
    rows = rows[[identity_kind(c, m, a) == kind for c, m, a in
                 zip(rows["control"], rows["mode"], rows["alpha"], strict=True)]]
    tested = rows[rows["p"].notna()]
    return len(tested), int((tested["p_fdr"] < q).sum())
