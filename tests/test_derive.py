"""Cells that are natural by construction are copied from their natural twin, not decoded.

The copy must be what a full decode gives (checked on the quickstart, both ways, on the
real engine with tiny-llama), a sentinel whose tokens differ must fail loudly, and a
twin that failed must not leave its dependents empty.
"""

from __future__ import annotations

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
