"""The whole analysis of one sweep: every table, one FDR family, written as Parquet.

`compute_stats` runs the estimators over a loaded sweep and applies Benjamini-Hochberg
once over every p-value the tables report (comparisons, dose-response, correlations), so
that a grid of hundreds of points cannot produce "significant" cells by chance; the
tables are computed the same way for a partial sweep as for a finished one.
`write_tables` puts them under `stats/` (one Parquet file each plus `summary.json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.analysis.comparisons import COMPARISON_COLUMNS, compare_conditions
from rloop_ray.analysis.completeness import (
    FAILURE_SUMMARY_COLUMNS,
    Completeness,
    completeness,
    failure_summary,
)
from rloop_ray.analysis.conditions import CONDITION_SUMMARY_COLUMNS, summarize_conditions
from rloop_ray.analysis.effects import (
    CORRELATION_COLUMNS,
    DOSE_COLUMNS,
    TRANSFER_COLUMNS,
    behaviour_correlations,
    dose_response,
    models_side_by_side,
    transfer_efficiency,
    transfer_side_by_side,
)
from rloop_ray.analysis.estimators import fdr_adjust
from rloop_ray.analysis.labels import metric_columns
from rloop_ray.analysis.load import ResultSet, load_results
from rloop_ray.analysis.profiles import (
    ATTENTION_TABLE_COLUMNS,
    PROFILE_COLUMNS,
    attention_table,
    profile_table,
)

STATS_DIR = "stats"
SUMMARY_FILE = "summary.json"


@dataclass
class StatsResult:
    """Everything `rloop-ray stats` computes for one sweep."""

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
    profiles: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PROFILE_COLUMNS))
    """Per condition and profile layer: PR and R_V by depth (analysis/profiles.py)."""
    attention: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=ATTENTION_TABLE_COLUMNS))
    """Per condition and layer: attention entropy and masses (analysis/profiles.py)."""

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
            "profiles": self.profiles,
            "attention": self.attention,
        }


def apply_fdr(tables: Iterable[tuple[pd.DataFrame, str, str]], q: float = 0.05) -> int:
    """Benjamini-Hochberg over every (table, p column) given, as ONE family; in place.

    Each entry is `(frame, p_column, p_fdr_column)`; a frame with a `significant` column
    gets it set from `p_fdr`. Returns the family size (p-values that are not NaN).
    """
    entries = list(tables)
    if not entries:
        return 0
    chunks = [pd.to_numeric(frame[p_col], errors="coerce").to_numpy(float)
              for frame, p_col, _ in entries]
    allp = np.concatenate(chunks)
    adjusted = fdr_adjust(allp)
    start = 0
    for (frame, _, out_col), chunk in zip(entries, chunks, strict=True):
        frame[out_col] = adjusted[start:start + len(chunk)]
        if "significant" in frame.columns and out_col == "p_fdr":
            frame["significant"] = frame[out_col] < q
        start += len(chunk)
    return int(np.isfinite(allp).sum())


def _chosen_metrics(results: ResultSet, metrics: Sequence[str] | None) -> list[str]:
    present = metric_columns(results.cells)
    if not metrics:
        return present
    unknown = [m for m in metrics if m not in present]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}. Available in {results.source}: {present}")
    return list(metrics)


def compute_stats(
    results: ResultSet,
    *,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    q: float = 0.05,
) -> StatsResult:
    """Every table of a loaded sweep (nothing is written)."""
    cells = results.cells
    chosen = _chosen_metrics(results, metrics)
    settings = {"seed": seed, "n_resamples": n_resamples, "confidence": confidence, "q": q}
    if cells.empty:
        return StatsResult(
            results=results, metrics=chosen,
            conditions=pd.DataFrame(columns=CONDITION_SUMMARY_COLUMNS),
            comparisons=pd.DataFrame(columns=COMPARISON_COLUMNS),
            transfer=pd.DataFrame(columns=TRANSFER_COLUMNS),
            dose=pd.DataFrame(columns=DOSE_COLUMNS),
            correlations=pd.DataFrame(columns=CORRELATION_COLUMNS),
            side_by_side=pd.DataFrame(), transfer_side_by_side=pd.DataFrame(),
            failures=pd.DataFrame(columns=FAILURE_SUMMARY_COLUMNS),
            completeness=completeness(results), fdr_family_size=0, q=q,
            confidence=confidence, settings=settings,
        )
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
    return StatsResult(
        results=results, metrics=chosen,
        conditions=summarize_conditions(cells, chosen, confidence),
        comparisons=comparisons, transfer=transfer, dose=dose, correlations=corr,
        side_by_side=models_side_by_side(comparisons),
        transfer_side_by_side=transfer_side_by_side(transfer),
        failures=failure_summary(cells, results.failures),
        completeness=completeness(results), fdr_family_size=family, q=q,
        confidence=confidence, settings=settings,
        profiles=profile_table(cells, seed=seed, n_resamples=n_resamples,
                               confidence=confidence),
        attention=attention_table(cells),
    )


def run_stats(
    source: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    q: float = 0.05,
) -> StatsResult:
    """Load a sweep (a local path or a URI) and compute every table (nothing is written)."""
    return compute_stats(load_results(source), metrics=metrics, seed=seed,
                         n_resamples=n_resamples, confidence=confidence, q=q)


def _to_parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns of mixed types become strings so Arrow can type them."""
    out = table.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col].dropna()}
            if len(kinds) > 1 or (kinds and not kinds <= {str, bool}):
                out[col] = out[col].map(lambda v: v if v is None else str(v))
    return out


def _replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write beside `path` and rename, so a reader never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def write_tables(result: StatsResult, out_dir: str | os.PathLike[str] | None = None
                 ) -> list[Path]:
    """Write every table as Parquet under `out_dir` (default `<sweep folder>/stats/`)."""
    folder = (Path(out_dir) if out_dir is not None
              else result.results.out_dir(purpose="the stats tables") / STATS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in result.tables().items():
        path = folder / f"{name}.parquet"
        safe = _to_parquet_safe(table)
        _replace_file(path, lambda tmp, safe=safe: safe.to_parquet(tmp, index=False))
        written.append(path)
    summary = json.dumps({
        "completeness": result.completeness.to_dict(),
        "metrics": result.metrics,
        "fdr_family_size": result.fdr_family_size,
        "settings": result.settings,
    }, indent=2)
    path = folder / SUMMARY_FILE
    _replace_file(path, lambda tmp: tmp.write_text(summary, encoding="utf-8"))
    written.append(path)
    return written
