"""The answer a sweep gives, per model: what each intervention did, and a verdict.

The tables hold hundreds of rows; a reader wants to know first whether the patch moved
the behaviour and R_V, by how much of the natural gap, and whether the controls moved it
just as much. This module reads the computed tables (never the cells' raw numbers again,
so the summary cannot disagree with them) and, for every intervention point and measure,
states the effect against natural, the transfer efficiency with its bootstrap interval,
each control against natural and against the patch, and a verdict derived by fixed rules:

* the patch effect survives FDR and differs from every control in its favour:
  "transfers (moves it), and exceeds every control";
* it survives, but a control moved the metric too and is not distinguishable from the
  patch: "... but so does the <c> control" (the effect is not specific to the source);
* it survives and a control is not distinguishable from it without moving the metric
  significantly itself: "... not shown to exceed the <c> control at this n";
* it does not survive: "no detectable effect at this n: 80% power for |d| >= X" with X
  from the noncentral t (analysis/power.py), or, when a control moved the metric alone,
  "... but the <c> control moves it";
* no test (too few cells, no spread): "not testable".

Identity cells (alpha = 0 mixes, the `self` control) are not effects: they are summarised
as checks (analysis/identity.py). Metrics that are constant over the whole sweep (a scorer
that never fires) are named and left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from rloop_ray.analysis.identity import IdentityCheck, identity_checks, identity_mask
from rloop_ray.analysis.labels import SCORE_PREFIX, during_suffix, numeric, primary_metrics
from rloop_ray.analysis.power import POWER, detectable_effect
from rloop_ray.analysis.tables import StatsResult
from rloop_ray.vocab import (
    BASELINE_GROUP,
    NATURAL,
    PATCH_CONTROLS,
    POINT_COLUMNS,
    RECURSIVE_GROUP,
    SELF,
    STATUS_OK,
    STEER,
)

PATCH_COMPARISONS = (SUFFICIENCY, NECESSITY, PATCH_EFFECT)
MAX_ROWS = 24
"""Rows of the summary table per model (effects first); the rest are in the appendix."""

EFFECT = "effect"
NONSPECIFIC = "nonspecific"
UNRESOLVED = "unresolved"
NULL = "null"
CONTROL_ONLY = "control_only"
UNTESTABLE = "untestable"
VERDICT_KINDS = (EFFECT, NONSPECIFIC, UNRESOLVED, CONTROL_ONLY, NULL, UNTESTABLE)
"""Verdict classes, in the order the summary lists rows."""


def measure_name(metric: str) -> str:
    """How the summary names a metric: `R_V`, or the scorer without its `score_` prefix."""
    return "R_V" if metric == "rv" else metric.removeprefix(SCORE_PREFIX)


def fmt(x: float, digits: int = 2, signed: bool = False) -> str:
    """A number for a sentence: `n/a` when missing, 3 significant digits otherwise."""
    if x is None or not np.isfinite(x):
        return "n/a"
    text = f"{x:+.{digits}g}" if signed and x != 0 else f"{x:.{digits}g}"
    return text.replace("-", "\u2212")


def fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def fmt_pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%".replace("-", "\u2212")


@dataclass(frozen=True)
class ControlEffect:
    """One control at the patch's intervention point."""

    control: str
    diff: float
    d: float
    p_fdr: float
    """Control vs the natural condition of the target."""
    vs_patch_p_fdr: float
    """Control vs the patched cells (is the patch specific to the source?)."""


@dataclass
class EffectRow:
    """One intervention point x measure of the summary, with its verdict."""

    model: str
    comparison: str
    metric: str
    a: str
    point: tuple
    letter: str
    source_group: str
    target_group: str
    test: str
    n_pairs: int
    n_a: int
    n_b: int
    diff: float
    d: float
    d_low: float
    d_high: float
    p_fdr: float
    note: str
    transfer: float = math.nan
    transfer_low: float = math.nan
    transfer_high: float = math.nan
    gap_significant: bool | None = None
    controls: list[ControlEffect] = field(default_factory=list)
    transplant_all: bool = False
    source_natural_p_fdr: float = math.nan
    detectable: float = math.nan
    kind: str = UNTESTABLE
    verdict: str = ""
    matched_by: list[str] = field(default_factory=list)
    """Controls that moved the metric as much (or more), or that the patch is not shown to
    exceed: why the verdict is not "exceeds every control"."""

    @property
    def n_text(self) -> str:
        return f"{self.n_pairs} pairs" if self.test == "paired_t" else f"{self.n_a}+{self.n_b}"


@dataclass(frozen=True)
class GapRow:
    """Natural recursive vs natural baseline on one measure: the gap transfer is read against."""

    metric: str
    diff: float
    d: float
    d_low: float
    d_high: float
    p_fdr: float


@dataclass
class ModelSummary:
    """The answer for one model."""

    model: str
    n_cells: int
    n_ok: int
    n_prompts: dict[str, int]
    headline: list[str]
    gap: list[GapRow]
    rows: list[EffectRow]
    """The table's rows: effects first, at most `MAX_ROWS`."""
    n_rows_total: int
    n_found_left_out: int
    """Rows with an effect that did not fit in the table (they are in the appendix)."""
    checks: list[IdentityCheck]


@dataclass
class Summary:
    """The per-model answers, and what they leave out."""

    models: list[ModelSummary]
    metrics: list[str]
    constant_metrics: dict[str, float]
    """Metrics with one value over every ok cell of the sweep (left out), and that value."""
    q: float
    controls: list[str]
    """Controls that appear beside a patch somewhere (columns of the table)."""


def constant_metrics(result: StatsResult, metrics: Sequence[str]) -> dict[str, float]:
    """Metrics that take one value over every ok cell: no scorer output to compare."""
    cells = result.results.cells
    if cells.empty:
        return {}
    ok = cells[cells["status"] == STATUS_OK]
    out: dict[str, float] = {}
    for m in metrics:
        values = numeric(ok, m).dropna()
        if len(values) and values.nunique() == 1:
            out[m] = float(values.iloc[0])
    return out


def summary_metrics(result: StatsResult, chosen: Sequence[str] | None = None
                    ) -> tuple[list[str], dict[str, float]]:
    """R_V first, then the behaviour scores that vary; and the constant ones left out."""
    metrics = [m for m in (chosen or primary_metrics(result.metrics)) if m in result.metrics]
    const = constant_metrics(result, metrics)
    shown = [m for m in metrics if m not in const]
    shown.sort(key=lambda m: (m != "rv", m))
    return shown, const


def _gap_rows(cmp: pd.DataFrame, model: str, metrics: Sequence[str]) -> list[GapRow]:
    rows = cmp[(cmp["model"] == model) & (cmp["comparison"] == GROUP_EFFECT)
               & cmp["a"].str.startswith("B:") & cmp["b"].str.startswith("A:")]
    out = []
    for m in metrics:
        hit = rows[rows["metric"] == m]
        if len(hit):
            r = hit.iloc[0]
            out.append(GapRow(m, r["diff"], r["cohens_d"], r["d_ci_low"], r["d_ci_high"],
                              r["p_fdr"]))
    return out


def _controls_for(mine: pd.DataFrame, row: pd.Series) -> list[ControlEffect]:
    """The controls standing beside this patch: their effect and their test vs the patch.

    `mine`: the comparisons of the row's model and metric.
    """
    beside = mine[mine["comparison"].str.startswith(CONTROL_VS_PATCH_PREFIX)
                  & (mine["b"] == row["a"])]
    out = []
    for _, vs in beside.iterrows():
        ctrl = str(vs["control"])
        if ctrl == SELF:
            continue
        own = mine[(mine["comparison"] == f"{CONTROL_PREFIX}{ctrl}") & (mine["a"] == vs["a"])]
        if own.empty:
            continue
        o = own.iloc[0]
        out.append(ControlEffect(ctrl, o["diff"], o["cohens_d"], o["p_fdr"], vs["p_fdr"]))
    order = {c: i for i, c in enumerate(PATCH_CONTROLS)}
    return sorted(out, key=lambda c: (order.get(c.control, 99), c.control))


def _groups(label: str) -> tuple[str, str]:
    """(source group, target group) from a patched condition label `... src->tgt @ ...`."""
    head = label.split(" @ ", 1)[0].rsplit(" ", 1)[-1]
    src, _, tgt = head.partition("->")
    return src, tgt


def _verdict(row: EffectRow, q: float) -> tuple[str, str]:
    """The verdict class and its one line, from the row's numbers (rules in the docstring).

    Sets `row.matched_by` to the controls that keep the effect from being specific.
    """
    if not np.isfinite(row.p_fdr):
        why = ("the values do not vary" if "constant" in row.note or "no spread" in row.note
               else row.note or "too few cells")
        return UNTESTABLE, f"not testable: {why}"
    moved = "transfers" if row.comparison == SUFFICIENCY else "moves it"
    ctrl_sig = [c for c in row.controls if np.isfinite(c.p_fdr) and c.p_fdr < q]
    if row.p_fdr < q:
        if not row.controls:
            return EFFECT, f"{moved} (no control beside this patch)"
        same = [c for c in row.controls if not (c.vs_patch_p_fdr < q)]
        bigger = [c for c in row.controls if c.vs_patch_p_fdr < q and np.isfinite(c.d)
                  and np.sign(c.d) == np.sign(row.d) and abs(c.d) > abs(row.d)]
        as_much = [c for c in same if c in ctrl_sig]
        if as_much:
            row.matched_by = [c.control for c in as_much]
            names = " and ".join(f"the {c.control}" for c in as_much)
            return NONSPECIFIC, f"{moved}, but so does {names} control"
        if bigger:
            row.matched_by = [c.control for c in bigger]
            names = " and ".join(f"the {c.control}" for c in bigger)
            return NONSPECIFIC, f"{moved}, but {names} control moves it more"
        if same:
            row.matched_by = [c.control for c in same]
            names = " or ".join(c.control for c in same)
            return UNRESOLVED, f"{moved}; not shown to exceed the {names} control at this n"
        return EFFECT, f"{moved}, and exceeds every control"
    if ctrl_sig:
        names = " and ".join(f"the {c.control}" for c in ctrl_sig)
        return CONTROL_ONLY, f"no detectable effect of the patch, but {names} control moves it"
    return NULL, (f"no detectable effect at this n: {POWER:.0%} power for |d| \u2265 "
                  f"{fmt(row.detectable)}")


def _effect_rows(result: StatsResult, model: str, metrics: Sequence[str]) -> list[EffectRow]:
    cmp, tr, q = result.comparisons, result.transfer, result.q
    mine = cmp[(cmp["model"] == model) & cmp["comparison"].isin(PATCH_COMPARISONS)
               & cmp["metric"].isin(metrics)]
    mine = mine[~identity_mask(mine)]
    gap = {g.metric: bool(g.p_fdr < q) if np.isfinite(g.p_fdr) else None
           for g in _gap_rows(cmp, model, metrics)}
    # sliced once per model and metric: a grid of thousands of points stays linear
    by_metric = {m: g for m, g in cmp[cmp["model"] == model].groupby("metric", sort=False)}
    transfer = ({m: g for m, g in tr[tr["model"] == model].groupby("metric", sort=False)}
                if not tr.empty else {})
    rows: list[EffectRow] = []
    for _, r in mine.iterrows():
        point = tuple(r[c] for c in POINT_COLUMNS)
        peers = by_metric[r["metric"]]
        src, tgt = _groups(str(r["a"]))
        n_pairs, n_a, n_b = int(r["n_pairs"] or 0), int(r["n_a"] or 0), int(r["n_b"] or 0)
        row = EffectRow(
            model=model, comparison=str(r["comparison"]), metric=str(r["metric"]),
            a=str(r["a"]), point=point, letter=str(r["a"]).split(":", 1)[0]
            if str(r["a"])[:2] in ("C:", "D:") else "", source_group=src, target_group=tgt,
            test=str(r["test"]), n_pairs=n_pairs, n_a=n_a, n_b=n_b, diff=r["diff"],
            d=r["cohens_d"], d_low=r["d_ci_low"], d_high=r["d_ci_high"], p_fdr=r["p_fdr"],
            note=str(r["note"] or ""), controls=_controls_for(peers, r),
        )
        row.detectable = (detectable_effect(n_pairs, alpha=q) if row.test == "paired_t"
                          else detectable_effect(n_a, n_b, alpha=q))
        hit = transfer.get(row.metric, pd.DataFrame(columns=POINT_COLUMNS))
        for c, v in zip(POINT_COLUMNS, point, strict=True):
            if hit.empty:
                break
            hit = hit[hit[c].isna()] if c == "alpha" and not np.isfinite(v) else hit[hit[c] == v]
        if len(hit):
            t = hit.iloc[0]
            row.transplant_all = bool(t["transplant_all"])
            if row.comparison == SUFFICIENCY:
                row.transfer, row.transfer_low, row.transfer_high = (
                    t["efficiency"], t["eff_ci_low"], t["eff_ci_high"])
            elif row.comparison == NECESSITY:
                row.transfer, row.transfer_low, row.transfer_high = (
                    t["necessity_fraction"], t["nec_ci_low"], t["nec_ci_high"])
            row.gap_significant = gap.get(row.metric)
        src_nat = peers[(peers["comparison"] == SOURCE_NATURAL) & (peers["a"] == row.a)]
        if len(src_nat):
            row.transplant_all = True
            row.source_natural_p_fdr = src_nat["p_fdr"].iloc[0]
        row.kind, row.verdict = _verdict(row, q)
        if row.transplant_all:
            same = np.isfinite(row.source_natural_p_fdr) and not row.source_natural_p_fdr < q
            row.verdict += ("; a whole-cache transplant: the source prompt continued" + (
                ", indistinguishable from the source run naturally" if same else ""))
        rows.append(row)
    order = {k: i for i, k in enumerate(VERDICT_KINDS)}
    rows.sort(key=lambda x: (PATCH_COMPARISONS.index(x.comparison), order[x.kind],
                             -abs(x.d) if np.isfinite(x.d) else 0.0, str(x.point), x.metric))
    return rows


def _point_text(point: tuple, with_align: bool) -> str:
    """`kv/mix, layers 16:32, tokens all, α = 1`; a steer's alpha is its vector's scale,
    and a point acting during generation says so."""
    at = dict(zip(POINT_COLUMNS, point, strict=True))
    text = f"{at['site']}/{at['mode']}, layers {at['layers']}, tokens {at['tokens']}"
    if with_align and at["mode"] != STEER:
        text += f", align {at['align']}"
    strength = "scale" if at["mode"] == STEER else "\u03b1 ="
    during = during_suffix(at["during"]).replace("=", " ")
    return text + f", {strength} {at['alpha']:g}" + (f",{during}" if during else "")


def point_text(row: EffectRow, with_align: bool = False) -> str:
    """`C: recursive -> baseline` over the intervention point, for the table's first column."""
    prefix = f"{row.letter}: " if row.letter else ""
    return (f"{prefix}{row.source_group} \u2192 {row.target_group}\n"
            f"{_point_text(row.point, with_align)}")


GROUP_LABELS = {
    SUFFICIENCY: "Recursive source into baseline targets (C vs A)",
    NECESSITY: "Baseline source into recursive targets (D vs B)",
    PATCH_EFFECT: "Other patches (vs the target's natural run)",
}
FOUND = (EFFECT, NONSPECIFIC, UNRESOLVED)


def _group_sentence(label: str, rows: Sequence[EffectRow]) -> str | None:
    """One comparison family's answer: how many effects survive, how they fare against
    the controls, and the strongest, with its numbers."""
    tested = [r for r in rows if r.kind != UNTESTABLE]
    if not tested:
        return None
    found = [r for r in tested if r.kind in FOUND]
    head = f"{label}: {len(found)} of {len(tested)} effects survive FDR"
    if not found:
        detect = [r.detectable for r in tested if np.isfinite(r.detectable)]
        d = float(np.median(detect)) if detect else math.nan
        return (head + f"; with {_typical_n(tested)} the tests had {POWER:.0%} power only for "
                f"|d| \u2265 {fmt(d)}.")
    kinds = {k: [r for r in found if r.kind == k] for k in FOUND}
    parts = []
    if kinds[EFFECT]:
        with_ctrl = [r for r in kinds[EFFECT] if r.controls]
        parts.append(f"{len(with_ctrl)} exceed every control" if with_ctrl
                     else f"{len(kinds[EFFECT])} with no control beside them")
        if with_ctrl and len(with_ctrl) < len(kinds[EFFECT]):
            parts.append(f"{len(kinds[EFFECT]) - len(with_ctrl)} with no control beside them")
    if kinds[NONSPECIFIC]:
        names = sorted({c for r in kinds[NONSPECIFIC] for c in r.matched_by})
        parts.append(f"{len(kinds[NONSPECIFIC])} matched by a control ({', '.join(names)}): "
                     f"not specific to the source")
    if kinds[UNRESOLVED]:
        names = sorted({c for r in kinds[UNRESOLVED] for c in r.matched_by})
        parts.append(f"{len(kinds[UNRESOLVED])} not shown to exceed the {' or '.join(names)} "
                     f"control at this n")
    best = max(found, key=lambda r: (r.kind == EFFECT, abs(r.d) if np.isfinite(r.d) else 0.0))
    share = (f"{fmt_pct(best.transfer)} of the natural gap [{fmt_pct(best.transfer_low)}, "
             f"{fmt_pct(best.transfer_high)}], " if np.isfinite(best.transfer) else "")
    return (head + " (" + "; ".join(parts) + "). Strongest: "
            f"{measure_name(best.metric)} at {_point_text(best.point, False)}, {share}"
            f"d {fmt(best.d)}, p_fdr {fmt_p(best.p_fdr)}, {best.n_text}: {best.verdict}.")


def _headline(ms: ModelSummary, result: StatsResult, rows: Sequence[EffectRow]) -> list[str]:
    """The answer in a few sentences: per comparison family, then the natural gap, the
    identity checks and the scale. `rows` are all the model's rows, not only the table's."""
    q = result.q
    answer = [text for comp in PATCH_COMPARISONS
              if (text := _group_sentence(GROUP_LABELS[comp],
                                          [r for r in rows if r.comparison == comp]))]
    if not answer:
        answer.append("No intervention could be tested (too few cells or no spread).")
    lines: list[str] = []
    if ms.gap:
        sig = [g for g in ms.gap if np.isfinite(g.p_fdr) and g.p_fdr < q]
        parts = "; ".join(f"{measure_name(g.metric)} \u0394 {fmt(g.diff, 3, True)} (d "
                          f"{fmt(g.d)}, p_fdr {fmt_p(g.p_fdr)})" for g in ms.gap)
        if sig:
            names = ", ".join(measure_name(g.metric) for g in sig)
            lines.append(f"Run naturally, recursive prompts differ from baseline ones on "
                         f"{names} (B \u2212 A: {parts}).")
        else:
            lines.append(f"Run naturally, recursive and baseline prompts do not differ "
                         f"detectably on any measure (B \u2212 A: {parts}), so transfer "
                         f"efficiencies divide by a gap indistinguishable from zero.")
    if ms.checks:
        bits = [c.short() for c in ms.checks]
        bad = [c for c in ms.checks if c.suspect]
        lines.append("Identity checks (must equal natural by construction): "
                     + "; ".join(bits) + (" \u2014 " + " ".join(c.sentence(q) for c in bad)
                                          if bad else "."))
    prompts = ", ".join(f"{n} {g}" for g, n in ms.n_prompts.items())
    failed = ms.n_cells - ms.n_ok
    lines.append(
        f"{ms.n_cells} cells ({'all ok' if not failed else f'{failed} failed'}) over "
        f"{prompts} target prompts; significance is after Benjamini-Hochberg over all "
        f"{result.fdr_family_size} tests of the sweep (q = {q})."
    )
    return answer + lines


def _typical_n(rows: Sequence[EffectRow]) -> str:
    paired = [r.n_pairs for r in rows if r.test == "paired_t" and r.n_pairs]
    if paired:
        n = int(np.median(paired))
        return f"{n} prompt pair{'s' if n != 1 else ''}"
    sizes = [(r.n_a, r.n_b) for r in rows if r.n_a]
    if sizes:
        n_a, n_b = sizes[len(sizes) // 2]
        return f"{n_a} and {n_b} cells"
    return "this n"


def _table_rows(rows: Sequence[EffectRow], max_rows: int) -> list[EffectRow]:
    """The rows the table keeps: effects before nulls before untestable, C before D."""
    order = {k: i for i, k in enumerate(VERDICT_KINDS)}
    ranked = sorted(rows, key=lambda r: (order[r.kind], PATCH_COMPARISONS.index(r.comparison),
                                         -abs(r.d) if np.isfinite(r.d) else 0.0))
    return ranked[:max_rows]


def _left_out(rows: Sequence[EffectRow], max_rows: int) -> list[EffectRow]:
    kept = {id(r) for r in _table_rows(rows, max_rows)}
    return [r for r in rows if id(r) not in kept]


def build_summary(result: StatsResult, metrics: Sequence[str] | None = None,
                  max_rows: int = MAX_ROWS) -> Summary:
    """The answer of every model of the sweep (no I/O)."""
    shown, const = summary_metrics(result, metrics)
    cells = result.results.cells
    checks = identity_checks(cells, shown, result.comparisons, result.q)
    models: list[ModelSummary] = []
    controls: set[str] = set()
    if cells.empty:
        return Summary([], shown, const, result.q, [])
    for model, mcells in cells.groupby("model", sort=True):
        rows = _effect_rows(result, str(model), shown)
        for r in rows:
            controls.update(c.control for c in r.controls)
        natural = mcells[mcells["is_natural"]]
        n_prompts = {g: int(natural.loc[natural["target_group"] == g, "target_id"].nunique())
                     for g in sorted(natural["target_group"].unique(),
                                     key=lambda g: (g != BASELINE_GROUP, g != RECURSIVE_GROUP, g))
                     if g != NATURAL}
        ms = ModelSummary(
            model=str(model), n_cells=int(mcells["cell_id"].nunique()),
            n_ok=int((mcells["status"] == STATUS_OK).sum()), n_prompts=n_prompts,
            headline=[], gap=_gap_rows(result.comparisons, str(model), shown),
            rows=_table_rows(rows, max_rows), n_rows_total=len(rows),
            n_found_left_out=sum(1 for r in _left_out(rows, max_rows) if r.kind in FOUND),
            checks=[c for c in checks if c.model == model],
        )
        ms.headline = _headline(ms, result, rows)
        models.append(ms)
    order = {c: i for i, c in enumerate(PATCH_CONTROLS)}
    return Summary(models, shown, const, result.q,
                   sorted(controls, key=lambda c: (order.get(c, 99), c)))
