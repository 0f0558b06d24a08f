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
    MIX,
    NATURAL,
    NATURAL_ZERO_METRICS,
    NONE,
    NONE_LABEL,
    POINT_COLUMNS,
    PREFILL,
    SELF,
    STATUS_OK,
    STEER,
    STEER_SOURCE_PREFIX,
    TRANSPLANT,
    classic_condition,
    is_steer_source,
)

GEOMETRY_METRICS = ("rv", "rv_prompt", "pr_early", "pr_late", "erank_early", "erank_late")
SCORE_PREFIX = "score_"
HUMAN_SCORE = "score_human"
"""The metric `rloop-ray rate import` adds; a missing value there means "not rated"."""
CONDITION_COLS = ("model", *POINT_COLUMNS, "control", "source_group", "target_group")
"""A condition: all cells that differ only by prompt (and seed). The point is the
vocabulary's (`vocab.POINT_COLUMNS`, `during` included), so two cells that differ only in
when the intervention acts are never pooled into one condition."""
_STRING_KEYS = ("model", "site", "mode", "layers", "tokens", "align", "during", "control",
                "source_group", "target_group")
ALPHA_ZERO = "alpha0"
SELF_CONTROL = "self"
TOLERANCE = 1e-3
"""Largest |difference| (relative to max(1, |natural value|)) that still counts as equal.

Float32 batches with other padding move R_V and log-probabilities by 1e-7..1e-5; no effect a
sweep of tens of prompts can detect is anywhere near 1e-3 of the value."""
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


def during_suffix(during: str) -> str:
    """` during=generation` for a point that does not act on the prefill only, else `""`.

    Prefill is the default (and what every row written before `during` existed did), so its
    labels stay exactly what they were."""
    return "" if during in (PREFILL, NONE, NONE_LABEL) else f" during={during}"


def point_label(site: str, mode: str, layers: str, tokens: str, align: str, alpha: float,
                during: str = PREFILL) -> str:
    """A readable, model-independent name for one intervention point.

    A `steer` point adds a vector (align does not apply) scaled by alpha, which is no mix
    weight: it reads `scale=`, so `alpha=2` is never mistaken for an extrapolated mix."""
    if site == NONE:
        return NONE_LABEL
    if mode == STEER:
        return (f"{site}/{mode} L={layers} T={tokens} scale={_fmt_alpha(alpha)}"
                f"{during_suffix(during)}")
    return (f"{site}/{mode} L={layers} T={tokens} align={align} alpha={_fmt_alpha(alpha)}"
            f"{during_suffix(during)}")


def scope_label(coords: dict[str, Any]) -> str:
    """A condition label with alpha left out: the name of a family that varies alpha."""
    return (condition_label({**coords, "alpha": math.nan})
            .replace(" alpha=-", "").replace(" scale=-", ""))


def condition_letter(control: str, source_group: str, target_group: str) -> str:
    """A/B/C/D of the classic design (vocab.classic_condition), `""` for any other cell."""
    return classic_condition(control, target_group, source_group) or ""


def condition_label(row: pd.Series | dict[str, Any]) -> str:
    """Model-independent label of a condition, e.g. `C: patch recursive->baseline @ kv/...`."""
    letter = condition_letter(row["control"], row["source_group"], row["target_group"])
    prefix = f"{letter}: " if letter else ""
    if row["control"] == NATURAL:
        return f"{prefix}{NATURAL} {row['target_group']}"
    point = point_label(*(row[c] for c in POINT_COLUMNS))
    return f"{prefix}{row['control']} {row['source_group']}->{row['target_group']} @ {point}"


def identity_kind(control: str, mode: str, alpha: float) -> str | None:
    """Which identity a patched cell is by construction (`self` first), or None.

    An alpha = 0 mix keeps none of the source, an alpha = 0 steer adds the zero vector,
    and `self` patches the target with itself (a `self` steer: the zero vector): all run
    the unpatched computation (analysis/identity.py checks them against natural)."""
    if control == SELF:
        return SELF_CONTROL
    if mode in (MIX, STEER) and alpha is not None and np.isfinite(alpha) and alpha == 0.0:
        return ALPHA_ZERO
    return None


def normalise_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Make coordinates comparable: strings for labels, float alpha, natural cells unpatched.

    Natural cells (control `natural` or site `none`) carry no intervention: their point
    fields become `-`, alpha NaN and source group `-`, so that every natural cell of a target
    group falls in one condition whatever the writer put there. A patched row without
    `during` acted on the prefill (the only kind there was); a steer row whose source group
    is missing takes it from its source id (`mean:<group>`).
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
    # rows written before `during` existed were prefill patches (the store backfills them
    # too; a frame built by hand may lack the column altogether)
    df.loc[~natural & df["during"].isin([NONE_LABEL, NONE]), "during"] = PREFILL
    steer = (~natural & (df["source_group"] == NONE_LABEL)
             & df["source_id"].map(is_steer_source).astype(bool))
    df.loc[steer, "source_group"] = [str(s)[len(STEER_SOURCE_PREFIX):]
                                     for s in df.loc[steer, "source_id"]]
    for col in ("mode", "layers", "tokens", "align", "during", "source_group"):
        df.loc[natural, col] = NONE_LABEL
    df.loc[natural, "alpha"] = np.nan
    df["is_natural"] = natural
    if df.empty:
        for col in ("point", "condition", "letter"):
            df[col] = pd.Series(dtype=object)
        return df
    df["point"] = [
        point_label(*vals) for vals in zip(*(df[c] for c in POINT_COLUMNS), strict=True)
    ]
    df["letter"] = [
        condition_letter(c, s, t)
        for c, s, t in zip(df["control"], df["source_group"], df["target_group"], strict=True)
    ]
    df["condition"] = [condition_label(r) for r in df[list(CONDITION_COLS)].to_dict("records")]
    return df


def _is_scalar_column(series: pd.Series) -> bool:
    """False for a column of lists (top-k ids, per-layer profiles): no metric is a list."""
    if series.dtype != object:
        return True
    return not any(isinstance(v, (list, tuple, np.ndarray, dict)) for v in series.dropna())


def metric_columns(cells: pd.DataFrame) -> list[str]:
    """Geometry metrics, `kl_from_natural` and `score_*` columns with at least one number.

    List columns (`top_ids`, `pr_by_layer`, `attn_*`, ...) are never metrics: the per-layer
    ones have their own tables (analysis/profiles.py)."""
    candidates = [c for c in (*GEOMETRY_METRICS, *NATURAL_ZERO_METRICS) if c in cells.columns]
    candidates += sorted(c for c in cells.columns if c.startswith(SCORE_PREFIX))
    return [c for c in candidates if _is_scalar_column(cells[c])
            and pd.to_numeric(cells[c], errors="coerce").notna().any()]


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
