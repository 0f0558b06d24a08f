"""Synthetic sweeps with known effects, for testing stats, figures and rating.

A real sweep needs a model; the statistics do not. `make_sweep` writes a sweep through
`ResultStore`, as the driver does (a manifest with a plan, `cells/` shards, failure
records), with metric values drawn from normal distributions whose means per condition
are chosen by the test, so every statistic has a known answer and can be checked against
a direct scipy computation.

Design of the synthetic grid (it mirrors the classic one):

* `n_prompts` baseline targets `base-i`, recursive targets `rec-i` (levels 1..5 in turn),
  optionally long_control targets `long-i`; natural cells for each (A, B, L);
* at every intervention point and alpha: C (target `base-i`, source `rec-i`), D (target
  `rec-i`, source `base-i`), and the controls on baseline targets (shuffle/random of the
  recursive source, `other` = source `base-(i+1)`, `self` = source `base-i`);
* a value = condition mean + a per-target prompt effect (so paired designs are paired) +
  noise. C and D means move from the natural target's mean by `gain * alpha` of the gap.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.plan import Plan
from rloop_ray.store import ResultStore
from rloop_ray.vocab import (
    BASELINE_GROUP,
    CLASSIC_CONDITIONS,
    LONG_CONTROL_GROUP,
    MIX,
    NATURAL,
    NONE,
    OTHER,
    PATCH,
    RANDOM,
    RECURSIVE_GROUP,
    SELF,
    SHUFFLE,
    STATUS_FAILED,
    STATUS_OK,
    SWEEP_COMPLETE,
    SWEEP_INTERRUPTED,
)

METRICS = ("rv", "score_keywords", "score_self_ref", "score_logprob_contrast")


@dataclass(frozen=True)
class Point:
    """An intervention point; `gain` scales how much of the B-A gap C closes there."""

    site: str = "kv"
    mode: str = MIX
    layers: str = "16:32"
    tokens: str = "all"
    align: str = "end"
    gain: float = 1.0
    during: str | None = None
    """`prefill`, `generation` or `both`; None writes no `during`, as rows written before
    the coordinate existed."""


@dataclass
class Effects:
    """Condition means per metric. C/D are derived: A + gain*alpha*(B-A), B - gain*alpha*(B-A).

    `controls` gives each control's mean shift as a fraction of the B-A gap, applied to the
    baseline target (0 = no effect, 1 = as much as a full transfer).
    """

    a: dict[str, float] = field(default_factory=lambda: {
        "rv": 0.98, "score_keywords": 0.4, "score_self_ref": 0.5, "score_logprob_contrast": -2.0,
    })
    b: dict[str, float] = field(default_factory=lambda: {
        "rv": 0.90, "score_keywords": 6.0, "score_self_ref": 4.0, "score_logprob_contrast": 1.0,
    })
    noise: dict[str, float] = field(default_factory=lambda: {
        "rv": 0.02, "score_keywords": 1.0, "score_self_ref": 0.8, "score_logprob_contrast": 0.5,
    })
    prompt_sd: float = 0.5
    """Per-target prompt effect, in units of each metric's noise sd."""
    controls: dict[str, float] = field(default_factory=lambda: {
        SHUFFLE: 0.0, RANDOM: 0.0, OTHER: 0.0, SELF: 0.0,
    })
    level_slope: dict[str, float] = field(default_factory=lambda: {"rv": -0.01})
    """Change of the recursive-natural mean per recursion level (levels 1..5, centred at 3)."""
    model_scale: dict[str, float] = field(default_factory=dict)
    """Per model, a factor on every B-A gap (0 makes that model a null)."""
    prompt_offset: float = 0.05
    """How much lower the prompt-side R_V (step 0) of recursive targets is than their R_V."""

    @classmethod
    def null(cls) -> Effects:
        """Every condition has the same mean: nothing should survive FDR."""
        same = {"rv": 0.95, "score_keywords": 1.0, "score_self_ref": 1.0,
                "score_logprob_contrast": 0.0}
        return cls(a=dict(same), b=dict(same), level_slope={}, prompt_offset=0.0)


@dataclass
class SyntheticSweep:
    path: Path | str
    """The sweep folder, or its URI when `make_sweep` was given one."""
    cells: pd.DataFrame
    """Every planned cell (before any partial drop), with the values written."""
    written: pd.DataFrame
    """The rows actually written (after partial drop and failures)."""
    n_total: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Every planned cell as a store row (before failures), e.g. to write a retry."""


def _cell_id(coords: dict[str, Any]) -> str:
    text = json.dumps(coords, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_sweep(
    root: str | Path,
    name: str = "synthetic",
    *,
    models: Sequence[str] = ("llama-tiny", "mistral-tiny"),
    n_prompts: int = 20,
    points: Sequence[Point] = (Point(),),
    alphas: Sequence[float] = (1.0,),
    controls: Sequence[str] = (SHUFFLE, RANDOM, OTHER, SELF),
    effects: Effects | None = None,
    long_control: bool = False,
    trajectory_steps: int = 12,
    fail_every: int = 0,
    nan_rv_every: int = 0,
    keep_fraction: float = 1.0,
    duplicate_rows: int = 0,
    stale_rows: int = 0,
    skip: Callable[[dict[str, Any]], bool] | None = None,
    write_plan: bool = True,
    extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    seed: int = 0,
) -> SyntheticSweep:
    """Write `root/name/` through the store like a sweep would; return what was written.

    `fail_every=k` marks every k-th cell failed (row in cells/ with status failed, plus a
    record in failures/); `nan_rv_every=k` leaves R_V null with a reason on every k-th ok
    cell; `keep_fraction<1` writes a seeded subset (a partial sweep); `duplicate_rows`
    re-writes rows in another shard (readers must dedupe); `stale_rows` writes rows of
    cells outside the plan (as an earlier plan would have left); `skip(row)` true keeps a
    planned cell unwritten; `write_plan=False` writes no plan (a legacy sweep, whose
    completeness is unknown); `extra(row)` returns more columns for a row (layer profiles,
    attention, KL), from the row's coordinates, so the sweep's own draws do not change.
    `root` may be a URI (`file://...`, `memory://...`).
    """
    eff = effects or Effects()
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    metrics = [m for m in METRICS if m in eff.a]
    prompt_effect = {}
    extra_keys: set[str] = set()

    def value(metric: str, mean: float, target: str) -> float:
        key = (metric, target)
        if key not in prompt_effect:
            prompt_effect[key] = rng.normal(0.0, eff.prompt_sd * eff.noise[metric])
        return float(mean + prompt_effect[key] + rng.normal(0.0, eff.noise[metric]))

    def add(model: str, coords: dict[str, Any], means: dict[str, float]) -> None:
        target = coords["target_id"]
        row = {"model": model, **coords}
        row["cell_id"] = _cell_id(row)
        row["unit_id"] = _cell_id({"model": model, "s": coords["source_id"], "t": target})
        row.update({m: value(m, means[m], target) for m in metrics})
        row["rv_prompt"] = float(row["rv"] - eff.prompt_offset * (coords["target_group"]
                                                                  == RECURSIVE_GROUP))
        if trajectory_steps:
            steps = np.linspace(row["rv_prompt"], row["rv"], trajectory_steps)
            noise = rng.normal(0, 0.005, len(steps))
            row["rv_trajectory"] = [float(v) for v in steps + noise]
        else:
            row["rv_trajectory"] = None
        row["score_technical"] = float(rng.normal(1.0, 0.5))
        row["pr_early"] = float(10 + rng.normal(0, 0.5))
        row["pr_late"] = float(row["rv"] * row["pr_early"])
        row["rv_status"] = STATUS_OK
        row["status"] = STATUS_OK
        row["generated_text"] = (
            f"Synthetic continuation {len(rows)}: the model describes "
            f"{'its own processing' if row['score_self_ref'] > 2 else 'the weather'}."
        )
        row["n_generated"] = 32
        row["attempt"] = 1
        row["worker"] = "synthetic"
        if extra is not None:
            added = extra(row)
            extra_keys.update(added)
            row.update(added)
        rows.append(row)

    groups = [BASELINE_GROUP, RECURSIVE_GROUP] + ([LONG_CONTROL_GROUP] if long_control else [])
    prefix = {BASELINE_GROUP: "base", RECURSIVE_GROUP: "rec", LONG_CONTROL_GROUP: "long"}
    for model in models:
        scale = eff.model_scale.get(model, 1.0)
        gap = {m: scale * (eff.b[m] - eff.a[m]) for m in metrics}
        nat = {
            BASELINE_GROUP: dict(eff.a),
            RECURSIVE_GROUP: {m: eff.a[m] + gap[m] for m in metrics},
            LONG_CONTROL_GROUP: dict(eff.a),
        }
        for group in groups:
            for i in range(n_prompts):
                level = (i % 5) + 1 if group == RECURSIVE_GROUP else None
                means = dict(nat[group])
                if level is not None:
                    for m, slope in eff.level_slope.items():
                        means[m] += slope * (level - 3)
                add(model, {
                    "source_id": None, "target_id": f"{prefix[group]}-{i:02d}",
                    "source_group": None, "target_group": group, "source_level": None,
                    "target_level": level, "pair_index": i, "site": NONE, "mode": None,
                    "layers": None, "tokens": None, "align": None, "alpha": None,
                    "control": NATURAL, "seed": 0,
                }, means)
        for point in points:
            for alpha in alphas:
                shift = {m: point.gain * alpha * gap[m] for m in metrics}
                base = {
                    "site": point.site, "mode": point.mode, "layers": point.layers,
                    "tokens": point.tokens, "align": point.align, "alpha": float(alpha),
                    "seed": 0, **({} if point.during is None else {"during": point.during}),
                }
                for i in range(n_prompts):
                    level = (i % 5) + 1
                    add(model, {**base, "source_id": f"rec-{i:02d}",
                                "target_id": f"base-{i:02d}", "source_group": RECURSIVE_GROUP,
                                "target_group": BASELINE_GROUP, "source_level": level,
                                "target_level": None, "pair_index": i, "control": PATCH},
                        {m: nat[BASELINE_GROUP][m] + shift[m] for m in metrics})
                    add(model, {**base, "source_id": f"base-{i:02d}",
                                "target_id": f"rec-{i:02d}", "source_group": BASELINE_GROUP,
                                "target_group": RECURSIVE_GROUP, "source_level": None,
                                "target_level": level, "pair_index": i, "control": PATCH},
                        {m: nat[RECURSIVE_GROUP][m] - shift[m] for m in metrics})
                    for ctrl in controls:
                        source = {
                            SHUFFLE: ("rec", i, RECURSIVE_GROUP),
                            RANDOM: ("rec", i, RECURSIVE_GROUP),
                            OTHER: ("base", (i + 1) % n_prompts, BASELINE_GROUP),
                            SELF: ("base", i, BASELINE_GROUP),
                        }[ctrl]
                        frac = eff.controls.get(ctrl, 0.0)
                        add(model, {**base, "source_id": f"{source[0]}-{source[1]:02d}",
                                    "target_id": f"base-{i:02d}", "source_group": source[2],
                                    "target_group": BASELINE_GROUP,
                                    "source_level": level if source[2] == RECURSIVE_GROUP
                                    else None,
                                    "target_level": None, "pair_index": i, "control": ctrl},
                            {m: nat[BASELINE_GROUP][m] + frac * alpha * gap[m] for m in metrics})

    planned = [dict(r) for r in rows]
    written_rows = [dict(r) for r in rows if skip is None or not skip(r)]
    if fail_every:
        for row in written_rows[::fail_every]:
            for col in (*metrics, "rv_prompt", "pr_early", "pr_late", "score_technical",
                        *extra_keys):
                row[col] = None
            row.update(rv_trajectory=None, generated_text=None, status=STATUS_FAILED,
                       rv_status=None, error_type="RuntimeError",
                       error="synthetic failure\nTraceback: ...")
    if nan_rv_every:
        ok_rows = [r for r in written_rows if r["status"] == STATUS_OK]
        for row in ok_rows[1::nan_rv_every]:
            row.update(rv=None, rv_status="too_few_tokens:5<16")
    if keep_fraction < 1.0:
        keep = rng.random(len(written_rows)) < keep_fraction
        written_rows = [r for r, k in zip(written_rows, keep, strict=True) if k]

    path: Path | str = (f"{root}/{name}" if "://" in str(root) else Path(root) / name)
    store = ResultStore(path)
    plan = Plan(tuple(r["cell_id"] for r in planned), tuple(r["unit_id"] for r in planned),
                tuple(r["model"] for r in planned))
    store.prepare(_spec(name, models, n_prompts, points, alphas, controls),
                  plan=plan if write_plan else None)
    store.start_run()
    half = len(written_rows) // 2
    store.write_cells(written_rows[:half])
    store.write_cells(written_rows[half:])
    if duplicate_rows:
        store.write_cells(written_rows[:duplicate_rows])
    if stale_rows:
        stale = [{**r, "cell_id": f"stale{i:011d}"} for i, r in enumerate(rows[:stale_rows])]
        store.write_cells(stale)
    store.write_failures([r for r in written_rows if r["status"] == STATUS_FAILED])
    store.finish_run(SWEEP_COMPLETE if keep_fraction >= 1.0 else SWEEP_INTERRUPTED)
    return SyntheticSweep(path=path, cells=pd.DataFrame(planned),
                          written=pd.DataFrame(written_rows), n_total=len(planned),
                          rows=planned)


def _spec(name: str, models: Sequence[str], n_prompts: int, points: Sequence[Point],
          alphas: Sequence[float], controls: Sequence[str]) -> dict[str, Any]:
    """The grid the synthetic sweep pretends to come from (what the manifest records)."""
    return {
        "name": name, "models": [{"id": m} for m in models],
        "prompts": {"conditions": list(CLASSIC_CONDITIONS), "n_pairs": n_prompts},
        "interventions": {
            "site": sorted({p.site for p in points}),
            "layers": sorted({p.layers for p in points}),
            "tokens": sorted({p.tokens for p in points}),
            "alpha": list(alphas),
            "mode": sorted({p.mode for p in points}),
        },
        "controls": [NATURAL, *controls],
    }
