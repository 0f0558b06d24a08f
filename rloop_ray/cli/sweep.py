"""`rloop-ray sweep` runs a grid on Ray into `results/<name>/`; `rloop-ray status` reports it.

The commands only translate flags and exceptions: `sweep` is `api.prepare_sweep` (every
check, the lease, the plan guard) then `SweepJob.run`, the bookkeeping is
`store.ResultStore`. Heavy imports (ray, pyarrow, the grid) stay inside the commands so
`--help` is instant.
"""

from __future__ import annotations

import logging
import os
import shlex
from typing import TYPE_CHECKING, Annotated

import typer

from rloop_ray.cli._app import GRID_METAVAR, SWEEP_METAVAR, app

if TYPE_CHECKING:
    from rloop_ray.api import SweepJob
    from rloop_ray.driver import SweepResult


def _split_models(values: list[str] | None) -> list[str] | None:
    """`--model a --model b` and `--models a,b` both give ["a", "b"]."""
    if not values:
        return None
    out = [m.strip() for v in values for m in v.split(",") if m.strip()]
    return out or None


EXIT_INVALID = 2
"""Bad input, a refused store operation or a failed write: nothing ran or nothing was lost."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_INVALID)


def _setup_logging(verbose: bool) -> None:
    """What reaches the terminal: warnings only under the live display, progress lines in
    CI and log files, everything of rloop-ray with `--verbose`."""
    from rloop_ray.driver import interactive

    live = interactive()
    level = logging.INFO if verbose or not live else logging.WARNING
    fmt = ("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose or not live
           else "%(levelname)s: %(message)s")
    logging.basicConfig(level=level, format=fmt)
    if verbose:
        logging.getLogger("rloop_ray").setLevel(logging.DEBUG)


def _header(job: SweepJob) -> str:
    """One line: what is about to run, counted as the driver counts (cells, units)."""
    grid = job.grid
    models = ", ".join(m.id for m in grid.models)
    return (f"sweep {grid.spec.name}: {len(grid.cells)} cells in {len(grid.units)} units on "
            f"{models} -> {job.store.uri}")


def _next_command(result: SweepResult, job: SweepJob, resume_args: list[str]) -> str:
    """The command to run next: the statistics when every selected cell is done, else the
    same sweep again with --resume (`resume_args`: the grid and the options that select
    the sweep and where it runs)."""
    from rloop_ray.vocab import SWEEP_COMPLETE, SWEEP_PARTIAL

    if result.status in (SWEEP_COMPLETE, SWEEP_PARTIAL):
        return f"rloop-ray stats {shlex.quote(job.store.uri)}"
    return "rloop-ray sweep " + " ".join(shlex.quote(a) for a in resume_args) + " --resume"


def _resume_args(grid_file: str, model: list[str] | None, name: str | None, results_dir: str,
                 address: str | None, backend: str) -> list[str]:
    args = [grid_file]
    for m in model or []:
        args += ["--model", m]
    if name:
        args += ["--name", name]
    if results_dir != "results":
        args += ["--results-dir", results_dir]
    if address:
        args += ["--address", address]
    if backend != "ray":
        args += ["--backend", backend]
    return args


@app.command()
def sweep(
    grid_file: Annotated[str, typer.Argument(metavar=GRID_METAVAR, help="The grid to run.",
                                             show_default=False)],
    resume: Annotated[
        bool, typer.Option(help="Continue `results/<name>`: run only the cells not done yet.")
    ] = False,
    extend: Annotated[
        bool,
        typer.Option(help="With --resume: add the cells a changed grid now makes to the "
                          "sweep (refused if any planned cell would disappear)."),
    ] = False,
    name: Annotated[
        str | None, typer.Option(help="Sweep directory name (default: the grid's `name`).")
    ] = None,
    results_dir: Annotated[
        str,
        typer.Option(
            help="Where sweep directories live: a path, or a URI every driver of the sweep "
            "can reach (file:///shared/results, s3://bucket/results, gs://bucket/results)."
        ),
    ] = "results",
    address: Annotated[
        str | None,
        typer.Option(help="Join a Ray cluster: `auto` or `ray://host:10001`. Default: local."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "--models",
            "-m",
            help="Run only these models (repeat or comma-separate; ids of the grid, or any "
            "other model name to run the grid on it; with --resume it adds that model).",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Replicas per model (default: one per GPU).")
    ] = None,
    num_gpus: Annotated[
        int | None, typer.Option(min=0, help="GPUs of the local Ray cluster (no --address).")
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(min=1, help="CPUs of the local Ray cluster (no --address).")
    ] = None,
    cpus_per_worker: Annotated[
        float | None,
        typer.Option(min=0.0, help="CPUs per replica (its torch threads on CPU). Default: 1 "
                                   "with GPUs; CPU replicas share their node's cores."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the existing sweep `results/<name>` and start over.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="On --resume, run cells that failed before again.")
    ] = True,
    skip_model_check: Annotated[
        bool,
        typer.Option("--skip-model-check",
                     help="Do not check layer, token and context limits against the model "
                          "configs before starting (offline, unknown models)."),
    ] = False,
    shard_rows: Annotated[int, typer.Option(min=1, help="Rows per Parquet shard (max).")] = 5000,
    shard_seconds: Annotated[
        float, typer.Option(min=0.0, help="Write a shard at least this often.")
    ] = 30.0,
    backend: Annotated[
        str,
        typer.Option(help="`ray` (a local cluster, or --address) or `local` (this process, "
                          "no Ray: one replica per model, all its cores)."),
    ] = "ray",
    derive: Annotated[
        bool,
        typer.Option(help="Write cells that are natural by construction (alpha 0, exact self "
                          "mixes; greedy) as copies of their natural run, decoding a seeded "
                          "10% as sentinels that must match it."),
    ] = True,
    lease_seconds: Annotated[
        float,
        typer.Option(min=1.0, help="A driver silent this long loses its lease on the sweep "
                                   "(another driver may then take it over)."),
    ] = 60.0,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v",
                     help="Debug logging, with Ray's notices and the workers' own output "
                          "(model loading bars included)."),
    ] = False,
) -> None:
    """Run every cell of GRID.yaml (resumable; Ctrl-C stops cleanly).

    Every check `validate` makes runs first; nothing starts and nothing is written
    unless the grid is valid on every model. Exit code: 0 all cells ok, 1 some cells
    failed or were not retried (reasons in failures/), 2 bad input, a refused store
    operation or a failed write, 130 interrupted (continue with --resume).
    """
    from rloop_ray.api import prepare_sweep
    from rloop_ray.driver import DriverError
    from rloop_ray.lease import LeaseError
    from rloop_ray.spec import SpecValidationError
    from rloop_ray.store import StoreError

    _setup_logging(verbose)
    if address and (num_gpus is not None or num_cpus is not None):
        typer.echo("warning: --num-gpus/--num-cpus size a local cluster; ignored with --address")
    if address and "://" not in results_dir and not os.path.isabs(results_dir):
        typer.echo(
            f"warning: --results-dir {results_dir} is relative to this driver's working "
            f"directory ({os.getcwd()}); under `ray job submit` that is a temporary copy. "
            f"Use an absolute path on shared storage or a URI (s3://, gs://, file://)."
        )
    try:
        job = prepare_sweep(
            grid_file, models=_split_models(model), results=results_dir, name=name,
            resume=resume, overwrite=overwrite, extend=extend,
            skip_model_check=skip_model_check, backend=backend, address=address,
            workers=workers, num_cpus=num_cpus, num_gpus=num_gpus,
            cpus_per_worker=cpus_per_worker, retry_failed=retry_failed,
            shard_rows=shard_rows, shard_seconds=shard_seconds, lease_seconds=lease_seconds,
            derive=derive,
        )
    except (SpecValidationError, StoreError, LeaseError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(_header(job))
    try:
        result = job.run()
    except DriverError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(result.message)
    again = _resume_args(grid_file, model, name, results_dir, address, backend)
    typer.echo(f"next: {_next_command(result, job, again)}")
    raise typer.Exit(result.exit_code)


SweepDir = Annotated[
    str,
    typer.Argument(metavar=SWEEP_METAVAR, show_default=False,
                   help="A sweep folder, `results/<name>`, or its URI."),
]


@app.command()
def status(sweep_dir: SweepDir) -> None:
    """Done, failed and remaining cells per model of a sweep, and its last run."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from rloop_ray.lease import read_lease
    from rloop_ray.store import ResultStore, StoreError

    store = ResultStore(sweep_dir)
    try:
        manifest = store.read_manifest()
        counts = store.counts()
        stale = store.stale_row_count()
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(
        f"sweep {manifest.get('name')}  status {manifest.get('status')}  "
        f"spec {str(manifest.get('spec_hash'))[:16]}  git {str(manifest.get('git_sha'))[:10]}"
    )
    runs = manifest.get("runs") or []
    if runs:
        last = runs[-1]
        typer.echo(
            f"runs {len(runs)}; last started {last.get('started_at')} on {last.get('host')}, "
            f"finished {last.get('finished_at') or '-'} ({last.get('status')})"
        )
        holder = read_lease(store)
        if holder is not None and not holder.expired():
            typer.echo(f"being written by {holder.describe()}")
        elif last.get("status") == "running":
            typer.echo(
                f"the last run's driver (pid {last.get('driver_pid')}) died without closing "
                f"it; `rloop-ray sweep ... --resume` continues it"
            )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False)
    for i, col in enumerate(("model", "planned", "done", "failed", "remaining")):
        table.add_column(col, justify="left" if i == 0 else "right")

    def text(n: int | None) -> str:
        return "?" if n is None else str(n)

    for c in counts:
        table.add_row(c.model, text(c.planned), str(c.done), str(c.failed), text(c.remaining))
    if len(counts) > 1:
        table.add_section()
        table.add_row("total", str(sum(c.planned or 0 for c in counts)),
                      str(sum(c.done for c in counts)), str(sum(c.failed for c in counts)),
                      str(sum(c.remaining or 0 for c in counts)), style="bold")
    Console(highlight=False).print(table)
    failed = sum(c.failed for c in counts)
    if failed:
        typer.echo(f"{failed} cells failed; reasons in {store.uri}/failures/ (--resume retries)")
    if stale:
        typer.echo(f"{stale} stale rows from an earlier plan are excluded from every count")


@app.command()
def repair(sweep_dir: SweepDir) -> None:
    """Move damaged or foreign shards to quarantine/ and restore a torn manifest.

    Nothing is deleted. The cells whose rows were in a quarantined shard count as not
    done, so `rloop-ray sweep GRID.yaml --resume` runs them again: every planned cell
    ends up exactly once. Exit code 0 repaired (or nothing to do), 2 not repairable.
    """
    from rloop_ray.store import ResultStore, StoreError

    store = ResultStore(sweep_dir)
    try:
        report = store.repair()
        store.read_manifest()
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    for path, reason in report.moved:
        typer.echo(f"quarantined {path}: {reason}")
    if report.manifest_restored:
        typer.echo("manifest.json was torn: restored from manifest.prev.json")
    for problem in report.problems:
        typer.echo(f"error: {problem}", err=True)
    if report.problems:
        raise typer.Exit(EXIT_INVALID)
    if not report.moved and not report.manifest_restored:
        typer.echo(f"{store.uri}: nothing damaged")
        return
    counts = store.counts()
    left = sum(c.remaining or 0 for c in counts) + sum(c.failed for c in counts)
    typer.echo(f"{left} planned cells are not done; continue with "
               f"`rloop-ray sweep GRID.yaml --resume`")
