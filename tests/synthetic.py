"""Synthetic results folders with known effects, for testing stats, figures and rating.

A real sweep needs a model; the statistics do not. `make_sweep` writes what the store
writes (`manifest.json`, `cells/*.parquet`, `failures/`) with metric values drawn from
normal distributions whose means per condition are chosen by the test, so every
statistic has a known answer and can be checked against a direct scipy computation.

Design of the synthetic grid (it mirrors the classic one, DESIGN §3):

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("rv", "score_keywords", "score_self_ref", "score_logprob_contrast")


@dataclass(frozen=True)
class Point:
    """An intervention point; `gain` scales how much of the B-A gap C closes there."""

    site: str = "kv"
    mode: str = "mix"
    layers: str = "16:32"
    tokens: str = "all"
    align: str = "end"
    gain: float = 1.0


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
        "shuffle": 0.0, "random": 0.0, "other": 0.0, "self": 0.0,
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
    path: Path
    cells: pd.DataFrame
    """Every planned cell (before any partial drop), with the values written."""
    written: pd.DataFrame
    """The rows actually written (after partial drop and failures)."""
    n_total: int


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
    controls: Sequence[str] = ("shuffle", "random", "other", "self"),
    effects: Effects | None = None,
    long_control: bool = False,
    trajectory_steps: int = 12,
    fail_every: int = 0,
    nan_rv_every: int = 0,
    keep_fraction: float = 1.0,
    orphan_failures: int = 0,
    duplicate_rows: int = 0,
    write_total: bool = True,
    seed: int = 0,
) -> SyntheticSweep:
    """Write `root/name/` like a sweep would and return what was written.

    `fail_every=k` marks every k-th cell failed (row in cells/ with status failed, plus a
    record in failures/); `nan_rv_every=k` leaves R_V null with a reason on every k-th ok
    cell; `keep_fraction<1` writes a seeded subset (a partial sweep); `orphan_failures`
    adds failures known only from failures/; `duplicate_rows` re-writes rows in a second
    shard (readers must dedupe).
    """
    eff = effects or Effects()
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    metrics = [m for m in METRICS if m in eff.a]
    prompt_effect = {}

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
                                                                  == "recursive"))
        if trajectory_steps:
            steps = np.linspace(row["rv_prompt"], row["rv"], trajectory_steps)
            noise = rng.normal(0, 0.005, len(steps))
            row["rv_trajectory"] = [float(v) for v in steps + noise]
        else:
            row["rv_trajectory"] = None
        row["score_technical"] = float(rng.normal(1.0, 0.5))
        row["pr_early"] = float(10 + rng.normal(0, 0.5))
        row["pr_late"] = float(row["rv"] * row["pr_early"])
        row["rv_status"] = "ok"
        row["status"] = "ok"
        row["generated_text"] = (
            f"Synthetic continuation {len(rows)}: the model describes "
            f"{'its own processing' if row['score_self_ref'] > 2 else 'the weather'}."
        )
        row["n_generated"] = 32
        row["attempt"] = 1
        row["worker"] = "synthetic"
        rows.append(row)

    groups = ["baseline", "recursive"] + (["long_control"] if long_control else [])
    prefix = {"baseline": "base", "recursive": "rec", "long_control": "long"}
    for model in models:
        scale = eff.model_scale.get(model, 1.0)
        gap = {m: scale * (eff.b[m] - eff.a[m]) for m in metrics}
        nat = {
            "baseline": dict(eff.a),
            "recursive": {m: eff.a[m] + gap[m] for m in metrics},
            "long_control": dict(eff.a),
        }
        for group in groups:
            for i in range(n_prompts):
                level = (i % 5) + 1 if group == "recursive" else None
                means = dict(nat[group])
                if level is not None:
                    for m, slope in eff.level_slope.items():
                        means[m] += slope * (level - 3)
                add(model, {
                    "source_id": None, "target_id": f"{prefix[group]}-{i:02d}",
                    "source_group": None, "target_group": group, "source_level": None,
                    "target_level": level, "pair_index": i, "site": "none", "mode": None,
                    "layers": None, "tokens": None, "align": None, "alpha": None,
                    "control": "natural", "seed": 0,
                }, means)
        for point in points:
            for alpha in alphas:
                shift = {m: point.gain * alpha * gap[m] for m in metrics}
                base = {
                    "site": point.site, "mode": point.mode, "layers": point.layers,
                    "tokens": point.tokens, "align": point.align, "alpha": float(alpha),
                    "seed": 0,
                }
                for i in range(n_prompts):
                    level = (i % 5) + 1
                    add(model, {**base, "source_id": f"rec-{i:02d}",
                                "target_id": f"base-{i:02d}", "source_group": "recursive",
                                "target_group": "baseline", "source_level": level,
                                "target_level": None, "pair_index": i, "control": "patch"},
                        {m: nat["baseline"][m] + shift[m] for m in metrics})
                    add(model, {**base, "source_id": f"base-{i:02d}",
                                "target_id": f"rec-{i:02d}", "source_group": "baseline",
                                "target_group": "recursive", "source_level": None,
                                "target_level": level, "pair_index": i, "control": "patch"},
                        {m: nat["recursive"][m] - shift[m] for m in metrics})
                    for ctrl in controls:
                        source = {
                            "shuffle": ("rec", i, "recursive"), "random": ("rec", i, "recursive"),
                            "other": ("base", (i + 1) % n_prompts, "baseline"),
                            "self": ("base", i, "baseline"),
                        }[ctrl]
                        frac = eff.controls.get(ctrl, 0.0)
                        add(model, {**base, "source_id": f"{source[0]}-{source[1]:02d}",
                                    "target_id": f"base-{i:02d}", "source_group": source[2],
                                    "target_group": "baseline",
                                    "source_level": level if source[2] == "recursive" else None,
                                    "target_level": None, "pair_index": i, "control": ctrl},
                            {m: nat["baseline"][m] + frac * alpha * gap[m] for m in metrics})

    cells = pd.DataFrame(rows)
    written = cells.copy()
    if fail_every:
        failed = written.index[::fail_every]
        for col in (*metrics, "rv_prompt", "pr_early", "pr_late", "score_technical"):
            written.loc[failed, col] = np.nan
        written.loc[failed, "rv_trajectory"] = None
        written.loc[failed, "generated_text"] = None
        written.loc[failed, "status"] = "failed"
        written.loc[failed, "rv_status"] = None
        written.loc[failed, "error_type"] = "RuntimeError"
        written.loc[failed, "error"] = "synthetic failure\nTraceback: ..."
    if nan_rv_every:
        ok_idx = written.index[written["status"] == "ok"][1::nan_rv_every]
        written.loc[ok_idx, "rv"] = np.nan
        written.loc[ok_idx, "rv_status"] = "too_few_tokens:5<16"
    if keep_fraction < 1.0:
        keep = rng.random(len(written)) < keep_fraction
        written = written[keep]
    written = written.reset_index(drop=True)

    path = Path(root) / name
    (path / "cells").mkdir(parents=True, exist_ok=True)
    (path / "failures").mkdir(parents=True, exist_ok=True)
    half = len(written) // 2
    written.iloc[:half].to_parquet(path / "cells" / "part-0001.parquet", index=False)
    written.iloc[half:].to_parquet(path / "cells" / "part-0002.parquet", index=False)
    if duplicate_rows:
        dup = written.iloc[:duplicate_rows]
        dup.to_parquet(path / "cells" / "part-0003.parquet", index=False)
    failures = written[written["status"] == "failed"]
    lines = [json.dumps({"cell_id": r.cell_id, "model": r.model, "error_type": "RuntimeError",
                         "error": "synthetic failure", "attempt": 1, "worker": "synthetic"})
             for r in failures.itertuples()]
    lines += [json.dumps({"cell_id": f"orphan{i:010d}", "error_type": "WorkerDied",
                          "error": "actor died", "attempt": 1}) for i in range(orphan_failures)]
    if lines:
        (path / "failures" / "failures.jsonl").write_text("\n".join(lines) + "\n")
    n_total = len(cells) + orphan_failures
    manifest: dict[str, Any] = {
        "name": name,
        "spec": {
            "name": name, "models": [{"id": m} for m in models],
            "prompts": {"conditions": ["A", "B", "C", "D"], "n_pairs": n_prompts},
            "interventions": {
                "site": sorted({p.site for p in points}),
                "layers": sorted({p.layers for p in points}),
                "tokens": sorted({p.tokens for p in points}),
                "alpha": list(alphas),
                "mode": sorted({p.mode for p in points}),
            },
            "controls": ["natural", *controls],
        },
        "spec_hash": hashlib.sha256(name.encode()).hexdigest(),
        "versions": {"rloop-ray": "0.1.0", "numpy": np.__version__, "pandas": pd.__version__},
        "started_at": "2026-11-25T12:00:00Z",
        "finished_at": "2026-11-25T13:00:00Z" if keep_fraction >= 1.0 else None,
        "status": "complete" if keep_fraction >= 1.0 else "interrupted",
    }
    if write_total:
        manifest["n_cells_total"] = n_total
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return SyntheticSweep(path=path, cells=cells, written=written, n_total=n_total)
