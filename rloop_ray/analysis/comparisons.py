"""Which conditions a sweep lets us compare, and the two-sample test of each pair.

`plan_comparisons` derives from the conditions present every comparison the design
supports (the table of names is in docs/statistics.md): the natural groups against each
other, each patch and each control against the natural condition of its target group,
each control against the patch it stands beside, and a whole-cache transplant against the
natural condition of its *source* group. `compare_samples` then decides per pair whether
the cells match by prompt (paired t, d_z) or not (Welch t, pooled d), because the prompt,
not the cell, is the independent unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from rloop_ray.analysis.estimators import cohens_d, d_confidence_interval, d_z
from rloop_ray.analysis.labels import TOLERANCE, identity_kind, numeric, transplant_all_mask
from rloop_ray.vocab import (
    BASELINE_GROUP,
    LONG_CONTROL_GROUP,
    NATURAL,
    NATURAL_ZERO_METRICS,
    NONE_LABEL,
    PATCH,
    POINT_COLUMNS,
    RECURSIVE_GROUP,
    STATUS_FAILED,
    STATUS_OK,
)

GROUP_EFFECT = "group_effect"
SUFFICIENCY = "sufficiency"
NECESSITY = "necessity"
PATCH_EFFECT = "patch_effect"
SOURCE_NATURAL = "source_natural"
CONTROL_PREFIX = "control:"
CONTROL_VS_PATCH_PREFIX = "control_vs_patch:"
CLASSIC_COMPARISONS = (GROUP_EFFECT, SUFFICIENCY, NECESSITY, PATCH_EFFECT, SOURCE_NATURAL)
"""Comparison names (the `comparison` column); controls add `control:<c>` and
`control_vs_patch:<c>` per control."""

COMPARISON_COLUMNS = (
    "comparison", "metric", "model", "a", "b", *POINT_COLUMNS, "control", "n_a", "n_b",
    "n_pairs", "n_unpaired", "n_failed_a", "n_failed_b",
    "n_nan_a", "n_nan_b", "mean_a", "mean_b", "sd_a", "sd_b", "diff", "effect_size",
    "cohens_d", "d_ci_low", "d_ci_high", "test", "statistic", "df", "p", "p_fdr",
    "significant", "mw_statistic", "mw_p", "wilcoxon_statistic", "wilcoxon_p", "note",
    "comparison_id",
)
"""Columns of the comparisons table, in order (docs/statistics.md explains each)."""


# --- the two-sample test ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One condition's cells reduced to what a comparison reads (numpy, not pandas)."""

    values: np.ndarray
    """The metric of every ok cell (NaN where missing)."""
    keys: dict[str, np.ndarray]
    """Pairing columns (`target_id`, `source_id`) of the same ok cells."""
    n_failed: int

    @classmethod
    def of(cls, cells: pd.DataFrame, metric: str,
           key_columns: Sequence[str] = ("target_id", "source_id")) -> Sample:
        ok = (cells["status"] == STATUS_OK).to_numpy()
        values = numeric(cells, metric).to_numpy(float)[ok]
        keys = {k: cells[k].to_numpy(object)[ok] for k in key_columns if k in cells}
        return cls(values, keys, int((cells["status"] == STATUS_FAILED).sum()))


def _key_means(keys: np.ndarray, values: np.ndarray) -> dict[Any, float]:
    sums: dict[Any, list[float]] = {}
    for k, v in zip(keys, values, strict=True):
        if k is None or (isinstance(k, float) and math.isnan(k)) or not np.isfinite(v):
            continue
        sums.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _pair(a: Sample, b: Sample, keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Values matched by prompt: mean per key on each side, inner join on the keys.

    Returns None (an independent design) unless at least 3 keys match and they cover at
    least half of the smaller side's prompts. Several cells of one prompt on one side
    (several sources, seeds) are averaged: the prompt is the unit of a paired design.
    """
    key_a, key_b = keys
    if key_a not in a.keys or key_b not in b.keys:
        return None
    ma = _key_means(a.keys[key_a], a.values)
    mb = _key_means(b.keys[key_b], b.values)
    common = sorted(set(ma) & set(mb), key=str)
    if len(common) < 3 or len(common) < 0.5 * min(len(ma), len(mb)):
        return None
    matched = set(common)
    unpaired = sum(
        1 for side, col in ((a, key_a), (b, key_b))
        for k, v in zip(side.keys[col], side.values, strict=True)
        if np.isfinite(v) and k not in matched
    )
    return (np.array([ma[k] for k in common]), np.array([mb[k] for k in common]), unpaired)


def _equal_within_tolerance(a: np.ndarray, b: np.ndarray) -> bool:
    """Every value of `a` equals its partner in `b` within `TOLERANCE` (relative to
    max(1, |b|)), as the identity checks count a cell as exact (analysis/identity.py)."""
    return bool(len(a)) and bool(np.all(np.abs(a - b) <= TOLERANCE * np.maximum(1.0, np.abs(b))))


IDENTITY_NOTE = (f"an identity by construction and every value equals natural within "
                 f"{TOLERANCE:g}: a check passed (see the identity checks), not a test")
"""The note of an identity comparison whose cells reproduce natural: no p-value, no d."""


def compare_samples(
    a: Sample,
    b: Sample,
    *,
    pair_on: tuple[str, str] | None = ("target_id", "target_id"),
    confidence: float = 0.95,
    identity: bool = False,
    no_test: str | None = None,
) -> dict[str, Any]:
    """Compare condition `a` with condition `b` on one metric (diff = a - b).

    Paired t and d_z when the cells match by prompt (`pair_on` gives the key column of each
    side), otherwise Welch t and pooled Cohen's d. Mann-Whitney (and Wilcoxon when paired)
    as rank-based robustness checks. Failed and NaN cells are counted, never used.

    `identity`: `a` is the same computation as `b` by construction (an alpha = 0 or `self`
    condition against natural). When its values then equal b's within `TOLERANCE` (paired:
    each pair; unpaired: every value of both sides), the differences are float noise, so no
    test, d or rank test is computed from them (a t test of noise that is never negative, as
    KL is, would come out "significant"). `no_test`: a reason the comparison is no test at
    all (both sides 0 by definition); counts and means are still reported.
    """
    out: dict[str, Any] = {
        "n_failed_a": a.n_failed,
        "n_failed_b": b.n_failed,
        "n_nan_a": int(np.isnan(a.values).sum()),
        "n_nan_b": int(np.isnan(b.values).sum()),
        "n_pairs": 0,
        "n_unpaired": 0,
        "statistic": math.nan, "df": math.nan, "p": math.nan,
        "cohens_d": math.nan, "d_ci_low": math.nan, "d_ci_high": math.nan,
        "mw_statistic": math.nan, "mw_p": math.nan,
        "wilcoxon_statistic": math.nan, "wilcoxon_p": math.nan,
        "note": "",
    }
    va, vb = a.values[np.isfinite(a.values)], b.values[np.isfinite(b.values)]
    notes: list[str] = []
    paired = _pair(a, b, pair_on) if pair_on else None
    if no_test is None and identity and len(va) and len(vb):
        same = (_equal_within_tolerance(paired[0], paired[1]) if paired is not None else
                _equal_within_tolerance(np.concatenate([va, vb]),
                                        np.full(len(va) + len(vb), float(np.median(vb)))))
        no_test = IDENTITY_NOTE if same else None
    if (no_test is None and len(va) and len(vb)
            and not (np.ptp(va) == 0 and np.ptp(vb) == 0 and va[0] == vb[0])):
        mw = stats.mannwhitneyu(va, vb, alternative="two-sided")
        out["mw_statistic"], out["mw_p"] = float(mw.statistic), float(mw.pvalue)

    if paired is not None:
        pa_vals, pb_vals, unpaired = paired
        diff = pa_vals - pb_vals
        out.update({
            "n_a": len(va), "n_b": len(vb), "n_pairs": len(pa_vals), "n_unpaired": unpaired,
            "mean_a": float(np.mean(pa_vals)), "mean_b": float(np.mean(pb_vals)),
            "sd_a": float(np.std(pa_vals, ddof=1)), "sd_b": float(np.std(pb_vals, ddof=1)),
            "diff": float(np.mean(diff)), "effect_size": "d_z", "test": "paired_t",
        })
        if unpaired:
            notes.append(f"{unpaired} cells without a matching prompt left out of the pairs")
        if no_test is not None:
            notes.append(no_test)
        elif np.ptp(diff) == 0:
            notes.append("paired differences are constant: no test")
        else:
            res = stats.ttest_rel(pa_vals, pb_vals)
            out.update(statistic=float(res.statistic), df=float(res.df), p=float(res.pvalue))
            dz = d_z(pa_vals, pb_vals)
            low, high = d_confidence_interval(dz, len(diff), None, confidence)
            out.update(cohens_d=dz, d_ci_low=low, d_ci_high=high)
            if np.count_nonzero(diff) >= 2:
                wx = stats.wilcoxon(pa_vals, pb_vals)
                out["wilcoxon_statistic"] = float(wx.statistic)
                out["wilcoxon_p"] = float(wx.pvalue)
    else:
        out.update({
            "n_a": len(va), "n_b": len(vb),
            "mean_a": float(np.mean(va)) if len(va) else math.nan,
            "mean_b": float(np.mean(vb)) if len(vb) else math.nan,
            "sd_a": float(np.std(va, ddof=1)) if len(va) > 1 else math.nan,
            "sd_b": float(np.std(vb, ddof=1)) if len(vb) > 1 else math.nan,
            "effect_size": "d_pooled", "test": "welch_t",
        })
        out["diff"] = out["mean_a"] - out["mean_b"]
        if no_test is not None:
            notes.append(no_test)
        elif len(va) < 2 or len(vb) < 2:
            notes.append("fewer than 2 valid cells on a side: no test")
        elif np.ptp(va) == 0 and np.ptp(vb) == 0:
            notes.append("no spread in either condition: no test")
        else:
            res = stats.ttest_ind(va, vb, equal_var=False)
            out.update(statistic=float(res.statistic), df=float(res.df), p=float(res.pvalue))
            d = cohens_d(va, vb)
            low, high = d_confidence_interval(d, len(va), len(vb), confidence)
            out.update(cohens_d=d, d_ci_low=low, d_ci_high=high)
    if out["n_failed_a"] or out["n_failed_b"]:
        notes.append(f"failed cells: {out['n_failed_a']} in a, {out['n_failed_b']} in b")
    out["note"] = "; ".join(notes)
    return out


# --- which comparisons a sweep supports ---------------------------------------------------


@dataclass(frozen=True)
class ComparisonPlan:
    """Two conditions of one model to compare, and how their cells pair."""

    comparison: str
    model: str
    a_condition: str
    b_condition: str
    point: tuple[Any, ...] | None
    control: str
    pair_on: tuple[str, str] | None


_GROUP_ORDER = {RECURSIVE_GROUP: 0, LONG_CONTROL_GROUP: 1, BASELINE_GROUP: 2}
"""Order of the natural groups in `group_effect`: a = the group expected to differ."""
_CROSS_SOURCE = {BASELINE_GROUP: RECURSIVE_GROUP, RECURSIVE_GROUP: BASELINE_GROUP}


def plan_comparisons(
    cells: pd.DataFrame, manifest: dict[str, Any] | None = None
) -> list[ComparisonPlan]:
    """Every comparison the sweep's conditions support (names in docs/statistics.md)."""
    plans: list[ComparisonPlan] = []
    transplant_all = transplant_all_mask(cells, manifest)
    for model, mcells in cells.groupby("model", sort=True):
        natural = mcells[mcells["is_natural"]]
        nat_cond = {
            g: sub["condition"].iloc[0] for g, sub in natural.groupby("target_group", sort=True)
        }
        groups = sorted(nat_cond, key=lambda g: (_GROUP_ORDER.get(g, 9), g))
        for i, ga in enumerate(groups):
            for gb in groups[i + 1:]:
                plans.append(ComparisonPlan(
                    GROUP_EFFECT, model, nat_cond[ga], nat_cond[gb], None, NATURAL, None
                ))
        patched = mcells[~mcells["is_natural"]]
        for point, pcells in patched.groupby(list(POINT_COLUMNS), dropna=False, sort=True):
            conds = pcells.drop_duplicates("condition")
            patch_conds = conds[conds["control"] == PATCH]
            for _, row in conds.iterrows():
                tg, sg, ctrl = row["target_group"], row["source_group"], row["control"]
                ref = nat_cond.get(tg)
                if ctrl == PATCH:
                    name = {"C": SUFFICIENCY, "D": NECESSITY}.get(row["letter"], PATCH_EFFECT)
                else:
                    name = f"{CONTROL_PREFIX}{ctrl}"
                if ref is not None:
                    plans.append(ComparisonPlan(
                        name, model, row["condition"], ref, point, ctrl,
                        ("target_id", "target_id"),
                    ))
                if ctrl == PATCH and transplant_all.loc[row.name] and sg in nat_cond:
                    plans.append(ComparisonPlan(
                        SOURCE_NATURAL, model, row["condition"], nat_cond[sg], point, ctrl,
                        ("source_id", "target_id"),
                    ))
                if ctrl != PATCH:
                    partner = _patch_partner(patch_conds, tg, sg)
                    if partner is not None:
                        plans.append(ComparisonPlan(
                            f"{CONTROL_VS_PATCH_PREFIX}{ctrl}", model, row["condition"],
                            partner, point, ctrl, ("target_id", "target_id"),
                        ))
    return plans


def _patch_partner(patch_conds: pd.DataFrame, target_group: str, source_group: str) -> str | None:
    """The patch condition a control stands beside: same target, the real foreign source."""
    same_target = patch_conds[
        (patch_conds["target_group"] == target_group)
        & (patch_conds["source_group"] != target_group)
    ]
    if same_target.empty:
        return None
    exact = same_target[same_target["source_group"] == source_group]
    if len(exact) == 1:
        return str(exact["condition"].iloc[0])
    cross = same_target[same_target["source_group"] == _CROSS_SOURCE.get(target_group)]
    if len(cross) == 1:
        return str(cross["condition"].iloc[0])
    if len(same_target) == 1:
        return str(same_target["condition"].iloc[0])
    return None


NATURAL_ZERO_NOTE = "both sides are natural runs, whose {metric} is 0 by definition: no test"
"""The note of a natural-vs-natural comparison of a metric measured against natural."""


def _against_natural(comparison: str) -> bool:
    """Comparisons whose `b` is the natural condition of the `a` cells' own target."""
    return comparison in (SUFFICIENCY, NECESSITY, PATCH_EFFECT) or (
        comparison.startswith(CONTROL_PREFIX))


def compare_conditions(
    cells: pd.DataFrame,
    metrics: Sequence[str],
    *,
    manifest: dict[str, Any] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """All planned comparisons x metrics, one row each (p_fdr filled by the FDR step)."""
    plans = plan_comparisons(cells, manifest)
    # Only the columns a comparison reads: slicing the full table (texts, trajectories)
    # thousands of times is what made this slow.
    keep = ["model", "condition", "status", "target_id", "source_id", *metrics]
    by_condition = {
        key: {m: Sample.of(group, m) for m in metrics}
        for key, group in cells[keep].groupby(["model", "condition"])
    }
    rows: list[dict[str, Any]] = []
    for plan in plans:
        a = by_condition[(plan.model, plan.a_condition)]
        b = by_condition[(plan.model, plan.b_condition)]
        point = dict(zip(POINT_COLUMNS, plan.point, strict=True)) if plan.point else {
            c: (math.nan if c == "alpha" else NONE_LABEL) for c in POINT_COLUMNS
        }
        identity = (plan.point is not None and _against_natural(plan.comparison)
                    and identity_kind(plan.control, point["mode"], point["alpha"]) is not None)
        for metric in metrics:
            no_test = (NATURAL_ZERO_NOTE.format(metric=metric)
                       if plan.comparison == GROUP_EFFECT and metric in NATURAL_ZERO_METRICS
                       else None)
            result = compare_samples(a[metric], b[metric], pair_on=plan.pair_on,
                                     confidence=confidence, identity=identity,
                                     no_test=no_test)
            rows.append({
                "comparison": plan.comparison, "metric": metric, "model": plan.model,
                "a": plan.a_condition, "b": plan.b_condition, **point,
                "control": plan.control, **result,
                "p_fdr": math.nan, "significant": False,
                "comparison_id": f"{plan.comparison} | {plan.a_condition} vs {plan.b_condition}",
            })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
