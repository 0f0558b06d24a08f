"""How much of the planned sweep the table holds, and what failed.

A partial sweep is analysed as far as it goes, so every report must say how far that is:
cells planned (the store's plan) against cells done, per model; the classic conditions
the spec plans but has no ok cell of (whole comparisons then cannot be computed); rows
the store excluded (an earlier plan) or collapsed (retries); and the failures by type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rloop_ray.analysis.load import ResultSet
from rloop_ray.vocab import (
    BASELINE_GROUP,
    CLASSIC_CONDITIONS,
    NATURAL,
    RECURSIVE_GROUP,
    STATUS_FAILED,
    STATUS_OK,
)

FAILURE_SUMMARY_COLUMNS = ("model", "error_type", "n", "example")


@dataclass
class Completeness:
    """How much of the sweep the table holds, and what the analysis could not compute."""

    n_expected: int | None
    n_done: int
    n_ok: int
    n_failed: int
    n_missing: int | None
    n_duplicate_rows: int
    n_stale_rows: int
    n_recovered: int
    missing_conditions: dict[str, list[str]] = field(default_factory=dict)
    """Per model, the classic conditions (A, B, C, D) the sweep plans but has no ok cell of."""
    by_model: list[dict[str, Any]] = field(default_factory=list)
    """Per model: planned (from the plan, if recorded), done, ok, failed, missing."""

    @property
    def partial(self) -> bool:
        return bool(self.n_missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_expected": self.n_expected, "n_done": self.n_done, "n_ok": self.n_ok,
            "n_failed": self.n_failed, "n_missing": self.n_missing,
            "n_duplicate_rows": self.n_duplicate_rows, "n_stale_rows": self.n_stale_rows,
            "n_recovered": self.n_recovered, "partial": self.partial,
            "missing_conditions": self.missing_conditions, "by_model": self.by_model,
        }


def expected_letters(spec: dict[str, Any]) -> set[str] | None:
    """Classic conditions (A-D) a sweep's spec plans, or None if the spec does not say.

    Mirrors spec.py: `prompts.conditions` when given, else natural cells for every target
    group when `natural` is a control, and patched cells for every cross-group pair when
    the spec has interventions.
    """
    if not isinstance(spec, dict) or not spec:
        return None
    prompts = spec.get("prompts") or {}
    if prompts.get("conditions"):
        return set(prompts["conditions"])
    targets = set(prompts.get("target_groups") or [BASELINE_GROUP])
    sources = set(prompts.get("source_groups") or [RECURSIVE_GROUP])
    controls = set(spec.get("controls") or [NATURAL])
    out: set[str] = set()
    if NATURAL in controls:
        out |= {"A"} if BASELINE_GROUP in targets else set()
        out |= {"B"} if RECURSIVE_GROUP in targets else set()
    if spec.get("interventions") is not None:
        if BASELINE_GROUP in targets and RECURSIVE_GROUP in sources:
            out.add("C")
        if RECURSIVE_GROUP in targets and BASELINE_GROUP in sources:
            out.add("D")
    return out


def completeness(results: ResultSet) -> Completeness:
    """Done vs planned cells, per sweep and per model, and planned conditions with no data."""
    cells = results.cells
    n_done = int(cells["cell_id"].nunique())
    n_ok = int((cells["status"] == STATUS_OK).sum())
    expected = results.n_expected
    planned = results.planned or {}
    wanted = expected_letters(results.manifest.get("spec") or {})
    absent: dict[str, list[str]] = {}
    by_model: list[dict[str, Any]] = []
    for model in sorted(set(planned) | set(cells["model"])):
        mine = cells[cells["model"] == model]
        done = int(mine["cell_id"].nunique())
        ok = mine[mine["status"] == STATUS_OK]
        plan = planned.get(model)
        by_model.append({"model": model, "planned": plan, "done": done, "ok": len(ok),
                         "failed": done - len(ok),
                         "missing": None if plan is None else max(plan - done, 0)})
        want = wanted if wanted is not None else set(mine["letter"])
        gone = [x for x in CLASSIC_CONDITIONS if x in want and x not in set(ok["letter"])]
        if gone:
            absent[model] = gone
    return Completeness(
        n_expected=expected, n_done=n_done, n_ok=n_ok, n_failed=n_done - n_ok,
        n_missing=None if expected is None else max(expected - n_done, 0),
        n_duplicate_rows=results.n_duplicate_rows, n_stale_rows=results.n_stale_rows,
        n_recovered=results.n_recovered, missing_conditions=absent, by_model=by_model,
    )


def failure_summary(cells: pd.DataFrame, failures: pd.DataFrame) -> pd.DataFrame:
    """Failed cells by model and error type (error text from `failures/` when absent)."""
    failed = cells[cells["status"] == STATUS_FAILED]
    if failed.empty:
        return pd.DataFrame(columns=FAILURE_SUMMARY_COLUMNS)
    failed = failed.copy()
    if not failures.empty:
        lookup = failures.set_index("cell_id")
        missing_type = failed["error_type"].isna()
        failed.loc[missing_type, "error_type"] = failed.loc[missing_type, "cell_id"].map(
            lookup["error_type"]
        )
        err = failed["cell_id"].map(lookup["error"])
        failed["error"] = failed["error"].fillna(err) if "error" in failed else err
    failed["error_type"] = failed["error_type"].fillna("unknown").astype(str)
    if "error" not in failed:
        failed["error"] = ""
    rows = []
    for (model, etype), sub in failed.groupby(["model", "error_type"], sort=True):
        first = str(sub["error"].dropna().iloc[0]) if sub["error"].notna().any() else ""
        rows.append({"model": model, "error_type": etype, "n": len(sub),
                     "example": first.strip().splitlines()[0][:200] if first.strip() else ""})
    return pd.DataFrame(rows, columns=FAILURE_SUMMARY_COLUMNS)
