"""Cells that are natural by construction are copied from their natural twin, not decoded.

The copy must be what a full decode gives (checked on the quickstart, both ways, on the
real engine with tiny-llama), a sentinel whose tokens differ must fail loudly, and a
twin that failed must not leave its dependents empty.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

import rloop_ray
import rloop_ray.worker
from rloop_ray.api import load_grid_like
from rloop_ray.derive import (
    SENTINEL_MISMATCH,
    natural_twin_id,
    plan_derivations,
    provably_natural,
)
from rloop_ray.vocab import DERIVED_FROM, NATURAL

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
ENGINE_COLUMNS = ("generated_ids", "generated_text", "stop_reason", "n_generated", "rv",
                  "rv_prompt", "pr_early", "pr_late", "score_keywords",
                  "score_logprob_contrast")


def quickstart_cells():
    return load_grid_like(QUICKSTART, ["tiny-llama"]).cells


def test_which_cells_are_natural_by_construction():
    cells = quickstart_cells()
    derivable = [c for c in cells if provably_natural(c)]
    assert len(cells) == 54 and len(derivable) == 30  # alpha 0 of every control, and self
    assert all(c.alpha == 0.0 or c.control == "self" for c in derivable)
    ids = {c.cell_id for c in cells}
    assert all(natural_twin_id(c) in ids for c in derivable)
    plan = plan_derivations(cells)
    assert len(plan.sentinels) == 3 and len(plan.derived) == 27
    assert plan_derivations(cells).sentinels == plan.sentinels  # seeded, stable
    sampled = load_grid_like({**load_grid_like(QUICKSTART).spec.model_dump(mode="json"),
                              "generation": {"max_new_tokens": 24, "temperature": 0.7},
                              "prompts": {"bank": str(REPO / "prompts"), "conditions":
                                          ["A", "B", "C"], "n_pairs": 3}}, ["tiny-llama"])
    assert not any(provably_natural(c) for c in sampled.cells)  # their seeds differ


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("derive")
    derived = rloop_ray.run(QUICKSTART, model="tiny-llama", results=out / "d",
                            backend="local", progress=False)
    decoded = rloop_ray.run(QUICKSTART, model="tiny-llama", results=out / "f",
                            backend="local", progress=False, derive=False)
    return derived, decoded


def test_derived_rows_equal_a_full_decode(both):
    derived, decoded = both
    a = derived.cells.set_index("cell_id").sort_index()
    b = decoded.cells.set_index("cell_id").sort_index()
    assert list(a.index) == list(b.index) and set(a["status"]) == {"ok"}
    for col in ENGINE_COLUMNS:
        left, right = a[col].tolist(), b[col].tolist()
        if col == "generated_ids":
            left, right = [list(x) for x in left], [list(x) for x in right]
        if a[col].dtype.kind == "f":
            # tokens are exact; measures agree to float32 round-off, which differs with the
            # batch a row was decoded in (a row's batch-mates change once copies are skipped)
            assert np.allclose(left, right, rtol=1e-4, atol=1e-6, equal_nan=True), col
        else:
            assert left == right, col
    copies = a[a[DERIVED_FROM].notna()]
    assert len(copies) == 27 and b[DERIVED_FROM].isna().all()
    twins = a.loc[copies[DERIVED_FROM].tolist()]
    assert set(twins["control"]) == {NATURAL}
    assert derived.sweep.ok == 54  # copies count as done cells


def _engine_wrapper(monkeypatch, edit):
    """Swap the engine factory for one whose rows pass through `edit(request, row)`."""
    base = rloop_ray.worker.SpecEngineFactory

    class Editing(base):
        def __call__(self, model):
            engine = super().__call__(model)
            run = engine.run

            def edited(requests):
                return [edit(q, r) for q, r in zip(requests, run(requests), strict=True)]

            engine.run = edited
            return engine

    monkeypatch.setattr(rloop_ray.worker, "SpecEngineFactory", Editing)


def test_a_broken_sentinel_fails_its_cell_loudly(monkeypatch, tmp_path):
    sentinels = set(plan_derivations(quickstart_cells()).sentinels)

    def flip(request, row):
        if request.cell_id in sentinels:
            row = {**row, "generated_ids": [*row["generated_ids"][:-1], 0]}
        return row

    _engine_wrapper(monkeypatch, flip)
    out = rloop_ray.run(QUICKSTART, model="tiny-llama", results=tmp_path, backend="local",
                        progress=False)
    assert out.sweep.exit_code == 1
    failed = out.cells[out.cells["status"] == "failed"]
    assert set(failed["cell_id"]) == sentinels
    assert set(failed["error_type"]) == {SENTINEL_MISMATCH}


def test_a_failed_twin_has_its_dependents_decoded(monkeypatch, tmp_path):
    def fail_natural(request, row):
        if request.intervention.control == NATURAL:
            return {"status": "failed", "error_type": "Boom", "error": "natural failed"}
        return row

    _engine_wrapper(monkeypatch, fail_natural)
    out = rloop_ray.run(QUICKSTART, model="tiny-llama", results=tmp_path, backend="local",
                        progress=False)
    cells = out.cells.set_index("cell_id")
    plan = plan_derivations(quickstart_cells())
    dependents = cells.loc[sorted(plan.derived)]
    assert set(dependents["status"]) == {"ok"} and dependents[DERIVED_FROM].isna().all()


def test_resume_copies_cells_whose_twin_ran_before(tmp_path):
    grid = load_grid_like(QUICKSTART, ["tiny-llama"])
    natural_only = {c.cell_id for c in grid.cells if c.control == NATURAL}
    first = rloop_ray.run(QUICKSTART, model="tiny-llama", results=tmp_path, backend="local",
                          progress=False)
    store = first.store
    # drop every copied row, as if the run had died right after the naturals
    import pyarrow.compute as pc

    kept = store.read_cells(dedupe=False)
    kept = kept.filter(pc.is_null(kept[DERIVED_FROM]))
    for path in Path(store.cells_path).glob("*.parquet"):
        path.unlink()
    store.write_cells(kept.to_pylist())
    again = rloop_ray.run(QUICKSTART, model="tiny-llama", results=tmp_path, backend="local",
                          progress=False, resume=True)
    assert again.sweep.ok == 27 and again.sweep.exit_code == 0
    assert natural_only <= set(again.cells["cell_id"])
    assert again.cells[DERIVED_FROM].notna().sum() == 27


def test_newer_cells_that_are_natural_by_construction():
    """Steer at alpha 0 or by `self` (the zero vector), a patch during generation at alpha 0,
    and `self` during generation (no companion decode) equal the natural run; their twin
    is the target's natural cell, whatever the later fields."""
    from rloop_ray.grid import build_grid
    from rloop_ray.prompts import PromptBank
    from rloop_ray.spec import load_spec_text

    bank = Path(__file__).parent / "data" / "bank"
    spec = load_spec_text(
        f"name: t\nmodels: [m]\nprompts: {{bank: '{bank}', n_pairs: 2}}\n"
        "interventions: {site: resid, mode: [mix, steer], alpha: [0.0, 0.3, 1.0], "
        "during: [prefill, generation, both]}\ncontrols: [natural, self, random]\n"
        "measure: {attention: true}\n")
    cells = build_grid(spec, bank=PromptBank.load(bank)).cells
    ids = {c.cell_id for c in cells}

    def expected(c):
        if c.control == NATURAL:
            return False
        if c.alpha == 0.0:
            return True
        if c.mode == "steer":
            return c.control == "self"
        if c.control != "self":
            return False
        return c.during == "generation" or c.alpha == 1.0  # 0.3 is no exact self mix
    seen = collections.Counter()
    for c in cells:
        assert provably_natural(c) == expected(c), (c.mode, c.control, c.during, c.alpha)
        if provably_natural(c):
            assert natural_twin_id(c) in ids
            seen[(c.mode, c.control, c.during)] += 1
    assert seen[("steer", "self", "prefill")] == 2 * 3  # two targets, every alpha
    assert seen[("mix", "self", "generation")] == 2 * 3
    assert seen[("mix", "self", "both")] == 2 * 2  # alpha 0 and 1 only
    assert seen[("steer", "random", "generation")] == 2  # alpha 0 only
    assert not any(provably_natural(c) for c in cells
                   if c.mode == "steer" and c.control != "self" and c.alpha != 0.0)


def test_a_derived_row_leaves_patch_facts_null_and_its_kl_zero():
    from rloop_ray.derive import derived_row

    twin = {"cell_id": "n", "control": NATURAL, "status": "ok", "generated_ids": [1, 2],
            "kl_from_natural": 0.0, "n_matched_positions": None, "steer_norm": None,
            "attn_mass_patched": [0.0], "top_ids": [5, 6]}
    row = derived_row(twin, {"cell_id": "d", "control": "self", "during": "generation"},
                      "n", None)
    assert row["kl_from_natural"] == 0.0 and row["top_ids"] == [5, 6]
    assert row["attn_mass_patched"] is None and row["steer_norm"] is None
    assert (row["during"], row[DERIVED_FROM], row["cell_id"]) == ("generation", "n", "d")
