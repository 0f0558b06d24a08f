"""Statistics over one sweep's result table: what every number in the report comes from.

The functions here are pure (DataFrame in, DataFrame out) so that each statistic can be
checked against a direct scipy computation, and so that a half-finished sweep is analysed
the same way as a finished one. The design choices, and why, are in docs/statistics.md:

* per condition (model x intervention point x control x source group x target group):
  n, failures, NaNs, mean, sd and a t-based confidence interval for every metric present;
* comparisons: Welch t (independent cells) or paired t (cells matched by prompt),
  Cohen's d (pooled) or d_z with a noncentral-t interval, Mann-Whitney as a robustness check;
* the classic conditions A/B/C/D (sufficiency, necessity, transfer efficiency with a
  bootstrap interval), every control beside them, dose-response (Spearman) and R_V vs
  behaviour (Pearson, Spearman);
* one Benjamini-Hochberg family per sweep, over every p-value these tables report.

Failed cells are never dropped silently: they stay in the table with `status="failed"`
and are counted (`n_failed`) in every summary and comparison they belong to.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from scipy import optimize, special, stats

logger = logging.getLogger(__name__)

# --- vocabulary ---------------------------------------------------------------------------

NATURAL = "natural"
PATCH = "patch"
CONTROLS = ("self", "shuffle", "random", "other")
RECURSIVE = "recursive"
BASELINE = "baseline"
LONG_CONTROL = "long_control"
NONE_LABEL = "-"
"""Placeholder for intervention fields that do not apply (natural cells, missing values)."""

GEOMETRY_METRICS = ("rv", "rv_prompt", "pr_early", "pr_late", "erank_early", "erank_late")
SCORE_PREFIX = "score_"
POINT_COLS = ("site", "mode", "layers", "tokens", "align", "alpha")
"""One intervention point: where, how and how strongly a cell was patched."""
CONDITION_COLS = ("model", *POINT_COLS, "control", "source_group", "target_group")
"""A condition: all cells that differ only by prompt (and seed)."""
_STRING_KEYS = ("model", "site", "mode", "layers", "tokens", "align", "control",
                "source_group", "target_group")
ALL_LAYER_SPECS = frozenset({"all", ":", "0:", "0%:100%", ":100%", "0%:", "0:100%"})
"""Layer specs that always mean every layer of the model, whatever its depth."""

HUMAN_SCORES_FILE = Path("rating") / "score_human.parquet"
"""Where `rloop-ray rate import` leaves the per-cell human score (see rating.py)."""
STATS_DIR = "stats"
TOTAL_KEYS = ("n_cells_total", "n_cells", "total_cells")

# Columns of the comparisons table, in order (docs/statistics.md explains each).
COMPARISON_COLUMNS = (
    "comparison", "metric", "model", "a", "b", "site", "mode", "layers", "tokens", "align",
    "alpha", "control", "n_a", "n_b", "n_pairs", "n_unpaired", "n_failed_a", "n_failed_b",
    "n_nan_a", "n_nan_b", "mean_a", "mean_b", "sd_a", "sd_b", "diff", "effect_size",
    "cohens_d", "d_ci_low", "d_ci_high", "test", "statistic", "df", "p", "p_fdr",
    "significant", "mw_statistic", "mw_p", "wilcoxon_statistic", "wilcoxon_p", "note",
    "comparison_id",
)


# --- loading ------------------------------------------------------------------------------


@dataclass
class ResultSet:
    """A results folder read back: one row per cell id, plus what the reader had to decide."""

    path: Path
    manifest: dict[str, Any]
    cells: pd.DataFrame
    """One row per cell id (ok and failed), normalised by `normalise_cells`."""
    failures: pd.DataFrame
    """Failure records from `failures/`, one per cell id (latest attempt)."""
    n_duplicate_rows: int = 0
    n_failed_unattributed: int = 0
    """Failed cells known only from `failures/`, without grid coordinates."""
    n_recovered: int = 0
    """Cells that failed once and then succeeded on a retry."""
    n_unreadable_failure_lines: int = 0
    has_human_scores: bool = False

    @property
    def n_expected(self) -> int | None:
        """Cells the sweep plans: `n_cells_total`, else the sum of `planned_cells` (store.py)."""
        for key in TOTAL_KEYS:
            value = self.manifest.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value)
        planned = self.planned_by_model
        return sum(planned.values()) if planned else None

    @property
    def planned_by_model(self) -> dict[str, int]:
        planned = self.manifest.get("planned_cells")
        if not isinstance(planned, dict):
            return {}
        return {str(k): int(v) for k, v in planned.items() if isinstance(v, (int, float))}


def _parquet_files(folder: Path) -> list[Path]:
    """Finished shards only: writers use a temporary name and rename (store.py)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*.parquet") if not p.name.startswith((".", "_")) and p.is_file()
    )


def read_parquet_folder(folder: Path) -> pd.DataFrame:
    """All shards of a folder as one frame; shards may differ in columns (schemas unified)."""
    files = _parquet_files(folder)
    if not files:
        return pd.DataFrame()
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    table = pads.dataset([str(f) for f in files], schema=schema, format="parquet").to_table()
    return table.to_pandas()


def _read_failures(folder: Path) -> tuple[pd.DataFrame, int]:
    """Failure records from Parquet shards and/or JSON-lines files; counts unreadable lines."""
    frames = []
    parquet = read_parquet_folder(folder)
    if not parquet.empty:
        frames.append(parquet)
    records: list[dict[str, Any]] = []
    bad = 0
    if folder.is_dir():
        for path in sorted(folder.rglob("*.jsonl")):
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s line %d: not JSON, skipped (counted)", path, lineno)
                    bad += 1
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    bad += 1
    if records:
        frames.append(pd.DataFrame.from_records(records))
    if not frames:
        return pd.DataFrame(columns=["cell_id", "error_type", "error"]), bad
    failures = pd.concat(frames, ignore_index=True)
    if "cell_id" not in failures.columns:
        logger.warning("failure records without cell_id in %s", folder)
        return pd.DataFrame(columns=["cell_id", "error_type", "error"]), bad + len(failures)
    failures = failures[failures["cell_id"].notna()]
    if "attempt" in failures.columns:
        failures = failures.sort_values("attempt", kind="stable", na_position="first")
    return failures.drop_duplicates("cell_id", keep="last").reset_index(drop=True), bad


def _dedupe_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per cell id: the latest ok row if any, else the latest row."""
    if cells.empty:
        return cells, 0
    order = pd.DataFrame({
        "ok": (cells["status"] == "ok").astype(int) if "status" in cells else 1,
        "t": cells["finished_at"].astype(str) if "finished_at" in cells else "",
        "attempt": pd.to_numeric(cells["attempt"], errors="coerce").fillna(0)
        if "attempt" in cells else 0,
    }, index=cells.index)
    ranked = cells.loc[order.sort_values(["ok", "attempt", "t"], kind="stable").index]
    deduped = ranked.drop_duplicates("cell_id", keep="last")
    return deduped.sort_index().reset_index(drop=True), len(cells) - len(deduped)


def load_results(results_dir: str | Path) -> ResultSet:
    """Read `manifest.json`, `cells/`, `failures/` and any imported human scores."""
    path = Path(results_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"results folder not found: {path}")
    manifest_path = path / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    else:
        logger.warning("%s has no manifest.json; provenance will be missing", path)

    cells = read_parquet_folder(path / "cells")
    if not cells.empty and "cell_id" not in cells.columns:
        raise ValueError(f"{path / 'cells'}: shards have no cell_id column")
    if "status" in cells.columns:
        cells["status"] = cells["status"].fillna("ok")
    elif not cells.empty:
        cells["status"] = "ok"
    cells, n_dup = _dedupe_cells(cells)

    failures, bad_lines = _read_failures(path / "failures")
    ok_ids = set(cells.loc[cells["status"] == "ok", "cell_id"]) if not cells.empty else set()
    known_ids = set(cells["cell_id"]) if not cells.empty else set()
    n_recovered = int(failures["cell_id"].isin(ok_ids).sum()) if not failures.empty else 0
    orphan = failures[~failures["cell_id"].isin(known_ids)] if not failures.empty else failures
    n_unattributed = 0
    if not orphan.empty:
        extra = orphan.copy()
        extra["status"] = "failed"
        located = pd.Series(True, index=extra.index)
        for col in ("model", "control"):
            located &= extra[col].notna() if col in extra else False
        n_unattributed = int((~located).sum())
        cells = pd.concat([cells, extra], ignore_index=True) if not cells.empty else extra

    has_human = False
    human_path = path / HUMAN_SCORES_FILE
    if human_path.is_file() and not cells.empty:
        human = pd.read_parquet(human_path, columns=["cell_id", "score_human"])
        cells = cells.drop(columns=["score_human"], errors="ignore").merge(
            human, on="cell_id", how="left"
        )
        has_human = bool(cells["score_human"].notna().any())

    return ResultSet(
        path=path,
        manifest=manifest,
        cells=normalise_cells(cells),
        failures=failures,
        n_duplicate_rows=n_dup,
        n_failed_unattributed=n_unattributed,
        n_recovered=n_recovered,
        n_unreadable_failure_lines=bad_lines,
        has_human_scores=has_human,
    )


# --- normalisation and labels -------------------------------------------------------------


def _as_label(value: Any) -> str:
    """Grid coordinates may arrive as strings, numbers or lists; labels must be strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE_LABEL
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text else NONE_LABEL


def _fmt_alpha(alpha: float) -> str:
    return NONE_LABEL if alpha is None or not np.isfinite(alpha) else f"{alpha:g}"


def point_label(site: str, mode: str, layers: str, tokens: str, align: str, alpha: float) -> str:
    """A readable, model-independent name for one intervention point."""
    if site == "none":
        return NONE_LABEL
    return f"{site}/{mode} L={layers} T={tokens} align={align} alpha={_fmt_alpha(alpha)}"


def condition_letter(control: str, source_group: str, target_group: str) -> str:
    """The classic names: A/B natural baseline/recursive, C/D patched across groups."""
    if control == NATURAL:
        return {BASELINE: "A", RECURSIVE: "B"}.get(target_group, "")
    if control == PATCH:
        if (source_group, target_group) == (RECURSIVE, BASELINE):
            return "C"
        if (source_group, target_group) == (BASELINE, RECURSIVE):
            return "D"
    return ""


def condition_label(row: pd.Series | dict[str, Any]) -> str:
    """Model-independent label of a condition, e.g. `C: patch recursive->baseline @ kv/...`."""
    letter = condition_letter(row["control"], row["source_group"], row["target_group"])
    prefix = f"{letter}: " if letter else ""
    if row["control"] == NATURAL:
        return f"{prefix}natural {row['target_group']}"
    point = point_label(*(row[c] for c in POINT_COLS))
    return f"{prefix}{row['control']} {row['source_group']}->{row['target_group']} @ {point}"


def normalise_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Make coordinates comparable: strings for labels, float alpha, natural cells unpatched.

    Natural cells (control `natural` or site `none`) carry no intervention: their point
    fields become `-`, alpha NaN and source group `-`, so that every natural cell of a target
    group falls in one condition whatever the writer put there.
    """
    df = cells.copy()
    needed = (*CONDITION_COLS, "cell_id", "status", "target_id", "source_id", "target_level",
              "source_level", "rv_status", "error_type")
    for col in needed:
        if col not in df.columns:
            df[col] = np.nan
    for col in _STRING_KEYS:
        df[col] = df[col].map(_as_label).astype(object)
    df["alpha"] = pd.to_numeric(df["alpha"], errors="coerce").astype(float)
    for col in ("target_level", "source_level"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["status"] = df["status"].fillna("ok").astype(str)
    natural = (df["control"] == NATURAL) | (df["site"] == "none")
    df.loc[natural, "control"] = NATURAL
    df.loc[natural, "site"] = "none"
    for col in ("mode", "layers", "tokens", "align", "source_group"):
        df.loc[natural, col] = NONE_LABEL
    df.loc[natural, "alpha"] = np.nan
    df["is_natural"] = natural
    # A failure known only from failures/ has a model but no grid coordinates.
    df["attributed"] = (df["model"] != NONE_LABEL) & (df["control"] != NONE_LABEL)
    if df.empty:
        df["point"] = pd.Series(dtype=object)
        df["condition"] = pd.Series(dtype=object)
        df["letter"] = pd.Series(dtype=object)
        return df
    df["point"] = [
        point_label(*vals) for vals in zip(*(df[c] for c in POINT_COLS), strict=True)
    ]
    df["letter"] = [
        condition_letter(c, s, t)
        for c, s, t in zip(df["control"], df["source_group"], df["target_group"], strict=True)
    ]
    df["condition"] = [condition_label(r) for r in df[list(CONDITION_COLS)].to_dict("records")]
    return df


def metric_columns(cells: pd.DataFrame) -> list[str]:
    """Geometry metrics and `score_*` columns that hold at least one number."""
    candidates = [c for c in GEOMETRY_METRICS if c in cells.columns]
    candidates += sorted(c for c in cells.columns if c.startswith(SCORE_PREFIX))
    present = []
    for col in candidates:
        values = pd.to_numeric(cells[col], errors="coerce")
        if values.notna().any():
            present.append(col)
    return present


def primary_metrics(metrics: Sequence[str]) -> list[str]:
    """R_V and the behaviour scores: what the findings talk about (PR and effective rank
    are diagnostics of R_V, kept in the tables)."""
    main = [m for m in metrics if m == "rv" or m.startswith(SCORE_PREFIX)]
    return main or list(metrics)


def _numeric(cells: pd.DataFrame, metric: str) -> pd.Series:
    return pd.to_numeric(cells[metric], errors="coerce").astype(float)


# --- per condition ------------------------------------------------------------------------


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval of the mean (scipy.stats.t); NaN with fewer than two values."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    mean = float(np.mean(values))
    sem = float(stats.sem(values))
    if sem == 0.0:
        return (mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return (float(low), float(high))


def _nan_reasons(ok_rows: pd.DataFrame, metric: str, missing: pd.Series) -> str:
    if not missing.any():
        return ""
    if metric in GEOMETRY_METRICS and "rv_status" in ok_rows:
        reasons = ok_rows.loc[missing, "rv_status"].fillna("no reason recorded").astype(str)
    elif metric == "score_human":
        reasons = pd.Series(["not rated"] * int(missing.sum()))
    else:
        reasons = pd.Series(["no reason recorded"] * int(missing.sum()))
    counts = reasons.value_counts()
    return "; ".join(f"{reason} x{count}" for reason, count in counts.items())


def summarize_conditions(
    cells: pd.DataFrame, metrics: Sequence[str], confidence: float = 0.95
) -> pd.DataFrame:
    """One row per condition and metric: n, n_failed, n_nan, mean, sd, t-based CI."""
    rows: list[dict[str, Any]] = []
    attributed = cells[cells["attributed"]] if "attributed" in cells else cells
    if attributed.empty:
        return pd.DataFrame(columns=_CONDITION_SUMMARY_COLUMNS)
    for key, group in attributed.groupby(list(CONDITION_COLS), dropna=False, sort=True):
        coords = dict(zip(CONDITION_COLS, key, strict=True))
        ok = group[group["status"] == "ok"]
        base = {
            **coords,
            "condition": group["condition"].iloc[0],
            "letter": group["letter"].iloc[0],
            "point": group["point"].iloc[0],
            "n": len(group),
            "n_ok": len(ok),
            "n_failed": int((group["status"] == "failed").sum()),
        }
        for metric in metrics:
            values = _numeric(ok, metric)
            missing = values.isna()
            valid = values[~missing].to_numpy()
            low, high = t_interval(valid, confidence)
            rows.append({
                **base,
                "metric": metric,
                "n_nan": int(missing.sum()),
                "n_valid": len(valid),
                "mean": float(np.mean(valid)) if len(valid) else math.nan,
                "sd": float(np.std(valid, ddof=1)) if len(valid) > 1 else math.nan,
                "ci_low": low,
                "ci_high": high,
                "nan_reasons": _nan_reasons(ok, metric, missing),
            })
    return pd.DataFrame(rows, columns=_CONDITION_SUMMARY_COLUMNS)


_CONDITION_SUMMARY_COLUMNS = (
    *CONDITION_COLS, "condition", "letter", "point", "n", "n_ok", "n_failed", "metric",
    "n_nan", "n_valid", "mean", "sd", "ci_low", "ci_high", "nan_reasons",
)


# --- two-sample comparison ----------------------------------------------------------------


def _ncp_for_cdf(t_obs: float, df: float, target: float) -> float:
    """The noncentrality at which P(T <= t_obs) = target (cdf falls as ncp grows)."""

    def gap(ncp: float) -> float:
        # scipy.special.nctdtr is the cdf behind scipy.stats.nct, without its per-call checks
        return float(special.nctdtr(df, ncp, t_obs)) - target

    width = max(5.0, abs(t_obs))
    for _ in range(40):
        low, high = t_obs - width, t_obs + width
        g_low, g_high = gap(low), gap(high)
        if np.isfinite(g_low) and np.isfinite(g_high) and g_low > 0 > g_high:
            return float(optimize.brentq(gap, low, high, xtol=1e-9))
        width *= 2.0
    return math.nan


def d_confidence_interval(
    d: float, n_a: int, n_b: int | None, confidence: float = 0.95
) -> tuple[float, float]:
    """Exact interval of a standardised mean difference by inverting the noncentral t.

    `n_b=None` means a paired design (d_z over `n_a` pairs, t = d_z * sqrt(n)); otherwise
    Cohen's d with pooled sd (t = d * sqrt(n_a n_b / (n_a + n_b)), df = n_a + n_b - 2).
    """
    if not np.isfinite(d):
        return (math.nan, math.nan)
    if n_b is None:
        scale, df = math.sqrt(n_a), n_a - 1
    else:
        scale, df = math.sqrt(n_a * n_b / (n_a + n_b)), n_a + n_b - 2
    if df < 1:
        return (math.nan, math.nan)
    t_obs = d * scale
    tail = (1.0 - confidence) / 2.0
    low = _ncp_for_cdf(t_obs, df, 1.0 - tail)
    high = _ncp_for_cdf(t_obs, df, tail)
    return (low / scale, high / scale)


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean_a - mean_b) / pooled sd; NaN when undefined (n < 2 or zero spread)."""
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        return math.nan
    pooled = ((n_a - 1) * np.var(a, ddof=1) + (n_b - 1) * np.var(b, ddof=1)) / (n_a + n_b - 2)
    if pooled <= 0:
        return math.nan
    return float((np.mean(a) - np.mean(b)) / math.sqrt(pooled))


def d_z(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of the paired differences over their sd; NaN when undefined."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    if len(diff) < 2:
        return math.nan
    sd = np.std(diff, ddof=1)
    if sd <= 0:
        return math.nan
    return float(np.mean(diff) / sd)


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
        ok = (cells["status"] == "ok").to_numpy()
        values = _numeric(cells, metric).to_numpy(float)[ok]
        keys = {k: cells[k].to_numpy(object)[ok] for k in key_columns if k in cells}
        return cls(values, keys, int((cells["status"] == "failed").sum()))


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


def compare_two(
    a: pd.DataFrame,
    b: pd.DataFrame,
    metric: str,
    *,
    pair_on: tuple[str, str] | None = ("target_id", "target_id"),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Compare condition `a` with condition `b` on one metric (diff = a - b).

    Paired t and d_z when the cells match by prompt (`pair_on` gives the key column of each
    side), otherwise Welch t and pooled Cohen's d. Mann-Whitney (and Wilcoxon when paired)
    as rank-based robustness checks. Failed and NaN cells are counted, never used.
    """
    return compare_samples(Sample.of(a, metric), Sample.of(b, metric), pair_on=pair_on,
                           confidence=confidence)


def compare_samples(
    a: Sample,
    b: Sample,
    *,
    pair_on: tuple[str, str] | None = ("target_id", "target_id"),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """`compare_two` on pre-extracted samples (what `compare_conditions` loops over)."""
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
    if len(va) and len(vb) and not (np.ptp(va) == 0 and np.ptp(vb) == 0 and va[0] == vb[0]):
        mw = stats.mannwhitneyu(va, vb, alternative="two-sided")
        out["mw_statistic"], out["mw_p"] = float(mw.statistic), float(mw.pvalue)

    paired = _pair(a, b, pair_on) if pair_on else None
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
        if np.ptp(diff) == 0:
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
        if len(va) < 2 or len(vb) < 2:
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


_GROUP_ORDER = {RECURSIVE: 0, LONG_CONTROL: 1, BASELINE: 2}


def _cross_source(target_group: str) -> str | None:
    return {BASELINE: RECURSIVE, RECURSIVE: BASELINE}.get(target_group)


def is_all_layers(layers: str, patched: Any = None, n_layers: int | None = None) -> bool:
    """True when a layer spec (or the recorded patched layers) covers the whole model."""
    spec = str(layers).replace(" ", "")
    if spec in ALL_LAYER_SPECS:
        return True
    if n_layers:
        if spec == f"0:{n_layers}":
            return True
        if patched is not None and len(patched):
            return sorted(int(x) for x in patched) == list(range(n_layers))
    return False


def _model_depths(manifest: dict[str, Any]) -> dict[str, int]:
    """Best effort: find `n_layers` per model wherever the manifest records model info."""
    depths: dict[str, int] = {}

    def visit(obj: Any, name: str | None) -> None:
        if isinstance(obj, dict):
            n = obj.get("n_layers")
            model = obj.get("model", name)
            if isinstance(n, int) and isinstance(model, str):
                depths[model] = n
            for key, value in obj.items():
                visit(value, key if isinstance(key, str) else None)
        elif isinstance(obj, list):
            for item in obj:
                visit(item, name)

    visit({k: v for k, v in manifest.items() if k != "spec"}, None)
    return depths


def transplant_all_mask(cells: pd.DataFrame, manifest: dict[str, Any] | None = None) -> pd.Series:
    """Cells whose kv transplant replaces every layer (the 'continue the source' confound)."""
    depths = _model_depths(manifest or {})
    patched = cells["patched_layers"] if "patched_layers" in cells else pd.Series(
        [None] * len(cells), index=cells.index
    )
    mask = [
        site in ("kv", "k", "v") and mode == "transplant"
        and is_all_layers(layers, pl, depths.get(model))
        for site, mode, layers, pl, model in zip(
            cells["site"], cells["mode"], cells["layers"], patched, cells["model"], strict=True
        )
    ]
    return pd.Series(mask, index=cells.index, dtype=bool)


def plan_comparisons(
    cells: pd.DataFrame, manifest: dict[str, Any] | None = None
) -> list[ComparisonPlan]:
    """Every comparison the sweep's conditions support (names in docs/statistics.md)."""
    plans: list[ComparisonPlan] = []
    attributed = cells[cells["attributed"]]
    transplant_all = transplant_all_mask(attributed, manifest)
    for model, mcells in attributed.groupby("model", sort=True):
        natural = mcells[mcells["is_natural"]]
        nat_cond = {
            g: sub["condition"].iloc[0] for g, sub in natural.groupby("target_group", sort=True)
        }
        groups = sorted(nat_cond, key=lambda g: (_GROUP_ORDER.get(g, 9), g))
        for i, ga in enumerate(groups):
            for gb in groups[i + 1:]:
                plans.append(ComparisonPlan(
                    "group_effect", model, nat_cond[ga], nat_cond[gb], None, NATURAL, None
                ))
        patched = mcells[~mcells["is_natural"]]
        for point, pcells in patched.groupby(list(POINT_COLS), dropna=False, sort=True):
            conds = pcells.drop_duplicates("condition")
            patch_conds = conds[conds["control"] == PATCH]
            for _, row in conds.iterrows():
                tg, sg, ctrl = row["target_group"], row["source_group"], row["control"]
                ref = nat_cond.get(tg)
                if ctrl == PATCH:
                    name = {"C": "sufficiency", "D": "necessity"}.get(row["letter"],
                                                                        "patch_effect")
                else:
                    name = f"control:{ctrl}"
                if ref is not None:
                    plans.append(ComparisonPlan(
                        name, model, row["condition"], ref, point, ctrl,
                        ("target_id", "target_id"),
                    ))
                if ctrl == PATCH and transplant_all.loc[row.name] and sg in nat_cond:
                    plans.append(ComparisonPlan(
                        "source_natural", model, row["condition"], nat_cond[sg], point, ctrl,
                        ("source_id", "target_id"),
                    ))
                if ctrl != PATCH:
                    partner = _patch_partner(patch_conds, tg, sg)
                    if partner is not None:
                        plans.append(ComparisonPlan(
                            f"control_vs_patch:{ctrl}", model, row["condition"], partner,
                            point, ctrl, ("target_id", "target_id"),
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
    cross = same_target[same_target["source_group"] == _cross_source(target_group)]
    if len(cross) == 1:
        return str(cross["condition"].iloc[0])
    if len(same_target) == 1:
        return str(same_target["condition"].iloc[0])
    return None


def compare_conditions(
    cells: pd.DataFrame,
    metrics: Sequence[str],
    *,
    manifest: dict[str, Any] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """All planned comparisons x metrics, one row each (p_fdr filled by `apply_fdr`)."""
    plans = plan_comparisons(cells, manifest)
    # Only the columns a comparison reads: slicing the full table (texts, trajectories)
    # thousands of times is what made this slow.
    keep = ["model", "condition", "status", "target_id", "source_id", *metrics]
    by_condition = {
        key: {m: Sample.of(group, m) for m in metrics}
        for key, group in cells.loc[cells["attributed"], keep].groupby(["model", "condition"])
    }
    rows: list[dict[str, Any]] = []
    for plan in plans:
        a = by_condition[(plan.model, plan.a_condition)]
        b = by_condition[(plan.model, plan.b_condition)]
        point = dict(zip(POINT_COLS, plan.point, strict=True)) if plan.point else {
            c: (math.nan if c == "alpha" else NONE_LABEL) for c in POINT_COLS
        }
        for metric in metrics:
            result = compare_samples(a[metric], b[metric], pair_on=plan.pair_on,
                                     confidence=confidence)
            rows.append({
                "comparison": plan.comparison, "metric": metric, "model": plan.model,
                "a": plan.a_condition, "b": plan.b_condition, **point,
                "control": plan.control, **result,
                "p_fdr": math.nan, "significant": False,
                "comparison_id": f"{plan.comparison} | {plan.a_condition} vs {plan.b_condition}",
            })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


# --- transfer efficiency ------------------------------------------------------------------


def _ratio_of_gaps(
    num_hi: np.ndarray, num_lo: np.ndarray, den_hi: np.ndarray, den_lo: np.ndarray, axis: int = -1
) -> np.ndarray:
    """(mean(num_hi) - mean(num_lo)) / (mean(den_hi) - mean(den_lo)), vectorised."""
    num = np.mean(num_hi, axis=axis) - np.mean(num_lo, axis=axis)
    den = np.mean(den_hi, axis=axis) - np.mean(den_lo, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def bootstrap_ratio(
    samples: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    seed: int,
    n_resamples: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `_ratio_of_gaps` (scipy.stats.bootstrap, seeded).

    The samples are resampled independently (conditions hold different cells). Percentile
    rather than BCa: the ratio is unbounded near a zero denominator, where BCa's jackknife
    is unstable. Samples are passed unique (same array twice would be resampled twice).
    """
    unique: list[np.ndarray] = []
    index: list[int] = []
    for sample in samples:
        for i, seen in enumerate(unique):
            if seen is sample:
                index.append(i)
                break
        else:
            index.append(len(unique))
            unique.append(sample)

    def statistic(*data: np.ndarray, axis: int = -1) -> np.ndarray:
        picked = [data[i] for i in index]
        return _ratio_of_gaps(*picked, axis=axis)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            tuple(unique), statistic, n_resamples=n_resamples, vectorized=True, paired=False,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )
    for w in caught:
        if not issubclass(w.category, stats.DegenerateDataWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    ci = res.confidence_interval
    if any(issubclass(w.category, stats.DegenerateDataWarning) for w in caught):
        # Too few distinct values (or a zero denominator in resamples): no honest interval.
        return (math.nan, math.nan)
    return (float(ci.low), float(ci.high))


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
    attributed = cells[cells["attributed"] & (cells["status"] == "ok")].sort_values(
        "cell_id", kind="stable")
    transplant_all = transplant_all_mask(attributed, manifest)
    for model, mcells in attributed.groupby("model", sort=True):
        a_cells = mcells[mcells["letter"] == "A"]
        b_cells = mcells[mcells["letter"] == "B"]
        patched = mcells[mcells["letter"].isin(["C", "D"])]
        for point, pcells in patched.groupby(list(POINT_COLS), dropna=False, sort=True):
            c_cells = pcells[pcells["letter"] == "C"]
            d_cells = pcells[pcells["letter"] == "D"]
            for metric in metrics:
                va, vb, vc, vd = (
                    _numeric(x, metric).dropna().to_numpy()
                    for x in (a_cells, b_cells, c_cells, d_cells)
                )
                row: dict[str, Any] = {
                    "model": model, **dict(zip(POINT_COLS, point, strict=True)),
                    "point": pcells["point"].iloc[0], "metric": metric,
                    "transplant_all": bool(transplant_all.loc[pcells.index].any()),
                    "n_a": len(va), "n_b": len(vb), "n_c": len(vc), "n_d": len(vd),
                    "mean_a": _mean(va), "mean_b": _mean(vb),
                    "mean_c": _mean(vc), "mean_d": _mean(vd),
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
    return pd.DataFrame(rows, columns=_TRANSFER_COLUMNS)


_TRANSFER_COLUMNS = (
    "model", *POINT_COLS, "point", "metric", "transplant_all", "n_a", "n_b", "n_c", "n_d",
    "mean_a", "mean_b", "mean_c", "mean_d", "efficiency", "eff_ci_low", "eff_ci_high",
    "necessity_fraction", "nec_ci_low", "nec_ci_high", "note",
)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# --- dose-response and correlations -------------------------------------------------------


SMALL_N_PERMUTATION = 10
"""Below this many cells a Spearman p-value comes from a permutation test: the t
approximation of `spearmanr` gives p = 0 for a perfect rank order of 3 cells."""


def _rank_correlation(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along `axis` (Pearson of the ranks), vectorised for resampling."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    num = (rx * ry).sum(axis=axis)
    den = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    if len(x) < 3:
        return (math.nan, math.nan, "fewer than 3 cells")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return (math.nan, math.nan, "constant input")
    res = stats.spearmanr(x, y)
    if len(x) >= SMALL_N_PERMUTATION:
        return (float(res.statistic), float(res.pvalue), "")

    def statistic(xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return _rank_correlation(xs, np.broadcast_to(y, xs.shape), axis=axis)

    # One sample permuted against fixed y: n! pairings, enumerated exactly for n <= 7.
    perm = stats.permutation_test(
        (x,), statistic, permutation_type="pairings", vectorized=True,
        n_resamples=9999, alternative="two-sided", rng=np.random.default_rng(0),
    )
    return (float(res.statistic), float(perm.pvalue), "permutation p-value (small n)")


def dose_response(cells: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Spearman rho of each metric with alpha, and with recursion level.

    alpha: within each patched condition family (everything but alpha fixed), over the
    alphas the sweep ran. target_level: natural recursive cells (levels 1..5).
    source_level: patched conditions whose recursive sources span several levels.
    """
    rows: list[dict[str, Any]] = []
    family_cols = ["model", "site", "mode", "layers", "tokens", "align", "control",
                   "source_group", "target_group"]
    keep = [*family_cols, "alpha", "source_level", "target_level", "is_natural"]
    sel = cells["attributed"] & (cells["status"] == "ok")
    ok = cells.loc[sel, keep].copy()
    for metric in metrics:
        ok[metric] = _numeric(cells.loc[sel], metric)

    def add(factor: str, scope: str, sub: pd.DataFrame, coords: dict[str, Any]) -> None:
        x_all = sub[factor].to_numpy(float)
        for metric in metrics:
            y_all = sub[metric].to_numpy(float)
            finite = np.isfinite(x_all) & np.isfinite(y_all)
            x, y = x_all[finite], y_all[finite]
            rho, p, note = _spearman(x, y)
            rows.append({
                "factor": factor, "scope": scope, **coords, "metric": metric,
                "n": len(x), "n_levels": len(np.unique(x)),
                "rho": rho, "p": p, "p_fdr": math.nan, "significant": False, "note": note,
            })

    patched = ok[~ok["is_natural"]]
    for key, fam in patched.groupby(family_cols, dropna=False, sort=True):
        if fam["alpha"].nunique() >= 2:
            coords = dict(zip(family_cols, key, strict=True))
            scope = condition_label({**coords, "alpha": math.nan}).replace(" alpha=-", "")
            add("alpha", scope, fam, coords)
        if fam["source_level"].nunique() >= 2:
            coords = dict(zip(family_cols, key, strict=True))
            levels = fam.groupby("alpha", dropna=False)
            for alpha, sub in levels:
                if sub["source_level"].nunique() >= 2:
                    scope = condition_label({**coords, "alpha": alpha})
                    add("source_level", scope, sub, coords)
    natural = ok[ok["is_natural"] & (ok["target_group"] == RECURSIVE)]
    for model, sub in natural.groupby("model", sort=True):
        if sub["target_level"].nunique() >= 2:
            coords = {c: NONE_LABEL for c in family_cols}
            coords.update(model=model, control=NATURAL, target_group=RECURSIVE)
            add("target_level", f"natural {RECURSIVE}", sub, coords)
    return pd.DataFrame(rows, columns=_DOSE_COLUMNS)


_DOSE_COLUMNS = (
    "factor", "scope", "model", "site", "mode", "layers", "tokens", "align", "control",
    "source_group", "target_group", "metric", "n", "n_levels", "rho", "p", "p_fdr",
    "significant", "note",
)


def behaviour_correlations(
    cells: pd.DataFrame, metrics: Sequence[str], geometry: str = "rv"
) -> pd.DataFrame:
    """Pearson (with CI) and Spearman of R_V with every behaviour score, per model.

    Scope `all`: every ok cell of the model (geometry and behaviour move together across
    interventions); scope `natural`: unpatched cells only (the prompts' own relation).
    """
    rows: list[dict[str, Any]] = []
    if geometry not in metrics:
        return pd.DataFrame(columns=_CORR_COLUMNS)
    scores = [m for m in metrics if m.startswith(SCORE_PREFIX)]
    ok = cells[cells["attributed"] & (cells["status"] == "ok")]
    for model, mcells in ok.groupby("model", sort=True):
        for scope, sub in (("all", mcells), ("natural", mcells[mcells["is_natural"]])):
            for score in scores:
                frame = pd.DataFrame({
                    "x": _numeric(sub, geometry), "y": _numeric(sub, score)
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
                    rho, p, note = _spearman(x, y)
                    row.update(spearman_rho=rho, spearman_p=p, note=note)
                rows.append(row)
    return pd.DataFrame(rows, columns=_CORR_COLUMNS)


_CORR_COLUMNS = (
    "model", "scope", "x", "y", "n", "pearson_r", "pearson_p", "pearson_ci_low",
    "pearson_ci_high", "spearman_rho", "spearman_p", "pearson_p_fdr", "spearman_p_fdr", "note",
)


# --- multiple comparisons -----------------------------------------------------------------


def apply_fdr(
    tables: Iterable[tuple[pd.DataFrame, str, str]], q: float = 0.05
) -> int:
    """Benjamini-Hochberg over every (table, p column) given, as ONE family; in place.

    Each entry is `(frame, p_column, p_fdr_column)`. Returns the family size. NaN p-values
    (no test possible) stay NaN and do not count towards the family.
    """
    entries = list(tables)
    chunks = []
    for frame, p_col, _ in entries:
        chunks.append(pd.to_numeric(frame[p_col], errors="coerce").to_numpy(float))
    if not chunks:
        return 0
    allp = np.concatenate(chunks)
    finite = np.isfinite(allp)
    adjusted = np.full_like(allp, np.nan)
    if finite.any():
        adjusted[finite] = stats.false_discovery_control(np.clip(allp[finite], 0.0, 1.0),
                                                         method="bh")
    start = 0
    for (frame, _, out_col), chunk in zip(entries, chunks, strict=True):
        frame[out_col] = adjusted[start:start + len(chunk)]
        if "significant" in frame.columns and out_col in ("p_fdr",):
            frame["significant"] = frame[out_col] < q
        start += len(chunk)
    return int(finite.sum())


# --- models side by side ------------------------------------------------------------------


SIDE_BY_SIDE_VALUES = ("n_a", "n_b", "diff", "cohens_d", "d_ci_low", "d_ci_high", "p_fdr")


def models_side_by_side(comparisons: pd.DataFrame) -> pd.DataFrame:
    """A wide table: one row per (comparison, metric), per-model columns `col[model]`.

    Conditions are named without the model and fractional layer specs fit any depth, so
    the same intervention lines up across models. Empty with fewer than two models.
    """
    if comparisons.empty or comparisons["model"].nunique() < 2:
        return pd.DataFrame()
    keyed = comparisons.set_index(["comparison_id", "comparison", "metric", "model"])
    wide = keyed[list(SIDE_BY_SIDE_VALUES)].unstack("model")
    wide.columns = [f"{value}[{model}]" for value, model in wide.columns]
    models = sorted(comparisons["model"].unique())
    ordered = [f"{v}[{m}]" for m in models for v in SIDE_BY_SIDE_VALUES if f"{v}[{m}]" in wide]
    return wide[ordered].reset_index()


def transfer_side_by_side(transfer: pd.DataFrame) -> pd.DataFrame:
    """Transfer efficiency per intervention point with one column set per model."""
    if transfer.empty or transfer["model"].nunique() < 2:
        return pd.DataFrame()
    values = ["efficiency", "eff_ci_low", "eff_ci_high", "necessity_fraction"]
    wide = transfer.set_index(["point", "metric", "model"])[values].unstack("model")
    wide.columns = [f"{value}[{model}]" for value, model in wide.columns]
    models = sorted(transfer["model"].unique())
    ordered = [f"{v}[{m}]" for m in models for v in values if f"{v}[{m}]" in wide]
    return wide[ordered].reset_index()


# --- completeness -------------------------------------------------------------------------


@dataclass
class Completeness:
    """How much of the sweep the table holds, and what the analysis could not compute."""

    n_expected: int | None
    n_done: int
    n_ok: int
    n_failed: int
    n_failed_unattributed: int
    n_missing: int | None
    n_duplicate_rows: int
    n_recovered: int
    missing_conditions: dict[str, list[str]] = field(default_factory=dict)
    """Per model, the classic conditions (A, B, C, D) the sweep plans but has no ok cell of."""
    by_model: list[dict[str, Any]] = field(default_factory=list)
    """Per model: planned (from the manifest, if recorded), done, ok, failed, missing."""

    @property
    def partial(self) -> bool:
        return bool(self.n_missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_expected": self.n_expected, "n_done": self.n_done, "n_ok": self.n_ok,
            "n_failed": self.n_failed, "n_failed_unattributed": self.n_failed_unattributed,
            "n_missing": self.n_missing, "n_duplicate_rows": self.n_duplicate_rows,
            "n_recovered": self.n_recovered, "partial": self.partial,
            "missing_conditions": self.missing_conditions, "by_model": self.by_model,
        }


def expected_letters(spec: dict[str, Any]) -> set[str] | None:
    """Classic conditions (A-D) a sweep's spec plans, or None if the spec does not say.

    Mirrors spec.py: `prompts.conditions` when given, else natural cells for every target
    group when `natural` is a control, and patched cells for every cross-group pair when
    the spec has interventions.
    """
    if not isinstance(spec, dict) or not spec:
        return None
    prompts = spec.get("prompts") or {}
    if prompts.get("conditions"):
        return set(prompts["conditions"])
    targets = set(prompts.get("target_groups") or [BASELINE])
    sources = set(prompts.get("source_groups") or [RECURSIVE])
    controls = set(spec.get("controls") or [NATURAL])
    out: set[str] = set()
    if NATURAL in controls:
        out |= {"A"} if BASELINE in targets else set()
        out |= {"B"} if RECURSIVE in targets else set()
    if spec.get("interventions") is not None:
        if BASELINE in targets and RECURSIVE in sources:
            out.add("C")
        if RECURSIVE in targets and BASELINE in sources:
            out.add("D")
    return out


def completeness(results: ResultSet) -> Completeness:
    """Done vs planned cells, per sweep and per model, and planned conditions with no data."""
    cells = results.cells
    n_done = int(cells["cell_id"].nunique()) if not cells.empty else 0
    n_ok = int((cells["status"] == "ok").sum()) if not cells.empty else 0
    n_failed = n_done - n_ok
    expected = results.n_expected
    missing = None if expected is None else max(expected - n_done, 0)
    absent: dict[str, list[str]] = {}
    by_model: list[dict[str, Any]] = []
    planned = results.planned_by_model
    models = sorted(set(planned) | set(cells.loc[cells["model"] != NONE_LABEL, "model"])
                    ) if not cells.empty else sorted(planned)
    wanted = expected_letters(results.manifest.get("spec") or {})
    for model in models:
        mine = cells[cells["model"] == model] if not cells.empty else cells
        done = int(mine["cell_id"].nunique()) if not mine.empty else 0
        ok_n = int((mine["status"] == "ok").sum()) if not mine.empty else 0
        plan = planned.get(model)
        by_model.append({"model": model, "planned": plan, "done": done, "ok": ok_n,
                         "failed": done - ok_n,
                         "missing": None if plan is None else max(plan - done, 0)})
        located = mine[mine["attributed"]] if not mine.empty else mine
        seen_any = set(located["letter"]) if not located.empty else set()
        seen_ok = set(located.loc[located["status"] == "ok", "letter"]) if not located.empty \
            else set()
        want = wanted if wanted is not None else seen_any
        gone = [x for x in "ABCD" if x in want and x not in seen_ok]
        if gone:
            absent[model] = gone
    return Completeness(
        n_expected=expected, n_done=n_done, n_ok=n_ok, n_failed=n_failed,
        n_failed_unattributed=results.n_failed_unattributed, n_missing=missing,
        n_duplicate_rows=results.n_duplicate_rows, n_recovered=results.n_recovered,
        missing_conditions=absent, by_model=by_model,
    )


def failure_summary(cells: pd.DataFrame, failures: pd.DataFrame) -> pd.DataFrame:
    """Failed cells by model and error type (error text from `failures/` when absent)."""
    failed = cells[cells["status"] == "failed"]
    if failed.empty:
        return pd.DataFrame(columns=["model", "error_type", "n", "example"])
    failed = failed.copy()
    if not failures.empty and "error_type" in failures:
        lookup = failures.set_index("cell_id")
        missing_type = failed["error_type"].isna()
        failed.loc[missing_type, "error_type"] = failed.loc[missing_type, "cell_id"].map(
            lookup["error_type"]
        )
        if "error" in lookup:
            err = failed["cell_id"].map(lookup["error"])
            failed["error"] = failed["error"].fillna(err) if "error" in failed else err
    failed["error_type"] = failed["error_type"].fillna("unknown").astype(str)
    if "error" not in failed:
        failed["error"] = ""
    rows = []
    for (model, etype), sub in failed.groupby(["model", "error_type"], sort=True):
        first = str(sub["error"].dropna().iloc[0]) if sub["error"].notna().any() else ""
        rows.append({"model": model, "error_type": etype, "n": len(sub),
                     "example": first.strip().splitlines()[0][:200] if first.strip() else ""})
    return pd.DataFrame(rows, columns=["model", "error_type", "n", "example"])


# --- the whole analysis -------------------------------------------------------------------


@dataclass
class StatsResult:
    """Everything `rloop-ray stats` computes for one results folder."""

    results: ResultSet
    metrics: list[str]
    conditions: pd.DataFrame
    comparisons: pd.DataFrame
    transfer: pd.DataFrame
    dose: pd.DataFrame
    correlations: pd.DataFrame
    side_by_side: pd.DataFrame
    transfer_side_by_side: pd.DataFrame
    failures: pd.DataFrame
    completeness: Completeness
    fdr_family_size: int
    q: float
    confidence: float
    settings: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Name -> table, as written under `stats/` (one Parquet file each)."""
        return {
            "conditions": self.conditions,
            "comparisons": self.comparisons,
            "transfer": self.transfer,
            "dose_response": self.dose,
            "correlations": self.correlations,
            "models_side_by_side": self.side_by_side,
            "models_transfer": self.transfer_side_by_side,
            "failures": self.failures,
        }


def run_stats(
    results_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    q: float = 0.05,
) -> StatsResult:
    """Load a results folder and compute every table (nothing is written)."""
    results = load_results(results_dir)
    cells = results.cells
    present = metric_columns(cells) if not cells.empty else []
    if metrics:
        unknown = [m for m in metrics if m not in present]
        if unknown:
            raise ValueError(
                f"Unknown metric(s) {unknown}. Available in {results.path}: {present}"
            )
        chosen = list(metrics)
    else:
        chosen = present
    if cells.empty:
        empty = pd.DataFrame()
        conditions, comparisons, transfer = (
            pd.DataFrame(columns=_CONDITION_SUMMARY_COLUMNS),
            pd.DataFrame(columns=COMPARISON_COLUMNS),
            pd.DataFrame(columns=_TRANSFER_COLUMNS),
        )
        dose = pd.DataFrame(columns=_DOSE_COLUMNS)
        corr = pd.DataFrame(columns=_CORR_COLUMNS)
        fails = pd.DataFrame(columns=["model", "error_type", "n", "example"])
        family = 0
        side = tside = empty
    else:
        conditions = summarize_conditions(cells, chosen, confidence)
        comparisons = compare_conditions(cells, chosen, manifest=results.manifest,
                                         confidence=confidence)
        transfer = transfer_efficiency(cells, chosen, seed=seed, n_resamples=n_resamples,
                                       confidence=confidence, manifest=results.manifest)
        dose = dose_response(cells, chosen)
        corr = behaviour_correlations(cells, chosen)
        family = apply_fdr([
            (comparisons, "p", "p_fdr"),
            (dose, "p", "p_fdr"),
            (corr, "pearson_p", "pearson_p_fdr"),
            (corr, "spearman_p", "spearman_p_fdr"),
        ], q=q)
        side = models_side_by_side(comparisons)
        tside = transfer_side_by_side(transfer)
        fails = failure_summary(cells, results.failures)
    return StatsResult(
        results=results, metrics=chosen, conditions=conditions, comparisons=comparisons,
        transfer=transfer, dose=dose, correlations=corr, side_by_side=side,
        transfer_side_by_side=tside, failures=fails, completeness=completeness(results),
        fdr_family_size=family, q=q, confidence=confidence,
        settings={"seed": seed, "n_resamples": n_resamples, "confidence": confidence, "q": q},
    )


def write_tables(result: StatsResult, out_dir: str | Path | None = None) -> list[Path]:
    """Write every table as Parquet under `out_dir` (default `<results>/stats/`)."""
    folder = Path(out_dir) if out_dir else result.results.path / STATS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in result.tables().items():
        path = folder / f"{name}.parquet"
        tmp = folder / f".{name}.parquet.tmp"
        _to_parquet_safe(table).to_parquet(tmp, index=False)
        tmp.replace(path)
        written.append(path)
    summary = folder / "summary.json"
    tmp = folder / ".summary.json.tmp"
    tmp.write_text(json.dumps({
        "completeness": result.completeness.to_dict(),
        "metrics": result.metrics,
        "fdr_family_size": result.fdr_family_size,
        "settings": result.settings,
    }, indent=2), encoding="utf-8")
    tmp.replace(summary)
    written.append(summary)
    return written


def _to_parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns of mixed types become strings so Arrow can type them."""
    out = table.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col].dropna()}
            if len(kinds) > 1 or (kinds and not kinds <= {str, bool}):
                out[col] = out[col].map(lambda v: v if v is None else str(v))
    return out


# --- plain-language notes -----------------------------------------------------------------


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
        return notes
    attributed = cells[cells["attributed"]]
    notes.append(Note("scope", (
        f"{comp.n_done} cells in {attributed['condition'].nunique()} conditions over "
        f"{attributed['model'].nunique()} model(s); {comp.n_ok} ok, {comp.n_failed} failed. "
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
            "The manifest records no total cell count, so completeness cannot be checked."
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
        if comp.n_failed_unattributed:
            notes.append(Note("failures", (
                f"{comp.n_failed_unattributed} failures are known only from failures/ "
                f"without grid coordinates: counted in the totals, not in any condition."
            ), "warning"))
    else:
        notes.append(Note("failures", "No cell failed."))
    if comp.n_recovered:
        notes.append(Note("failures", f"{comp.n_recovered} cells failed once and succeeded "
                                      f"on a retry; only the successful row is used."))
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
    notes.extend(_alpha_zero_notes(result))
    notes.extend(_transfer_notes(result))
    notes.extend(_dose_notes(result))
    notes.extend(_model_notes(result))
    return notes


def _transplant_notes(result: StatsResult) -> list[Note]:
    cmp = result.comparisons
    src = cmp[(cmp["comparison"] == "source_natural")
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
    vs_patch = cmp[cmp["comparison"].str.startswith("control_vs_patch:")
                   & cmp["metric"].isin(primary_metrics(result.metrics))]
    effect = cmp.set_index(["model", "a", "metric"]).sort_index()
    lines_by_control: dict[str, list[str]] = {}
    moved_alone: dict[str, list[str]] = {}
    unresolved: dict[str, list[str]] = {}
    for _, row in vs_patch.iterrows():
        ctrl = row["control"]
        if ctrl == "self":
            continue
        key_ctrl = (row["model"], row["a"], row["metric"])
        key_patch = (row["model"], row["b"], row["metric"])
        if key_ctrl not in effect.index or key_patch not in effect.index:
            continue
        ce = _first_effect(effect.loc[key_ctrl], f"control:{ctrl}")
        pe = _first_effect(effect.loc[key_patch], ("sufficiency", "necessity", "patch_effect"))
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
    selfc = cmp[(cmp["comparison"] == "control:self")
                & cmp["metric"].isin(primary_metrics(result.metrics))]
    if not selfc.empty:
        bad = selfc[selfc["p_fdr"] < q]
        if len(bad):
            lines = [f"{r['model']}, {r['metric']} at {_point_of(r)} (p_fdr="
                     f"{_fmt_p(r['p_fdr'])})" for _, r in bad.iterrows()]
            notes.append(Note("self_check", (
                "The 'self' control (source = target) differs from natural, which it must "
                "not: suspect the intervention code. " + _capped(lines)
            ), "warning"))
        else:
            notes.append(Note("self_check", (
                f"The 'self' control is indistinguishable from natural in all {len(selfc)} "
                f"comparisons, as it must be."
            )))
    return notes


def _alpha_zero_notes(result: StatsResult) -> list[Note]:
    """alpha = 0 must reproduce the unpatched run: any effect there is an implementation bug."""
    cmp = result.comparisons
    zero = cmp[(cmp["alpha"] == 0.0) & ~cmp["comparison"].str.startswith("control_vs_patch")
               & (cmp["comparison"] != "source_natural")
               & cmp["metric"].isin(primary_metrics(result.metrics))]
    if zero.empty:
        return []
    bad = zero[zero["p_fdr"] < result.q]
    if bad.empty:
        return [Note("alpha_zero", (
            f"Cells patched with alpha = 0 are indistinguishable from natural in all "
            f"{len(zero)} comparisons, as they must be (alpha = 0 is the unpatched run)."
        ))]
    lines = [f"{r['model']}, {r['metric']}, '{r['a']}' (p_fdr={_fmt_p(r['p_fdr'])})"
             for _, r in bad.iterrows()]
    return [Note("alpha_zero", (
        "Cells patched with alpha = 0 differ from natural, which they must not (alpha = 0 "
        "reproduces the unpatched run): suspect the intervention code. " + _capped(lines)
    ), "warning")]


def _first_effect(
    block: pd.DataFrame | pd.Series, names: str | tuple[str, ...]
) -> pd.Series | None:
    frame = block.to_frame().T if isinstance(block, pd.Series) else block
    wanted = (names,) if isinstance(names, str) else names
    hit = frame[frame["comparison"].isin(wanted)]
    return None if hit.empty else hit.iloc[0]


def _point_of(row: pd.Series) -> str:
    return point_label(*(row[c] for c in POINT_COLS))


def _transfer_notes(result: StatsResult) -> list[Note]:
    tr = result.transfer
    if tr.empty:
        return []
    notes: list[Note] = []
    cmp = result.comparisons
    group = cmp[(cmp["comparison"] == "group_effect") & cmp["a"].str.startswith("B:")
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


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def spec_sort_key(spec: str) -> tuple[float, float, str]:
    """Order layer/token specs by their numbers ('8:16' before '16:32'), then by text."""
    nums = [float(x) for x in NUMBER.findall(str(spec))]
    first = nums[0] if nums else math.inf
    second = nums[1] if len(nums) > 1 else first
    return (first, second, str(spec))

