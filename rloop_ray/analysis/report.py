"""The sweep report: `report.md` and a self-contained `report.html` from the statistics.

`rloop-ray stats` ends here. The report states what was run (grid, n, models, versions),
what failed, is missing or was excluded, the findings the analysis derived in plain
language (`derive_notes`), the tables with FDR-adjusted significance, and the figures.
It is laid out once as a `Document` and rendered to both files (analysis/document.py).
Outputs go into the sweep folder when it is local, else into the folder the caller names.
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
from rloop_ray.analysis.document import MAX_ROWS, Document
from rloop_ray.analysis.figures import FIGURES_DIR, FigureInfo, make_figures
from rloop_ray.analysis.labels import primary_metrics
from rloop_ray.analysis.load import load_results
from rloop_ray.analysis.notes import Note, derive_notes
from rloop_ray.analysis.tables import STATS_DIR, StatsResult, compute_stats, write_tables
from rloop_ray.vocab import NATURAL, NONE_LABEL

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


# --- table views for the report -------------------------------------------------------------


def stars(p: float, q: float) -> str:
    """Significance after FDR: * p_fdr < q, ** < 0.01, *** < 0.001."""
    if p is None or not np.isfinite(p) or p >= q:
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*"


def report_metrics(result: StatsResult, chosen: Sequence[str] | None = None) -> list[str]:
    """Metrics shown in the report's tables: R_V and the behaviour scores (all in stats/)."""
    if chosen:
        return [m for m in chosen if m in result.metrics]
    return primary_metrics(result.metrics)


def _comparison_view(cmp: pd.DataFrame, q: float) -> pd.DataFrame:
    if cmp.empty:
        return cmp
    view = pd.DataFrame({
        "model": cmp["model"], "comparison": cmp["comparison"], "metric": cmp["metric"],
        "a": cmp["a"], "b": cmp["b"], "n_a": cmp["n_a"], "n_b": cmp["n_b"],
        "pairs": cmp["n_pairs"], "failed a/b": [
            f"{int(x)}/{int(y)}" for x, y in zip(cmp["n_failed_a"], cmp["n_failed_b"],
                                                 strict=True)],
        "mean_a": cmp["mean_a"], "mean_b": cmp["mean_b"], "diff": cmp["diff"],
        "d": cmp["cohens_d"], "d 95% CI": [
            "" if not np.isfinite(lo) else f"[{lo:.2f}, {hi:.2f}]"
            for lo, hi in zip(cmp["d_ci_low"], cmp["d_ci_high"], strict=True)],
        "test": cmp["test"], "p": cmp["p"], "p_fdr": cmp["p_fdr"],
        "sig": [stars(p, q) for p in cmp["p_fdr"]], "mw_p": cmp["mw_p"], "note": cmp["note"],
    })
    return view


def _transfer_view(tr: pd.DataFrame) -> pd.DataFrame:
    if tr.empty:
        return tr
    return pd.DataFrame({
        "model": tr["model"], "point": tr["point"], "metric": tr["metric"],
        "n A/B/C/D": [f"{a}/{b}/{c}/{d}" for a, b, c, d in zip(
            tr["n_a"], tr["n_b"], tr["n_c"], tr["n_d"], strict=True)],
        "A": tr["mean_a"], "B": tr["mean_b"], "C": tr["mean_c"], "D": tr["mean_d"],
        "(C-A)/(B-A)": tr["efficiency"], "95% CI": [
            "" if not np.isfinite(lo) else f"[{lo:.2f}, {hi:.2f}]"
            for lo, hi in zip(tr["eff_ci_low"], tr["eff_ci_high"], strict=True)],
        "(B-D)/(B-A)": tr["necessity_fraction"], "nec. 95% CI": [
            "" if not np.isfinite(lo) else f"[{lo:.2f}, {hi:.2f}]"
            for lo, hi in zip(tr["nec_ci_low"], tr["nec_ci_high"], strict=True)],
        "whole-cache transplant": tr["transplant_all"], "note": tr["note"],
    })


def _condition_view(cond: pd.DataFrame) -> pd.DataFrame:
    if cond.empty:
        return cond
    return pd.DataFrame({
        "model": cond["model"], "condition": cond["condition"], "metric": cond["metric"],
        "n": cond["n"], "failed": cond["n_failed"], "nan": cond["n_nan"],
        "valid": cond["n_valid"], "mean": cond["mean"], "sd": cond["sd"],
        "95% CI": ["" if not np.isfinite(lo) else f"[{lo:.3g}, {hi:.3g}]"
                   for lo, hi in zip(cond["ci_low"], cond["ci_high"], strict=True)],
        "nan reasons": cond["nan_reasons"],
    })


def _sort_comparisons(cmp: pd.DataFrame) -> pd.DataFrame:
    return cmp.sort_values(["model", "metric", "p_fdr"], na_position="last", kind="stable")


# --- the report -----------------------------------------------------------------------------


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
            f"layers: {values('layers')}",
            f"tokens: {values('tokens')}",
            f"alpha: {values('alpha')}",
        ]
    else:
        lines.append("no patched cells (natural conditions only)")
    return lines


def _provenance(manifest: dict[str, Any]) -> list[str]:
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
    spec = manifest.get("spec") or {}
    if isinstance(spec, dict):
        if spec.get("description"):
            lines.append(f"description: {spec['description']}")
        if spec.get("retests"):
            lines.append("re-tests prior claims: " + ", ".join(map(str, spec["retests"])))
    return lines


def build_document(
    result: StatsResult, notes: Sequence[Note], figures: Sequence[FigureInfo],
    metrics: Sequence[str] | None = None,
) -> Document:
    """Lay the report out as blocks (no I/O)."""
    rs = result.results
    comp = result.completeness
    q = result.q
    shown = report_metrics(result, metrics)
    doc = Document(f"rloop-ray report: {rs.name}")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.para(f"Generated {now} by rloop-ray {__version__} from `{rs.source}`. Full tables: "
             f"`{STATS_DIR}/*.parquet`; methods: `docs/statistics.md`.")

    doc.heading("What was run")
    doc.bullets(_grid_summary(result) + _provenance(rs.manifest))
    if rs.manifest.get("spec"):
        doc.para("The grid file as the sweep recorded it:")
        doc.code(json.dumps(rs.manifest["spec"], indent=2, sort_keys=True, default=str))

    doc.heading("Completeness and failures")
    expected = "unknown (no plan recorded)" if comp.n_expected is None else comp.n_expected
    doc.bullets([
        f"cells planned: {expected}; done: {comp.n_done} (ok {comp.n_ok}, failed "
        f"{comp.n_failed}); missing: {'unknown' if comp.n_missing is None else comp.n_missing}",
        f"duplicate rows collapsed: {comp.n_duplicate_rows}; failed then recovered on retry: "
        f"{comp.n_recovered}; stale rows from an earlier plan excluded: {comp.n_stale_rows}",
        f"metrics analysed: {', '.join(result.metrics) or 'none'}",
    ])
    if comp.by_model:
        doc.table(pd.DataFrame(comp.by_model), "stats/summary.json")
    if not result.failures.empty:
        doc.para("Failed cells by error type (tracebacks in `failures/`):")
        doc.table(result.failures, "stats/failures.parquet")

    doc.heading("Findings")
    doc.para("Derived by the analysis from the tables below; significance is after "
             f"Benjamini-Hochberg over every test of the sweep (q = {q}).")
    doc.bullets([(n.level, n.text) for n in notes])

    cmp = result.comparisons
    cmp = cmp[cmp["metric"].isin(shown)] if not cmp.empty else cmp
    classic = cmp[cmp["comparison"].isin(CLASSIC_COMPARISONS)]
    doc.heading("Classic comparisons")
    doc.para("A = baseline target natural, B = recursive target natural, C = baseline target "
             "with recursive source, D = recursive target with baseline source. diff = a - b; "
             "d is Cohen's d (pooled sd) for Welch rows and d_z for paired rows (cells "
             "matched by prompt). sig: * p_fdr < q, ** < 0.01, *** < 0.001.")
    doc.table(_comparison_view(_sort_comparisons(classic), q), "stats/comparisons.parquet")

    doc.heading("Transfer efficiency")
    tr = result.transfer
    tr = tr[tr["metric"].isin(shown)] if not tr.empty else tr
    if tr.empty:
        doc.para("Not computed: the sweep has no intervention point with A, B and C cells.")
    else:
        doc.para("(C-A)/(B-A): the share of the recursive-natural gap a recursive source "
                 "moves a baseline target; (B-D)/(B-A): the share a baseline source removes "
                 "from a recursive target. Percentile bootstrap 95% CIs "
                 f"({result.settings.get('n_resamples')} resamples, seed "
                 f"{result.settings.get('seed')}).")
        doc.table(_transfer_view(tr), "stats/transfer.parquet")

    controls = cmp[cmp["comparison"].str.startswith((CONTROL_PREFIX, CONTROL_VS_PATCH_PREFIX))
                   ] if not cmp.empty else cmp
    doc.heading("Controls")
    if controls.empty:
        doc.para("The sweep has no control conditions (self, shuffle, random, other).")
    else:
        doc.para("Each control against the natural condition of its target group "
                 "(`control:*`) and against the patch it stands beside "
                 "(`control_vs_patch:*`). A control that moves the metric as much as the "
                 "patch means the patch effect is not specific to the source.")
        doc.table(_comparison_view(_sort_comparisons(controls), q), "stats/comparisons.parquet")

    doc.heading("Dose-response")
    dose = result.dose
    dose = dose[dose["metric"].isin(shown)] if not dose.empty else dose
    if dose.empty:
        doc.para("No factor varied: the sweep has one alpha and no recursion levels.")
    else:
        view = dose[["model", "factor", "scope", "metric", "n", "n_levels", "rho", "p",
                     "p_fdr"]].copy()
        view["sig"] = [stars(p, q) for p in view["p_fdr"]]
        doc.table(view.sort_values(["model", "factor", "p_fdr"], na_position="last"),
                  "stats/dose_response.parquet")

    doc.heading("R_V and behaviour")
    corr = result.correlations
    if corr.empty:
        doc.para("Not computed: the sweep has no R_V or no behaviour score.")
    else:
        view = corr[["model", "scope", "y", "n", "pearson_r", "pearson_p_fdr", "spearman_rho",
                     "spearman_p_fdr", "note"]].copy()
        view["sig (Pearson)"] = [stars(p, q) for p in view["pearson_p_fdr"]]
        doc.table(view, "stats/correlations.parquet")

    side = result.side_by_side
    if not side.empty:
        doc.heading("Models side by side")
        view = side[side["metric"].isin(shown)]
        doc.para("Every comparison that ran on more than one model, one column set per model.")
        doc.table(view.drop(columns=["comparison_id"]).assign(
            a_vs_b=view["comparison_id"].str.split(" \\| ", n=1).str[1]),
            "stats/models_side_by_side.parquet")

    doc.heading("Per condition")
    cond = result.conditions
    cond = cond[cond["metric"].isin(shown)] if not cond.empty else cond
    doc.para("n counts every cell of the condition; failed cells and ok cells without a "
             "value (nan) are excluded from mean, sd and the t-based 95% CI.")
    order = cond.assign(_nat=cond["control"] != NATURAL).sort_values(
        ["model", "metric", "_nat", "condition"]) if not cond.empty else cond
    doc.table(_condition_view(order), "stats/conditions.parquet", max_rows=MAX_ROWS * 2)

    doc.heading("Figures")
    for info in figures:
        doc.figure(info)
    return doc


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
    doc = build_document(result, notes, figs, metrics)
    base.mkdir(parents=True, exist_ok=True)
    md_path, html_path = base / REPORT_MD, base / REPORT_HTML
    for path, text in ((md_path, doc.markdown(base)), (html_path, doc.html())):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    logger.info("report written to %s and %s", md_path, html_path)
    return ReportOutputs(stats=result, notes=notes, tables=tables, figures=figs,
                         markdown=md_path, html=html_path)
