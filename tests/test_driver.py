"""The driver on real local Ray with the NullEngine: once-only rows, shards, resume, Ctrl-C, CLI.

Cells and units here are small local stand-ins with the shape `grid.Cell`/`grid.WorkUnit`
give the driver, so these tests do not depend on the grid; one CLI test runs a real grid
file end to end with the engine swapped for the NullEngine.
"""

from __future__ import annotations

import os
import signal
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from rloop_ray.driver import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    DriverConfig,
    _plan,
    _progress_enabled,
    _Run,
    run_sweep,
)
from rloop_ray.engine.types import CellRequest, Intervention
from rloop_ray.null_engine import NullEngine, NullEngineFactory
from rloop_ray.store import ResultStore

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cell:
    cell_id: str
    model: str
    alpha: float

    def coordinates(self) -> dict:
        return {"cell_id": self.cell_id, "model": self.model, "alpha": self.alpha, "site": "kv"}


@dataclass(frozen=True)
class Unit:
    unit_id: str
    model: str
    cells: tuple[Cell, ...]


def make_units(n_cells: int, unit_size: int, models: tuple[str, ...] = ("m",)) -> list[Unit]:
    units = []
    for model in models:
        for u in range(0, n_cells, unit_size):
            cells = tuple(
                Cell(f"{model}-c{i:05d}", model, i / n_cells)
                for i in range(u, min(u + unit_size, n_cells))
            )
            units.append(Unit(f"{model}-u{u:05d}", model, cells))
    return units


def to_requests(unit: Unit) -> list[CellRequest]:
    return [CellRequest(c.cell_id, "t", "s", Intervention(alpha=c.alpha)) for c in unit.cells]


def fresh_store(tmp_path: Path, name: str = "sweep") -> ResultStore:
    store = ResultStore(tmp_path / name)
    store.prepare({"test": name})
    return store


CFG = DriverConfig(workers=2, shard_rows=100, shard_seconds=5.0, progress=False)


# -- without Ray ----------------------------------------------------------------------------


def test_plan_keeps_only_missing_cells_and_counts_everything():
    units = make_units(25, 10)
    done = {"m-c00000", "m-c00001"} | {f"m-c{i:05d}" for i in range(10, 20)}
    tasks, planned, coords, _ = _plan(units, to_requests, done, {"m-c00002": 2})
    assert planned == {"m": 25}
    assert [len(t.requests) for t in tasks["m"]] == [8, 5]  # the middle unit is done
    assert tasks["m"][0].attempt == 3  # continues the highest attempt in the unit
    assert coords["m-c00002"]["unit_id"] == "m-u00000"
    assert set(coords) == {f"m-c{i:05d}" for i in range(25)} - done


def test_plan_rejects_duplicate_cells():
    u = make_units(2, 2)[0]
    with pytest.raises(ValueError, match="twice"):
        _plan([u, u], to_requests, set(), {})


def test_rows_are_deduped_before_writing(tmp_path):
    store = fresh_store(tmp_path)
    units = make_units(3, 3)
    _, _, coords, _ = _plan(units, to_requests, set(), {})
    from rloop_ray.driver import _Progress, _SigintLatch

    run = _Run(
        store, NullEngineFactory(), CFG, coords, _Progress(3, 0, False, 60), _SigintLatch(False)
    )
    requests = to_requests(units[0])
    rows = [{**r, "cell_id": q.cell_id} for r, q in zip(NullEngine().run(requests), requests)]
    run.accept(rows)
    run.accept(rows[:2])  # a duplicate delivery of two cells
    run.flush()
    assert store.read_cells(dedupe=False).num_rows == 3


class _RaisingEngine:
    def __init__(self, model: str) -> None:
        self.model = model

    def run(self, requests):
        raise MemoryError("CUDA out of memory (pretend)")

    def info(self):
        return {"model": self.model}


class _ShortEngine(_RaisingEngine):
    def run(self, requests):
        return []


def test_worker_without_ray_returns_rows_with_runner_keys():
    from rloop_ray.worker import ModelWorker

    w = ModelWorker(NullEngineFactory({"fail_cells": ["m-c00001"]}), "m", index=3)
    assert w.ready()["engine"]["model"] == "m" and w.name.startswith("w3-")
    rows = w.run_unit(to_requests(make_units(3, 3)[0]), attempt=2)
    assert [r["cell_id"] for r in rows] == ["m-c00000", "m-c00001", "m-c00002"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert all(r["attempt"] == 2 and r["worker"] == w.name for r in rows)
    assert rows[1]["error_type"] == "NullEngineError"


@pytest.mark.parametrize("engine", [_RaisingEngine, _ShortEngine])
def test_worker_turns_a_broken_engine_into_failed_rows(engine):
    from rloop_ray.worker import ModelWorker

    rows = ModelWorker(engine, "m").run_unit(to_requests(make_units(2, 2)[0]))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "Traceback" in rows[0]["error"]
    assert rows[0]["error_type"] in ("MemoryError", "RuntimeError")


def test_progress_bar_only_on_a_tty_outside_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not _progress_enabled(DriverConfig())
    assert _progress_enabled(DriverConfig(progress=True))
    monkeypatch.delenv("CI")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not _progress_enabled(DriverConfig())


# -- on real local Ray ----------------------------------------------------------------------


@pytest.mark.ray
def test_every_cell_once_in_few_shards(ray_local, tmp_path):
    store = fresh_store(tmp_path)
    units = make_units(300, 10, models=("m1", "m2"))
    result = run_sweep(units, store, NullEngineFactory(), to_requests, CFG)
    assert result.status == "complete" and result.exit_code == EXIT_OK
    assert (result.ok, result.failed, result.remaining) == (600, 0, 0)
    t = store.read_cells(dedupe=False)
    ids = t["cell_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 600
    shards = [n for n in os.listdir(store.cells_path) if n.endswith(".parquet")]
    assert len(shards) <= 10  # batched: 600 rows at <= 100 per shard, not one per unit
    row = t.to_pylist()[0]
    assert row["unit_id"].startswith(row["model"]) and row["site"] == "kv"
    assert row["attempt"] == 1 and row["worker"].startswith("w") and row["node"]
    assert row["finished_at"] is not None and row["seconds"] >= 0
    first = next(r for r in to_requests(units[0]) if r.cell_id == row["cell_id"])
    assert row["generated_ids"] == NullEngine().run([first])[0]["generated_ids"]
    m = store.read_manifest()
    assert m["status"] == "complete" and m["planned_cells"] == {"m1": 300, "m2": 300}
    assert set(m["runs"][-1]["engines"]) == {"m1", "m2"}


@pytest.mark.ray
def test_resume_runs_only_missing_cells(ray_local, tmp_path):
    store = fresh_store(tmp_path)
    units = make_units(60, 10)
    pre = [
        {"cell_id": c.cell_id, "model": "m", "status": "ok", "worker": "earlier-run"}
        for u in units[:3]
        for c in u.cells[:7]
    ]
    store.write_cells(pre)
    result = run_sweep(units, store, NullEngineFactory(), to_requests, CFG)
    assert (result.skipped, result.ok) == (21, 39)
    t = store.read_cells(dedupe=False)
    assert t.num_rows == 60  # nothing done before was run again
    workers = t["worker"].to_pylist()
    assert workers.count("earlier-run") == 21


@pytest.mark.ray
def test_failed_cells_are_retried_on_resume_unless_told_not_to(ray_local, tmp_path):
    store = fresh_store(tmp_path)
    units = make_units(40, 10)
    bad = ["m-c00003", "m-c00031"]
    first = run_sweep(units, store, NullEngineFactory({"fail_cells": bad}), to_requests, CFG)
    assert first.exit_code == EXIT_FAILED and first.failed == 2 and first.ok == 38
    assert "2 cells failed" in first.message
    assert store.failed_cell_ids() == set(bad)
    assert store.read_manifest()["status"] == "failed"

    again = run_sweep(
        units,
        store,
        NullEngineFactory(),
        to_requests,
        DriverConfig(workers=1, retry_failed=False, progress=False),
    )
    assert again.ok == 0 and store.failed_cell_ids() == set(bad)

    retry = run_sweep(units, store, NullEngineFactory(), to_requests, CFG)
    assert retry.exit_code == EXIT_OK and retry.ok == 2
    assert store.failed_cell_ids() == set() and len(store.done_cell_ids()) == 40
    t = store.read_cells()
    assert {r["attempt"] for r in t.to_pylist() if r["cell_id"] in bad} == {2}
    assert store.read_failures().num_rows == 2  # the history of the failed attempt


@pytest.mark.ray
def test_ctrl_c_flushes_marks_interrupted_and_resumes(ray_local, tmp_path):
    store = fresh_store(tmp_path)
    units = make_units(300, 10)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background
    # Ctrl-C arrives while unit 5 runs: at least 2 units were collected before it was
    # dispatched, and ~1.2 s of work is left, far more than the driver needs to notice.
    trigger = units[5].cells[0].cell_id
    factory = NullEngineFactory(
        {"sleep_per_cell": 0.01, "signal_on": (trigger, os.getpid(), signal.SIGINT)}
    )
    cfg = DriverConfig(workers=2, shard_rows=1000, shard_seconds=60, progress=False)
    result = run_sweep(units, store, factory, to_requests, cfg)
    assert result.status == "interrupted" and result.exit_code == EXIT_INTERRUPTED
    assert store.read_manifest()["status"] == "interrupted"
    done = store.done_cell_ids()
    assert 20 <= len(done) < 300  # what finished was flushed although no shard was due
    assert signal.getsignal(signal.SIGINT) is handler_before

    rest = run_sweep(units, store, NullEngineFactory(), to_requests, CFG)
    assert rest.status == "complete" and rest.skipped == len(done)
    ids = store.read_cells(dedupe=False)["cell_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 300


@pytest.mark.ray
def test_cli_sweep_and_status_on_a_real_grid(ray_local, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import rloop_ray.worker
    from rloop_ray.cli import app

    class FakeSpecFactory(NullEngineFactory):
        def __init__(self, models: dict) -> None:
            super().__init__({"fail_cells": []})

    monkeypatch.setattr(rloop_ray.worker, "SpecEngineFactory", FakeSpecFactory)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        textwrap.dedent(
            f"""\
            name: tiny
            models: [m1, m2]
            prompts: {{bank: {REPO / "prompts"}, conditions: [A, C], n_pairs: 2}}
            interventions: {{layers: ["all", "0:1"], alpha: [0.5, 1.0]}}
            generation: {{max_new_tokens: 4}}
            measure: {{window: 4}}
            """
        )
    )
    runner = CliRunner()
    args = ["sweep", str(grid), "--results-dir", str(tmp_path / "res"), "--workers", "1",
            "--skip-model-check"]  # m1, m2 are no real models
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "complete: 20 cells ok" in out.output

    again = runner.invoke(app, args)  # exists, no --resume: refused with a way out
    assert again.exit_code == 2 and "--resume" in again.output

    resumed = runner.invoke(app, [*args, "--resume", "--model", "m1"])
    assert resumed.exit_code == 0 and "complete: 0 cells ok" in resumed.output

    changed = grid.read_text().replace("alpha: [0.5, 1.0]", "alpha: [0.25]")
    grid.write_text(changed)
    mismatch = runner.invoke(app, [*args, "--resume"])
    assert mismatch.exit_code == 2 and "--name" in mismatch.output

    status = runner.invoke(app, ["status", str(tmp_path / "res" / "tiny")])
    assert status.exit_code == 0, status.output
    lines = {ln.split()[0]: ln.split()[1:] for ln in status.output.splitlines() if ln.strip()}
    assert lines["m1"] == ["10", "10", "0", "0"] and lines["total"] == ["20", "20", "0", "0"]


def test_units_are_packed_into_full_batches_without_losing_cells():
    from rloop_ray.driver import _pack, _Task

    tasks = [_Task(f"u{i}", "m", [f"r{i}.{j}" for j in range(n)], 1)  # type: ignore[misc]
             for i, n in enumerate([1, 1, 1, 5, 1, 2])]
    tasks.append(_Task("retry", "m", ["x"], 2))  # other attempts are never merged
    packed = _pack(tasks, 4)
    # every call but an attempt's last is full: a unit may be split between two calls
    assert [len(t.requests) for t in packed] == [4, 4, 3, 1]
    assert [r for t in packed for r in t.requests] == [r for t in tasks for r in t.requests]
    assert packed[0].unit_id == "u0+3" and packed[1].unit_id == "u3"
    assert packed[-1].attempt == 2
    assert _pack(tasks, 1) == tasks
