"""The sweep report: `report.md` and a self-contained `report.html` from the statistics.

`rloop-ray stats` ends here. The report states what was run (grid, n, models, versions),
what failed or is missing, the findings the analysis derived in plain language (see
`stats.derive_notes`), the tables with FDR-adjusted significance, and the figures. Both
files are rendered from one list of blocks, so the Markdown and the HTML never disagree;
the HTML embeds its images (base64) so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray import __version__
from rloop_ray.figures import FIGURES_DIR, FigureInfo, make_figures
from rloop_ray.stats import (
    NATURAL,
    STATS_DIR,
    Note,
    StatsResult,
    derive_notes,
    primary_metrics,
    run_stats,
    write_tables,
)

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MAX_ROWS = 60
"""Rows shown per table; the full tables are the Parquet files under stats/."""


# --- a tiny document model, rendered twice ------------------------------------------------


@dataclass
class Block:
    kind: str  # heading | para | bullets | table | figure | code
    text: str = ""
    level: int = 2
    items: list[tuple[str, str]] = field(default_factory=list)  # (level, text) for bullets
    table: pd.DataFrame | None = None
    more: int = 0
    source: str = ""
    figure: FigureInfo | None = None


class Document:
    """Blocks in order; `markdown()` and `html()` render the same content."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text=text, level=level))

    def para(self, text: str) -> None:
        self.blocks.append(Block("para", text=text))

    def bullets(self, items: Sequence[str | tuple[str, str]]) -> None:
        pairs = [(i if isinstance(i, tuple) else ("info", i)) for i in items]
        pairs = [(level, " ".join(text.split())) for level, text in pairs]  # one line each
        self.blocks.append(Block("bullets", items=list(pairs)))

    def table(self, frame: pd.DataFrame, source: str = "", max_rows: int = MAX_ROWS) -> None:
        shown = frame.head(max_rows)
        self.blocks.append(Block("table", table=shown, more=len(frame) - len(shown),
                                 source=source))

    def figure(self, info: FigureInfo) -> None:
        self.blocks.append(Block("figure", figure=info))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text=text))

    # -- Markdown ---------------------------------------------------------------------------

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                out += ["#" * b.level + " " + b.text, ""]
            elif b.kind == "para":
                out += [b.text, ""]
            elif b.kind == "bullets":
                out += [f"- {'**Warning:** ' if lvl == 'warning' else ''}{t}" for lvl, t in b.items]
                out.append("")
            elif b.kind == "table" and b.table is not None:
                out += _md_table(b.table)
                if b.more:
                    out.append(f"\n*{b.more} more rows in `{b.source}`.*")
                out.append("")
            elif b.kind == "figure" and b.figure is not None:
                f = b.figure
                if f.path is not None:
                    rel = Path(f.path).resolve().relative_to(base.resolve()) if _inside(
                        f.path, base) else Path(f.path)
                    out += [f"**{f.title}**", "", f"![{f.title}]({rel.as_posix()})", "",
                            f.caption, ""]
                else:
                    out += [f"**{f.title}**: skipped: {f.skipped}", ""]
            elif b.kind == "code":
                out += ["```", b.text, "```", ""]
        return "\n".join(out).rstrip() + "\n"

    # -- HTML -------------------------------------------------------------------------------

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
            f"<title>{html.escape(self.title)}</title>", f"<style>{_CSS}</style>",
            "</head><body>", f"<h1>{html.escape(self.title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind == "heading":
                lvl = min(max(b.level, 2), 6)
                parts.append(f"<h{lvl}>{html.escape(b.text)}</h{lvl}>")
            elif b.kind == "para":
                parts.append(f"<p>{_inline(b.text)}</p>")
            elif b.kind == "bullets":
                items = "".join(
                    f"<li class=\"{lvl}\">{'<b>Warning:</b> ' if lvl == 'warning' else ''}"
                    f"{_inline(t)}</li>" for lvl, t in b.items
                )
                parts.append(f"<ul>{items}</ul>")
            elif b.kind == "table" and b.table is not None:
                parts.append(_html_table(b.table))
                if b.more:
                    parts.append(f"<p class=\"more\">{b.more} more rows in "
                                 f"<code>{html.escape(b.source)}</code>.</p>")
            elif b.kind == "figure" and b.figure is not None:
                f = b.figure
                if f.path is not None and Path(f.path).is_file():
                    data = base64.b64encode(Path(f.path).read_bytes()).decode("ascii")
                    parts.append(
                        f"<figure><img alt=\"{html.escape(f.title)}\" "
                        f"src=\"data:image/png;base64,{data}\"><figcaption><b>"
                        f"{html.escape(f.title)}</b>. {html.escape(f.caption)}</figcaption>"
                        f"</figure>"
                    )
                else:
                    parts.append(f"<p class=\"skipped\"><b>{html.escape(f.title)}</b>: skipped: "
                                 f"{html.escape(f.skipped or 'file missing')}</p>")
            elif b.kind == "code":
                parts.append(f"<details><summary>show</summary><pre>{html.escape(b.text)}</pre>"
                             f"</details>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "line-height:1.4}table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "th{background:#f3f3f3}td.t{text-align:left}li.warning{color:#8a4b00}"
    "img{max-width:100%}figure{margin:1em 0}.skipped,.more{color:#666;font-style:italic}"
    "pre{background:#f6f6f6;padding:0.5em;overflow-x:auto}"
)


def _inside(path: Path, base: Path) -> bool:
    try:
        Path(path).resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline markup the report uses)."""
    escaped = html.escape(text)
    pieces = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
    return str(value)


def _md_table(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return ["*(no rows)*"]
    cols = [str(c) for c in frame.columns]

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(esc(_cell(v)) for v in row) + " |")
    return lines


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class=\"more\">(no rows)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            text = _cell(v)
            cls = " class=\"t\"" if isinstance(v, str) else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


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
    cells = result.results.cells
    located = cells[cells["attributed"]] if not cells.empty else cells
    if located.empty:
        return ["no cells yet"]
    patched = located[~located["is_natural"]]

    def values(col: str, frame: pd.DataFrame = patched) -> str:
        vals = frame[col].dropna().unique()
        if col == "alpha":
            return ", ".join(f"{v:g}" for v in sorted(vals)) or "-"
        return ", ".join(sorted(str(v) for v in vals)) or "-"

    counts = located.groupby("model")["cell_id"].nunique()
    prompts = located["target_id"].nunique()
    lines = [
        "models: " + ", ".join(f"{m} ({n} cells)" for m, n in counts.items()),
        f"target groups: {values('target_group', located)} ({prompts} distinct target prompts)",
        f"controls: {values('control', located)}",
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
    doc = Document(f"rloop-ray report: {rs.manifest.get('name') or rs.path.name}")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.para(f"Generated {now} by rloop-ray {__version__} from `{rs.path}`. Full tables: "
             f"`{STATS_DIR}/*.parquet`; methods: `docs/statistics.md`.")

    doc.heading("What was run")
    doc.bullets(_grid_summary(result) + _provenance(rs.manifest))
    if rs.manifest.get("spec"):
        doc.para("The grid file as the sweep recorded it:")
        doc.code(json.dumps(rs.manifest["spec"], indent=2, sort_keys=True, default=str))

    doc.heading("Completeness and failures")
    expected = "unknown (not in the manifest)" if comp.n_expected is None else comp.n_expected
    doc.bullets([
        f"cells planned: {expected}; done: {comp.n_done} (ok {comp.n_ok}, failed "
        f"{comp.n_failed}); missing: {'unknown' if comp.n_missing is None else comp.n_missing}",
        f"duplicate rows collapsed: {comp.n_duplicate_rows}; failed then recovered on retry: "
        f"{comp.n_recovered}; failures without grid coordinates: {comp.n_failed_unattributed}",
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
    classic = cmp[cmp["comparison"].isin(["group_effect", "sufficiency", "necessity",
                                          "patch_effect", "source_natural"])]
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

    controls = cmp[cmp["comparison"].str.startswith("control")] if not cmp.empty else cmp
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
    results_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    q: float = 0.05,
    figures: bool = True,
) -> ReportOutputs:
    """Everything `rloop-ray stats` does: tables, figures, report.md and report.html."""
    result = run_stats(results_dir, metrics=metrics, seed=seed, n_resamples=n_resamples,
                       confidence=confidence, q=q)
    base = result.results.path
    tables = write_tables(result)
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
    md_path, html_path = base / REPORT_MD, base / REPORT_HTML
    for path, text in ((md_path, doc.markdown(base)), (html_path, doc.html())):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    logger.info("report written to %s and %s", md_path, html_path)
    return ReportOutputs(stats=result, notes=notes, tables=tables, figures=figs,
                         markdown=md_path, html=html_path)
