"""A sweep read back for analysis: the store's tables, normalised, plus human ratings.

The store is the only reader of a sweep folder (`ResultStore.read_sweep`): it knows the
plan, so rows of an earlier plan are excluded and counted instead of mixed in, and it
names a damaged shard instead of skipping it. This module adds what the analysis needs
on top: pandas frames with comparable coordinates (`normalise_cells`), the latest failure
record per cell, and the `score_human` column that `rloop-ray rate import` leaves beside
the cells. Nothing here writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from rloop_ray.analysis.labels import HUMAN_SCORE, normalise_cells
from rloop_ray.store import ResultStore
from rloop_ray.vocab import STATUS_OK

HUMAN_SCORES_FILE = Path("rating") / "score_human.parquet"
"""Where `rloop-ray rate import` leaves the per-cell human score (analysis/rating.py)."""


class NotLocalError(ValueError):
    """Outputs (tables, figures, ratings) need a local folder and the sweep is not on one."""


@dataclass
class ResultSet:
    """A sweep read back: one row per planned cell, plus what the reader had to decide."""

    source: str
    """The path or URI the sweep was read from, as given."""
    local_dir: Path | None
    """The sweep folder on local disk (a path or `file://`), None on object stores."""
    manifest: dict[str, Any]
    cells: pd.DataFrame
    """One row per planned cell id (ok and failed), normalised by `normalise_cells`."""
    failures: pd.DataFrame
    """Failure records from `failures/`, one per cell id (latest attempt)."""
    planned: dict[str, int] | None = None
    """Planned cells per model; None for a legacy manifest without a plan."""
    n_duplicate_rows: int = 0
    """Rows of planned cells collapsed by the dedupe (retries, resumes, a shard twice)."""
    n_stale_rows: int = 0
    """Rows of cells outside the plan (an earlier plan of this folder), excluded."""
    n_recovered: int = 0
    """Cells that failed once and then succeeded on a retry."""

    @property
    def n_expected(self) -> int | None:
        """Cells the sweep plans (None when the manifest records no plan)."""
        return None if self.planned is None else sum(self.planned.values())

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.source.rstrip("/").rsplit("/", 1)[-1])

    def out_dir(self, out: str | os.PathLike[str] | None = None, *, purpose: str) -> Path:
        """Where outputs go: `out` if given, else the sweep folder when it is local."""
        if out is not None:
            return Path(out)
        if self.local_dir is None:
            raise NotLocalError(
                f"{self.source} is not a local folder, so {purpose} cannot be written into "
                f"it: give an output folder (`--out DIR`, `out_dir=`)"
            )
        return self.local_dir


def _latest_failures(failures: pd.DataFrame) -> pd.DataFrame:
    """The latest attempt's failure record per cell (earlier attempts are history)."""
    if failures.empty:
        return failures.reset_index(drop=True)
    ordered = failures.sort_values("attempt", kind="stable", na_position="first")
    return ordered.drop_duplicates("cell_id", keep="last").reset_index(drop=True)


def _join_human_scores(cells: pd.DataFrame, local_dir: Path | None) -> pd.DataFrame:
    """Add `score_human` from the ratings file, when the sweep has one and cells exist."""
    path = None if local_dir is None else local_dir / HUMAN_SCORES_FILE
    if path is None or not path.is_file() or cells.empty:
        return cells
    try:
        human = pd.read_parquet(path, columns=["cell_id", HUMAN_SCORE])
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise ValueError(f"{path}: unreadable human scores ({exc}); import the rating "
                         f"sheets again (`rloop-ray rate import`) to rebuild it") from exc
    return cells.drop(columns=[HUMAN_SCORE], errors="ignore").merge(
        human, on="cell_id", how="left")


def load_results(source: str | os.PathLike[str]) -> ResultSet:
    """Read a sweep (a local path or a URI) through the store.

    Raises the store's `NotASweepError` for a folder without a manifest and
    `DamagedFileError` (naming the file) for a shard or manifest that cannot be read.
    """
    store = ResultStore(source)
    tables = store.read_sweep()
    cells = tables.cells.to_pandas()
    failures = _latest_failures(tables.failures.to_pandas())
    ok_ids = set(cells.loc[cells["status"] == STATUS_OK, "cell_id"]) if len(cells) else set()
    n_recovered = int(failures["cell_id"].isin(ok_ids).sum()) if len(failures) else 0
    cells = _join_human_scores(cells, tables.local_dir)
    return ResultSet(
        source=os.fspath(source),
        local_dir=tables.local_dir,
        manifest=tables.manifest,
        cells=normalise_cells(cells),
        failures=failures,
        planned=tables.planned,
        n_duplicate_rows=tables.n_attempt_rows - tables.cells.num_rows,
        n_stale_rows=tables.n_stale_rows,
        n_recovered=n_recovered,
    )
