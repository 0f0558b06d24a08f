"""Per-layer tables: the participation-ratio profile over depth, and attention per layer.

R_V compares two layers; the claim behind it is about depth (late layers contract the
value space, early ones do not), which two layers can only sample. A sweep with
`measure.layers` records the participation ratio of V at every profile layer
(`pr_by_layer`, and `pr_prompt_by_layer` on the prompt side), and one with
`measure.attention` the attention entropy and masses at every layer; these are lists in
the rows, never metrics of the tests. Here they become one row per condition and layer:
the mean with a seeded bootstrap interval (a PR is bounded and skewed), and R_V by depth,
PR(layer) over PR at the row's reference layer, so the whole curve reads like R_V.

The reference layer of a row is its early layer (`layer_early`, R_V's own denominator)
when the profile contains it, else the first profile layer; the table names which, so a
curve is never read against the wrong baseline. At the late layer with the early layer
as reference, R_V by depth is the row's `rv` (same tokens, same PR).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.analysis.estimators import bootstrap_mean, mean_or_nan
from rloop_ray.analysis.labels import CONDITION_COLS
from rloop_ray.vocab import (
    ATTENTION_COLUMNS,
    LAYER_EARLY,
    PR_BY_LAYER,
    PR_PROMPT_BY_LAYER,
    PROFILE_LAYERS,
    STATUS_OK,
)

REFERENCE_EARLY = "layer_early"
REFERENCE_FIRST = "first profile layer"
"""How a row's R_V by depth is referenced: its early layer, or the first profile layer."""

_LABEL_COLS = ("condition", "letter", "point")
PROFILE_COLUMNS = (
    *CONDITION_COLS, *_LABEL_COLS, "layer", "n", "n_valid", "mean_pr", "pr_ci_low",
    "pr_ci_high", "n_prompt_valid", "mean_pr_prompt", "reference", "reference_layer",
    "n_rv_valid", "mean_rv_depth", "rv_ci_low", "rv_ci_high", "note",
)
"""Columns of `stats/profiles.parquet` (docs/statistics.md explains each)."""
ENTROPY, MASS_PROMPT, MASS_GENERATED, MASS_PATCHED = ATTENTION_COLUMNS
ATTENTION_TABLE_COLUMNS = (
    *CONDITION_COLS, *_LABEL_COLS, "layer", "n", "mean_entropy", "mean_mass_prompt",
    "mean_mass_generated", "n_patched", "mean_mass_patched", "note",
)
"""Columns of `stats/attention.parquet`."""


def floats(value: Any) -> np.ndarray | None:
    """A list cell as a float array (null elements NaN); None for a missing list."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return np.array([math.nan if v is None else float(v) for v in value], float)
    except (TypeError, ValueError):
        return None


def has_list_column(cells: pd.DataFrame, column: str) -> bool:
    """The column exists and at least one row holds a list in it."""
    return column in cells and any(floats(v) is not None for v in cells[column])


def _groups(cells: pd.DataFrame) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """ok cells per condition, each in cell-id order (the bootstrap does not depend on how
    rows were sharded)."""
    ok = cells[cells["status"] == STATUS_OK].sort_values("cell_id", kind="stable")
    yield from ok.groupby(list(CONDITION_COLS), dropna=False, sort=True)


def _base(key: tuple, group: pd.DataFrame) -> dict[str, Any]:
    return {**dict(zip(CONDITION_COLS, key, strict=True)),
            **{c: group[c].iloc[0] for c in _LABEL_COLS}}


def _reference(layers: np.ndarray, early: Any) -> tuple[int, str]:
    """The index into `layers` of the row's reference layer, and which kind it is."""
    try:
        e = int(early)
    except (TypeError, ValueError):
        e = None
    if e is not None and e in layers:
        return int(np.flatnonzero(layers == e)[0]), REFERENCE_EARLY
    return 0, REFERENCE_FIRST


def _profile_records(group: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One record per (cell, profile layer): PR, prompt PR, R_V by depth, its reference.

    Returns the records and the number of cells whose lists do not line up (skipped)."""
    records: list[dict[str, Any]] = []
    malformed = 0
    early_col = group[LAYER_EARLY] if LAYER_EARLY in group else pd.Series(None, group.index)
    prompt_col = (group[PR_PROMPT_BY_LAYER] if PR_PROMPT_BY_LAYER in group
                  else pd.Series(None, group.index))
    for cell, layers_v, pr_v, prompt_v, early in zip(
            group["cell_id"], group[PROFILE_LAYERS], group[PR_BY_LAYER], prompt_col,
            early_col, strict=True):
        layers, pr, prompt = floats(layers_v), floats(pr_v), floats(prompt_v)
        if layers is None or pr is None:
            continue
        if len(layers) != len(pr) or not len(layers) or (
                prompt is not None and len(prompt) != len(layers)):
            malformed += 1
            continue
        layers = layers.astype(int)
        ref, kind = _reference(layers, early)
        denom = pr[ref]
        usable = np.isfinite(denom) and denom > 0
        for i, layer in enumerate(layers):
            records.append({
                "cell_id": cell, "layer": int(layer), "pr": pr[i],
                "pr_prompt": math.nan if prompt is None else prompt[i],
                "rv_depth": pr[i] / denom if usable else math.nan,
                "reference": kind, "reference_layer": int(layers[ref]),
                "no_reference": not usable,
            })
    return pd.DataFrame(records), malformed


def _reference_text(sub: pd.DataFrame) -> tuple[str, float]:
    """The reference of a layer's cells: `layer_early (L4)`; all of them when mixed."""
    pairs = sorted({(k, int(x)) for k, x in zip(sub["reference"], sub["reference_layer"],
                                                strict=True)}, key=lambda p: (p[1], p[0]))
    text = "; ".join(f"{k} (L{x})" for k, x in pairs)
    layer = float(pairs[0][1]) if len(pairs) == 1 else math.nan
    return text, layer


def profile_table(
    cells: pd.DataFrame, *, seed: int = 0, n_resamples: int = 2000, confidence: float = 0.95
) -> pd.DataFrame:
    """Per model x condition x profile layer: n, mean PR with its bootstrap interval, mean
    prompt PR, and R_V by depth (mean of the cells' PR(layer) / PR(reference layer)) with
    its bootstrap interval. Empty when no cell recorded a profile."""
    if cells.empty or not has_list_column(cells, PROFILE_LAYERS) or PR_BY_LAYER not in cells:
        return pd.DataFrame(columns=PROFILE_COLUMNS)
    rows: list[dict[str, Any]] = []
    for key, group in _groups(cells):
        records, malformed = _profile_records(group)
        if records.empty:
            continue
        base = _base(key, group)
        for layer, sub in records.groupby("layer", sort=True):
            pr = sub["pr"].to_numpy(float)
            prompt = sub["pr_prompt"].to_numpy(float)
            rv = sub["rv_depth"].to_numpy(float)
            pr_ok, prompt_ok, rv_ok = pr[np.isfinite(pr)], prompt[np.isfinite(prompt)], \
                rv[np.isfinite(rv)]
            notes = []
            if len(pr_ok) < len(pr):
                notes.append(f"{len(pr) - len(pr_ok)} cells without a PR at this layer "
                             f"(too few generated tokens)")
            no_ref = int(sub["no_reference"].sum())
            if no_ref:
                notes.append(f"{no_ref} cells without a PR at their reference layer: no R_V "
                             f"by depth")
            if malformed:
                notes.append(f"{malformed} cells whose profile lists differ in length, "
                             f"left out")
            if len(pr_ok) == 1:
                notes.append("one valid cell: no interval")
            reference, reference_layer = _reference_text(sub)
            pr_low, pr_high = bootstrap_mean(pr_ok, seed=seed, n_resamples=n_resamples,
                                             confidence=confidence)
            rv_low, rv_high = bootstrap_mean(rv_ok, seed=seed, n_resamples=n_resamples,
                                             confidence=confidence)
            rows.append({
                **base, "layer": int(layer), "n": len(sub), "n_valid": len(pr_ok),
                "mean_pr": mean_or_nan(pr_ok), "pr_ci_low": pr_low, "pr_ci_high": pr_high,
                "n_prompt_valid": len(prompt_ok), "mean_pr_prompt": mean_or_nan(prompt_ok),
                "reference": reference, "reference_layer": reference_layer,
                "n_rv_valid": len(rv_ok), "mean_rv_depth": mean_or_nan(rv_ok),
                "rv_ci_low": rv_low, "rv_ci_high": rv_high, "note": "; ".join(notes),
            })
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def _layer_means(series: Sequence[Any]) -> tuple[list[np.ndarray], int]:
    """The lists of a column as arrays (missing ones skipped) and the longest length."""
    arrays = [a for a in (floats(v) for v in series) if a is not None]
    return arrays, max((len(a) for a in arrays), default=0)


def _column_at(arrays: Sequence[np.ndarray], layer: int) -> np.ndarray:
    vals = np.array([a[layer] for a in arrays if layer < len(a)], float)
    return vals[np.isfinite(vals)]


def attention_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Per model x condition x layer: mean attention entropy and masses over the cells
    (each cell's value already a mean over its generated queries and heads). The patched
    mass is averaged over the cells that patched a position (`n_patched`). Empty when no
    cell recorded attention."""
    if cells.empty or not has_list_column(cells, ENTROPY):
        return pd.DataFrame(columns=ATTENTION_TABLE_COLUMNS)
    rows: list[dict[str, Any]] = []
    for key, group in _groups(cells):
        columns = {c: _layer_means(group[c]) if c in group else ([], 0)
                   for c in ATTENTION_COLUMNS}
        entropy, depth = columns[ENTROPY]
        if not entropy:
            continue
        base = _base(key, group)
        n_cells = len(entropy)
        for layer in range(depth):
            ent = _column_at(entropy, layer)
            prompt = _column_at(columns[MASS_PROMPT][0], layer)
            generated = _column_at(columns[MASS_GENERATED][0], layer)
            patched = _column_at(columns[MASS_PATCHED][0], layer)
            notes = []
            if len(ent) < n_cells:
                notes.append(f"{n_cells - len(ent)} cells without a value at this layer")
            if not len(patched):
                notes.append("no cell of this condition patched a position: no patched mass")
            elif len(patched) < len(ent):
                notes.append(f"patched mass over the {len(patched)} cells that patched a "
                             f"position")
            rows.append({
                **base, "layer": layer, "n": len(ent), "mean_entropy": mean_or_nan(ent),
                "mean_mass_prompt": mean_or_nan(prompt),
                "mean_mass_generated": mean_or_nan(generated), "n_patched": len(patched),
                "mean_mass_patched": mean_or_nan(patched), "note": "; ".join(notes),
            })
    return pd.DataFrame(rows, columns=ATTENTION_TABLE_COLUMNS)
