"""The effect summaries beyond pairwise tests: transfer, dose-response, R_V vs behaviour.

Transfer efficiency (C-A)/(B-A) is the number the earlier work reported as "percent
transfer"; here it comes with a seeded bootstrap interval and a flag for the whole-cache
transplant, whose transfer is expected by construction. Dose-response is Spearman because
the claims are monotone, not linear. The side-by-side tables line the same intervention
up across models, which the labels (without the model) make possible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from rloop_ray.analysis.estimators import bootstrap_ratio, mean_or_nan, spearman
from rloop_ray.analysis.identity import identity_mask
from rloop_ray.analysis.labels import (
    SCORE_PREFIX,
    condition_label,
    numeric,
    scope_label,
    transplant_all_mask,
)
from rloop_ray.vocab import NATURAL, NONE_LABEL, POINT_COLUMNS, RECURSIVE_GROUP, STATUS_OK

TRANSFER_COLUMNS = (
    "model", *POINT_COLUMNS, "point", "metric", "transplant_all", "n_a", "n_b", "n_c", "n_d",
    "mean_a", "mean_b", "mean_c", "mean_d", "efficiency", "eff_ci_low", "eff_ci_high",
    "necessity_fraction", "nec_ci_low", "nec_ci_high", "note",
)
DOSE_COLUMNS = (
    "factor", "scope", "model", "site", "mode", "layers", "tokens", "align", "during",
    "control", "source_group", "target_group", "metric", "n", "n_levels", "rho", "p", "p_fdr",
    "significant", "note",
)
CORRELATION_COLUMNS = (
    "model", "scope", "x", "y", "n", "pearson_r", "pearson_p", "pearson_ci_low",
    "pearson_ci_high", "spearman_rho", "spearman_p", "pearson_p_fdr", "spearman_p_fdr", "note",
)
SIDE_BY_SIDE_VALUES = ("n_a", "n_b", "diff", "cohens_d", "d_ci_low", "d_ci_high", "p_fdr")
_FAMILY_COLS = ["model", *(c for c in POINT_COLUMNS if c != "alpha"), "control",
                "source_group", "target_group"]
"""A dose-response family: everything but alpha (and the prompt) fixed."""


def _ok(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["status"] == STATUS_OK]


# --- transfer efficiency ------------------------------------------------------------------


def transfer_efficiency(
    cells: pd.DataFrame,
    metrics: Sequence[str],
    *,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    manifest: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Per model, intervention point and metric: efficiency (C-A)/(B-A) with bootstrap CI.

    Also the necessity fraction (B-D)/(B-A): how much of the recursive-natural gap removing
    the recursive cache (baseline source into a recursive target) takes away.
    """
    rows: list[dict[str, Any]] = []
    # Cell-id order makes the bootstrap independent of how rows were sharded (a resumed
    # sweep writes other shards than an uninterrupted one, with the same cells).
    ok = _ok(cells).sort_values("cell_id", kind="stable")
    transplant_all = transplant_all_mask(ok, manifest)
    for model, mcells in ok.groupby("model", sort=True):
        a_cells = mcells[mcells["letter"] == "A"]
        b_cells = mcells[mcells["letter"] == "B"]
        patched = mcells[mcells["letter"].isin(["C", "D"])]
        for point, pcells in patched.groupby(list(POINT_COLUMNS), dropna=False, sort=True):
            c_cells = pcells[pcells["letter"] == "C"]
            d_cells = pcells[pcells["letter"] == "D"]
            for metric in metrics:
                va, vb, vc, vd = (
                    numeric(x, metric).dropna().to_numpy()
                    for x in (a_cells, b_cells, c_cells, d_cells)
                )
                row: dict[str, Any] = {
                    "model": model, **dict(zip(POINT_COLUMNS, point, strict=True)),
                    "point": pcells["point"].iloc[0], "metric": metric,
                    "transplant_all": bool(transplant_all.loc[pcells.index].any()),
                    "n_a": len(va), "n_b": len(vb), "n_c": len(vc), "n_d": len(vd),
                    "mean_a": mean_or_nan(va), "mean_b": mean_or_nan(vb),
                    "mean_c": mean_or_nan(vc), "mean_d": mean_or_nan(vd),
                    "efficiency": math.nan, "eff_ci_low": math.nan, "eff_ci_high": math.nan,
                    "necessity_fraction": math.nan, "nec_ci_low": math.nan,
                    "nec_ci_high": math.nan, "note": "",
                }
                notes = []
                gap = row["mean_b"] - row["mean_a"]
                if len(va) < 2 or len(vb) < 2:
                    notes.append("A or B has fewer than 2 valid cells")
                elif gap == 0 or not np.isfinite(gap):
                    notes.append("B equals A: efficiency undefined")
                else:
                    if len(vc) >= 2:
                        row["efficiency"] = (row["mean_c"] - row["mean_a"]) / gap
                        row["eff_ci_low"], row["eff_ci_high"] = bootstrap_ratio(
                            (vc, va, vb, va), seed=seed, n_resamples=n_resamples,
                            confidence=confidence,
                        )
                    if len(vd) >= 2:
                        row["necessity_fraction"] = (row["mean_b"] - row["mean_d"]) / gap
                        row["nec_ci_low"], row["nec_ci_high"] = bootstrap_ratio(
                            (vb, vd, vb, va), seed=seed, n_resamples=n_resamples,
                            confidence=confidence,
                        )
                    if (np.isfinite(row["efficiency"]) and not np.isfinite(row["eff_ci_low"])) \
                            or (np.isfinite(row["necessity_fraction"])
                                and not np.isfinite(row["nec_ci_low"])):
                        notes.append("bootstrap degenerate (too few distinct values): no CI")
                row["note"] = "; ".join(notes)
                rows.append(row)
    return pd.DataFrame(rows, columns=TRANSFER_COLUMNS)


# --- dose-response ------------------------------------------------------------------------


def dose_response(cells: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Spearman rho of each metric with alpha, and with recursion level.

    alpha: within each patched condition family (everything but alpha fixed), over the
    alphas the sweep ran. target_level: natural recursive cells (levels 1..5).
    source_level: patched conditions whose recursive sources span several levels.
    """
    rows: list[dict[str, Any]] = []
    keep = [*_FAMILY_COLS, "alpha", "source_level", "target_level", "is_natural"]
    sel = cells["status"] == STATUS_OK
    ok = cells.loc[sel, keep].copy()
    for metric in metrics:
        ok[metric] = numeric(cells.loc[sel], metric)

    def add(factor: str, scope: str, sub: pd.DataFrame, coords: dict[str, Any]) -> None:
        x_all = sub[factor].to_numpy(float)
        for metric in metrics:
            y_all = sub[metric].to_numpy(float)
            finite = np.isfinite(x_all) & np.isfinite(y_all)
            x, y = x_all[finite], y_all[finite]
            rho, p, note = spearman(x, y)
            rows.append({
                "factor": factor, "scope": scope, **coords, "metric": metric,
                "n": len(x), "n_levels": len(np.unique(x)),
                "rho": rho, "p": p, "p_fdr": math.nan, "significant": False, "note": note,
            })

    patched = ok[~ok["is_natural"]]
    for key, fam in patched.groupby(_FAMILY_COLS, dropna=False, sort=True):
        coords = dict(zip(_FAMILY_COLS, key, strict=True))
        if fam["alpha"].nunique() >= 2:
            add("alpha", scope_label(coords), fam, coords)
        if fam["source_level"].nunique() >= 2:
            for alpha, sub in fam.groupby("alpha", dropna=False):
                if sub["source_level"].nunique() >= 2:
                    add("source_level", condition_label({**coords, "alpha": alpha}), sub,
                        coords)
    natural = ok[ok["is_natural"] & (ok["target_group"] == RECURSIVE_GROUP)]
    for model, sub in natural.groupby("model", sort=True):
        if sub["target_level"].nunique() >= 2:
            coords = {c: NONE_LABEL for c in _FAMILY_COLS}
            coords.update(model=model, control=NATURAL, target_group=RECURSIVE_GROUP)
            add("target_level", f"{NATURAL} {RECURSIVE_GROUP}", sub, coords)
    return pd.DataFrame(rows, columns=DOSE_COLUMNS)


# --- R_V against behaviour ----------------------------------------------------------------


def behaviour_correlations(
    cells: pd.DataFrame, metrics: Sequence[str], geometry: str = "rv"
) -> pd.DataFrame:
    """Pearson (with CI) and Spearman of R_V with every behaviour score, per model.

    Scope `all`: every ok cell of the model (geometry and behaviour move together across
    interventions) except the identity cells (alpha = 0 mixes, `self` controls, and so
    every cell copied from a natural twin): they are the natural run measured again, and
    counting them would weight natural rows several times and inflate n (the `note`
    says how many were left out); scope `natural`: unpatched cells only (the prompts'
    own relation).
    """
    rows: list[dict[str, Any]] = []
    if geometry not in metrics:
        return pd.DataFrame(columns=CORRELATION_COLUMNS)
    scores = [m for m in metrics if m.startswith(SCORE_PREFIX)]
    for model, mcells in _ok(cells).groupby("model", sort=True):
        identity = identity_mask(mcells)
        left_out = int(identity.sum())
        for scope, sub in (("all", mcells[~identity]),
                           (NATURAL, mcells[mcells["is_natural"]])):
            for score in scores:
                frame = pd.DataFrame({
                    "x": numeric(sub, geometry), "y": numeric(sub, score)
                }).dropna()
                x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
                row: dict[str, Any] = {
                    "model": model, "scope": scope, "x": geometry, "y": score, "n": len(frame),
                    "pearson_r": math.nan, "pearson_p": math.nan, "pearson_ci_low": math.nan,
                    "pearson_ci_high": math.nan, "spearman_rho": math.nan,
                    "spearman_p": math.nan, "pearson_p_fdr": math.nan,
                    "spearman_p_fdr": math.nan, "note": "",
                }
                if len(frame) < 3:
                    row["note"] = "fewer than 3 cells"
                elif np.ptp(x) == 0 or np.ptp(y) == 0:
                    row["note"] = "constant input"
                else:
                    pr = stats.pearsonr(x, y)
                    ci = pr.confidence_interval()
                    row.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                               pearson_ci_low=float(ci.low), pearson_ci_high=float(ci.high))
                    rho, p, note = spearman(x, y)
                    row.update(spearman_rho=rho, spearman_p=p, note=note)
                if scope == "all" and left_out:
                    row["note"] = "; ".join(filter(None, [
                        row["note"], f"{left_out} identity cells (alpha = 0, self) not "
                                     "counted again"]))
                rows.append(row)
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


# --- models side by side ------------------------------------------------------------------


def _wide_by_model(table: pd.DataFrame, index: list[str], values: Sequence[str]) -> pd.DataFrame:
    """`values` per model as columns `value[model]`, models in name order; empty below 2."""
    if table.empty or table["model"].nunique() < 2:
        return pd.DataFrame()
    wide = table.set_index([*index, "model"])[list(values)].unstack("model")
    wide.columns = [f"{value}[{model}]" for value, model in wide.columns]
    models = sorted(table["model"].unique())
    ordered = [f"{v}[{m}]" for m in models for v in values if f"{v}[{m}]" in wide]
    return wide[ordered].reset_index()


def models_side_by_side(comparisons: pd.DataFrame) -> pd.DataFrame:
    """A wide table: one row per (comparison, metric), per-model columns `col[model]`.

    Conditions are named without the model and fractional layer specs fit any depth, so
    the same intervention lines up across models. Empty with fewer than two models.
    """
    return _wide_by_model(comparisons, ["comparison_id", "comparison", "metric"],
                          SIDE_BY_SIDE_VALUES)


def transfer_side_by_side(transfer: pd.DataFrame) -> pd.DataFrame:
    """Transfer efficiency per intervention point with one column set per model."""
    return _wide_by_model(transfer, ["point", "metric"],
                          ("efficiency", "eff_ci_low", "eff_ci_high", "necessity_fraction"))
