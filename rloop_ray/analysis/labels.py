"""What a cell is, in the analysis's terms: its condition, its label, its metrics.

Every table groups cells by condition and every row names its condition with a label, so
the labels must be comparable across models and across writers: `normalise_cells` turns
whatever a shard holds (strings, numbers, lists, nulls) into one canonical form before
anything is grouped. The whole-cache transplant is classified here too, because both the
comparison plan and the transfer table must treat it apart (docs/statistics.md says why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.vocab import (
    CACHE_SITES,
    NATURAL,
    NONE,
    NONE_LABEL,
    STATUS_OK,
    TRANSPLANT,
    classic_condition,
)

GEOMETRY_METRICS = ("rv", "rv_prompt", "pr_early", "pr_late", "erank_early", "erank_late")
SCORE_PREFIX = "score_"
HUMAN_SCORE = "score_human"
"""The metric `rloop-ray rate import` adds; a missing value there means "not rated"."""
POINT_COLS = ("site", "mode", "layers", "tokens", "align", "alpha")
"""One intervention point: where, how and how strongly a cell was patched."""
CONDITION_COLS = ("model", *POINT_COLS, "control", "source_group", "target_group")
"""A condition: all cells that differ only by prompt (and seed)."""
_STRING_KEYS = ("model", "site", "mode", "layers", "tokens", "align", "control",
                "source_group", "target_group")
ALL_LAYER_SPECS = frozenset({"all", ":", "0:", "0%:100%", ":100%", "0%:", "0:100%"})
"""Layer specs that always mean every layer of the model, whatever its depth."""


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
    if site == NONE:
        return NONE_LABEL
    return f"{site}/{mode} L={layers} T={tokens} align={align} alpha={_fmt_alpha(alpha)}"


def condition_letter(control: str, source_group: str, target_group: str) -> str:
    """A/B/C/D of the classic design (vocab.classic_condition), `""` for any other cell."""
    return classic_condition(control, target_group, source_group) or ""


def condition_label(row: pd.Series | dict[str, Any]) -> str:
    """Model-independent label of a condition, e.g. `C: patch recursive->baseline @ kv/...`."""
    letter = condition_letter(row["control"], row["source_group"], row["target_group"])
    prefix = f"{letter}: " if letter else ""
    if row["control"] == NATURAL:
        return f"{prefix}{NATURAL} {row['target_group']}"
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
    df["status"] = df["status"].fillna(STATUS_OK).astype(str)
    natural = (df["control"] == NATURAL) | (df["site"] == NONE)
    df.loc[natural, "control"] = NATURAL
    df.loc[natural, "site"] = NONE
    for col in ("mode", "layers", "tokens", "align", "source_group"):
        df.loc[natural, col] = NONE_LABEL
    df.loc[natural, "alpha"] = np.nan
    df["is_natural"] = natural
    if df.empty:
        for col in ("point", "condition", "letter"):
            df[col] = pd.Series(dtype=object)
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
    return [c for c in candidates if pd.to_numeric(cells[c], errors="coerce").notna().any()]


def primary_metrics(metrics: Sequence[str]) -> list[str]:
    """R_V and the behaviour scores: what the findings talk about (PR and effective rank
    are diagnostics of R_V, kept in the tables)."""
    main = [m for m in metrics if m == "rv" or m.startswith(SCORE_PREFIX)]
    return main or list(metrics)


def numeric(cells: pd.DataFrame, metric: str) -> pd.Series:
    """A metric column as float: shards may hold it as int, object or with None."""
    return pd.to_numeric(cells[metric], errors="coerce").astype(float)


# --- the whole-cache transplant -----------------------------------------------------------


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
    """Cells whose cache transplant replaces every layer (the 'continue the source' confound)."""
    depths = _model_depths(manifest or {})
    patched = cells["patched_layers"] if "patched_layers" in cells else pd.Series(
        [None] * len(cells), index=cells.index
    )
    mask = [
        site in CACHE_SITES and mode == TRANSPLANT
        and is_all_layers(layers, pl, depths.get(model))
        for site, mode, layers, pl, model in zip(
            cells["site"], cells["mode"], cells["layers"], patched, cells["model"], strict=True
        )
    ]
    return pd.Series(mask, index=cells.index, dtype=bool)
