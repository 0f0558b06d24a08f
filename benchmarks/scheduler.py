"""Scheduler overhead: what the runner (Ray actors, ray.wait, rows, Parquet shards) costs per cell.

A sweep of N cells (default 10,000) on the NullEngine, whose own work is ~nothing, is timed
end to end (worker start, dispatch, result transfer, row merge, shard writes, manifest)
against a reference in the same process: the same NullEngine called directly in a loop
over the same requests, with no Ray and no store. The difference per cell is the runner's
overhead; the target is < 2 ms/cell. "steady" excludes the actors' start (first to last
result, from the rows' finished_at).

    .venv/bin/python benchmarks/scheduler.py                 # 10k cells, a few configurations
    .venv/bin/python benchmarks/scheduler.py --cells 2000 --unit-sizes 10 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from rloop_ray.driver import DriverConfig, run_sweep
from rloop_ray.null_engine import NullEngine, NullEngineFactory, synthetic_requests, synthetic_units
from rloop_ray.store import ResultStore


def reference(n_cells: int, unit_size: int) -> float:
    """Seconds to run every request through the NullEngine directly (no Ray, no store)."""
    units = synthetic_units(n_cells, unit_size)
    engine = NullEngine("null")
    t0 = time.perf_counter()
    n = 0
    for unit in units:
        n += len(engine.run(synthetic_requests(unit)))
    assert n == n_cells
    return time.perf_counter() - t0


def sweep(
    root: str, n_cells: int, unit_size: int, workers: int, in_flight: int, shard_rows: int
) -> dict:
    units = synthetic_units(n_cells, unit_size)
    store = ResultStore(os.path.join(root, f"u{unit_size}-w{workers}-f{in_flight}"))
    store.prepare({"bench": n_cells, "unit_size": unit_size})
    cfg = DriverConfig(
        workers=workers,
        use_gpus=False,
        max_in_flight=in_flight,
        shard_rows=shard_rows,
        shard_seconds=30.0,
        progress=False,
        handle_sigint=False,
    )
    t0 = time.perf_counter()
    result = run_sweep(units, store, NullEngineFactory(), synthetic_requests, cfg)
    wall = time.perf_counter() - t0
    if result.ok != n_cells:
        raise RuntimeError(result.message)
    finished = store.read_cells(["finished_at"])["finished_at"].to_pylist()
    steady = (max(finished) - min(finished)).total_seconds()
    shards = len([n for n in os.listdir(store.cells_path) if n.endswith(".parquet")])
    return {"wall": wall, "steady": steady, "shards": shards}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--unit-sizes", default="10,50")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--shard-rows", type=int, default=5000)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    n = args.cells
    sizes = [int(s) for s in args.unit_sizes.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    ref = reference(n, sizes[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="rloop-bench-") as root:
        for size in sizes:
            for workers in worker_counts:
                r = sweep(root, n, size, workers, args.in_flight, args.shard_rows)
                rows.append((size, workers, r))
    ray.shutdown()

    print(f"\nscheduler overhead, {n} NullEngine cells, {os.cpu_count()} CPUs")
    print(f"ray.init (local cluster, not counted below): {ray_start:.1f}s")
    print(
        f"reference (NullEngine in a loop, no Ray/store): {ref:.3f}s = "
        f"{1e3 * ref / n:.4f} ms/cell\n"
    )
    head = (
        "unit",
        "workers",
        "in-flight",
        "shards",
        "wall s",
        "ms/cell",
        "overhead ms/cell",
        "steady ms/cell",
    )
    print("  ".join(f"{h:>8}" for h in head))
    for size, workers, r in rows:
        print(
            "  ".join(
                f"{v:>8}"
                for v in (
                    size,
                    workers,
                    args.in_flight,
                    r["shards"],
                    f"{r['wall']:.2f}",
                    f"{1e3 * r['wall'] / n:.3f}",
                    f"{1e3 * (r['wall'] - ref) / n:.3f}",
                    f"{1e3 * r['steady'] / n:.3f}",
                )
            )
        )
    best = min(1e3 * (r["wall"] - ref) / n for _, _, r in rows)
    print(f"\nbest overhead: {best:.3f} ms/cell (target < 2 ms/cell)")


if __name__ == "__main__":
    main()
