"""Figures of a sweep's statistics: PNG files the report embeds.

Each figure is drawn from the tables `compute_stats` computed (or the cells they came from), so
a figure never shows a number the tables do not hold. A figure whose data the sweep does
not have (a single alpha, no trajectories, no behaviour score) is skipped with a reason,
and the report says so instead of showing an empty plot.

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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as sstats

from rloop_ray.analysis.estimators import t_interval
from rloop_ray.analysis.labels import HUMAN_SCORE, SCORE_PREFIX
from rloop_ray.analysis.tables import StatsResult
from rloop_ray.vocab import (
    BASELINE_GROUP,
    LONG_CONTROL_GROUP,
    NATURAL,
    RECURSIVE_GROUP,
    STATUS_OK,
)

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
PRIMARY_SCORES = (HUMAN_SCORE, "score_logprob_contrast", "score_self_ref", "score_keywords")
"""Behaviour scores in order of preference for the one-score figures (least noisy first,
after a human rating when there is one)."""
DPI = 100


@dataclass(frozen=True)
class FigureInfo:
    """One figure: where it was written, or why it was not drawn."""

    name: str
    title: str
    caption: str
    path: Path | None = None
    skipped: str | None = None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def spec_sort_key(spec: str) -> tuple[float, float, str]:
    """Order layer/token specs by their numbers ('8:16' before '16:32'), then by text."""
    nums = [float(x) for x in _NUMBER.findall(str(spec))]
    first = nums[0] if nums else math.inf
    second = nums[1] if len(nums) > 1 else first
    return (first, second, str(spec))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _new_figure(n_rows: int, n_cols: int, cell: tuple[float, float] = (4.6, 3.6)
                ) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cell[0] * n_cols, cell[1] * n_rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    tmp = out_dir / f".{name}.png.tmp"
    fig.savefig(tmp, format="png", dpi=DPI)
    tmp.replace(path)
    return path


def figure_metrics(result: StatsResult) -> list[str]:
    """R_V and the preferred behaviour score, those the sweep has."""
    out = ["rv"] if "rv" in result.metrics else []
    for score in PRIMARY_SCORES:
        if score in result.metrics:
            out.append(score)
            break
    return out


def _ok_cells(result: StatsResult) -> pd.DataFrame:
    cells = result.results.cells
    if cells.empty:
        return cells
    return cells[cells["status"] == STATUS_OK]


# --- transfer heatmap ---------------------------------------------------------------------


def transfer_heatmaps(result: StatsResult, out_dir: Path, metrics: Sequence[str]
                      ) -> list[FigureInfo]:
    """Transfer efficiency (C-A)/(B-A) over layers x tokens; a panel per model and alpha."""
    tr = result.transfer
    title = "Transfer efficiency by layers x tokens"
    if tr.empty or not np.isfinite(tr["efficiency"].astype(float)).any():
        return [FigureInfo("transfer_heatmap", title, "", skipped=(
            "no intervention point has A, B and C cells to compute transfer efficiency"
        ))]
    out: list[FigureInfo] = []
    for metric in metrics:
        sub = tr[(tr["metric"] == metric) & np.isfinite(tr["efficiency"].astype(float))]
        if sub.empty:
            out.append(FigureInfo(f"transfer_heatmap_{metric}", f"{title}: {metric}", "",
                                  skipped=f"no transfer efficiency for {metric}"))
            continue
        for (site, mode, align), fam in sub.groupby(["site", "mode", "align"], sort=True):
            models = sorted(fam["model"].unique())
            alphas = sorted(fam["alpha"].unique())
            layers = sorted(fam["layers"].unique(), key=spec_sort_key)
            tokens = sorted(fam["tokens"].unique(), key=spec_sort_key)
            fig, axes = _new_figure(len(models), len(alphas),
                                    cell=(max(3.2, 1.1 * len(tokens) + 2), max(2.6, 0.5 *
                                                                               len(layers) + 1.8)))
            values = fam["efficiency"].astype(float)
            lim = float(min(max(1.0, np.nanmax(np.abs(values))), 2.0))
            image = None
            for i, model in enumerate(models):
                for j, alpha in enumerate(alphas):
                    ax = axes[i, j]
                    panel = fam[(fam["model"] == model) & (fam["alpha"] == alpha)]
                    grid = panel.pivot_table(index="layers", columns="tokens",
                                             values="efficiency", aggfunc="first")
                    grid = grid.reindex(index=layers, columns=tokens)
                    image = ax.imshow(grid.to_numpy(float), cmap="RdBu_r", vmin=-lim, vmax=lim,
                                      aspect="auto")
                    for (r, c), v in np.ndenumerate(grid.to_numpy(float)):
                        if np.isfinite(v):
                            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
                    ax.set_xticks(range(len(tokens)), tokens, rotation=30, fontsize=8)
                    ax.set_yticks(range(len(layers)), layers, fontsize=8)
                    ax.set_xlabel("tokens")
                    ax.set_ylabel("layers")
                    ax.set_title(f"{model}, alpha={alpha:g}", fontsize=9)
            if image is not None:
                fig.colorbar(image, ax=axes, shrink=0.8, label="(C-A)/(B-A)")
            fig.suptitle(f"Transfer efficiency of {metric} ({site}/{mode}, align={align})")
            name = _slug(f"transfer_heatmap_{metric}_{site}_{mode}_{align}")
            path = _save(fig, out_dir, name)
            out.append(FigureInfo(name, f"{title}: {metric} ({site}/{mode})", (
                f"(C-A)/(B-A) of {metric}: 0 = the patch leaves the baseline target as it was, "
                f"1 = it makes it look like a recursive prompt. Bootstrap CIs in "
                f"stats/transfer.parquet."
            ), path=path))
    return out


# --- alpha dose-response ------------------------------------------------------------------


def alpha_curves(result: StatsResult, out_dir: Path, metrics: Sequence[str]) -> list[FigureInfo]:
    """Mean +- 95% CI of each metric against alpha, one line per condition family."""
    cond = result.conditions
    title = "Dose-response in alpha"
    patched = cond[cond["control"] != NATURAL] if not cond.empty else cond
    if patched.empty:
        return [FigureInfo("alpha_dose", title, "", skipped="the sweep has no patched cells")]
    family = ["model", "site", "mode", "layers", "tokens", "align", "control", "source_group",
              "target_group"]
    out: list[FigureInfo] = []
    for metric in metrics:
        sub = patched[(patched["metric"] == metric) & (patched["n_valid"] > 0)]
        fams = [(k, g) for k, g in sub.groupby(family, sort=True) if g["alpha"].nunique() >= 2]
        classic = [(k, g) for k, g in fams if g["letter"].iloc[0] in ("C", "D")]
        fams = classic or fams  # controls stay in the tables: the plot shows the design
        if not fams:
            out.append(FigureInfo(f"alpha_dose_{metric}", f"{title}: {metric}", "",
                                  skipped="no condition was run at more than one alpha"))
            continue
        models = sorted({k[0] for k, _ in fams})
        fig, axes = _new_figure(1, len(models), cell=(5.6, 4.0))
        for j, model in enumerate(models):
            ax = axes[0, j]
            mine = [(k, g) for k, g in fams if k[0] == model]
            colours = colormaps["tab20"].resampled(max(len(mine), 1))
            for idx, (key, g) in enumerate(mine):
                g = g.sort_values("alpha")
                letter = g["letter"].iloc[0]
                label = (f"{letter + ' ' if letter else ''}{key[6]} {key[7]}->{key[8]} "
                         f"{key[1]}/{key[2]} L={key[3]} T={key[4]}")
                err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]])
                ax.errorbar(g["alpha"], g["mean"], yerr=np.nan_to_num(err), marker="o",
                            capsize=3, label=label, color=colours(idx),
                            linestyle="-" if letter == "C" else "--")
            natural = cond[(cond["control"] == NATURAL) & (cond["metric"] == metric)
                           & (cond["model"] == model)]
            for _, row in natural.iterrows():
                if np.isfinite(row["mean"]):
                    ax.axhline(row["mean"], linestyle="--", linewidth=1, color="grey")
                    ax.annotate(f"natural {row['target_group']}", (0.0, row["mean"]),
                                xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                                va="bottom")
            ax.set_xlabel("alpha")
            ax.set_ylabel(metric)
            ax.set_title(model, fontsize=10)
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(handles[:16], labels[:16], fontsize=6, loc="best")
        fig.suptitle(f"{metric} against alpha (mean and 95% CI)")
        name = _slug(f"alpha_dose_{metric}")
        path = _save(fig, out_dir, name)
        out.append(FigureInfo(name, f"{title}: {metric}", (
            "Each line holds everything but alpha fixed (C solid, D dashed; controls are in "
            "the tables); grey dashed lines are the natural conditions. Spearman rho per "
            "line in stats/dose_response.parquet."
        ), path=path))
    return out


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
    fig, axes = _new_figure(1, len(models), cell=(max(4.0, 0.9 * len(order) + 1.5), 3.8))
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
            ax.scatter(x, data[i], s=8, alpha=0.6)
        ax.set_xticks(range(1, len(order) + 1), order, rotation=30, fontsize=8)
        ax.set_ylabel("R_V")
        ax.set_title(model, fontsize=10)
    fig.suptitle("R_V = PR(late) / PR(early) of natural cells")
    path = _save(fig, out_dir, name)
    return FigureInfo(name, title, (
        "Box: quartiles; points: cells. Lower R_V means a more contracted late-layer value "
        "space. Tests in stats/comparisons.parquet (group_effect) and dose_response "
        "(target_level)."
    ), path=path)


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
    fig, axes = _new_figure(1, len(models), cell=(5.6, 4.0))
    drawn = False
    for j, model in enumerate(models):
        ax = axes[0, j]
        mine = cells[cells["model"] == model]
        lines: list[tuple[str, pd.Series]] = []
        for group, sub in mine[mine["is_natural"]].groupby("target_group", sort=True):
            lines.append((f"natural {group}", sub["rv_trajectory"]))
        patched = mine[mine["letter"].isin(["C", "D"])]
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
        ax.set_xlabel("generation step (0 = prompt side)")
        ax.set_ylabel("R_V")
        ax.set_title(model, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    if not drawn:
        return FigureInfo(name, title, "", skipped="trajectories are empty")
    fig.suptitle("R_V trajectory (mean and 95% CI per step)")
    path = _save(fig, out_dir, name)
    return FigureInfo(name, title, (
        "Step 0 is the prompt-side value; if the groups separate at step 0 and converge "
        "later, the geometry is set at encoding (claim P9)."
    ), path=path)


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
    for score in scores:
        fig, axes = _new_figure(1, len(models))
        drawn = False
        for j, model in enumerate(models):
            ax = axes[0, j]
            mine = cells[cells["model"] == model]
            x = pd.to_numeric(mine["rv"], errors="coerce")
            y = pd.to_numeric(mine[score], errors="coerce")
            keep = x.notna() & y.notna()
            if keep.sum() < 3:
                ax.set_title(f"{model}: fewer than 3 cells", fontsize=9)
                continue
            kinds = mine.loc[keep, "letter"].replace("", "other")
            for kind in sorted(kinds.unique()):
                sel = kinds == kind
                ax.scatter(x[keep][sel], y[keep][sel], s=10, alpha=0.6, label=kind)
            xs, ys = x[keep].to_numpy(float), y[keep].to_numpy(float)
            if np.ptp(xs) > 0 and np.ptp(ys) > 0:
                fit = sstats.linregress(xs, ys)
                grid = np.linspace(xs.min(), xs.max(), 50)
                ax.plot(grid, fit.intercept + fit.slope * grid, color="black", linewidth=1)
                ax.set_title(f"{model}: r={fit.rvalue:.2f}, n={len(xs)}", fontsize=9)
            else:
                ax.set_title(f"{model}: constant values, n={len(xs)}", fontsize=9)
            ax.set_xlabel("R_V")
            ax.set_ylabel(score)
            ax.legend(fontsize=6, title="condition", title_fontsize=6)
            drawn = True
        name = _slug(f"rv_vs_{score}")
        if not drawn:
            out.append(FigureInfo(name, f"{title}: {score}", "",
                                  skipped=f"fewer than 3 cells with both R_V and {score}"))
            continue
        fig.suptitle(f"R_V against {score} (all ok cells, least-squares line)")
        path = _save(fig, out_dir, name)
        out.append(FigureInfo(name, f"{title}: {score}", (
            "Colours are the classic conditions (A-D) and everything else; Pearson and "
            "Spearman with p_fdr in stats/correlations.parquet."
        ), path=path))
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
    figures += rv_vs_scores(result, folder)
    for fig in figures:
        if fig.skipped:
            logger.info("figure %s skipped: %s", fig.name, fig.skipped)
    return figures
