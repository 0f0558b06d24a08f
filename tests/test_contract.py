"""The results contract, case by case: each test reproduces a way a table could go wrong.

A sweep is exactly its planned cells, the store is its only reader and writer, one driver
writes at a time, and every check runs before anything is written. The sweeps here are
real grid files run through the CLI on local Ray, with the engine swapped for the
NullEngine (its rows are a function of the cell id, so "exactly once" is checkable).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import rloop_ray.worker
from rloop_ray.cli import app
from rloop_ray.lease import LOCK_FILE, LeaseError
from rloop_ray.null_engine import NullEngineFactory
from rloop_ray.plan import Plan
from rloop_ray.store import ResultStore

REPO = Path(__file__).resolve().parents[1]
N_CELLS = 10  # the grid below: 2 natural cells + 2 pairs x 2 layer specs x 2 alphas


FAIL_CELLS: list[str] = []


@pytest.fixture
def null_engine(monkeypatch):
    """The real engine factory swapped for a NullEngine failing the cells in `FAIL_CELLS`.

    Defined here, not at module level, so Ray pickles the class by value (the workers
    cannot import this test module).
    """
    fail = FAIL_CELLS

    class FakeSpecFactory(NullEngineFactory):
        def __init__(self, models: dict) -> None:
            super().__init__({"fail_cells": list(fail)})

    monkeypatch.setattr(rloop_ray.worker, "SpecEngineFactory", FakeSpecFactory)
    FAIL_CELLS.clear()
    yield
    FAIL_CELLS.clear()


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    """A private copy of the prompt bank, so a test may edit a prompt."""
    dest = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", dest)
    return dest


def write_grid(path: Path, bank: Path, *, name: str = "tiny", extra: str = "",
               alpha: str = "[0.5, 1.0]") -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        models: [tiny-llama]
        prompts: {{bank: {bank}, conditions: [A, C], n_pairs: 2}}
        interventions: {{layers: ["all", "0:1"], alpha: {alpha}}}
        generation: {{max_new_tokens: 4}}
        measure: {{window: 4, early_layer: "0", late_layer: "1"}}
        """) + extra)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def sweep_args(grid: Path, results: Path, *more: str) -> list[str]:
    return ["sweep", str(grid), "--results-dir", str(results), "--workers", "1", *more]


def rows_per_cell(store: ResultStore) -> dict[str, int]:
    ids = store.read_cells(["cell_id"], dedupe=False, planned_only=False)["cell_id"].to_pylist()
    out: dict[str, int] = {}
    for cid in ids:
        out[cid] = out.get(cid, 0) + 1
    return out


# -- the plan is the truth -------------------------------------------------------------------


@pytest.mark.ray
def test_edited_prompt_makes_resume_refuse_with_the_change_in_words(
        ray_local, null_engine, tmp_path, bank):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "res"
    first = invoke(*sweep_args(grid, res))
    assert first.exit_code == 0, first.output
    store = ResultStore(res / "tiny")
    planned = len(store.read_plan())

    baseline = (bank / "baseline.yaml").read_text()
    used = sorted(store.read_manifest()["prompts"])
    edited_id = next(p for p in used if f"id: {p}" in baseline)
    lines = baseline.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip().endswith(f"id: {edited_id}"))
    text_line = next(i for i in range(at, len(lines)) if "text:" in lines[i])
    lines[text_line] = lines[text_line].replace("text:", "text: EDITED", 1)
    (bank / "baseline.yaml").write_text("\n".join(lines) + "\n")

    again = invoke(*sweep_args(grid, res, "--resume"))
    assert again.exit_code == 2, again.output
    assert f"prompts text edited: {edited_id}" in again.output
    assert "cells added" in again.output and "no longer in the grid" in again.output
    assert invoke("status", str(res / "tiny")).exit_code == 0
    [counts] = store.counts()
    assert (counts.planned, counts.done) == (planned, planned) == (N_CELLS, N_CELLS)


def test_rows_outside_the_plan_are_excluded_and_reported(tmp_path):
    store = ResultStore(tmp_path / "s")

    class C:
        def __init__(self, cid: str) -> None:
            self.cell_id = cid

    class U:
        def __init__(self, uid: str, cids: list[str]) -> None:
            self.unit_id, self.model, self.cells = uid, "m", [C(c) for c in cids]

    store.prepare({"name": "s"}, plan=Plan.from_units([U("u", ["a", "b"])]))
    store.write_cells([{"cell_id": c, "model": "m", "status": "ok"} for c in ("a", "x", "y")])
    assert store.read_cells()["cell_id"].to_pylist() == ["a"]
    assert store.stale_row_count() == 2
    tables = store.read_sweep()
    assert tables.n_planned == 2 and tables.n_stale_rows == 2 and tables.cells.num_rows == 1
    [counts] = store.counts()
    assert (counts.planned, counts.done, counts.remaining) == (2, 1, 1)
    out = invoke("status", str(tmp_path / "s"))
    assert "2 stale rows from an earlier plan" in out.output


@pytest.mark.ray
def test_a_folder_without_manifest_is_never_adopted(ray_local, null_engine, tmp_path, bank):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "res"
    assert invoke(*sweep_args(grid, res)).exit_code == 0
    (res / "tiny" / "manifest.json").unlink()
    other = write_grid(tmp_path / "other.yaml", bank, alpha="[0.25]")
    out = invoke(*sweep_args(other, res))
    assert out.exit_code == 2 and "not an rloop-ray sweep" in out.output, out.output
    assert not (res / "tiny" / "manifest.json").exists()
    over = invoke(*sweep_args(other, res, "--overwrite"))
    assert over.exit_code == 2 and "--overwrite deletes only sweeps" in over.output
    assert any((res / "tiny" / "cells").iterdir())  # the old shards are untouched


@pytest.mark.ray
def test_extend_adds_cells_and_adding_a_model_needs_no_flag(
        ray_local, null_engine, tmp_path, bank):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "res"
    assert invoke(*sweep_args(grid, res)).exit_code == 0
    store = ResultStore(res / "tiny")
    before = len(store.read_plan())
    write_grid(grid, bank, alpha="[0.5, 1.0, 0.25]")
    refused = invoke(*sweep_args(grid, res, "--resume"))
    assert refused.exit_code == 2 and "--extend" in refused.output
    assert "interventions.alpha" in refused.output
    extended = invoke(*sweep_args(grid, res, "--resume", "--extend"))
    assert extended.exit_code == 0, extended.output
    after = len(store.read_plan())
    assert after > before and set(rows_per_cell(store).values()) == {1}
    assert len(rows_per_cell(store)) == after
    write_grid(grid, bank, alpha="[0.5]")  # removes planned cells: --extend cannot
    shrink = invoke(*sweep_args(grid, res, "--resume", "--extend"))
    assert shrink.exit_code == 2 and "only adds cells" in shrink.output


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", ".", "..", "a/b", "/abs", ".hidden", ""])
def test_unsafe_names_are_refused_before_anything_is_written(tmp_path, bank, name):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "deep" / "res"
    sibling = res / "keep"
    sibling.mkdir(parents=True)
    (sibling / "manifest.json").write_text("{}")
    out = invoke(*sweep_args(grid, res, "--name", name, "--overwrite", "--skip-model-check"))
    assert out.exit_code == 2, out.output
    assert "a sweep name is" in out.output
    assert sorted(p.name for p in res.iterdir()) == ["keep"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["res"]
    assert (sibling / "manifest.json").exists()


# -- one writer at a time ------------------------------------------------------------------


def test_a_second_driver_is_refused_naming_the_holder(tmp_path, bank):
    grid = write_grid(tmp_path / "g.yaml", bank)
    store = ResultStore(tmp_path / "res" / "tiny")
    with store.lease(ttl_seconds=30):
        out = invoke(*sweep_args(grid, tmp_path / "res", "--resume"))
        assert out.exit_code == 2, out.output
        assert f"driver pid {os.getpid()}" in out.output and "heartbeat" in out.output
        with pytest.raises(LeaseError):
            ResultStore(store.uri).lease().acquire()
    assert not (tmp_path / "res" / "tiny" / LOCK_FILE).exists()  # released on exit


def test_the_heartbeat_keeps_a_lease_and_a_dead_drivers_lease_is_taken_over(tmp_path, caplog):
    store = ResultStore(tmp_path / "s")
    with store.lease(ttl_seconds=1.5):
        time.sleep(2.5)  # longer than the ttl: only the heartbeat keeps it
        with pytest.raises(LeaseError):
            ResultStore(store.uri).lease(ttl_seconds=1.5).acquire()
    dead = {"owner": "x", "host": "gone", "pid": 999999, "acquired_at": "2026-01-01T00:00:00",
            "heartbeat_at": time.time() - 120, "ttl_seconds": 60.0}
    (tmp_path / "s" / LOCK_FILE).write_text(json.dumps(dead))
    lease = ResultStore(store.uri).lease()
    with caplog.at_level("WARNING"), lease:
        assert lease.took_over is not None and lease.took_over.pid == 999999
    assert "took over the lease" in caplog.text and "pid 999999 on gone" in caplog.text


# -- sweep = validate + run ----------------------------------------------------------------


@pytest.mark.parametrize(("extra", "field"), [
    ("", "interventions.layers"),
    ("", "measure.early_layer"),
    ("", "model"),
])
def test_model_checks_run_before_ray_starts_and_nothing_is_written(
        tmp_path, bank, monkeypatch, extra, field):
    import rloop_ray.driver

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for an invalid grid")

    monkeypatch.setattr(rloop_ray.driver, "ray_session", no_ray)
    grid = write_grid(tmp_path / "g.yaml", bank)
    text = grid.read_text()
    if field == "interventions.layers":
        text = text.replace('"0:1"', '"0:999"')
    elif field == "measure.early_layer":
        text = text.replace('early_layer: "0"', "early_layer: 999")
    else:
        text = text.replace("[tiny-llama]", "[no-such-org/no-such-model-xyz]")
    grid.write_text(text)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        out = invoke(*sweep_args(grid, tmp_path / "res"))
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert out.exit_code == 2, out.output
    assert field.split(".")[-1] in out.output
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("manifest.json"))


# -- damage is named and recoverable -------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("damage", ["truncated_shard", "foreign_parquet", "torn_manifest"])
def test_damage_is_named_and_repair_then_resume_finishes_exactly_once(
        ray_local, null_engine, tmp_path, bank, damage):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "res"
    assert invoke(*sweep_args(grid, res, "--shard-rows", "5")).exit_code == 0
    sweep = res / "tiny"
    store = ResultStore(sweep)
    n = len(store.read_plan())
    shards = sorted((sweep / "cells").glob("*.parquet"))
    if damage == "truncated_shard":
        bad = shards[0]
        bad.write_bytes(bad.read_bytes()[:200])
    elif damage == "foreign_parquet":
        bad = sweep / "cells" / "notes.parquet"
        pq.write_table(pa.table({"x": [1, 2]}), bad)
    else:
        bad = sweep / "manifest.json"
        bad.write_text(bad.read_text()[:100])
    for command in (["status", str(sweep)], ["stats", str(sweep)],
                    sweep_args(grid, res, "--resume")):
        out = invoke(*command)
        assert out.exit_code == 2, out.output
        assert str(bad) in out.output and "rloop-ray repair" in out.output
        assert "cells in" not in out.output  # refused before the run is announced
    fixed = invoke("repair", str(sweep))
    assert fixed.exit_code == 0, fixed.output
    assert list((sweep / "quarantine").iterdir()) and not bad.exists() or damage == "torn_manifest"
    resumed = invoke(*sweep_args(grid, res, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    counts = rows_per_cell(store)
    assert len(counts) == n and set(counts.values()) == {1}
    assert invoke("status", str(sweep)).exit_code == 0


# -- smaller cases ---------------------------------------------------------------------------


@pytest.mark.ray
def test_no_retry_failed_with_failures_left_is_incomplete(ray_local, null_engine, tmp_path,
                                                          bank):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "res"
    from rloop_ray.grid import load_grid

    FAIL_CELLS.extend(c.cell_id for c in load_grid(grid).cells[:3])
    assert invoke(*sweep_args(grid, res)).exit_code == 1
    FAIL_CELLS.clear()
    out = invoke(*sweep_args(grid, res, "--resume", "--no-retry-failed"))
    assert out.exit_code == 1, out.output
    assert "not retried" in out.output
    assert ResultStore(res / "tiny").read_manifest()["status"] == "incomplete"
    done = invoke(*sweep_args(grid, res, "--resume"))
    assert done.exit_code == 0 and "complete: 3 cells ok" in done.output


@pytest.mark.ray
def test_a_failed_write_exits_2_with_the_path_and_resume_loses_nothing(
        ray_local, null_engine, tmp_path, bank, monkeypatch):
    grid = write_grid(tmp_path / "g.yaml", bank)
    res = tmp_path / "res"

    def full_disk(self, subdir, table):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ResultStore, "_write_table", full_disk)
        out = invoke(*sweep_args(grid, res))
    assert out.exit_code == 2, out.output
    assert "No space left on device" in out.output and str(res / "tiny" / "cells") in out.output
    assert "Traceback" not in out.output
    again = invoke(*sweep_args(grid, res, "--resume"))
    assert again.exit_code == 0, again.output
    counts = rows_per_cell(ResultStore(res / "tiny"))
    assert len(counts) == N_CELLS and set(counts.values()) == {1}


def test_a_killed_drivers_lease_on_this_host_is_taken_over_at_once(tmp_path):
    """A real second process holds the lease; while it lives we are refused, after kill -9
    (no release, no last heartbeat) the lease is ours without waiting for the ttl."""
    import signal
    import subprocess
    import sys

    sweep = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from rloop_ray.store import ResultStore; "
         f"ResultStore({str(sweep)!r}).lease(ttl_seconds=600).acquire(); "
         "print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseError, match=f"pid {holder.pid}"):
            ResultStore(sweep).lease().acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        lease = ResultStore(sweep).lease().acquire()
        assert lease.took_over is not None and lease.took_over.pid == holder.pid
        lease.release()
    finally:
        if holder.poll() is None:
            holder.kill()
