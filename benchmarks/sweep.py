"""A sweep's cells per second against the engine's own, on the same cells, in one run.

The reference is one in-process `Engine.run` over every cell of the grid (model loaded
once, outside the timing): the fastest this machine runs those cells. Then the same grid
goes through `rloop_ray.run` with the local backend and with the Ray backend (a local
cluster), each into a fresh results folder. A sweep's compute time is its run time minus
its replicas' model load (Ray start-up is outside `run_sweep` already); wall time with
everything is printed beside it. The goals: the sweep at >= 90% of the engine when
every cell is decoded, and (`local+derive`: cells natural by construction copied from
their natural twin) the quickstart's compute down by >= 40% with the same tokens.

    python benchmarks/sweep.py --grid sweeps/quickstart.yaml --model smollm2-135m
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import rloop_ray
from rloop_ray.api import engine_models, load_grid_like
from rloop_ray.engine import Engine

REPO = Path(__file__).resolve().parents[1]


def engine_seconds(grid_path: str, model: str) -> tuple[float, int, list[list[int]]]:
    """(seconds, cells, tokens per cell) of one in-process `Engine.run` over the grid."""
    grid = load_grid_like(grid_path, [model])
    kwargs = dict(engine_models(grid)[model])
    path = kwargs.pop("name_or_path")
    kwargs.pop("device_map", None)
    engine = Engine(path, **kwargs)
    texts = grid.prompt_texts()
    requests = [r for u in grid.units for r in u.requests(texts)]
    engine.run(requests[:2])  # warm-up outside the timing, then no cached prompt
    engine._prompts.clear()
    t0 = time.perf_counter()
    rows = engine.run(requests)
    seconds = time.perf_counter() - t0
    by_id = {r.cell_id: row["generated_ids"] for r, row in zip(requests, rows, strict=True)}
    return seconds, len(requests), [by_id[c.cell_id] for c in grid.cells]


def sweep_seconds(grid_path: str, model: str, backend: str, out: Path, derive: bool
                  ) -> tuple[float, float, list[list[int]]]:
    """(compute seconds, wall seconds, tokens per cell) of one whole sweep."""
    t0 = time.perf_counter()
    results = rloop_ray.run(grid_path, model=model, results=out, backend=backend,
                            progress=False, derive=derive)
    wall = time.perf_counter() - t0
    import pandas as pd

    run = results.manifest["runs"][-1]
    ready = min(pd.Timestamp(w["ready_at"]) for w in run["workers"])
    cells = results.cells.set_index("cell_id")
    compute = (pd.Timestamp(cells["finished_at"].max()) - ready).total_seconds()
    grid = load_grid_like(grid_path, [model])
    return compute, wall, [list(cells.loc[c.cell_id, "generated_ids"]) for c in grid.cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=str(REPO / "sweeps" / "quickstart.yaml"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", default="local,ray,local+derive,ray+derive",
                        help="sweeps to time: BACKEND or BACKEND+derive (cells natural by "
                             "construction copied from their natural twin)")
    args = parser.parse_args()

    import torch

    t_eng, n, ref_tokens = engine_seconds(args.grid, args.model)
    print(f"grid {args.grid} on {args.model}: {n} cells; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'runner':<30}{'compute s':>10}{'cells/s':>10}{'of engine':>11}{'wall s':>9}"
          f"{'same tokens':>13}")
    print(f"{'Engine.run (in process)':<30}{t_eng:>10.2f}{n / t_eng:>10.2f}{'100%':>11}"
          f"{'':>9}{'':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            backend, _, derive = run.partition("+")
            compute, wall, tokens = sweep_seconds(args.grid, args.model, backend,
                                                  Path(tmp) / run, derive == "derive")
            same = sum(a == b for a, b in zip(tokens, ref_tokens, strict=True))
            print(f"{'rloop-ray sweep, ' + run:<30}{compute:>10.2f}{n / compute:>10.2f}"
                  f"{t_eng / compute:>10.0%}{wall:>9.1f}{f'{same}/{n}':>13}")


if __name__ == "__main__":
    main()
