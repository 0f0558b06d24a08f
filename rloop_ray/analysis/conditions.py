"""Per condition and metric: n, failures, NaNs, mean, sd and a t interval.

The honest-n table: every cell of a condition is counted (`n`), failed cells and ok cells
without a value are counted apart (`n_failed`, `n_nan` with the recorded reason) and left
out of the mean, so a condition that lost half its cells says so instead of looking as
precise as a complete one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.analysis.estimators import mean_or_nan, t_interval
from rloop_ray.analysis.labels import CONDITION_COLS, GEOMETRY_METRICS, HUMAN_SCORE, numeric
from rloop_ray.vocab import NATURAL_ZERO_METRICS, STATUS_FAILED, STATUS_OK

CONDITION_SUMMARY_COLUMNS = (
    *CONDITION_COLS, "condition", "letter", "point", "n", "n_ok", "n_failed", "metric",
    "n_nan", "n_valid", "mean", "sd", "ci_low", "ci_high", "nan_reasons",
)


def _nan_reasons(ok_rows: pd.DataFrame, metric: str, missing: pd.Series) -> str:
    """Why ok cells have no value, counted by reason (the engine records one per cell)."""
    if not missing.any():
        return ""
    if metric in GEOMETRY_METRICS and "rv_status" in ok_rows:
        reasons = ok_rows.loc[missing, "rv_status"].fillna("no reason recorded").astype(str)
    elif metric == HUMAN_SCORE:
        reasons = pd.Series(["not rated"] * int(missing.sum()))
    elif metric in NATURAL_ZERO_METRICS:
        reasons = pd.Series([f"{metric} not measured (off in the grid, or a row written "
                             f"before it existed)"] * int(missing.sum()))
    else:
        reasons = pd.Series(["no reason recorded"] * int(missing.sum()))
    counts = reasons.value_counts()
    return "; ".join(f"{reason} x{count}" for reason, count in counts.items())


def summarize_conditions(
    cells: pd.DataFrame, metrics: Sequence[str], confidence: float = 0.95
) -> pd.DataFrame:
    """One row per condition and metric: n, n_failed, n_nan, mean, sd, t-based CI."""
    rows: list[dict[str, Any]] = []
    if cells.empty:
        return pd.DataFrame(columns=CONDITION_SUMMARY_COLUMNS)
    for key, group in cells.groupby(list(CONDITION_COLS), dropna=False, sort=True):
        coords = dict(zip(CONDITION_COLS, key, strict=True))
        ok = group[group["status"] == STATUS_OK]
        base = {
            **coords,
            "condition": group["condition"].iloc[0],
            "letter": group["letter"].iloc[0],
            "point": group["point"].iloc[0],
            "n": len(group),
            "n_ok": len(ok),
            "n_failed": int((group["status"] == STATUS_FAILED).sum()),
        }
        for metric in metrics:
            values = numeric(ok, metric)
            missing = values.isna()
            valid = values[~missing].to_numpy()
            low, high = t_interval(valid, confidence)
            rows.append({
                **base,
                "metric": metric,
                "n_nan": int(missing.sum()),
                "n_valid": len(valid),
                "mean": mean_or_nan(valid),
                "sd": float(np.std(valid, ddof=1)) if len(valid) > 1 else math.nan,
                "ci_low": low,
                "ci_high": high,
                "nan_reasons": _nan_reasons(ok, metric, missing),
            })
    return pd.DataFrame(rows, columns=CONDITION_SUMMARY_COLUMNS)
