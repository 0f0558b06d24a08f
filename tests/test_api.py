"""The Python API: `rloop_ray.run` / `rloop_ray.load` and the local backend.

The local backend must be the Ray backend without Ray: the same plan, the same cell ids
and the same tokens, through the same store (so resume and the contract hold for both).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rloop_ray
from rloop_ray.lease import LeaseError
from rloop_ray.spec import SpecValidationError
from rloop_ray.store import NotASweepError, PlanChangedError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    results = rloop_ray.run(QUICKSTART, model="tiny-llama", results=out / "local",
                            backend="local", progress=False)
    return results


def test_local_backend_runs_the_whole_plan_without_ray(local_results):
    import ray

    assert not ray.is_initialized()
    assert local_results.sweep is not None and local_results.sweep.exit_code == 0
    cells = local_results.cells
    assert len(cells) == 54 and set(cells["status"]) == {"ok"}
    assert {"A", "B", "C"} <= set(cells["letter"])  # condition letters come with the rows
    assert local_results.manifest["runs"][-1]["backend"] == "local"


def test_load_reads_the_same_rows_and_stats(local_results):
    again = rloop_ray.load(local_results.source)
    assert sorted(again.cells["cell_id"]) == sorted(local_results.cells["cell_id"])
    stats = again.stats(n_resamples=200)
    assert not stats.conditions.empty


def test_resume_through_the_api_runs_nothing_and_a_changed_grid_is_refused(local_results):
    out = Path(local_results.source).parent
    again = rloop_ray.run(QUICKSTART, model="tiny-llama", results=out, backend="local",
                          resume=True, progress=False)
    assert again.sweep.ok == 0 and again.sweep.skipped == 54
    changed = rloop_ray.api.load_grid_like(QUICKSTART).spec.model_dump(mode="json")
    changed["generation"]["max_new_tokens"] = 12
    changed["prompts"]["bank"] = str(REPO / "prompts")
    with pytest.raises(PlanChangedError, match="generation.max_new_tokens: 24 -> 12"):
        rloop_ray.run(changed, model="tiny-llama", results=out, backend="local", resume=True)


def test_load_of_a_folder_that_is_no_sweep_raises(tmp_path):
    with pytest.raises(NotASweepError):
        rloop_ray.load(tmp_path)


def test_bad_names_and_a_held_lease_raise_before_anything_runs(local_results, tmp_path):
    with pytest.raises(SpecValidationError, match="sweep name"):
        rloop_ray.run(QUICKSTART, model="tiny-llama", results=tmp_path, name="../x",
                      backend="local")
    store = local_results.store
    with store.lease():
        with pytest.raises(LeaseError):
            rloop_ray.run(QUICKSTART, model="tiny-llama", results=Path(store.root).parent,
                          backend="local", resume=True)


@pytest.mark.ray
def test_ray_backend_gives_the_same_cell_ids_and_tokens(local_results, tmp_path):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = rloop_ray.run(QUICKSTART, model="tiny-llama", results=tmp_path,
                               backend="ray", progress=False)
    finally:
        ray.shutdown()
    [replica] = on_ray.manifest["runs"][-1]["workers"]
    assert replica["threads"] == 2  # one CPU replica with both cores, not 1 thread of 2
    a = local_results.cells.set_index("cell_id").sort_index()
    b = on_ray.cells.set_index("cell_id").sort_index()
    assert list(a.index) == list(b.index)
    assert [list(x) for x in a["generated_ids"]] == [list(x) for x in b["generated_ids"]]
    assert a["generated_text"].tolist() == b["generated_text"].tolist()
