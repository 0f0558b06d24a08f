"""A model-free engine and a synthetic grid, to measure and break the runner without torch.

`NullEngine` has the `Engine` interface (`run(list[CellRequest]) -> list[dict]`, `info()`)
and returns deterministic fake results derived from each cell id, so a sweep interrupted
and resumed any number of times must produce exactly the table of an uninterrupted one.
Hooks make it fail chosen cells (errors as data), sleep (to look like work), or kill its
own process (to test dead workers). `synthetic_units` builds stand-in cells and units with
the shape the driver relies on; `python -m rloop_ray.null_engine` runs such a sweep as a
separate driver process, which the chaos tests SIGKILL and resume.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention

log = logging.getLogger(__name__)


class NullEngineError(RuntimeError):
    """The failure a NullEngine reports for a cell listed in `fail_cells`."""


def _digest(cell_id: str) -> bytes:
    return hashlib.sha256(cell_id.encode()).digest()


class NullEngine:
    """Deterministic stand-in for `engine.Engine`: no model, outputs are a function of cell_id."""

    def __init__(
        self,
        model_name: str = "null",
        *,
        fail_cells: Iterable[str] = (),
        sleep_per_cell: float = 0.0,
        kill_cells: Iterable[str] = (),
        kill_marker_dir: str | None = None,
        load_seconds: float = 0.0,
        signal_on: tuple[str, int, int] | None = None,
        start_barrier: tuple[str, int] | None = None,
        max_batch_size: int = 16,
        oom_batch: int | None = None,
        oom_cells: Iterable[str] = (),
        **_: Any,
    ) -> None:
        """`kill_cells`: SIGKILL this process when one of these cells comes up. With
        `kill_marker_dir`, each such cell kills only once (a marker file records it), so a
        restarted worker completes it; without, it kills every time (a poison cell).
        `signal_on=(cell_id, pid, signum)`: send a signal to another process (the driver)
        when that cell runs, to interrupt a sweep at a known point.
        `start_barrier=(dir, n)`: `run` waits (up to 60 s) until n engines have been built,
        each leaving a file in `dir`, so a test can rely on every worker getting units.
        `oom_batch`: a batch (min(cells, max_batch_size)) larger than this fails every cell
        with `OutOfMemoryError`, like a GPU that is too small; `oom_cells` do so even alone."""
        self.model_name = model_name
        self.fail_cells = frozenset(fail_cells)
        self.kill_cells = frozenset(kill_cells)
        self.kill_marker_dir = kill_marker_dir
        self.sleep_per_cell = sleep_per_cell
        self.signal_on = signal_on
        self.start_barrier = start_barrier
        self.max_batch_size = max_batch_size
        self.oom_batch = oom_batch
        self.oom_cells = frozenset(oom_cells)
        if start_barrier is not None:
            Path(start_barrier[0], f"engine-{os.getpid()}").touch()
        if load_seconds:
            time.sleep(load_seconds)

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "architecture": "null", "n_layers": 0, "pid": os.getpid()}

    def _maybe_kill(self, cell_id: str) -> None:
        if cell_id not in self.kill_cells:
            return
        if self.kill_marker_dir is not None:
            marker = os.path.join(self.kill_marker_dir, f"killed-{cell_id}")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    return  # already died once on this cell
                raise
        log.warning("NullEngine killing its own process (pid %d) on cell %s", os.getpid(), cell_id)
        os.kill(os.getpid(), signal.SIGKILL)

    def _one(self, req: CellRequest) -> dict[str, Any]:
        if req.cell_id in self.fail_cells:
            try:
                raise NullEngineError(f"configured to fail cell {req.cell_id}")
            except NullEngineError as exc:
                return {
                    "status": "failed",
                    "error_type": type(exc).__name__,
                    "error": traceback.format_exc(),
                }
        d = _digest(req.cell_id)
        n_gen = 4 + d[0] % 8
        ids = [int(b) for b in d[1 : 1 + n_gen]]
        rv = 0.5 + d[20] / 255.0
        return {
            "status": "ok",
            "error_type": None,
            "error": None,
            "n_target_tokens": 8 + d[21] % 8,
            "n_source_tokens": 8 + d[22] % 8,
            "n_patched_positions": d[23] % 8,
            "n_unpatched_positions": 0,
            "patched_layers": [0, 1],
            "query_position": 7,
            "rope_consistent": True,
            "alpha_extrapolated": not 0.0 <= req.intervention.alpha <= 1.0,
            "generated_ids": ids,
            "generated_text": " ".join(f"t{i}" for i in ids),
            "n_generated": n_gen,
            "stop_reason": "max_new_tokens",
            "layer_early": 0,
            "layer_late": 1,
            "rv": rv,
            "pr_early": 2.0,
            "pr_late": 2.0 * rv,
            "erank_early": 1.5,
            "erank_late": 1.5 * rv,
            "rv_status": "ok",
            "rv_prompt": rv,
            "rv_trajectory": None,
            "score_keywords": float(d[24] % 4),
            "score_self_ref": d[25] / 255.0,
            "score_technical": d[26] / 255.0,
            "score_logprob_contrast": (d[27] - 128) / 64.0,
            "engine_seconds": self.sleep_per_cell,
        }

    def _wait_for_barrier(self) -> None:
        if self.start_barrier is None:
            return
        folder, n = self.start_barrier
        deadline = time.monotonic() + 60
        while len(list(Path(folder).glob("engine-*"))) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def _oom(self) -> dict[str, Any]:
        return {
            "status": "failed",
            "error_type": "OutOfMemoryError",
            "error": "CUDA out of memory (NullEngine: simulated)",
        }

    def run(self, requests: list[CellRequest]) -> list[dict[str, Any]]:
        self._wait_for_barrier()
        batch = min(len(requests), self.max_batch_size)
        if self.oom_batch is not None and batch > self.oom_batch:
            return [self._oom() for _ in requests]
        rows = []
        for req in requests:
            self._maybe_kill(req.cell_id)
            if self.signal_on is not None and req.cell_id == self.signal_on[0]:
                os.kill(self.signal_on[1], self.signal_on[2])
            if self.sleep_per_cell:
                time.sleep(self.sleep_per_cell)
            rows.append(self._oom() if req.cell_id in self.oom_cells else self._one(req))
        return rows


@dataclass(frozen=True)
class NullEngineFactory:
    """Picklable `model -> NullEngine` factory with fixed hooks (what the driver ships)."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: str) -> NullEngine:
        return NullEngine(model, **self.kwargs)


# -- a synthetic grid with the shape grid.Cell / grid.WorkUnit give the driver --------------


@dataclass(frozen=True)
class SyntheticCell:
    cell_id: str
    model: str
    pair_index: int
    alpha: float
    layers: str = "all"

    def coordinates(self) -> dict[str, Any]:
        return {
            "cell_id": self.cell_id,
            "model": self.model,
            "source_id": f"src{self.pair_index}",
            "target_id": f"tgt{self.pair_index}",
            "pair_index": self.pair_index,
            "site": "kv",
            "mode": "mix",
            "layers": self.layers,
            "tokens": "all",
            "align": "end",
            "alpha": self.alpha,
            "control": "patch",
            "seed": 0,
        }


@dataclass(frozen=True)
class SyntheticUnit:
    unit_id: str
    model: str
    cells: tuple[SyntheticCell, ...]


def synthetic_units(
    n_cells: int, unit_size: int, models: Sequence[str] = ("null",)
) -> list[SyntheticUnit]:
    """`n_cells` cells per model in units of `unit_size` (same ids on every call)."""
    units = []
    for model in models:
        for start in range(0, n_cells, unit_size):
            pair = start // unit_size
            cells = tuple(
                SyntheticCell(
                    cell_id=hashlib.sha256(f"{model}/{i}".encode()).hexdigest()[:16],
                    model=model,
                    pair_index=pair,
                    alpha=(i - start) / max(unit_size - 1, 1),
                )
                for i in range(start, min(start + unit_size, n_cells))
            )
            uid = hashlib.sha256("".join(sorted(c.cell_id for c in cells)).encode())
            units.append(SyntheticUnit(uid.hexdigest()[:16], model, cells))
    return units


def synthetic_requests(unit: SyntheticUnit) -> list[CellRequest]:
    return [
        CellRequest(
            cell_id=c.cell_id,
            target_text=f"target {c.pair_index}",
            source_text=f"source {c.pair_index}",
            intervention=Intervention(alpha=c.alpha),
            generation=GenerationConfig(max_new_tokens=8),
        )
        for c in unit.cells
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a synthetic NullEngine sweep as its own driver process (benchmarks, chaos tests)."""
    from rloop_ray.driver import DriverConfig, ray_session, run_sweep
    from rloop_ray.store import ResultStore

    p = argparse.ArgumentParser(prog="python -m rloop_ray.null_engine", description=main.__doc__)
    p.add_argument("store")
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--unit-size", type=int, default=10)
    p.add_argument("--models", default="null")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=float, default=None)
    p.add_argument("--sleep-per-cell", type=float, default=0.0)
    p.add_argument("--fail-cells", default="")
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--shard-seconds", type=float, default=5.0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    models = [m for m in args.models.split(",") if m]
    units = synthetic_units(args.cells, args.unit_size, models)
    spec = {"synthetic": True, "cells": args.cells, "unit_size": args.unit_size, "models": models}
    store = ResultStore(args.store)
    store.prepare(spec, resume=args.resume)
    factory = NullEngineFactory(
        {
            "sleep_per_cell": args.sleep_per_cell,
            "fail_cells": [c for c in args.fail_cells.split(",") if c],
        }
    )
    config = DriverConfig(
        workers=args.workers,
        shard_rows=args.shard_rows,
        shard_seconds=args.shard_seconds,
        progress=False,
    )
    with ray_session(args.address, num_cpus=args.num_cpus):
        result = run_sweep(units, store, factory, synthetic_requests, config)
    log.info("%s", result.message)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
