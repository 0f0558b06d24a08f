"""The plain-language findings of a sweep: what the report states because the data says so.

A table of hundreds of rows does not say that a control moved the metric as much as the
patch, that a whole-cache transplant is the source prompt continued, or that a quarter of
the sweep is missing; a reader has to be told. Each note here is derived from the tables
of `compute_stats` by a fixed rule (docs/statistics.md, "Controls in the findings"), so
the same sweep always yields the same sentences, and a warning is never left to luck.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop_ray.analysis.comparisons import (
    CONTROL_PREFIX,
    CONTROL_VS_PATCH_PREFIX,
    GROUP_EFFECT,
    NECESSITY,
    PATCH_EFFECT,
    SOURCE_NATURAL,
    SUFFICIENCY,
)
from rloop_ray.analysis.identity import (
    ALPHA_ZERO,
    SELF_CONTROL,
    identity_checks,
    identity_mask,
)
from rloop_ray.analysis.labels import point_label, primary_metrics
from rloop_ray.analysis.tables import StatsResult
from rloop_ray.vocab import POINT_COLUMNS, SELF


@dataclass(frozen=True)
class Note:
    """One sentence (or a few) the report states because the data says so."""

    kind: str
    text: str
    level: str = "info"  # info | warning


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}"


def _ci_overlap(a_low: float, a_high: float, b_low: float, b_high: float) -> bool:
    if not all(np.isfinite(v) for v in (a_low, a_high, b_low, b_high)):
        return False
    return a_low <= b_high and b_low <= a_high


def _capped(lines: list[str], limit: int = 6) -> str:
    shown = lines[:limit]
    rest = len(lines) - len(shown)
    text = " ".join(shown)
    return text + (f" ({rest} more like this in stats/comparisons.parquet.)" if rest else "")


def derive_notes(result: StatsResult) -> list[Note]:
    """The plain-language findings: honest n, failures, confounds, controls, FDR."""
    notes: list[Note] = []
    comp = result.completeness
    cells = result.results.cells
    q = result.q

    if cells.empty:
        notes.append(Note("scope", "The results folder holds no cells yet: nothing to analyse.",
                          "warning"))
        return notes + _stale_notes(result)
    notes.append(Note("scope", (
        f"{comp.n_done} cells in {cells['condition'].nunique()} conditions over "
        f"{cells['model'].nunique()} model(s); {comp.n_ok} ok, {comp.n_failed} failed. "
        f"Every failed cell is counted in its condition's n_failed and left out of means "
        f"and tests; none is dropped silently."
    )))
    if comp.n_expected is not None:
        if comp.partial:
            notes.append(Note("partial", (
                f"Partial sweep: {comp.n_done} of {comp.n_expected} cells done "
                f"({100 * comp.n_done / max(comp.n_expected, 1):.0f}%), {comp.n_missing} "
                f"missing. Conditions and comparisons below use the cells done so far; "
                f"rerun `rloop-ray stats` after `rloop-ray sweep --resume`."
            ), "warning"))
        else:
            notes.append(Note("complete", f"All {comp.n_expected} cells of the sweep are done."))
    else:
        notes.append(Note("partial", (
            "The sweep records no plan (a legacy manifest), so completeness cannot be checked."
        ), "warning"))
    for model, letters in comp.missing_conditions.items():
        lost = {"A": "sufficiency/transfer", "B": "necessity/transfer",
                "C": "sufficiency/transfer", "D": "necessity"}
        what = sorted({lost[x] for x in letters})
        notes.append(Note("missing_conditions", (
            f"{model}: no ok cell for condition(s) {', '.join(letters)}, so "
            f"{', '.join(what)} cannot be computed for it."
        ), "warning"))
    if comp.n_failed:
        kinds = result.failures.groupby("error_type")["n"].sum().sort_values(ascending=False)
        detail = ", ".join(f"{k} x{v}" for k, v in kinds.items())
        notes.append(Note("failures", f"{comp.n_failed} cells failed ({detail}).", "warning"))
    else:
        notes.append(Note("failures", "No cell failed."))
    if comp.n_recovered:
        notes.append(Note("failures", f"{comp.n_recovered} cells failed once and succeeded "
                                      f"on a retry; only the successful row is used."))
    notes.extend(_stale_notes(result))
    if comp.n_duplicate_rows:
        notes.append(Note("duplicates", f"{comp.n_duplicate_rows} duplicate rows (same "
                                        f"cell id) were collapsed to one row per cell."))
    cond = result.conditions
    if not cond.empty and "rv" in result.metrics:
        rv = cond[cond["metric"] == "rv"]
        n_nan = int(rv["n_nan"].sum())
        if n_nan:
            reasons: dict[str, int] = {}
            for text in rv["nan_reasons"]:
                for part in filter(None, str(text).split("; ")):
                    reason, _, count = part.rpartition(" x")
                    reasons[reason] = reasons.get(reason, 0) + int(count or 0)
            detail = ", ".join(f"{k} x{v}" for k, v in reasons.items())
            notes.append(Note("nan", (
                f"R_V is missing for {n_nan} ok cells ({detail}); they count in n_nan."
            ), "warning"))
        low = cond[(cond["n_valid"] < 5) & (cond["metric"] == "rv")]
        if len(low):
            notes.append(Note("low_n", (
                f"{len(low)} condition(s) have fewer than 5 valid cells; their intervals are "
                f"wide and their tests weak."
            ), "warning"))

    cmp = result.comparisons
    tested = cmp[cmp["p"].notna()]
    n_sig = int((tested["p_fdr"] < q).sum())
    notes.append(Note("fdr", (
        f"Benjamini-Hochberg over all {result.fdr_family_size} tests of this sweep "
        f"(comparisons, dose-response, correlations): {n_sig} of {len(tested)} comparisons "
        f"have p_fdr < {q}." + (" No comparison survives the correction." if n_sig == 0
                                else "")
    )))
    notes.extend(_transplant_notes(result))
    notes.extend(_control_notes(result))
    notes.extend(_identity_notes(result))
    notes.extend(_transfer_notes(result))
    notes.extend(_dose_notes(result))
    notes.extend(_model_notes(result))
    return notes


def _stale_notes(result: StatsResult) -> list[Note]:
    """Rows the store excluded because their cells are not in the plan (an earlier grid)."""
    n = result.completeness.n_stale_rows
    if not n:
        return []
    return [Note("stale", (
        f"{n} stale rows from an earlier plan were excluded: their cells are not in this "
        f"sweep's plan, so no table counts them."
    ), "warning")]


def _transplant_notes(result: StatsResult) -> list[Note]:
    cmp = result.comparisons
    src = cmp[(cmp["comparison"] == SOURCE_NATURAL)
              & cmp["metric"].isin(primary_metrics(result.metrics))]
    if src.empty:
        return []
    notes = [Note("transplant_all", (
        "A kv transplant of ALL layers replaces the target's entire prompt cache with the "
        "source's: that is the same computation as continuing the source prompt with the "
        "target's last token. Its 'transfer' is therefore expected by construction and must "
        "be read against the source-natural condition (the source's group run naturally), "
        "not against the target's."
    ), "warning")]
    lines = []
    for (model, a, b), sub in src.groupby(["model", "a", "b"], sort=True):
        same = sub[np.isfinite(sub["p_fdr"]) & ~(sub["p_fdr"] < result.q)]
        diff = sub[sub["p_fdr"] < result.q]
        text = f"{model}, '{a}' vs source-natural '{b}':"
        if len(same):
            text += f" not distinguishable on {', '.join(same['metric'])}"
            text += (" (it behaves like the source prompt continued);" if len(diff) else
                     " (it behaves like the source prompt continued).")
        if len(diff):
            parts = [f"{r['metric']} {_fmt(r['mean_a'])} vs {_fmt(r['mean_b'])} "
                     f"(d={_fmt(r['cohens_d'], 2)}, p_fdr={_fmt_p(r['p_fdr'])})"
                     for _, r in diff.iterrows()]
            text += " different on " + "; ".join(parts) + "."
        if not len(same) and not len(diff):
            text += " not testable (too few cells)."
        lines.append(text)
    notes.append(Note("transplant_all", _capped(lines, 8)))
    return notes


def _control_notes(result: StatsResult) -> list[Note]:
    """Controls that moved the metric as much as the patch: the effect is not specific."""
    cmp = result.comparisons
    q = result.q
    notes: list[Note] = []
    vs_patch = cmp[cmp["comparison"].str.startswith(CONTROL_VS_PATCH_PREFIX)
                   & cmp["metric"].isin(primary_metrics(result.metrics))]
    vs_patch = vs_patch[~identity_mask(vs_patch)]  # checks, not effects (_identity_notes)
    effect = cmp.set_index(["model", "a", "metric"]).sort_index()
    lines_by_control: dict[str, list[str]] = {}
    moved_alone: dict[str, list[str]] = {}
    unresolved: dict[str, list[str]] = {}
    for _, row in vs_patch.iterrows():
        ctrl = row["control"]
        if ctrl == SELF:
            continue
        key_ctrl = (row["model"], row["a"], row["metric"])
        key_patch = (row["model"], row["b"], row["metric"])
        if key_ctrl not in effect.index or key_patch not in effect.index:
            continue
        ce = _first_effect(effect.loc[key_ctrl], f"{CONTROL_PREFIX}{ctrl}")
        pe = _first_effect(effect.loc[key_patch], (SUFFICIENCY, NECESSITY, PATCH_EFFECT))
        if ce is None or pe is None:
            continue
        patch_sig, ctrl_sig = bool(pe["p_fdr"] < q), bool(ce["p_fdr"] < q)
        if np.isfinite(row["p_fdr"]):
            same = not (row["p_fdr"] < q)
            how = f"{ctrl} vs patch p_fdr={_fmt_p(row['p_fdr'])}"
        else:
            same = _ci_overlap(ce["d_ci_low"], ce["d_ci_high"], pe["d_ci_low"], pe["d_ci_high"])
            how = "no direct test; the effect-size intervals overlap"
        detail = (
            f"{row['model']}, {row['metric']} at {_point_of(row)}: {ctrl} d="
            f"{_fmt(ce['cohens_d'], 2)} [{_fmt(ce['d_ci_low'], 2)}, {_fmt(ce['d_ci_high'], 2)}]"
            f" (p_fdr={_fmt_p(ce['p_fdr'])}) vs patch d={_fmt(pe['cohens_d'], 2)} "
            f"[{_fmt(pe['d_ci_low'], 2)}, {_fmt(pe['d_ci_high'], 2)}], {how}."
        )
        overlap = _ci_overlap(ce["d_ci_low"], ce["d_ci_high"], pe["d_ci_low"], pe["d_ci_high"])
        same_sign = np.sign(ce["cohens_d"]) == np.sign(pe["cohens_d"])
        if patch_sig and same and overlap and same_sign:
            lines_by_control.setdefault(ctrl, []).append(detail)
        elif patch_sig and same:
            unresolved.setdefault(ctrl, []).append(detail)
        elif ctrl_sig and not patch_sig:
            moved_alone.setdefault(ctrl, []).append(detail)
    for ctrl, lines in sorted(lines_by_control.items()):
        notes.append(Note("control_as_large", (
            f"The '{ctrl}' control moved the metric as much as the patch did (the control's "
            f"cells are not significantly different from the patched cells and the two "
            f"effect intervals overlap), so there the patch effect is not specific to the "
            f"source's content: " + _capped(lines)
        ), "warning"))
    for ctrl, lines in sorted(unresolved.items()):
        notes.append(Note("control_unresolved", (
            f"Specificity not established against the '{ctrl}' control: the patch moved the "
            f"metric, the control's effect interval does not reach the patch's, but the "
            f"direct control-vs-patch test is not significant (too few cells to tell). "
            + _capped(lines, 3)
        )))
    for ctrl, lines in sorted(moved_alone.items()):
        notes.append(Note("control_moved", (
            f"The '{ctrl}' control moved the metric although the patch did not: any foreign "
            f"or perturbed cache disturbs the target there. " + _capped(lines)
        ), "warning"))
    return notes


def _identity_notes(result: StatsResult) -> list[Note]:
    """alpha = 0 mixes and the `self` control must reproduce the unpatched run.

    Counted cell by cell against the natural run of the same target (analysis/identity.py):
    exact matches are a check passed, not an effect of size zero; cells that differ are
    judged by their comparisons (systematic: suspect the code; scattered: numerics).
    """
    checks = identity_checks(result.results.cells, primary_metrics(result.metrics),
                             result.comparisons, result.q)
    notes: list[Note] = []
    for kind, name in ((SELF_CONTROL, "self_check"), (ALPHA_ZERO, "alpha_zero")):
        mine = [c for c in checks if c.kind == kind]
        if mine:
            level = "warning" if any(c.suspect for c in mine) else "info"
            notes.append(Note(name, " ".join(c.sentence(result.q) for c in mine), level))
    return notes


def _first_effect(
    block: pd.DataFrame | pd.Series, names: str | tuple[str, ...]
) -> pd.Series | None:
    frame = block.to_frame().T if isinstance(block, pd.Series) else block
    wanted = (names,) if isinstance(names, str) else names
    hit = frame[frame["comparison"].isin(wanted)]
    return None if hit.empty else hit.iloc[0]


def _point_of(row: pd.Series) -> str:
    return point_label(*(row[c] for c in POINT_COLUMNS))


def _transfer_notes(result: StatsResult) -> list[Note]:
    tr = result.transfer
    if tr.empty:
        return []
    notes: list[Note] = []
    cmp = result.comparisons
    group = cmp[(cmp["comparison"] == GROUP_EFFECT) & cmp["a"].str.startswith("B:")
                & cmp["b"].str.startswith("A:")]
    flat: dict[str, list[str]] = {}
    main = primary_metrics(result.metrics)
    for _, row in group.iterrows():
        if row["metric"] in main and not (row["p_fdr"] < result.q):
            flat.setdefault(row["model"], []).append(row["metric"])
    for model, metrics in sorted(flat.items()):
        notes.append(Note("transfer_denominator", (
            f"{model}: recursive and baseline natural cells do not differ significantly on "
            f"{', '.join(metrics)}, so transfer efficiency (C-A)/(B-A) for these divides by a "
            f"gap indistinguishable from zero and is not interpretable."
        ), "warning"))
    best = tr[np.isfinite(tr["efficiency"].astype(float))]
    best = best[~identity_mask(best.assign(control="patch"))]
    for (model, metric), sub in best.groupby(["model", "metric"], sort=True):
        if metric not in main or metric in flat.get(model, []):
            continue
        top = sub.loc[sub["efficiency"].idxmax()]
        notes.append(Note("transfer", (
            f"{model}, {metric}: transfer efficiency ranges {_fmt(sub['efficiency'].min(), 2)}"
            f" to {_fmt(sub['efficiency'].max(), 2)} over {len(sub)} intervention point(s); "
            f"highest at {top['point']} ({_fmt(top['efficiency'], 2)}, 95% CI "
            f"[{_fmt(top['eff_ci_low'], 2)}, {_fmt(top['eff_ci_high'], 2)}])"
            + (" -- a whole-cache transplant, see the note on transplants." if
               top["transplant_all"] else ".")
        )))
    return notes


def _dose_notes(result: StatsResult) -> list[Note]:
    dose = result.dose
    if dose.empty:
        return []
    dose = dose[dose["metric"].isin(primary_metrics(result.metrics))]
    sig = dose[dose["p_fdr"] < result.q]
    lines = [f"{r['model']}, {r['metric']} vs {r['factor']} ({r['scope']}): rho="
             f"{_fmt(r['rho'], 2)}, p_fdr={_fmt_p(r['p_fdr'])}, n={r['n']}."
             for _, r in sig.iterrows()]
    if not lines:
        return [Note("dose", f"No dose-response correlation ({len(dose)} tested) survives "
                             f"the FDR correction.")]
    return [Note("dose", f"{len(sig)} of {len(dose)} dose-response correlations survive the "
                         f"FDR correction: " + _capped(lines))]


def _model_notes(result: StatsResult) -> list[Note]:
    cmp = result.comparisons
    if cmp.empty or cmp["model"].nunique() < 2:
        return []
    models = sorted(cmp["model"].unique())
    sig = cmp.assign(sig=cmp["p_fdr"] < result.q).pivot_table(
        index=["comparison_id", "metric"], columns="model", values="sig", aggfunc="first"
    ).dropna()
    if sig.empty:
        return []
    both = int(sig.all(axis=1).sum())
    none = int((~sig.astype(bool)).all(axis=1).sum())
    split = len(sig) - both - none
    return [Note("models", (
        f"Across {len(sig)} comparisons run on every model ({', '.join(models)}): significant "
        f"in all models {both}, in none {none}, in some but not others {split}."
    ))]
