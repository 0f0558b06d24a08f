"""Faults on real local Ray: logical GPUs, killed workers, a SIGKILLed driver, failing cells.

The NullEngine makes every failure reproducible: its outputs are a function of the cell
id, so "every cell exactly once, identical to an uninterrupted run" is checked row by row.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rloop_ray.driver import EXIT_FAILED, EXIT_OK, DriverConfig, run_sweep
from rloop_ray.null_engine import NullEngineFactory, synthetic_requests, synthetic_units
from rloop_ray.store import RUNNER_COLUMNS, ResultStore

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """4 logical CPUs (more than the machine's 2 is fine: they are only counters), 2 GPUs."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def fresh_store(tmp_path: Path, name: str, spec: dict | None = None) -> ResultStore:
    store = ResultStore(tmp_path / name)
    store.prepare(spec or {"test": name})
    return store


def cpu_config(**kw) -> DriverConfig:
    base = {"workers": 2, "use_gpus": False, "shard_rows": 200, "progress": False}
    return DriverConfig(**{**base, **kw})


def assert_each_cell_once(store: ResultStore, n: int) -> None:
    ids = store.read_cells(dedupe=False)["cell_id"].to_pylist()
    assert len(ids) == n, f"{len(ids)} rows for {n} cells"
    assert len(set(ids)) == n, "a cell was written twice"


def test_one_worker_per_logical_gpu_each_pinned_to_its_own(ray_cluster, tmp_path):
    store = fresh_store(tmp_path, "gpus")
    units = synthetic_units(200, 10)
    cfg = DriverConfig(shard_rows=500, progress=False)  # workers: one per GPU
    barrier = tmp_path / "barrier"
    barrier.mkdir()  # no unit runs until both workers exist: both get work, whatever the timing
    factory = NullEngineFactory({"sleep_per_cell": 0.002, "start_barrier": (str(barrier), 2)})
    result = run_sweep(units, store, factory, synthetic_requests, cfg)
    assert result.exit_code == EXIT_OK
    rows = store.read_cells(["worker", "accelerator_ids"]).to_pylist()
    pinned = {r["worker"]: tuple(r["accelerator_ids"]) for r in rows}
    assert len(pinned) == 2, pinned  # two workers, both used
    assert sorted(pinned.values()) == [("0",), ("1",)]  # each has exactly one, distinct GPU
    assert all(tuple(r["accelerator_ids"]) == pinned[r["worker"]] for r in rows)


def test_worker_killed_mid_sweep_every_cell_exactly_once(ray_cluster, tmp_path):
    store = fresh_store(tmp_path, "killed")
    units = synthetic_units(300, 10)
    victim = units[12].cells[4].cell_id
    marker = tmp_path / "markers"
    marker.mkdir()
    factory = NullEngineFactory(
        {"sleep_per_cell": 0.002, "kill_cells": [victim], "kill_marker_dir": str(marker)}
    )
    result = run_sweep(units, store, factory, synthetic_requests, cpu_config())
    assert (marker / f"killed-{victim}").exists()  # the worker really died
    assert result.exit_code == EXIT_OK and result.ok == 300
    assert_each_cell_once(store, 300)
    rows = {r["cell_id"]: r for r in store.read_cells().to_pylist()}
    assert rows[victim]["status"] == "ok" and rows[victim]["attempt"] == 2


def test_unit_that_keeps_killing_workers_is_recorded_failed(ray_cluster, tmp_path):
    store = fresh_store(tmp_path, "poison")
    units = synthetic_units(100, 10)
    poison = units[3].cells[0].cell_id
    factory = NullEngineFactory({"kill_cells": [poison]})  # no marker: dies every time
    cfg = cpu_config(max_unit_attempts=2, max_restarts=2)
    result = run_sweep(units, store, factory, synthetic_requests, cfg)
    assert result.exit_code == EXIT_FAILED
    assert set(result.failed_cell_ids) == {c.cell_id for c in units[3].cells}
    assert result.ok == 90
    assert_each_cell_once(store, 100)
    failures = store.read_failures().to_pylist()
    assert {f["error_type"] for f in failures} == {"WorkerDied"}
    assert "died 2 times" in failures[0]["error"]


def test_failing_cell_recorded_with_reason_rest_completes(ray_cluster, tmp_path):
    store = fresh_store(tmp_path, "failing")
    units = synthetic_units(100, 10)
    bad = units[5].cells[2].cell_id
    factory = NullEngineFactory({"fail_cells": [bad]})
    result = run_sweep(units, store, factory, synthetic_requests, cpu_config())
    assert result.exit_code == EXIT_FAILED and result.failed == 1 and result.ok == 99
    assert "1 cells failed" in result.message
    assert_each_cell_once(store, 100)
    assert store.failed_cell_ids() == {bad}
    (fail,) = store.read_failures().to_pylist()
    assert fail["cell_id"] == bad and fail["error_type"] == "NullEngineError"
    assert "Traceback" in fail["error"] and "configured to fail" in fail["error"]
    assert fail["worker"] and fail["attempt"] == 1


def _comparable(store: ResultStore) -> list[dict]:
    t = store.read_cells().sort_by("cell_id")
    keep = [c for c in t.column_names if c not in RUNNER_COLUMNS]
    return t.select(keep).to_pylist()


def test_driver_sigkilled_at_random_points_then_resumed(ray_cluster, tmp_path):
    n_cells, unit = 1200, 10
    path = tmp_path / "chaos"
    cmd = [
        sys.executable, "-m", "rloop_ray.null_engine", str(path),
        "--cells", str(n_cells), "--unit-size", str(unit), "--workers", "2",
        "--address", ray_cluster, "--sleep-per-cell", "0.004",
        "--shard-rows", "50", "--shard-seconds", "0.3", "--resume",
    ]  # fmt: skip
    rng = random.Random(1234)
    store = ResultStore(path)
    done_counts = []
    log = open(tmp_path / "driver.log", "ab")  # noqa: SIM115 - closed below
    try:
        for kill in range(3):
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
            if kill == 0:  # anywhere, start-up included
                time.sleep(rng.uniform(0.5, 3.0))
            else:  # mid-sweep: once this driver has written a shard
                before = len(store.done_cell_ids()) if store.exists() else 0
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and proc.poll() is None:
                    if store.exists() and len(store.done_cell_ids()) > before:
                        break
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            if store.exists():
                ids = store.read_cells(dedupe=False)["cell_id"].to_pylist()
                assert len(ids) == len(set(ids)), "duplicate rows after a kill"
                done_counts.append(len(ids))
        final = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=log, timeout=120)
    finally:
        log.close()
    assert final.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
    assert done_counts == sorted(done_counts)  # progress is never lost
    assert 0 < done_counts[-1] < n_cells  # the kills did land mid-sweep
    assert_each_cell_once(store, n_cells)
    assert store.read_manifest()["status"] == "complete"
    assert len(store.read_manifest()["runs"]) >= 3

    reference = fresh_store(tmp_path, "reference")
    units = synthetic_units(n_cells, unit)
    run_sweep(units, reference, NullEngineFactory(), synthetic_requests, cpu_config())
    assert _comparable(store) == _comparable(reference)


def test_out_of_memory_units_are_split_until_they_fit(ray_cluster, tmp_path):
    store = fresh_store(tmp_path, "oom")
    units = synthetic_units(50, 10)
    hopeless = units[2].cells[7].cell_id  # runs out of memory even alone
    # Batches above 3 cells "do not fit"; the engine's own batch is 16.
    factory = NullEngineFactory({"oom_batch": 3, "oom_cells": [hopeless]})
    result = run_sweep(units, store, factory, synthetic_requests, cpu_config())
    assert result.failed_cell_ids == [hopeless] and result.ok == 49
    assert_each_cell_once(store, 50)
    rows = {r["cell_id"]: r for r in store.read_cells().to_pylist()}
    assert rows[hopeless]["error_type"] == "OutOfMemoryError"
    # 10 cells at batch 10 -> halves at batch 5 -> halves at batch 2: the third attempt fits.
    assert {r["attempt"] for cid, r in rows.items() if cid != hopeless} == {3}
