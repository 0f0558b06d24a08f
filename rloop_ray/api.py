"""The Python API: run a sweep and read it back from a notebook; the CLI wraps these.

`run` is `rloop-ray sweep` as a function (the habit researchers bring from Ray Tune's
`Tuner.fit()` and lm-eval-harness's `simple_evaluate`): a grid in, a `Results` out.
It goes through the same steps in the same order as the command, because they are the
command: every model check before anything is written, the sweep's lease, the store's
plan guard, then the driver, on Ray actors or (`backend="local"`) in this process. `load`
opens any sweep folder or URI. Errors are exceptions (the CLI turns them into exit
codes): `SpecValidationError` for bad input, `StoreError` / `LeaseError` for a store
that cannot be used as asked, `DriverError` when no replica could run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rloop_ray.driver import BACKEND_RAY, BACKENDS, DriverConfig, SweepResult

if TYPE_CHECKING:
    import pandas as pd

    from rloop_ray.analysis import ReportOutputs, ResultSet, StatsResult
    from rloop_ray.grid import Grid
    from rloop_ray.lease import SweepLease
    from rloop_ray.store import ResultStore

DEFAULT_RESULTS = "results"


def join_uri(results_dir: str, name: str) -> str:
    """`results_dir`/`name`; a URI keeps its query: `s3://b/r?region=x` -> `s3://b/r/n?region=x`."""
    base, sep, query = results_dir.partition("?") if "://" in results_dir else (results_dir, "", "")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def check_sweep_name(name: str, *, source: str | None = None) -> str:
    """A sweep name is one safe path component inside the results folder (the grid rule)."""
    from rloop_ray.spec import NAME_MAX_LENGTH, NAME_PATTERN, SpecValidationError

    if not re.fullmatch(NAME_PATTERN, name) or len(name) > NAME_MAX_LENGTH:
        raise SpecValidationError(
            f"{name!r}: a sweep name is letters, digits, '.', '_' and '-', starting with a "
            f"letter or digit, at most {NAME_MAX_LENGTH} characters (it names one folder "
            f"inside the results folder)",
            file=source, field="--name",
        )
    return name


def load_grid_like(grid: Any, models: Sequence[str] | None = None) -> Grid:
    """A `Grid` from a grid file path, a dict of grid fields or a `SweepSpec`."""
    from rloop_ray.grid import build_grid, load_grid
    from rloop_ray.spec import SweepSpec, parse_spec

    if isinstance(grid, SweepSpec):
        return build_grid(grid, models_override=models)
    if isinstance(grid, Mapping):
        return build_grid(parse_spec(dict(grid), source="<dict>", base_dir=Path.cwd()),
                          models_override=models)
    return load_grid(os.fspath(grid), models_override=models)


def engine_models(grid: Grid) -> dict[str, dict[str, Any]]:
    """Model id -> `Engine` arguments, from the grid's model table and resources."""
    batch = grid.spec.resources.batch_size
    return {
        m.id: {
            "name_or_path": m.name_or_path or m.id,
            "dtype": m.dtype,
            "chat_template": m.chat_template,
            "trust_remote_code": m.trust_remote_code,
            "revision": m.revision,
            "device_map": m.device_map,
            "max_batch_size": batch,
        }
        for m in grid.models
    }


@dataclass
class SweepJob:
    """A checked, prepared sweep holding its lease: `run()` it, or `close()` it.

    Split from `run` so the CLI can say what is about to run between the checks and the
    run; a notebook calls `rloop_ray.run`, which does both.
    """

    grid: Grid
    store: ResultStore
    config: DriverConfig
    lease: SweepLease
    backend: str = BACKEND_RAY
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    derive: bool = True

    def run(self) -> SweepResult:
        """Run the cells not done yet; the lease is released whatever happens."""
        from rloop_ray import worker
        from rloop_ray.derive import Derivations, plan_derivations
        from rloop_ray.driver import ray_session, run_sweep

        texts = self.grid.prompt_texts()
        factory = worker.SpecEngineFactory(engine_models(self.grid))
        derivations = plan_derivations(self.grid.cells) if self.derive else Derivations()
        try:
            if self.backend == BACKEND_RAY:
                with ray_session(self.address, num_cpus=self.num_cpus, num_gpus=self.num_gpus):
                    return run_sweep(self.grid.units, self.store, factory,
                                     lambda unit: unit.requests(texts), self.config,
                                     derivations=derivations)
            return run_sweep(self.grid.units, self.store, factory,
                             lambda unit: unit.requests(texts), self.config,
                             backend=self.backend, derivations=derivations)
        finally:
            self.close()

    def close(self) -> None:
        self.lease.release()


def prepare_sweep(
    grid: Any,
    *,
    models: Sequence[str] | None = None,
    results: str | os.PathLike[str] | None = None,
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    extend: bool = False,
    skip_model_check: bool = False,
    backend: str = BACKEND_RAY,
    address: str | None = None,
    workers: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    cpus_per_worker: float | None = None,
    retry_failed: bool = True,
    shard_rows: int = 5000,
    shard_seconds: float = 30.0,
    lease_seconds: float = 60.0,
    progress: bool | None = None,
    handle_sigint: bool = True,
    derive: bool = True,
) -> SweepJob:
    """Every check, the lease and the store's plan guard; nothing runs yet.

    Raises before anything is written when the grid is invalid on any model
    (`SpecValidationError`), and before any cell runs when the store refuses (a changed
    plan, another driver, a damaged file: `StoreError`, `LeaseError`). `derive`: write
    cells that are natural by construction as copies of their natural twin, decoding a
    seeded 10% of them as sentinels (`derive.py`); `False` decodes every cell.
    """
    import _thread

    from rloop_ray.grid import check_models
    from rloop_ray.plan import Plan
    from rloop_ray.spec import SpecValidationError
    from rloop_ray.store import ResultStore

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if extend and not resume:
        raise SpecValidationError("extend adds cells to an existing sweep: use it with resume",
                                  field="--extend")
    if resume and overwrite:
        raise SpecValidationError("resume continues a sweep and overwrite deletes it: "
                                  "choose one", field="--overwrite")
    built = load_grid_like(grid, models)
    if not skip_model_check:
        check_models(built)
    spec = built.spec
    if not built.units:
        raise SpecValidationError("the grid expands to no cells", file=spec.source)
    sweep_name = check_sweep_name(name, source=spec.source) if name is not None else spec.name
    store = ResultStore(join_uri(os.fspath(results or DEFAULT_RESULTS), sweep_name))
    lease = store.lease(ttl_seconds=lease_seconds, command=" ".join(sys.argv))
    if handle_sigint:
        lease.on_lost = _thread.interrupt_main  # stop dispatching, as after a Ctrl-C
    lease.acquire()
    try:
        store.prepare(
            spec.model_dump(mode="json"),
            plan=Plan.from_units(built.units),
            prompts={pid: p.text_hash for pid, p in built.prompts.items()},
            resume=resume, overwrite=overwrite, extend=extend,
            spec_file=spec.source, digest=spec.spec_hash(),
        )
    except BaseException:
        lease.release()
        raise
    res = spec.resources
    gpus = res.gpus_per_replica
    config = DriverConfig(
        workers=workers or res.replicas,
        use_gpus=None if gpus is None else gpus > 0,
        gpus_per_worker=gpus or 1.0,
        cpus_per_worker=cpus_per_worker,
        max_in_flight=res.max_units_in_flight_per_worker,
        shard_rows=shard_rows,
        shard_seconds=shard_seconds,
        retry_failed=retry_failed,
        pack_cells=res.batch_size,
        progress=progress,
        handle_sigint=handle_sigint,
    )
    return SweepJob(built, store, config, lease, backend=backend, address=address,
                    num_cpus=num_cpus, num_gpus=num_gpus, derive=derive)


def run(
    grid: Any,
    *,
    model: str | None = None,
    models: Sequence[str] | None = None,
    results: str | os.PathLike[str] | None = None,
    resume: bool = False,
    backend: str = BACKEND_RAY,
    **options: Any,
) -> Results:
    """Run a sweep and return its `Results` (the library form of `rloop-ray sweep`).

    `grid`: a grid file, a dict of grid fields or a `SweepSpec`. `model` / `models` run
    the grid on these models instead of its own. `results`: the folder (or URI) sweep
    folders live in, `results/` by default. `backend`: `"ray"` (a local cluster, or
    `address=` to join one) or `"local"` (this process, no Ray; the same store and
    exactly-once semantics). Other keywords are those of `prepare_sweep` (`name`,
    `overwrite`, `extend`, `workers`, `skip_model_check`, ...). Failed cells do not
    raise: they are rows with `status="failed"`, and `Results.sweep` says what ran.
    """
    chosen = list(models or []) + ([model] if model else [])
    job = prepare_sweep(grid, models=chosen or None, results=results, resume=resume,
                        backend=backend,
                        **options)
    outcome = job.run()
    return Results(job.store.uri, sweep=outcome)


@dataclass
class Results:
    """A sweep read back through the store: cells with condition letters and labels.

    Reading is lazy and cached; `refresh()` reads again (e.g. while a sweep runs).
    """

    source: str
    sweep: SweepResult | None = None
    """What the run that returned this did (None for `load`)."""
    _set: ResultSet | None = field(default=None, repr=False)

    @property
    def result_set(self) -> ResultSet:
        if self._set is None:
            from rloop_ray.analysis import load_results

            self._set = load_results(self.source)
        return self._set

    def refresh(self) -> Results:
        self._set = None
        return self

    @property
    def cells(self) -> pd.DataFrame:
        """One row per planned cell that ran: coordinates, `letter`, `condition`, metrics."""
        return self.result_set.cells

    @property
    def failures(self) -> pd.DataFrame:
        """The latest failure record (error type, traceback) per failed cell."""
        return self.result_set.failures

    @property
    def manifest(self) -> dict[str, Any]:
        return self.result_set.manifest

    @property
    def store(self) -> ResultStore:
        from rloop_ray.store import ResultStore

        return ResultStore(self.source)

    def stats(self, **options: Any) -> StatsResult:
        """Every statistics table (nothing written); options as `rloop-ray stats`."""
        from rloop_ray.analysis import compute_stats

        return compute_stats(self.result_set, **options)

    def report(self, **options: Any) -> ReportOutputs:
        """Tables, figures, report.md and report.html (into the sweep folder or `out_dir`)."""
        from rloop_ray.analysis import write_report

        return write_report(self.source, **options)

    def __len__(self) -> int:
        return len(self.cells)


def load(path_or_uri: str | os.PathLike[str]) -> Results:
    """Open a sweep folder or URI; raises `NotASweepError` / `DamagedFileError` at once."""
    results = Results(os.fspath(path_or_uri))
    results.store.read_manifest()
    return results
