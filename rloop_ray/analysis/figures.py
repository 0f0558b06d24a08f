"""Figures of a sweep's statistics: PNG (for the report) and SVG (for papers) files.

Each figure is drawn from the tables `compute_stats` computed (or the cells they came
from), so a figure never shows a number the tables do not hold. They are meant to be read
at a glance: 160 dpi, text at 9-11 pt, nothing clipped (constrained layout, tight bounding
box), significance after FDR marked on the marks themselves (* p_fdr < q, ** < 0.01,
*** < 0.001), the controls drawn beside the patch they stand for, and cell labels in
black or white by the luminance of the cell's colour. Panels that are constant by
construction (an alpha = 0 mix is the unpatched run, its transfer is 0) are not drawn.
A figure whose data the sweep does not have (a single alpha, no trajectories, no
behaviour score) is skipped with a reason, and the report says so.

Drawing uses matplotlib's object API on the Agg canvas (no pyplot, no global state), so it
is safe in tests, on headless workers and in threads.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats as sstats

from rloop_ray.analysis.comparisons import (
    CONTROL_PREFIX,
    GROUP_EFFECT,
    NECESSITY,
    PATCH_EFFECT,
    SUFFICIENCY,
)
from rloop_ray.analysis.estimators import t_interval
from rloop_ray.analysis.identity import identity_kind
from rloop_ray.analysis.labels import HUMAN_SCORE, SCORE_PREFIX, during_suffix, numeric
from rloop_ray.analysis.tables import StatsResult
from rloop_ray.vocab import (
    BASELINE_GROUP,
    LONG_CONTROL_GROUP,
    NATURAL,
    PATCH,
    PATCH_CONTROLS,
    POINT_COLUMNS,
    RECURSIVE_GROUP,
    SELF,
    STATUS_OK,
    STEER,
)

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
PRIMARY_SCORES = (HUMAN_SCORE, "score_logprob_contrast", "score_self_ref", "score_keywords")
"""Behaviour scores in order of preference for the one-score figures (least noisy first,
after a human rating when there is one)."""
DPI = 160
"""PNG resolution: sharp on a laptop screen and in print at column width."""
FONT = 10
SMALL = 9
MAX_PANELS = 12
"""Panels per figure; a larger grid is cut (the tables hold every point)."""
CONTROL_STYLE = {PATCH: ("o", "-"), "shuffle": ("s", ":"), "random": ("^", "--"),
                 "other": ("D", "-."), SELF: ("v", ":")}
"""Marker and line style per condition kind, the same in every figure."""


@dataclass(frozen=True)
class FigureInfo:
    """One figure: where it was written (PNG, and SVG beside it), or why it was not drawn."""

    name: str
    title: str
    caption: str
    path: Path | None = None
    skipped: str | None = None
    svg: Path | None = None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def spec_sort_key(spec: str) -> tuple[float, float, str]:
    """Order layer/token specs by their numbers ('8:16' before '16:32'), then by text."""
    nums = [float(x) for x in _NUMBER.findall(str(spec))]
    first = nums[0] if nums else math.inf
    second = nums[1] if len(nums) > 1 else first
    return (first, second, str(spec))


def stars(p: float, q: float) -> str:
    """The significance mark of a p_fdr: `*` < q, `**` < 0.01, `***` < 0.001, else empty."""
    if p is None or not np.isfinite(p) or p >= q:
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*"


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of this colour (WCAG luminance)."""
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # contrast with black (L + 0.05) / 0.05 vs with white 1.05 / (L + 0.05): equal at ~0.179
    return "black" if luminance > 0.179 else "white"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _measure(metric: str) -> str:
    return "R_V" if metric == "rv" else metric.removeprefix(SCORE_PREFIX)


def _new_figure(n_rows: int, n_cols: int, cell: tuple[float, float] = (4.6, 3.6)
                ) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cell[0] * n_cols, cell[1] * n_rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _save(fig: Figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    """PNG and SVG, each written beside its final name and renamed (no half files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{name}.{ext}"
        tmp = out_dir / f".{name}.{ext}.tmp"
        fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight", pad_inches=0.08)
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def _drawn(name: str, title: str, caption: str, paths: tuple[Path, Path]) -> FigureInfo:
    return FigureInfo(name, title, caption, path=paths[0], svg=paths[1])


def _varies(result: StatsResult, metric: str) -> bool:
    cells = _ok_cells(result)
    return metric in cells and numeric(cells, metric).dropna().nunique() > 1


def figure_metrics(result: StatsResult) -> list[str]:
    """R_V and the preferred behaviour score that varies, those the sweep has."""
    out = ["rv"] if "rv" in result.metrics and _varies(result, "rv") else []
    for score in PRIMARY_SCORES:
        if score in result.metrics and _varies(result, score):
            out.append(score)
            break
    return out


def _ok_cells(result: StatsResult) -> pd.DataFrame:
    cells = result.results.cells
    if cells.empty:
        return cells
    return cells[cells["status"] == STATUS_OK]


def _p_fdr(result: StatsResult, **where: object) -> float:
    """p_fdr of the first comparison row matching `where` (NaN if none)."""
    cmp = result.comparisons
    if cmp.empty:
        return math.nan
    sel = pd.Series(True, index=cmp.index)
    for col, val in where.items():
        if isinstance(val, float) and math.isnan(val):
            sel &= cmp[col].isna()
        elif isinstance(val, tuple):
            sel &= cmp[col].isin(val)
        else:
            sel &= cmp[col] == val
    hit = cmp[sel]
    return float(hit["p_fdr"].iloc[0]) if len(hit) else math.nan


def _legend_below(fig: Figure, axes: np.ndarray) -> None:
    """One legend for the figure, below the panels (never over the data)."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        labels = sorted(seen, key=lambda label: "natural" in label)  # references last
        fig.legend([seen[k] for k in labels], labels, loc="outside lower center",
                   ncols=min(4, len(labels)), fontsize=SMALL, frameon=False)


# --- transfer heatmap ---------------------------------------------------------------------


def _natural_means(cond: pd.DataFrame, model: str, metric: str) -> tuple[float, float]:
    nat = cond[(cond["control"] == NATURAL) & (cond["model"] == model)
               & (cond["metric"] == metric)]
    a = nat.loc[nat["target_group"] == BASELINE_GROUP, "mean"]
    b = nat.loc[nat["target_group"] == RECURSIVE_GROUP, "mean"]
    return (float(a.iloc[0]) if len(a) else math.nan, float(b.iloc[0]) if len(b) else math.nan)


def _heat_panel(ax: Axes, values: np.ndarray, notes: np.ndarray, layers: list[str],
                tokens: list[str], norm: Normalize, title: str, row_label: str | None) -> object:
    """One layers x tokens panel; `row_label` (model, alpha) only on a row's first panel."""
    cmap = colormaps["RdBu_r"]
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto")
    ax.set_facecolor("#e6e6e6")
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            colour = text_colour(cmap(norm(float(np.clip(v, norm.vmin, norm.vmax)))))
            ax.text(c, r, notes[r, c], ha="center", va="center", fontsize=SMALL,
                    color=colour)
        else:
            ax.text(c, r, "n/a", ha="center", va="center", fontsize=SMALL, color="#555555")
    ax.set_xticks(range(len(tokens)), tokens, fontsize=SMALL)
    ax.set_yticks(range(len(layers)), layers if row_label else [""] * len(layers),
                  fontsize=SMALL)
    ax.set_xlabel("tokens", fontsize=FONT)
    if row_label:
        ax.set_ylabel(f"{row_label}\nlayers", fontsize=FONT)
    ax.set_title(title, fontsize=FONT)
    return image


def transfer_heatmaps(result: StatsResult, out_dir: Path, metrics: Sequence[str]
                      ) -> list[FigureInfo]:
    """Transfer (X-A)/(B-A) over layers x tokens for the patch (X = C) and each control.

    A row of panels per model and alpha (alpha = 0 mixes are left out: the unpatched run
    by construction); each cell shows the value, the patch's bootstrap interval and the
    significance of the condition against natural.
    """
    tr = result.transfer
    title = "Transfer by layers x tokens, patch beside its controls"
    if tr.empty or not np.isfinite(tr["efficiency"].astype(float)).any():
        return [FigureInfo("transfer_heatmap", title, "", skipped=(
            "no intervention point has A, B and C cells to compute transfer efficiency"
        ))]
    cond, q = result.conditions, result.q
    out: list[FigureInfo] = []
    for metric in metrics:
        sub = tr[(tr["metric"] == metric) & np.isfinite(tr["efficiency"].astype(float))]
        sub = sub[[identity_kind(PATCH, m, a) is None
                   for m, a in zip(sub["mode"], sub["alpha"], strict=True)]]
        if sub.empty:
            out.append(FigureInfo(f"transfer_heatmap_{metric}", f"{title}: {_measure(metric)}",
                                  "", skipped=f"no transfer efficiency for {metric} beyond "
                                              f"alpha = 0"))
            continue
        for (site, mode, align, during), fam in sub.groupby(
                ["site", "mode", "align", "during"], sort=True):
            controls = sorted(
                {c for c in cond.loc[(cond["site"] == site) & (cond["mode"] == mode)
                                     & (cond["during"] == during)
                                     & (cond["target_group"] == BASELINE_GROUP), "control"]
                 if c in PATCH_CONTROLS and c != SELF},
                key=lambda c: PATCH_CONTROLS.index(c))
            kinds = [PATCH, *controls]
            panels = [(m, a) for m in sorted(fam["model"].unique())
                      for a in sorted(fam.loc[fam["model"] == m, "alpha"].unique())]
            panels = panels[: max(1, MAX_PANELS // len(kinds))]
            layers = sorted(fam["layers"].unique(), key=spec_sort_key)
            tokens = sorted(fam["tokens"].unique(), key=spec_sort_key)
            fig, axes = _new_figure(len(panels), len(kinds), cell=(
                max(2.6, 1.15 * len(tokens) + 1.6), max(2.2, 0.55 * len(layers) + 1.5)))
            grids: list[tuple[np.ndarray, np.ndarray]] = []
            for model, alpha in panels:
                a_mean, b_mean = _natural_means(cond, model, metric)
                for kind in kinds:
                    vals = np.full((len(layers), len(tokens)), np.nan)
                    notes = np.full(vals.shape, "", dtype=object)
                    for i, lay in enumerate(layers):
                        for j, tok in enumerate(tokens):
                            vals[i, j], notes[i, j] = _heat_value(
                                result, fam, model, alpha, lay, tok, kind, metric,
                                (site, mode, align, during), a_mean, b_mean, q)
                    grids.append((vals, notes))
            finite = np.concatenate([v[np.isfinite(v)] for v, _ in grids])
            lim = float(min(max(1.0, np.max(np.abs(finite)) if len(finite) else 1.0), 2.0))
            norm = Normalize(-lim, lim)
            image = None
            cells = iter(grids)
            for i, (model, alpha) in enumerate(panels):
                for j, kind in enumerate(kinds):
                    vals, notes = next(cells)
                    label = "patch (C)" if kind == PATCH else f"{kind} control"
                    image = _heat_panel(axes[i, j], vals, notes, layers, tokens, norm,
                                        label if i == 0 else "",
                                        f"{model}, \u03b1 = {alpha:g}" if j == 0 else None)
            if image is not None:
                fig.colorbar(image, ax=axes, shrink=0.85, label="(X \u2212 A) / (B \u2212 A)")
            when = during_suffix(during)
            fig.suptitle(f"{_measure(metric)}: share of the natural gap moved ({site}/{mode}, "
                         f"align {align}{when.replace('=', ' ')})", fontsize=FONT + 1)
            name = _slug(f"transfer_heatmap_{metric}_{site}_{mode}_{align}"
                         + (f"_{during}" if when else ""))
            out.append(_drawn(name, f"{title}: {_measure(metric)} ({site}/{mode}{when})", (
                f"(X \u2212 A)/(B \u2212 A) of {_measure(metric)} for the patch (X = C, with its "
                f"bootstrap 95% interval) and for each control on the same baseline targets: "
                f"0 = the target as it was, 1 = as far as the recursive prompts. Stars: the "
                f"condition against natural, p_fdr after FDR (* < {q}). alpha = 0 panels are "
                f"not drawn: they are the unpatched run by construction."
            ), _save(fig, out_dir, name)))
    return out


def _heat_value(result: StatsResult, fam: pd.DataFrame, model: str, alpha: float, layers: str,
                tokens: str, kind: str, metric: str, family: tuple[str, str, str, str],
                a_mean: float, b_mean: float, q: float) -> tuple[float, str]:
    """The value and label of one heatmap cell (patch: transfer table; control: its mean)."""
    site, mode, align, during = family
    where = {"model": model, "alpha": alpha, "layers": layers, "tokens": tokens,
             "site": site, "mode": mode, "align": align, "during": during}
    if kind == PATCH:
        hit = fam
        for col, val in where.items():
            hit = hit[hit[col] == val]
        if hit.empty:
            return math.nan, ""
        row = hit.iloc[0]
        p = _p_fdr(result, comparison=SUFFICIENCY, metric=metric, **where)
        ci = (f"\n[{row['eff_ci_low']:.2f}, {row['eff_ci_high']:.2f}]"
              if np.isfinite(row["eff_ci_low"]) else "")
        return float(row["efficiency"]), f"{row['efficiency']:.2f}{stars(p, q)}{ci}"
    cond = result.conditions
    sel = (cond["control"] == kind) & (cond["metric"] == metric) & (
        cond["target_group"] == BASELINE_GROUP)
    for col, val in where.items():
        sel &= cond[col] == val
    hit = cond[sel]
    gap = b_mean - a_mean
    if hit.empty or not np.isfinite(gap) or gap == 0:
        return math.nan, ""
    value = (float(hit["mean"].iloc[0]) - a_mean) / gap
    p = _p_fdr(result, comparison=f"{CONTROL_PREFIX}{kind}", metric=metric, **where)
    return value, f"{value:.2f}{stars(p, q)}"


# --- alpha dose-response ------------------------------------------------------------------


def alpha_curves(result: StatsResult, out_dir: Path, metrics: Sequence[str]) -> list[FigureInfo]:
    """Mean and 95% CI of each metric against alpha: the patch and its controls side by side.

    A panel per model and intervention point (everything but alpha); lines for the patch
    (C and D) and every control on the same targets; the natural conditions as grey
    reference lines; a star above each alpha where the condition differs from natural.
    """
    cond = result.conditions
    title = "Dose-response in alpha, patch beside its controls"
    patched = cond[cond["control"] != NATURAL] if not cond.empty else cond
    if patched.empty:
        return [FigureInfo("alpha_dose", title, "", skipped="the sweep has no patched cells")]
    point = ["model", *(c for c in POINT_COLUMNS if c != "alpha")]
    q = result.q
    out: list[FigureInfo] = []
    for metric in metrics:
        sub = patched[(patched["metric"] == metric) & (patched["n_valid"] > 0)]
        panels = [(k, g) for k, g in sub.groupby(point, sort=True) if g["alpha"].nunique() >= 2]
        if not panels:
            out.append(FigureInfo(f"alpha_dose_{metric}", f"{title}: {_measure(metric)}", "",
                                  skipped="no condition was run at more than one alpha"))
            continue
        n_cut = max(0, len(panels) - MAX_PANELS)
        panels = panels[:MAX_PANELS]
        n_cols = min(3, len(panels))
        n_rows = math.ceil(len(panels) / n_cols)
        fig, axes = _new_figure(n_rows, n_cols, cell=(4.8, 3.6))
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (key, g) in zip(axes.flat, panels, strict=False):
            _alpha_panel(ax, result, key, g, metric, q)
        _legend_below(fig, axes)
        fig.suptitle(f"{_measure(metric)} against alpha (mean and 95% CI; * differs from "
                     f"natural after FDR)", fontsize=FONT + 1)
        name = _slug(f"alpha_dose_{metric}")
        cut = f" {n_cut} more intervention points are in the tables." if n_cut else ""
        out.append(_drawn(name, f"{title}: {_measure(metric)}", (
            "Each panel holds one intervention point; the patch (C: recursive source into "
            "baseline targets, D: the reverse) is drawn with its controls on the same targets "
            "(the self control is an identity check, reported in the summary). Grey lines: "
            "the natural conditions. Stars mark alphas where the condition "
            f"differs from its natural target (p_fdr < {q}); Spearman rho per line in "
            "stats/dose_response.parquet." + cut
        ), _save(fig, out_dir, name)))
    return out


def _alpha_panel(ax: Axes, result: StatsResult, key: tuple, g: pd.DataFrame, metric: str,
                 q: float) -> None:
    model, site, mode, layers, tokens, align, during = key
    cond = result.conditions
    lines = []
    for (ctrl, src, tgt), line in g.groupby(["control", "source_group", "target_group"],
                                            sort=True):
        if line["alpha"].nunique() < 2 or ctrl == SELF:  # self is a check, not a control
            continue
        letter = line["letter"].iloc[0]
        label = (f"{letter}: patch {src} \u2192 {tgt}" if letter else
                 f"patch {src} \u2192 {tgt}" if ctrl == PATCH else f"{ctrl} control on {tgt}")
        order = 0 if ctrl == PATCH else 1 + (PATCH_CONTROLS.index(ctrl)
                                             if ctrl in PATCH_CONTROLS else 9)
        lines.append((order, label, ctrl, line.sort_values("alpha")))
    lines.sort(key=lambda x: (x[0], x[1]))
    colours = colormaps["tab10"]
    alphas = g["alpha"].dropna()
    dodge = 0.015 * (float(alphas.max() - alphas.min()) or 1.0)  # overlapping bars stay visible
    for idx, (_, label, ctrl, line) in enumerate(lines):
        marker, style = CONTROL_STYLE.get(ctrl, ("o", "-"))
        err = np.vstack([line["mean"] - line["ci_low"], line["ci_high"] - line["mean"]])
        colour = colours(idx % 10)
        x = line["alpha"] + dodge * (idx - (len(lines) - 1) / 2)
        ax.errorbar(x, line["mean"], yerr=np.nan_to_num(err), marker=marker,
                    linestyle=style, capsize=3, label=label, color=colour, linewidth=1.6)
        name = (f"{CONTROL_PREFIX}{ctrl}" if ctrl != PATCH
                else (SUFFICIENCY, NECESSITY, PATCH_EFFECT))
        for xi, (_, row) in zip(x, line.iterrows(), strict=True):
            p = _p_fdr(result, comparison=name, model=model, metric=metric, site=site, mode=mode,
                       layers=layers, tokens=tokens, align=align, during=during,
                       alpha=row["alpha"], a=row["condition"])
            mark = stars(p, q)
            if mark and np.isfinite(row["mean"]):
                top = row["ci_high"] if np.isfinite(row["ci_high"]) else row["mean"]
                ax.annotate(mark, (xi, top), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=FONT, color=colour)
    natural = cond[(cond["control"] == NATURAL) & (cond["metric"] == metric)
                   & (cond["model"] == model)]
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    for _, row in natural.sort_values("target_group").iterrows():
        if np.isfinite(row["mean"]):
            letter = f"{row['letter']}: " if row["letter"] else ""
            ax.axhline(row["mean"], linestyle=next(styles, "--"), linewidth=1.1,
                       color="dimgrey", label=f"{letter}natural {row['target_group']}")
    ax.set_xlabel("scale (steering vector)" if mode == STEER else "alpha", fontsize=FONT)
    ax.set_ylabel(_measure(metric), fontsize=FONT)
    ax.tick_params(labelsize=SMALL)
    ax.set_title(f"{model}: {site}/{mode}, layers {layers}, tokens {tokens}"
                 f"{during_suffix(during).replace('=', ' ')}", fontsize=SMALL)


# --- R_V distributions ----------------------------------------------------------------------


def rv_distributions(result: StatsResult, out_dir: Path) -> FigureInfo:
    """R_V of natural cells by prompt group (recursive split by level), per model."""
    name, title = "rv_by_group", "R_V by prompt group (natural cells)"
    cells = _ok_cells(result)
    if cells.empty or "rv" not in cells:
        return FigureInfo(name, title, "", skipped="no R_V values")
    natural = cells[cells["is_natural"]].copy()
    natural["rv"] = pd.to_numeric(natural["rv"], errors="coerce")
    natural = natural[natural["rv"].notna()]
    if natural.empty:
        return FigureInfo(name, title, "", skipped="no natural cell has an R_V value")

    def label(row: pd.Series) -> str:
        if row["target_group"] == RECURSIVE_GROUP and np.isfinite(row["target_level"]):
            return f"{RECURSIVE_GROUP} L{int(row['target_level'])}"
        return str(row["target_group"])

    natural["group"] = natural.apply(label, axis=1)
    order = sorted(natural["group"].unique(),
                   key=lambda g: (0 if g == BASELINE_GROUP else
                                  1 if g == LONG_CONTROL_GROUP else 2, g))
    models = sorted(natural["model"].unique())
    fig, axes = _new_figure(1, len(models), cell=(max(4.2, 0.9 * len(order) + 1.8), 3.8))
    rng = np.random.default_rng(0)
    for j, model in enumerate(models):
        ax = axes[0, j]
        mine = natural[natural["model"] == model]
        data = [mine.loc[mine["group"] == g, "rv"].to_numpy(float) for g in order]
        present = [i for i, d in enumerate(data) if len(d)]
        ax.boxplot([data[i] for i in present], positions=[i + 1 for i in present],
                   widths=0.6, showfliers=False)
        for i in present:
            x = (i + 1) + rng.uniform(-0.15, 0.15, len(data[i]))
            ax.scatter(x, data[i], s=12, alpha=0.7)
        ax.set_xticks(range(1, len(order) + 1), order, rotation=30, ha="right", fontsize=SMALL)
        ax.tick_params(axis="y", labelsize=SMALL)
        ax.set_ylabel("R_V", fontsize=FONT)
        p = _p_fdr(result, comparison=GROUP_EFFECT, model=model, metric="rv",
                   a=f"B: {NATURAL} {RECURSIVE_GROUP}", b=f"A: {NATURAL} {BASELINE_GROUP}")
        test = ("" if not np.isfinite(p) else
                f"\nrecursive vs baseline: p_fdr {p:.2g}{stars(p, result.q)}")
        ax.set_title(f"{model}{test}", fontsize=FONT)
    fig.suptitle("R_V = PR(late) / PR(early) of natural cells", fontsize=FONT + 1)
    return _drawn(name, title, (
        "Box: quartiles; points: cells. Lower R_V means a more contracted late-layer value "
        "space. The panel title gives the recursive-vs-baseline test (group_effect, p_fdr); "
        "the recursion-level trend is in stats/dose_response.parquet (target_level)."
    ), _save(fig, out_dir, name))


# --- R_V trajectories -----------------------------------------------------------------------


def _trajectory_matrix(series: pd.Series) -> np.ndarray:
    rows = []
    for value in series:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        arr = np.array([np.nan if v is None else float(v) for v in value], float)
        if len(arr):
            rows.append(arr)
    if not rows:
        return np.empty((0, 0))
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def rv_trajectories(result: StatsResult, out_dir: Path, max_points: int = 4) -> FigureInfo:
    """Mean R_V at every generation step with a 95% band: natural groups, C and D."""
    name, title = "rv_trajectory", "R_V over generation steps"
    cells = _ok_cells(result)
    if cells.empty or "rv_trajectory" not in cells or not cells["rv_trajectory"].notna().any():
        return FigureInfo(name, title, "", skipped=(
            "no cell recorded an R_V trajectory (measure.trajectory: true in the grid)"
        ))
    models = sorted(cells["model"].unique())
    fig, axes = _new_figure(1, len(models), cell=(5.4, 3.9))
    drawn = False
    for j, model in enumerate(models):
        ax = axes[0, j]
        mine = cells[cells["model"] == model]
        lines: list[tuple[str, pd.Series]] = []
        for group, sub in mine[mine["is_natural"]].groupby("target_group", sort=True):
            lines.append((f"natural {group}", sub["rv_trajectory"]))
        patched = mine[mine["letter"].isin(["C", "D"])]
        # a boolean array, not a list: an empty list would select no *columns*
        patched = patched[np.array([identity_kind(c, m, a) is None for c, m, a in
                                    zip(patched["control"], patched["mode"], patched["alpha"],
                                        strict=True)], dtype=bool)]
        points = sorted(patched["point"].unique())[:max_points]
        for point in points:
            for letter, sub in patched[patched["point"] == point].groupby("letter", sort=True):
                lines.append((f"{letter} @ {point}", sub["rv_trajectory"]))
        for label, series in lines:
            mat = _trajectory_matrix(series)
            if mat.size == 0:
                continue
            steps = np.arange(mat.shape[1])
            mean = np.nanmean(mat, axis=0)
            bands = [t_interval(col[np.isfinite(col)]) for col in mat.T]
            low = np.array([b[0] for b in bands])
            high = np.array([b[1] for b in bands])
            (line,) = ax.plot(steps, mean, label=f"{label} (n={mat.shape[0]})")
            ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
            drawn = True
        ax.set_xlabel("generation step (0 = prompt side)", fontsize=FONT)
        ax.set_ylabel("R_V", fontsize=FONT)
        ax.tick_params(labelsize=SMALL)
        ax.set_title(model, fontsize=FONT)
    if not drawn:
        return FigureInfo(name, title, "", skipped="trajectories are empty")
    _legend_below(fig, axes)
    fig.suptitle("R_V trajectory (mean and 95% CI per step)", fontsize=FONT + 1)
    return _drawn(name, title, (
        "Step 0 is the prompt-side value; if the groups separate at step 0 and converge "
        "later, the geometry is set at encoding (claim P9)."
    ), _save(fig, out_dir, name))


# --- R_V by depth ----------------------------------------------------------------------------


def rv_by_depth(result: StatsResult, out_dir: Path) -> FigureInfo | None:
    """R_V by depth (PR at each profile layer over PR at the reference layer) of natural
    cells: a panel per model, a line per target group with its bootstrap 95% band.

    None when no cell recorded a layer profile (`measure.layers` is off by default, so a
    sweep without one is not missing a figure)."""
    name, title = "rv_by_depth", "R_V by depth (natural cells)"
    prof = result.profiles
    if prof.empty:
        return None
    natural = prof[(prof["control"] == NATURAL) & (prof["n_rv_valid"] > 0)]
    if natural.empty:
        return FigureInfo(name, title, "", skipped=(
            "no natural cell has a layer profile with a PR at its reference layer"))
    models = sorted(natural["model"].unique())
    fig, axes = _new_figure(1, len(models), cell=(5.0, 3.8))
    for j, model in enumerate(models):
        ax = axes[0, j]
        mine = natural[natural["model"] == model]
        order = sorted(mine["target_group"].unique(),
                       key=lambda g: (0 if g == BASELINE_GROUP else 1 if g == RECURSIVE_GROUP
                                      else 2, g))
        for group in order:
            line = mine[mine["target_group"] == group].sort_values("layer")
            n = int(line["n_rv_valid"].max())
            (drawn,) = ax.plot(line["layer"], line["mean_rv_depth"], marker="o", markersize=3,
                               label=f"natural {group} (n={n})")
            band = line[np.isfinite(line["rv_ci_low"].astype(float))]
            ax.fill_between(band["layer"].to_numpy(float), band["rv_ci_low"].to_numpy(float),
                            band["rv_ci_high"].to_numpy(float), alpha=0.2,
                            color=drawn.get_color())
        refs = sorted({r for r in mine["reference"] if r})
        ax.axhline(1.0, color="dimgrey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("layer", fontsize=FONT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_ylabel("PR(layer) / PR(reference)", fontsize=FONT)
        ax.tick_params(labelsize=SMALL)
        ax.set_title(f"{model}\nreference: {'; '.join(refs)}", fontsize=FONT)
    _legend_below(fig, axes)
    fig.suptitle("R_V by depth (mean and bootstrap 95% CI per layer)", fontsize=FONT + 1)
    return _drawn(name, title, (
        "Each cell's participation ratio of V (last W generated tokens) at every profile "
        "layer, divided by its PR at the reference layer (its early layer when the profile "
        "holds it, else the first profile layer; the panel title names it), averaged over "
        "the natural cells of each target group. Below 1: a more contracted value space "
        "than at the reference; at the late layer with the early layer as reference this is "
        "R_V itself. Every condition, patched ones too, is in stats/profiles.parquet."
    ), _save(fig, out_dir, name))


# --- R_V vs behaviour -------------------------------------------------------------------------


def rv_vs_scores(result: StatsResult, out_dir: Path) -> list[FigureInfo]:
    """Scatter of R_V against each behaviour score with a least-squares line, per model."""
    cells = _ok_cells(result)
    scores = [m for m in result.metrics if m.startswith(SCORE_PREFIX)]
    title = "R_V against behaviour"
    if cells.empty or "rv" not in result.metrics or not scores:
        missing = "R_V" if "rv" not in result.metrics else "a behaviour score"
        return [FigureInfo("rv_vs_score", title, "", skipped=f"the sweep has no {missing}")]
    out: list[FigureInfo] = []
    models = sorted(cells["model"].unique())
    corr = result.correlations
    for score in scores:
        name = _slug(f"rv_vs_{score}")
        if not _varies(result, score):
            out.append(FigureInfo(name, f"{title}: {_measure(score)}", "",
                                  skipped=f"{score} has one value in every cell"))
            continue
        fig, axes = _new_figure(1, len(models), cell=(4.6, 3.8))
        drawn = False
        for j, model in enumerate(models):
            ax = axes[0, j]
            mine = cells[cells["model"] == model]
            x = pd.to_numeric(mine["rv"], errors="coerce")
            y = pd.to_numeric(mine[score], errors="coerce")
            keep = x.notna() & y.notna()
            if keep.sum() < 3:
                ax.set_title(f"{model}: fewer than 3 cells", fontsize=FONT)
                continue
            kinds = mine.loc[keep, "letter"].replace("", "other cells")
            for kind in sorted(kinds.unique()):
                sel = kinds == kind
                ax.scatter(x[keep][sel], y[keep][sel], s=14, alpha=0.7, label=kind)
            xs, ys = x[keep].to_numpy(float), y[keep].to_numpy(float)
            subtitle = f"n = {len(xs)}"
            if np.ptp(xs) > 0 and np.ptp(ys) > 0:
                fit = sstats.linregress(xs, ys)
                grid = np.linspace(xs.min(), xs.max(), 50)
                ax.plot(grid, fit.intercept + fit.slope * grid, color="black", linewidth=1)
                hit = corr[(corr["model"] == model) & (corr["scope"] == "all")
                           & (corr["y"] == score)] if not corr.empty else corr
                p = float(hit["pearson_p_fdr"].iloc[0]) if len(hit) else math.nan
                subtitle = (f"r = {fit.rvalue:.2f}, n = {len(xs)}"
                            + (f", p_fdr {p:.2g}{stars(p, result.q)}" if np.isfinite(p) else ""))
            ax.set_title(f"{model}\n{subtitle}", fontsize=FONT)
            ax.set_xlabel("R_V", fontsize=FONT)
            ax.set_ylabel(_measure(score), fontsize=FONT)
            ax.tick_params(labelsize=SMALL)
            drawn = True
        if not drawn:
            out.append(FigureInfo(name, f"{title}: {_measure(score)}", "",
                                  skipped=f"fewer than 3 cells with both R_V and {score}"))
            continue
        _legend_below(fig, axes)
        fig.suptitle(f"R_V against {_measure(score)} (all ok cells)", fontsize=FONT + 1)
        out.append(_drawn(name, f"{title}: {_measure(score)}", (
            "Colours are the classic conditions (A-D) and all other cells; the line is a "
            "least-squares fit; r is Pearson's with its p_fdr (Spearman too in "
            "stats/correlations.parquet)."
        ), _save(fig, out_dir, name)))
    return out


# --- all of them ------------------------------------------------------------------------------


def make_figures(
    result: StatsResult, out_dir: str | Path | None = None,
    metrics: Sequence[str] | None = None,
) -> list[FigureInfo]:
    """Draw every figure the sweep's data supports; the rest come back with a reason.

    `metrics` picks the metrics of the per-metric figures (heatmaps, alpha curves);
    default: R_V and the preferred behaviour score.
    """
    folder = (Path(out_dir) if out_dir is not None
              else result.results.out_dir(purpose="figures") / FIGURES_DIR)
    if result.results.cells.empty:
        return [FigureInfo("all", "Figures", "", skipped="the results folder holds no cells")]
    chosen = list(metrics) if metrics else figure_metrics(result)
    figures: list[FigureInfo] = []
    figures += transfer_heatmaps(result, folder, chosen)
    figures += alpha_curves(result, folder, chosen)
    figures.append(rv_distributions(result, folder))
    figures.append(rv_trajectories(result, folder))
    depth = rv_by_depth(result, folder)
    if depth is not None:
        figures.append(depth)
    figures += rv_vs_scores(result, folder)
    for fig in figures:
        if fig.skipped:
            logger.info("figure %s skipped: %s", fig.name, fig.skipped)
    _remove_stale(folder, figures)
    return figures


_OUR_FIGURES = re.compile(
    r"^(transfer_heatmap_|alpha_dose_|rv_vs_|rv_by_group$|rv_trajectory$|rv_by_depth$)")


def _remove_stale(folder: Path, figures: Sequence[FigureInfo]) -> None:
    """Delete figures an earlier `stats` run drew that this one did not (data changed).

    Only files named like our figures are touched: a stale `rv_vs_score_x.png` beside a
    fresh report would show a number no table holds any more.
    """
    if not folder.is_dir():
        return
    keep = {p.name for f in figures for p in (f.path, f.svg) if p is not None}
    for path in folder.iterdir():
        if (path.suffix in (".png", ".svg") and path.name not in keep
                and _OUR_FIGURES.match(path.stem)):
            path.unlink()
            logger.info("removed stale figure %s", path)
