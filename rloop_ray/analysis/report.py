"""The sweep report: `report.md` and a self-contained `report.html`, answer first.

`rloop-ray stats` ends here. A reader opens the report to learn what the sweep found, so
it is laid out in the order of their questions: per model, the answer (each intervention
point's effect on R_V and behaviour against natural and against each control, transfer
efficiency with its interval, p_fdr and a verdict: analysis/summary.py), then what the
patched model actually wrote (analysis/examples.py), then the figures, then the full
tables (collapsed in HTML, an appendix in Markdown), and provenance and the grid last.
The context is built once here and rendered by two templates (analysis/document.py), so
both files say the same. Outputs go into the sweep folder when it is local, else into
the folder the caller names.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray import __version__
from rloop_ray.analysis.comparisons import (
    CLASSIC_COMPARISONS,
    CONTROL_PREFIX,
    CONTROL_VS_PATCH_PREFIX,
)
from rloop_ray.analysis.document import MAX_ROWS, render_html, render_markdown
from rloop_ray.analysis.examples import examples_frame, pick_examples
from rloop_ray.analysis.figures import DPI, FIGURES_DIR, FigureInfo, make_figures
from rloop_ray.analysis.identity import identity_mask
from rloop_ray.analysis.load import load_results
from rloop_ray.analysis.notes import Note, derive_notes
from rloop_ray.analysis.summary import (
    NECESSITY,
    SUFFICIENCY,
    EffectRow,
    ModelSummary,
    Summary,
    build_summary,
    fmt,
    fmt_p,
    fmt_pct,
    measure_name,
    point_text,
)
from rloop_ray.analysis.tables import STATS_DIR, StatsResult, compute_stats, write_tables
from rloop_ray.vocab import NATURAL, NONE_LABEL, PREFILL

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def stars(p: float, q: float) -> str:
    """Significance after FDR: * p_fdr < q, ** < 0.01, *** < 0.001."""
    if p is None or not np.isfinite(p) or p >= q:
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*"


# --- the summary table --------------------------------------------------------------------


def _lines(*lines: str) -> str:
    """A table cell of short lines that do not wrap inside (numbers stay whole)."""
    return "\n".join(line.replace(" ", "\u00a0") for line in lines if line)


def _effect_cell(row: EffectRow, q: float) -> str:
    return _lines(f"\u0394 {fmt(row.diff, 3, True)} \u00b7 d {fmt(row.d)}",
                  f"p_fdr {fmt_p(row.p_fdr)}{stars(row.p_fdr, q)}")


def _transfer_cell(row: EffectRow) -> str:
    if not np.isfinite(row.transfer):
        return "\u2014"
    ci = (f"[{fmt_pct(row.transfer_low)}, {fmt_pct(row.transfer_high)}]"
          if np.isfinite(row.transfer_low) else "(no CI)")
    return _lines("(B\u2212D)/(B\u2212A)" if row.comparison == NECESSITY else "",
                  f"{fmt_pct(row.transfer)} {ci}",
                  "(gap B\u2212A n.s.)" if row.gap_significant is False else "")


def _control_cell(row: EffectRow, control: str, q: float) -> str:
    hit = next((c for c in row.controls if c.control == control), None)
    if hit is None:
        return "\u2014"
    return _lines(f"\u0394 {fmt(hit.diff, 3, True)}",
                  f"p_fdr {fmt_p(hit.p_fdr)}{stars(hit.p_fdr, q)}",
                  f"vs patch {fmt_p(hit.vs_patch_p_fdr)}{stars(hit.vs_patch_p_fdr, q)}")


def summary_frame(ms: ModelSummary, summary: Summary) -> pd.DataFrame:
    """The answer as a table: one row per intervention point and measure."""
    q = summary.q
    aligns = {r.point[4] for r in ms.rows}
    order = {m: i for i, m in enumerate(summary.metrics)}
    rows = sorted(ms.rows, key=lambda r: (r.comparison != SUFFICIENCY, str(r.point),
                                          order.get(r.metric, 99)))
    records = []
    last = None
    for r in rows:
        where = f"{point_text(r, with_align=len(aligns) > 1)}\nn = {r.n_text}"
        record = {
            "intervention": where if where != last else "",
            "measure": measure_name(r.metric),
            "patch vs natural": _effect_cell(r, q),
            "transfer (C\u2212A)/(B\u2212A)": _transfer_cell(r),
        }
        for ctrl in summary.controls:
            record[f"{ctrl} control"] = _control_cell(r, ctrl, q)
        record["verdict"] = r.verdict
        records.append(record)
        last = where
    return pd.DataFrame(records)


def _gap_line(ms: ModelSummary) -> str:
    return "; ".join(
        f"{measure_name(g.metric)} \u0394 {fmt(g.diff, 3, True)} (d {fmt(g.d)} "
        f"[{fmt(g.d_low)}, {fmt(g.d_high)}], p_fdr {fmt_p(g.p_fdr)})" for g in ms.gap)


# --- appendix views -----------------------------------------------------------------------


def _n_text(row: pd.Series) -> str:
    if row["test"] == "paired_t":
        return f"{int(row['n_pairs'])} pairs"
    return f"{int(row['n_a'])} / {int(row['n_b'])}"


def _ci(lo: float, hi: float) -> str:
    return "" if not np.isfinite(lo) else f"[{fmt(lo)}, {fmt(hi)}]"


def comparison_view(cmp: pd.DataFrame, q: float, with_model: bool) -> pd.DataFrame:
    """The comparison rows a reader needs (the Parquet file has every column)."""
    if cmp.empty:
        return cmp
    cmp = cmp.sort_values(["model", "metric", "p_fdr"], na_position="last", kind="stable")
    view = pd.DataFrame({
        "measure": [measure_name(m) for m in cmp["metric"]],
        "comparison": cmp["comparison"], "a": cmp["a"], "b": cmp["b"],
        "n": [_n_text(r) for _, r in cmp.iterrows()],
        "mean a": cmp["mean_a"], "mean b": cmp["mean_b"], "diff": cmp["diff"],
        "d [95% CI]": [f"{fmt(d)} {_ci(lo, hi)}".strip() if np.isfinite(d) else ""
                       for d, lo, hi in zip(cmp["cohens_d"], cmp["d_ci_low"], cmp["d_ci_high"],
                                            strict=True)],
        "p_fdr": cmp["p_fdr"], "sig": [stars(p, q) for p in cmp["p_fdr"]],
        "note": cmp["note"],
    })
    if with_model:
        view.insert(0, "model", cmp["model"].to_numpy())
    return view


def transfer_view(tr: pd.DataFrame, with_model: bool) -> pd.DataFrame:
    if tr.empty:
        return tr
    view = pd.DataFrame({
        "point": tr["point"], "measure": [measure_name(m) for m in tr["metric"]],
        "n A/B/C/D": [f"{a}/{b}/{c}/{d}" for a, b, c, d in zip(
            tr["n_a"], tr["n_b"], tr["n_c"], tr["n_d"], strict=True)],
        "A": tr["mean_a"], "B": tr["mean_b"], "C": tr["mean_c"], "D": tr["mean_d"],
        "(C\u2212A)/(B\u2212A) [95% CI]": [
            "" if not np.isfinite(e) else f"{fmt(e)} {_ci(lo, hi)}".strip()
            for e, lo, hi in zip(tr["efficiency"], tr["eff_ci_low"], tr["eff_ci_high"],
                                 strict=True)],
        "(B\u2212D)/(B\u2212A) [95% CI]": [
            "" if not np.isfinite(e) else f"{fmt(e)} {_ci(lo, hi)}".strip()
            for e, lo, hi in zip(tr["necessity_fraction"], tr["nec_ci_low"],
                                 tr["nec_ci_high"], strict=True)],
        "whole cache": tr["transplant_all"], "note": tr["note"],
    })
    if with_model:
        view.insert(0, "model", tr["model"].to_numpy())
    return view


def condition_view(cond: pd.DataFrame, metrics: Sequence[str], with_model: bool
                   ) -> pd.DataFrame:
    """One row per condition, one column per measure: mean [95% CI] (n valid if fewer)."""
    if cond.empty:
        return cond
    cond = cond[cond["metric"].isin(metrics)]
    keys = ["model", "condition"]
    records = []
    natural_first = cond.assign(_nat=cond["control"] != NATURAL).sort_values(
        ["model", "_nat", "condition"], kind="stable")
    for (model, label), sub in natural_first.groupby(keys, sort=False):
        first = sub.iloc[0]
        rec: dict[str, Any] = {"model": model, "condition": label, "n": int(first["n"]),
                               "failed": int(first["n_failed"])}
        reasons = set()
        for m in metrics:
            hit = sub[sub["metric"] == m]
            if hit.empty:
                rec[measure_name(m)] = ""
                continue
            h = hit.iloc[0]
            text = "" if not np.isfinite(h["mean"]) else (
                f"{fmt(h['mean'], 3)} {_ci(h['ci_low'], h['ci_high'])}".strip())
            if h["n_valid"] < h["n_ok"]:
                text += f" (n={int(h['n_valid'])})"
            rec[measure_name(m)] = text
            if h["nan_reasons"]:
                reasons.add(f"{measure_name(m)}: {h['nan_reasons']}")
        rec["missing values"] = "; ".join(sorted(reasons))
        records.append(rec)
    view = pd.DataFrame(records)
    if not with_model:
        view = view.drop(columns=["model"])
    if not view["missing values"].astype(bool).any():
        view = view.drop(columns=["missing values"])
    return view


def _natural_first(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the natural conditions first, then the rest, each by model and condition."""
    return table.assign(_nat=table["control"] != NATURAL).sort_values(
        ["model", "_nat", "condition", "layer"], kind="stable").drop(columns=["_nat"])


def profile_view(prof: pd.DataFrame, with_model: bool) -> pd.DataFrame:
    """Per condition and profile layer: PR, prompt PR and R_V by depth with intervals."""
    if prof.empty:
        return prof
    prof = _natural_first(prof)
    view = pd.DataFrame({
        "condition": prof["condition"], "layer": prof["layer"], "n": prof["n_valid"],
        "PR [95% CI]": [f"{fmt(m, 3)} {_ci(lo, hi)}".strip() if np.isfinite(m) else ""
                        for m, lo, hi in zip(prof["mean_pr"], prof["pr_ci_low"],
                                             prof["pr_ci_high"], strict=True)],
        "prompt PR": prof["mean_pr_prompt"],
        "R_V by depth [95% CI]": [
            f"{fmt(m, 3)} {_ci(lo, hi)}".strip() if np.isfinite(m) else ""
            for m, lo, hi in zip(prof["mean_rv_depth"], prof["rv_ci_low"], prof["rv_ci_high"],
                                 strict=True)],
        "reference": prof["reference"], "note": prof["note"],
    })
    if with_model:
        view.insert(0, "model", prof["model"].to_numpy())
    return view


def attention_view(att: pd.DataFrame, with_model: bool) -> pd.DataFrame:
    """Per condition and layer: mean attention entropy and where the attention goes."""
    if att.empty:
        return att
    att = _natural_first(att)
    view = pd.DataFrame({
        "condition": att["condition"], "layer": att["layer"], "n": att["n"],
        "entropy": att["mean_entropy"], "mass prompt": att["mean_mass_prompt"],
        "mass generated": att["mean_mass_generated"],
        "mass patched": att["mean_mass_patched"], "note": att["note"],
    })
    if with_model:
        view.insert(0, "model", att["model"].to_numpy())
    return view


def _section(ident: str, title: str, intro: str = "", table: pd.DataFrame | None = None,
             source: str = "", items: Sequence[tuple[str, str]] = (),
             max_rows: int = MAX_ROWS) -> dict[str, Any]:
    shown = table.head(max_rows) if table is not None else None
    return {"id": ident, "title": title, "intro": intro, "table": shown,
            "more": 0 if table is None else len(table) - len(shown), "source": source,
            "items": [{"level": lvl, "text": " ".join(t.split())} for lvl, t in items]}


def _appendix(result: StatsResult, notes: Sequence[Note], metrics: Sequence[str]
              ) -> list[dict[str, Any]]:
    rs, comp, q = result.results, result.completeness, result.q
    multi = rs.cells["model"].nunique() > 1 if not rs.cells.empty else False
    out = [_section("findings", "Findings", "Every note the analysis derived, in order; "
                    "warnings are marked.", items=[(n.level, n.text) for n in notes])]
    expected = "unknown (no plan recorded)" if comp.n_expected is None else comp.n_expected
    out.append(_section(
        "completeness", "Completeness and failures",
        table=pd.DataFrame(comp.by_model) if comp.by_model else None,
        source=f"{STATS_DIR}/summary.json", items=[
            ("info", f"cells planned: {expected}; done: {comp.n_done} (ok {comp.n_ok}, failed "
                     f"{comp.n_failed}); missing: "
                     f"{'unknown' if comp.n_missing is None else comp.n_missing}"),
            ("info", f"duplicate rows collapsed: {comp.n_duplicate_rows}; failed then "
                     f"recovered on retry: {comp.n_recovered}; stale rows from an earlier "
                     f"plan excluded: {comp.n_stale_rows}"),
            ("info", f"metrics analysed: {', '.join(result.metrics) or 'none'}"),
        ]))
    if not result.failures.empty:
        out.append(_section("failures", "Failed cells by error type",
                            "Tracebacks are in `failures/`.", result.failures,
                            f"{STATS_DIR}/failures.parquet"))
    cmp = result.comparisons
    cmp = cmp[cmp["metric"].isin(metrics)] if not cmp.empty else cmp
    identities = identity_mask(cmp) if not cmp.empty else pd.Series(dtype=bool)
    n_identity = int(identities.sum())
    cmp = cmp[~identities] if not cmp.empty else cmp
    skipped = (f" {n_identity} rows of identity conditions (alpha = 0, self) are left out: "
               f"they are checks (see the summary), their rows are in "
               f"`{STATS_DIR}/comparisons.parquet`." if n_identity else "")
    classic = cmp[cmp["comparison"].isin(CLASSIC_COMPARISONS)] if not cmp.empty else cmp
    out.append(_section(
        "classic", "Classic comparisons",
        "A = baseline target natural, B = recursive target natural, C = baseline target with "
        "recursive source, D = recursive target with baseline source. diff = a \u2212 b; d is "
        "Cohen's d (pooled sd) for Welch rows and d_z for paired rows (cells matched by "
        "prompt). sig: * p_fdr < q, ** < 0.01, *** < 0.001." + skipped,
        comparison_view(classic, q, multi), f"{STATS_DIR}/comparisons.parquet"))
    tr = result.transfer
    if not tr.empty:
        tr = tr[tr["metric"].isin(metrics)]
        tr = tr[~identity_mask(tr.assign(control="patch"))]
    out.append(_section(
        "transfer", "Transfer efficiency",
        "(C\u2212A)/(B\u2212A): the share of the recursive-natural gap a recursive source moves "
        "a baseline target; (B\u2212D)/(B\u2212A): the share a baseline source removes from a "
        f"recursive target. Percentile bootstrap {result.confidence:.0%} CIs "
        f"({result.settings.get('n_resamples')} resamples, seed {result.settings.get('seed')})."
        if not tr.empty else "Not computed: the sweep has no intervention point with A, B "
                             "and C cells.",
        transfer_view(tr, multi) if not tr.empty else None, f"{STATS_DIR}/transfer.parquet"))
    controls = cmp[cmp["comparison"].str.startswith((CONTROL_PREFIX, CONTROL_VS_PATCH_PREFIX))
                   ] if not cmp.empty else cmp
    out.append(_section(
        "controls", "Controls",
        "Each control against the natural condition of its target group (`control:*`) and "
        "against the patch it stands beside (`control_vs_patch:*`). A control that moves the "
        "metric as much as the patch means the patch effect is not specific to the source."
        if not controls.empty else "The sweep has no control conditions beside a patch.",
        comparison_view(controls, q, multi) if not controls.empty else None,
        f"{STATS_DIR}/comparisons.parquet"))
    dose = result.dose
    dose = dose[dose["metric"].isin(metrics)] if not dose.empty else dose
    if not dose.empty:
        dose = dose.sort_values(["model", "factor", "p_fdr"], na_position="last")
        view = pd.DataFrame({"factor": dose["factor"], "scope": dose["scope"],
                             "measure": [measure_name(m) for m in dose["metric"]],
                             "n": dose["n"], "levels": dose["n_levels"], "rho": dose["rho"],
                             "p_fdr": dose["p_fdr"],
                             "sig": [stars(p, q) for p in dose["p_fdr"]], "note": dose["note"]})
        if multi:
            view.insert(0, "model", dose["model"].to_numpy())
    out.append(_section(
        "dose", "Dose-response",
        "Spearman's rho of each measure with alpha (within a condition family) and with the "
        "recursion level." if not dose.empty else
        "No factor varied: the sweep has one alpha and no recursion levels.",
        view if not dose.empty else None, f"{STATS_DIR}/dose_response.parquet"))
    corr = result.correlations
    if not corr.empty:
        view = pd.DataFrame({"scope": corr["scope"],
                             "measure": [measure_name(m) for m in corr["y"]], "n": corr["n"],
                             "Pearson r": corr["pearson_r"],
                             "r [95% CI]": [_ci(lo, hi) for lo, hi in zip(
                                 corr["pearson_ci_low"], corr["pearson_ci_high"], strict=True)],
                             "p_fdr (r)": corr["pearson_p_fdr"],
                             "Spearman rho": corr["spearman_rho"],
                             "p_fdr (rho)": corr["spearman_p_fdr"], "note": corr["note"]})
        if multi:
            view.insert(0, "model", corr["model"].to_numpy())
    out.append(_section(
        "correlations", "R_V and behaviour",
        "R_V against each behaviour score over all ok cells and over natural cells only."
        if not corr.empty else "Not computed: the sweep has no R_V or no behaviour score.",
        view if not corr.empty else None, f"{STATS_DIR}/correlations.parquet"))
    side = result.side_by_side
    if not side.empty:
        view = side[side["metric"].isin(metrics)]
        view = view.drop(columns=["comparison_id"]).assign(
            a_vs_b=view["comparison_id"].str.split(" \\| ", n=1).str[1])
        out.append(_section("models", "Models side by side",
                            "Every comparison that ran on more than one model, one column set "
                            "per model.", view, f"{STATS_DIR}/models_side_by_side.parquet"))
    if not result.profiles.empty:
        out.append(_section(
            "profiles", "Layer profiles",
            "Participation ratio of V (last W generated tokens) at each profile layer, its "
            "prompt-side value, and R_V by depth = PR(layer) / PR(reference layer): the "
            "cell's early layer when the profile holds it, else the first profile layer "
            "(column `reference`); means over the ok cells with percentile bootstrap "
            f"{result.confidence:.0%} intervals. Drawn for natural cells in the figure R_V "
            "by depth.", profile_view(result.profiles, multi), f"{STATS_DIR}/profiles.parquet"))
    if not result.attention.empty:
        out.append(_section(
            "attention", "Attention by layer",
            "Mean over cells of each cell's attention entropy and of the attention mass on "
            "the prompt, on the generated tokens and on the patched positions (the patched "
            "mass over the cells that patched one), per layer; each cell's value is already "
            "a mean over its generated queries and the heads.",
            attention_view(result.attention, multi), f"{STATS_DIR}/attention.parquet"))
    out.append(_section(
        "conditions", "Per condition",
        "Mean and t-based 95% CI of each measure; n counts every cell of the condition, "
        "failed cells and cells without a value are left out of the mean.",
        condition_view(result.conditions, metrics, multi), f"{STATS_DIR}/conditions.parquet",
        max_rows=MAX_ROWS * 2))
    return out


# --- provenance -----------------------------------------------------------------------------


def _grid_summary(result: StatsResult) -> list[str]:
    """What the grid holds, as the cells show it (the recorded spec follows in full)."""
    cells = result.results.cells
    if cells.empty:
        return ["no cells yet"]
    patched = cells[~cells["is_natural"]]

    def values(col: str, frame: pd.DataFrame = patched) -> str:
        vals = frame[col].dropna().unique()
        if col == "alpha":
            return ", ".join(f"{v:g}" for v in sorted(vals)) or NONE_LABEL
        return ", ".join(sorted(str(v) for v in vals)) or NONE_LABEL

    counts = cells.groupby("model")["cell_id"].nunique()
    prompts = cells["target_id"].nunique()
    lines = [
        "models: " + ", ".join(f"{m} ({n} cells)" for m, n in counts.items()),
        f"target groups: {values('target_group', cells)} ({prompts} distinct target prompts)",
        f"controls: {values('control', cells)}",
    ]
    if not patched.empty:
        lines += [
            f"sites: {values('site')}; modes: {values('mode')}; align: {values('align')}",
            f"layers: {values('layers')}", f"tokens: {values('tokens')}",
            f"alpha: {values('alpha')}",
        ]
        if set(patched["during"].dropna()) - {PREFILL}:
            lines.append(f"during: {values('during')}")
    else:
        lines.append("no patched cells (natural conditions only)")
    return lines


def _provenance(manifest: dict[str, Any], result: StatsResult) -> list[str]:
    lines = []
    for key in ("spec_hash", "status", "created_at", "started_at", "finished_at", "git_sha",
                "git_dirty", "host", "python"):
        if manifest.get(key) is not None:
            lines.append(f"{key}: `{manifest[key]}`")
    versions = manifest.get("versions")
    if isinstance(versions, dict) and versions:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())
                                             if v is not None))
    runs = manifest.get("runs")
    if isinstance(runs, list) and runs:
        lines.append(f"runs (sweep invocations, resumes included): {len(runs)}")
    s = result.settings
    lines.append(f"analysis: seed {s.get('seed')}, {s.get('n_resamples')} bootstrap resamples, "
                 f"{result.confidence:.0%} intervals, FDR q = {result.q} over "
                 f"{result.fdr_family_size} tests")
    return lines


# --- the report ------------------------------------------------------------------------------


def _status_line(result: StatsResult) -> str:
    comp = result.completeness
    cells = result.results.cells
    models = ", ".join(sorted(cells["model"].unique())) if not cells.empty else "no model"
    expected = "?" if comp.n_expected is None else str(comp.n_expected)
    state = result.results.manifest.get("status") or "unknown"
    failed = f", {comp.n_failed} failed" if comp.n_failed else ""
    return f"{models} \u00b7 {comp.n_done} of {expected} cells{failed} \u00b7 sweep {state}"


def build_context(
    result: StatsResult, notes: Sequence[Note], figures: Sequence[FigureInfo],
    metrics: Sequence[str] | None = None, *, n_examples: int = 3,
) -> dict[str, Any]:
    """Everything both templates render, as plain values and DataFrames (no I/O)."""
    rs = result.results
    spec = rs.manifest.get("spec") if isinstance(rs.manifest.get("spec"), dict) else {}
    summary = build_summary(result, metrics)
    points = {ms.model: [r.point for r in ms.rows] for ms in summary.models}
    examples = pick_examples(rs, points, seed=int(result.settings.get("seed") or 0),
                             n=n_examples)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    const = summary.constant_metrics
    return {
        "title": rs.name,
        "status_line": _status_line(result),
        "retests": ", ".join(map(str, spec.get("retests") or [])),
        "description": " ".join(str(spec.get("description") or "").split()),
        "generated": f"Generated {now} by rloop-ray {__version__} from `{rs.source}`; "
                     f"methods: `docs/statistics.md`; every table in full: "
                     f"`{STATS_DIR}/*.parquet`.",
        "q": result.q,
        "models": [{
            "name": ms.model, "headline": ms.headline, "table": summary_frame(ms, summary),
            "gap": _gap_line(ms), "checks": [c.sentence(result.q) for c in ms.checks],
            "more": ms.n_rows_total - len(ms.rows), "more_found": ms.n_found_left_out,
        } for ms in summary.models],
        "constant": ", ".join(f"{measure_name(m)} (always {v:g})" for m, v in const.items()),
        "caveats": [" ".join(n.text.split()) for n in notes if n.level == "warning"],
        "examples": [{"model": ex.model, "table": examples_frame(ex), "note": ex.note}
                     for ex in examples if ex.rows],
        "figures": [f for f in figures if f.path is not None],
        "skipped_figures": [f for f in figures if f.path is None],
        "appendix": _appendix(result, notes, summary.metrics or result.metrics),
        "grid_summary": _grid_summary(result),
        "provenance": _provenance(rs.manifest, result),
        "spec_json": json.dumps(spec, indent=2, sort_keys=True, default=str) if spec else "",
    }


@dataclass
class ReportOutputs:
    """What `write_report` produced."""

    stats: StatsResult
    notes: list[Note]
    tables: list[Path]
    figures: list[FigureInfo]
    markdown: Path
    html: Path


def write_report(
    source: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    q: float = 0.05,
    figures: bool = True,
) -> ReportOutputs:
    """Everything `rloop-ray stats` does: tables, figures, report.md and report.html.

    `source` is a sweep folder or URI; the outputs go into `out_dir`, by default the sweep
    folder when it is local (`NotLocalError` otherwise, checked before any computing).
    """
    results = load_results(source)
    base = results.out_dir(out_dir, purpose="the report")
    result = compute_stats(results, metrics=metrics, seed=seed, n_resamples=n_resamples,
                           confidence=confidence, q=q)
    tables = write_tables(result, base / STATS_DIR)
    notes = derive_notes(result)
    if figures:
        figs = make_figures(result, base / FIGURES_DIR, metrics)
    else:
        figs = [FigureInfo("all", "Figures", "", skipped="figures were not requested")]
    skipped = [f for f in figs if f.skipped]
    if skipped:
        notes.append(Note("figures", "Figures skipped for lack of data: " + "; ".join(
            f"{f.title} ({f.skipped})" for f in skipped) + "."))
    context = build_context(result, notes, figs, metrics)
    base.mkdir(parents=True, exist_ok=True)
    md_path, html_path = base / REPORT_MD, base / REPORT_HTML
    for path, text in ((md_path, render_markdown(context, base)),
                       (html_path, render_html(context, DPI))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    logger.info("report written to %s and %s", md_path, html_path)
    return ReportOutputs(stats=result, notes=notes, tables=tables, figures=figs,
                         markdown=md_path, html=html_path)
