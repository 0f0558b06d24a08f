"""Scheduling work units onto model workers: backpressure, retries, shards, progress, Ctrl-C.

The driver is the only stateful piece of a sweep and it keeps its state on disk: what is
done is whatever the store's shards say, so a driver killed at any instant is resumed by
running it again. Per model it starts one `ModelWorker` actor per replica, keeps at most
`max_in_flight` units queued on each (`ray.wait`, never a `ray.get` loop), batches rows
into shards of up to `shard_rows` rows or `shard_seconds` seconds, and writes each cell
once. A dead worker is handled in two layers, on purpose:

* Ray restarts the actor process (`max_restarts`, model reloaded in the constructor);
  `max_task_retries=0`, so Ray itself never re-runs a unit.
* The driver requeues the dead worker's in-flight units (attempt + 1) onto any live worker.
  A unit that was in flight when a worker died becomes a *suspect* and is only dispatched
  to an idle worker, alone, so a later death is pinned on it; after `max_unit_attempts`
  deaths its cells are recorded as failed (`WorkerDied`) instead of looping forever.

Cells that come back with `error_type = OutOfMemoryError` (GPU memory, docs/cluster.md)
are split: the unit's OOM cells are requeued in two halves with half the batch size,
recursively, until a single cell that still runs out of memory is recorded as failed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Protocol

from rloop_ray.derive import SENTINEL_MISMATCH, Derivations, check_sentinel, derived_row
from rloop_ray.engine.types import CellRequest
from rloop_ray.plan import Plan
from rloop_ray.store import ResultStore, StoreError, StoreWriteError, now_utc
from rloop_ray.vocab import (
    STATUS_OK,
    SWEEP_COMPLETE,
    SWEEP_FAILED,
    SWEEP_INCOMPLETE,
    SWEEP_INTERRUPTED,
    SWEEP_PARTIAL,
)
from rloop_ray.worker import (
    VERBOSE_ENV,
    EngineFactory,
    ModelWorker,
    failed_rows,
    remote_worker,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

BACKEND_RAY = "ray"
BACKEND_LOCAL = "local"
BACKENDS = (BACKEND_RAY, BACKEND_LOCAL)
"""Where a sweep's replicas run: Ray actors, or this process (no Ray)."""

OOM_ERROR_TYPES = frozenset({"OutOfMemoryError"})
"""Engine error types that mean "this batch did not fit": retried smaller, not failed."""


class CellLike(Protocol):
    cell_id: str

    def coordinates(self) -> dict[str, Any]: ...


class UnitLike(Protocol):
    """What the driver needs of a `grid.WorkUnit`."""

    unit_id: str
    model: str
    cells: Sequence[CellLike]


ToRequests = Callable[[Any], Sequence[CellRequest]]
"""unit -> its cells' engine requests (any order; matched to cells by cell_id)."""


class DriverError(RuntimeError):
    """The sweep cannot go on (no worker could start, every worker died)."""


@dataclass(frozen=True)
class DriverConfig:
    """Knobs of one sweep run. Defaults suit GPU workers; tests and benchmarks shrink them."""

    workers: int | None = None  # None: one per GPU replica; on CPUs one per node (see below)
    use_gpus: bool | None = None  # None: GPU workers iff the cluster has GPUs
    gpus_per_worker: float = 1.0
    cpus_per_worker: float | None = None  # None: 1 for GPU workers; CPU workers share the node
    max_in_flight: int = 2  # units queued per worker: one running, one waiting to start
    shard_rows: int = 5000  # a shard is written at this many rows ...
    shard_seconds: float = 30.0  # ... or when its oldest row is this old
    max_unit_attempts: int = 3  # worker deaths a unit may be part of before it is failed
    max_restarts: int = 3  # Ray-level restarts of a dead actor process
    retry_failed: bool = True  # a resume re-runs cells recorded as failed
    progress: bool | None = None  # None: a live display on a TTY unless CI is set
    log_every: float = 30.0  # seconds between progress log lines when there is no bar
    handle_sigint: bool = True  # first Ctrl-C/SIGTERM stops dispatching and flushes
    pack_cells: int = 1  # merge small units of one model into tasks of up to this many cells


@dataclass
class SweepResult:
    """What a run did. `status`: complete | partial | incomplete | failed | interrupted."""

    status: str
    planned: int
    skipped: int  # already done before this run
    ok: int  # cells that succeeded in this run
    failed: int  # cells recorded as failed in this run
    remaining: int  # cells neither done nor failed at the end
    seconds: float
    failed_cell_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed_not_retried: int = 0  # failed before, skipped by `retry_failed=False`

    @property
    def exit_code(self) -> int:
        if self.status == SWEEP_INTERRUPTED:
            return EXIT_INTERRUPTED
        return EXIT_OK if self.status in (SWEEP_COMPLETE, SWEEP_PARTIAL) else EXIT_FAILED

    @property
    def message(self) -> str:
        head = (
            f"{self.status}: {self.ok} cells ok, {self.failed} failed, "
            f"{self.remaining} remaining, {self.skipped} already done "
            f"(of {self.planned}) in {self.seconds:.1f}s"
        )
        notes = list(self.errors)
        if self.failed:
            notes.append(
                f"{self.failed} cells failed; their reasons are in failures/ "
                f"(rerun with --resume to retry them)"
            )
        if self.failed_not_retried:
            notes.append(
                f"{self.failed_not_retried} cells that failed before were not retried "
                f"(--no-retry-failed); the sweep is incomplete until they succeed"
            )
        if self.status == SWEEP_INTERRUPTED:
            notes.append("interrupted; continue with --resume")
        return "; ".join([head, *notes])


# -- Ray session -----------------------------------------------------------------------------


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Ray's logger of "Token authentication is enabled for this Ray cluster": a notice about
the cluster Ray starts, repeated on every run, which says nothing about the sweep."""


def verbose_logging() -> bool:
    """Whether rloop-ray logs at DEBUG (`--verbose`): then library and worker noise shows."""
    return logging.getLogger("rloop_ray").isEnabledFor(logging.DEBUG)


def interactive() -> bool:
    """A terminal a person watches: stderr is a TTY and this is not CI."""
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return sys.stderr.isatty() and not ci


@contextlib.contextmanager
def _quiet_ray_notices(quiet: bool) -> Iterator[None]:
    """Keep Ray's start-up notices (auth token, "Started a local Ray instance") out."""
    if not quiet:
        yield
        return
    auth = logging.getLogger(_RAY_AUTH_LOGGER)
    saved = auth.level
    auth.setLevel(logging.ERROR)
    try:
        yield
    finally:
        auth.setLevel(saved)


@contextlib.contextmanager
def _status(text: str, show: bool) -> Iterator[None]:
    """A transient spinner line while Ray starts (the progress display's first phase)."""
    if not show:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text, spinner="dots"):
        yield


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> Iterator[None]:
    """Ray for the duration of a sweep.

    No `address`: start an embedded local cluster (no dashboard; sized by num_cpus/num_gpus
    if given) and shut it down at the end. `auto` or `ray://...`: join an existing cluster
    and leave it running. An already initialised Ray (tests, notebooks) is used as is.

    Unless rloop-ray logs at DEBUG (`--verbose`), Ray's own notices and the workers' output
    stay out of the driver's terminal: workers report errors as rows and Ray's errors
    reach the driver as exceptions, so what is forwarded is noise (library warnings, model
    loading bars, colour codes); Ray keeps it under its session's `logs/` folder. When it
    is forwarded to something that is not a terminal, it comes without ANSI colour codes.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    verbose = verbose_logging()
    kwargs: dict[str, Any] = {"log_to_driver": verbose}
    if not verbose:
        kwargs["logging_level"] = logging.WARNING
    if address:
        kwargs["address"] = address
    else:
        # "local", not None: with no address Ray joins any cluster a `ray start` left
        # running on this machine (its ray_current_cluster file) instead of starting one
        kwargs.update(address="local", include_dashboard=False, dashboard_host="127.0.0.1")
        if num_cpus is not None:
            kwargs["num_cpus"] = int(num_cpus)
        if num_gpus is not None:
            kwargs["num_gpus"] = int(num_gpus)
        if verbose:
            kwargs["runtime_env"] = {"env_vars": {VERBOSE_ENV: "1"}}
    colour = os.environ.get("RAY_COLOR_PREFIX")
    if not sys.stderr.isatty():
        os.environ["RAY_COLOR_PREFIX"] = "0"  # read by Ray's log printer at every line
    t0 = time.monotonic()
    try:
        with _quiet_ray_notices(not verbose), _status(
                "starting Ray" if not address else f"joining Ray at {address}", interactive()):
            ray.init(**kwargs)
        log.info("Ray %s in %.1fs", "joined" if address else "started", time.monotonic() - t0)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if colour is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        else:
            os.environ["RAY_COLOR_PREFIX"] = colour


# -- internals ------------------------------------------------------------------------------


@dataclass
class _Task:
    unit_id: str
    model: str
    requests: list[CellRequest]
    attempt: int
    deaths: int = 0
    max_batch_size: int | None = None  # set when an OOM split asked for smaller batches

    @property
    def suspect(self) -> bool:
        return self.deaths > 0


@dataclass
class _Worker:
    index: int
    handle: Any
    state: str = "starting"  # starting | ready | probing | dead
    name: str = ""
    in_flight: int = 0
    suspect_in_flight: bool = False
    probe_at: float = 0.0

    def capacity(self, max_in_flight: int) -> int:
        if self.state != "ready" or self.suspect_in_flight:
            return 0
        return max_in_flight - self.in_flight


def _coordinates(cell: Any) -> dict[str, Any]:
    coords = getattr(cell, "coordinates", None)
    if callable(coords):
        return dict(coords())
    if is_dataclass(cell) and not isinstance(cell, type):
        return asdict(cell)
    raise TypeError(f"{type(cell).__name__} has no coordinates() and is not a dataclass")


def _replica_slots(nodes: Sequence[Mapping[str, float]], key: str, per_replica: float) -> int:
    """How many replicas needing `per_replica` of resource `key` fit, node by node.

    A replica's GPUs must be on one node (accelerate's `device_map` spreads a model over
    the GPUs of one process), so two 1-GPU nodes hold no 2-GPU replica.
    """
    if per_replica <= 0:
        return sum(math.floor(n.get(key, 0)) for n in nodes)
    return sum(math.floor(n.get(key, 0) / per_replica + 1e-9) for n in nodes)


def _node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node, as the cluster has them now."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _default_workers(
    config: DriverConfig, use_gpus: bool, nodes: Sequence[Mapping[str, float]]
) -> int:
    """Replicas per model: `config.workers`, else as many as the nodes hold now.

    Counted when a model starts; nodes that join later are used only by replicas asked for
    up front (`workers`), which wait as pending actors (the autoscaler's demand) meanwhile.
    """
    if config.workers is not None:
        return max(1, config.workers)
    if use_gpus:
        return max(1, _replica_slots(nodes, "GPU", config.gpus_per_worker))
    if config.cpus_per_worker is None:
        return max(1, sum(1 for n in nodes if n.get("CPU", 0) >= 1))
    return max(1, _replica_slots(nodes, "CPU", config.cpus_per_worker))


def _worker_cpus(config: DriverConfig, use_gpus: bool, nodes: Sequence[Mapping[str, float]],
                 n_workers: int) -> float:
    """CPUs each replica asks Ray for (its torch threads on a CPU replica).

    GPU replicas need one CPU to drive the GPU. CPU replicas without an explicit
    `cpus_per_worker` split the cores of the nodes they land on: a replica with one thread
    on a many-core machine leaves the rest idle (torch inside an actor runs as many
    threads as the actor has CPUs), so the local default is one replica with every core.
    """
    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    if use_gpus:
        return 1.0
    cpu_nodes = [n.get("CPU", 0) for n in nodes if n.get("CPU", 0) >= 1] or [1.0]
    per_node = math.ceil(n_workers / len(cpu_nodes))
    share = min(cpu_nodes) / per_node
    return float(math.floor(share)) if share >= 1 else share


def _progress_enabled(config: DriverConfig) -> bool:
    if config.progress is not None:
        return config.progress
    return interactive()


@contextlib.contextmanager
def _logging_through(stream: Any) -> Iterator[None]:
    """Point the root logger's console handlers at `stream` for a while.

    A handler keeps the stderr it was created with; while the live display redraws its line,
    log records must go through the display's stream (printed above it, not over it).
    """
    moved = []
    for handler in logging.getLogger().handlers:
        if (isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler)
                and handler.stream in (sys.__stderr__, sys.__stdout__)):
            moved.append((handler, handler.setStream(stream)))
    try:
        yield
    finally:
        for handler, previous in moved:
            handler.setStream(previous)


class _Progress:
    """The run as it goes: one live line on a terminal, log lines elsewhere.

    On a terminal (rich): the phase (`loading <model>`, `running <model>`, `writing`), a
    bar of cells done out of the sweep's planned cells, failures, rate, elapsed time and
    ETA, redrawn in place; log records print above it. Elsewhere (CI, a log file, `ray job
    logs`): a log line at every phase and every `log_every` seconds.
    """

    def __init__(self, total: int, initial: int, enabled: bool, log_every: float) -> None:
        self.total = total
        self.initial = initial
        self.done = initial
        self.failed = 0
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.log_every = log_every
        self.phase_text = "starting"
        self.bar: Any = None
        self._task: Any = None
        self._redirect: contextlib.ExitStack | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                SpinnerColumn(), TextColumn("{task.description:<24}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("cells{task.fields[extra]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._task = self.bar.add_task(self.phase_text, total=total, completed=initial,
                                           extra="")
            self.bar.start()
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(_logging_through(sys.stderr))  # rich's proxy now

    def phase(self, text: str) -> None:
        """What the run is doing now; shown on the live line, or logged once."""
        if text == self.phase_text:
            return
        self.phase_text = text
        if self.bar is not None:
            self.bar.update(self._task, description=text)
        else:
            log.info("%s", text)

    def _extra(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{rate:.1f} cells/s"] if self.done > self.initial else []
        if self.failed:
            parts.append(f"{self.failed} failed")
        return "".join(f" \u00b7 {p}" for p in parts)

    def update(self, n_ok: int, n_failed: int) -> None:
        self.done += n_ok + n_failed
        self.failed += n_failed
        if self.bar is not None:
            self.bar.update(self._task, advance=n_ok + n_failed, extra=self._extra())
            return
        now = time.monotonic()
        if now - self.last_log >= self.log_every:
            self.last_log = now
            self.log()

    def log(self) -> None:
        elapsed = time.monotonic() - self.t0
        ran = self.done - self.initial
        rate = ran / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        log.info(
            "cells %d/%d (%.1f%%), %.1f cells/s, ETA %s, %d failed",
            self.done,
            self.total,
            100.0 * self.done / max(self.total, 1),
            rate,
            eta,
            self.failed,
        )

    def close(self, status: str = "done") -> None:
        """Leave the final line (the status, cells done) on the terminal, or log it."""
        if self.bar is not None:
            self.bar.update(self._task, description=status, extra=self._extra())
            self.bar.stop()
            if self._redirect is not None:
                self._redirect.close()
            self.bar = None
        else:
            self.log()


class _SigintLatch:
    """First Ctrl-C or SIGTERM sets a flag (stop dispatching, flush, exit 130); a second aborts.

    SIGTERM is what `ray job stop` sends a job's entrypoint (then SIGKILL after
    `RAY_JOB_STOP_WAIT_TIME_S`, 3 s by default), and what Kubernetes sends a pod.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.stop = False
        self._previous: dict[int, Any] = {}
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        log.warning(
            "%s: no new units; flushing finished cells (Ctrl-C again to abort)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> _SigintLatch:
        if self._enabled:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():  # None: it was not set from Python
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


class _Run:
    """State of one `run_sweep` call."""

    def __init__(
        self,
        store: ResultStore,
        engine_factory: EngineFactory,
        config: DriverConfig,
        coords: dict[str, dict[str, Any]],
        progress: _Progress,
        latch: _SigintLatch,
    ) -> None:
        self.store = store
        self.engine_factory = engine_factory
        self.config = config
        self.coords = coords
        self.progress = progress
        self.latch = latch
        self.written: set[str] = set()
        self.ok = 0
        self.failed_ids: list[str] = []
        self.errors: list[str] = []
        self.engines: dict[str, Any] = {}
        self.workers: list[dict[str, Any]] = []  # provenance: where each replica ran
        self.engine_batch: dict[str, int] = {}  # model -> the engine's own max batch size
        self.writer = store.writer(shard_rows=config.shard_rows,
                                   shard_seconds=config.shard_seconds)
        self.derive_setup(Derivations(), {})

    # -- rows and shards ----------------------------------------------------------------

    def derive_setup(self, derive: Derivations, deferred: dict[str, _Task]) -> None:
        """Cells to copy from their natural twin; twins already done are read from the store."""
        self.derive = derive
        self.deferred = deferred
        self.dependents = {t: [c for c in cs if c in deferred]
                           for t, cs in derive.dependents().items()}
        self.twin_rows: dict[str, dict[str, Any]] = {}
        self.parked: dict[str, list[dict[str, Any]]] = {}  # twin id -> sentinel rows waiting
        wanted = sorted({*self.dependents, *derive.sentinels.values()})
        if wanted and (deferred or derive.sentinels):
            import pyarrow as pa
            import pyarrow.compute as pc

            done = self.store.read_cells()
            if done.num_rows:
                mask = pc.is_in(done["cell_id"], value_set=pa.array(wanted, pa.string()))
                for row in done.filter(mask).to_pylist():
                    if row["status"] == STATUS_OK:
                        self.twin_rows[row["cell_id"]] = row
        for twin, row in list(self.twin_rows.items()):
            self._deliver(twin, row)

    def _deliver(self, twin: str, row: dict[str, Any]) -> None:
        """A natural twin's ok row is here: write its dependents and check its sentinels."""
        copies = [derived_row(row, self.coords[c], twin, now_utc())
                  for c in self.dependents.pop(twin, []) if c not in self.written]
        for c in copies:
            self.deferred.pop(c["cell_id"], None)
        waiting = [check_sentinel(s, row) for s in self.parked.pop(twin, [])]
        if copies or waiting:
            self.accept([*copies, *waiting], checked=True)

    def undeliverable(self, model: str) -> list[_Task]:
        """Derived cells of `model` whose twin never produced an ok row: decode them."""
        for twin, rows in list(self.parked.items()):  # sentinels without a twin: as they are
            if rows and rows[0].get("model") == model:
                self.accept(self.parked.pop(twin), checked=True)
        left = [t for t in self.deferred.values() if t.model == model]
        for t in left:
            self.deferred.pop(t.requests[0].cell_id)
        if left:
            log.warning("model %s: %d cells natural by construction lost their natural twin "
                        "(failed); decoding them", model, len(left))
        return _pack(left, self.config.pack_cells)

    def accept(self, rows: Iterable[dict[str, Any]], *, checked: bool = False) -> None:
        """Buffer a unit's rows; a cell id already written in this run is dropped.

        A sentinel's row waits for its natural twin's (and fails if their tokens differ);
        a natural twin's ok row releases the rows copied from it.
        """
        n_ok = n_failed = 0
        arrived: list[tuple[str, dict[str, Any]]] = []
        for row in rows:
            cid = row["cell_id"]
            if cid in self.written:
                log.debug("dropping duplicate row for cell %s", cid)
                continue
            twin = self.derive.sentinels.get(cid)
            if twin is not None and not checked:
                if twin in self.twin_rows:
                    row = check_sentinel(row, self.twin_rows[twin])
                else:
                    self.parked.setdefault(twin, []).append({**row, **self.coords[cid]})
                    continue
            self.written.add(cid)
            full = {**row, **self.coords[cid]}  # grid coordinates are authoritative
            if full.get("error_type") == SENTINEL_MISMATCH:
                log.error("cell %s: %s", cid, full.get("error"))
            if cid in self.dependents or cid in self.derive.sentinels.values():
                if full.get("status") == STATUS_OK:
                    self.twin_rows[cid] = full
                    arrived.append((cid, full))
            self.writer.add(full)
            if full.get("status") == STATUS_OK:
                n_ok += 1
            else:
                n_failed += 1
                self.failed_ids.append(cid)
        self.ok += n_ok
        self.progress.update(n_ok, n_failed)
        for twin, row in arrived:
            self._deliver(twin, row)

    def maybe_flush(self) -> None:
        self.writer.maybe_flush()

    def flush(self) -> None:
        """Cells first (the source of truth for resume), then their failure records."""
        self.writer.flush()

    def fail_task(self, task: _Task, error_type: str, error: str) -> None:
        rows = failed_rows(task.requests, error_type, error)
        for r in rows:
            r.update(attempt=task.attempt, finished_at=now_utc())
        self.accept(rows)

    # -- one model ------------------------------------------------------------------------

    def _record_worker(self, model: str, info: Mapping[str, Any]) -> None:
        """Provenance of a replica that became ready (the manifest's `workers`)."""
        keys = ("worker", "node", "pid", "accelerator_ids", "load_seconds", "threads")
        self.workers.append({"model": model, "ready_at": now_utc(),
                             **{k: info.get(k) for k in keys}})

    def run_model_local(self, model: str, tasks: list[_Task]) -> None:
        """All tasks of one model on one in-process replica, in order (no Ray).

        The same rows as a Ray worker's (`ModelWorker` is a plain class), the same OOM
        splitting; a model that cannot load is a `DriverError` like a worker that never
        started.
        """
        self.progress.phase(f"loading {model}")
        try:
            worker = ModelWorker(self.engine_factory, model, 0)
        except Exception as exc:  # noqa: BLE001  (any load failure ends this model's run)
            raise DriverError(f"model {model} could not load: {type(exc).__name__}: {exc}"
                              ) from exc
        self.progress.phase(f"running {model}")
        info = worker.ready()
        self.engines.setdefault(model, info["engine"])
        if info.get("max_batch_size"):
            self.engine_batch.setdefault(model, int(info["max_batch_size"]))
        self._record_worker(model, info)
        queue: deque[_Task] = deque(tasks)
        while queue and not self.latch.stop:
            task = queue.popleft()
            rows = worker.run_unit(task.requests, task.attempt, task.max_batch_size)
            self.accept(self._split_oom(task, rows, queue.appendleft))
            self.maybe_flush()

    def run_model(self, model: str, tasks: list[_Task], n_workers: int, use_gpus: bool,
                  cpus: float = 1.0) -> None:
        import ray
        from ray.exceptions import RayError

        cfg = self.config
        workers = [
            _Worker(
                index=i,
                name=f"w{i}",
                handle=remote_worker(
                    self.engine_factory,
                    model,
                    i,
                    num_gpus=cfg.gpus_per_worker if use_gpus else 0,
                    num_cpus=cpus,
                    max_restarts=cfg.max_restarts,
                    threads=None if use_gpus else max(1, int(cpus)),
                ),
            )
            for i in range(n_workers)
        ]
        queue: deque[_Task] = deque(tasks)
        suspects: deque[_Task] = deque()
        # ref -> (kind, worker, task): kind is "ready" (model load), "unit" or "probe".
        pending: dict[Any, tuple[str, _Worker, _Task | None]] = {}
        for w in workers:
            pending[w.handle.ready.remote()] = ("ready", w, None)
        log.info("model %s: %d cells in %d tasks on %d replica%s (%s CPUs each)", model,
                 sum(len(t.requests) for t in tasks), len(tasks), n_workers,
                 "" if n_workers == 1 else "s", f"{cpus:g}")
        self.progress.phase(f"loading {model}")

        def submit(w: _Worker, t: _Task) -> Any:
            return w.handle.run_unit.remote(t.requests, t.attempt, t.max_batch_size)

        def dispatch() -> None:
            for w in workers:
                if suspects:  # suspects run alone: let workers drain, then hand them over
                    if w.state == "ready" and w.in_flight == 0:
                        t = suspects.popleft()
                        pending[submit(w, t)] = ("unit", w, t)
                        w.in_flight += 1
                        w.suspect_in_flight = True
                    continue
                for _ in range(w.capacity(cfg.max_in_flight)):
                    if not queue:
                        break
                    t = queue.popleft()
                    pending[submit(w, t)] = ("unit", w, t)
                    w.in_flight += 1

        def worker_lost(w: _Worker, task: _Task, exc: BaseException) -> None:
            w.in_flight -= 1
            if task.suspect:
                w.suspect_in_flight = False
            task.deaths += 1
            task.attempt += 1
            if task.deaths >= cfg.max_unit_attempts:
                log.error(
                    "unit %s was on a dying worker %d times; recording its cells as failed",
                    task.unit_id,
                    task.deaths,
                )
                self.fail_task(
                    task,
                    "WorkerDied",
                    f"the worker died {task.deaths} times while this unit was in flight; "
                    f"last error: {type(exc).__name__}: {exc}",
                )
            else:
                suspects.append(task)
            if w.state == "ready":
                log.warning("worker %s died (%s); requeueing its units", w.name, type(exc).__name__)
                w.state = "probing"
                w.probe_at = time.monotonic()

        try:
            while True:
                if self.latch.stop:  # keep units that already finished, start nothing new
                    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                    for ref in done:
                        kind, w, task = pending.pop(ref)
                        if task is not None:
                            self._unit_done(ref, w, task, lambda *a: None, lambda t: None)
                    return
                now = time.monotonic()
                for w in workers:
                    if w.state == "probing" and w.probe_at and now >= w.probe_at:
                        w.probe_at = 0.0  # one probe at a time
                        pending[w.handle.ready.remote()] = ("probe", w, None)
                dispatch()
                live = [w for w in workers if w.state != "dead"]
                if (
                    not queue
                    and not suspects
                    and not any(k == "unit" for k, _, _ in pending.values())
                ):
                    return
                if not live and not pending:
                    left = sum(len(t.requests) for t in (*queue, *suspects))
                    raise DriverError(f"every worker for model {model} died; {left} cells not run")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                if ready:
                    rest = [r for r in pending if r not in ready]
                    if rest:
                        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                        ready.extend(more)
                for ref in ready:
                    kind, w, task = pending.pop(ref)
                    if task is not None:
                        self._unit_done(ref, w, task, worker_lost, queue.appendleft)
                    else:
                        self._control_done(ref, model, kind, w)
                self.maybe_flush()
        finally:
            for w in workers:
                with contextlib.suppress(RayError, ValueError):
                    ray.kill(w.handle, no_restart=True)

    def _unit_done(
        self,
        ref: Any,
        w: _Worker,
        task: _Task,
        worker_lost: Callable[..., None],
        requeue: Callable[[_Task], None],
    ) -> None:
        """A unit's result arrived: rows, a dead worker (requeue), or a task error (record)."""
        import ray
        from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayError

        try:
            rows = ray.get(ref)  # already ready: does not block
        except (RayActorError, ObjectLostError, NodeDiedError) as exc:
            # Died, restarting or unreachable, or its node went away with the result.
            worker_lost(w, task, exc)
            return
        except RayError as exc:  # the call itself failed (e.g. result not serialisable)
            w.in_flight -= 1
            if task.suspect:
                w.suspect_in_flight = False
            self.fail_task(task, type(exc).__name__, str(exc))
            return
        w.in_flight -= 1
        if task.suspect:
            w.suspect_in_flight = False
        self.accept(self._split_oom(task, rows, requeue))

    def _split_oom(
        self, task: _Task, rows: list[dict[str, Any]], requeue: Callable[[_Task], None]
    ) -> list[dict[str, Any]]:
        """Requeue a unit's out-of-memory cells in two halves at half the batch size.

        Returns the rows to write now: everything but the OOM cells of a multi-cell task.
        A single cell that still runs out of memory is written as failed (no loop).
        """
        if len(task.requests) < 2:
            return rows
        oom = {
            r["cell_id"]
            for r in rows
            if r.get("status") != STATUS_OK and r.get("error_type") in OOM_ERROR_TYPES
        }
        if not oom:
            return rows
        batch = task.max_batch_size or self.engine_batch.get(task.model) or len(task.requests)
        cap = max(1, min(batch, len(task.requests)) // 2)
        again = [q for q in task.requests if q.cell_id in oom]
        mid = (len(again) + 1) // 2
        for half in (again[:mid], again[mid:]):
            if half:
                requeue(_Task(task.unit_id, task.model, half, task.attempt + 1, max_batch_size=cap))
        log.warning(
            "unit %s: %d cells out of memory; retrying them in halves with batch size %d",
            task.unit_id,
            len(again),
            cap,
        )
        return [r for r in rows if r["cell_id"] not in oom]

    def _control_done(self, ref: Any, model: str, kind: str, w: _Worker) -> None:
        """A `ready` (model load) or `probe` (after a death) answer for worker `w`."""
        import ray
        from ray.exceptions import ActorDiedError, RayError

        try:
            info = ray.get(ref)
        except ActorDiedError as exc:  # constructor raised, or restarts exhausted
            w.state = "dead"
            reason = _last_line(exc)
            if kind == "ready":
                msg = f"a worker for model {model} could not start: {reason}"
            else:
                msg = f"worker {w.name} for model {model} died for good: {reason}"
            log.error("%s", msg)
            if msg not in self.errors:
                self.errors.append(msg)
            return
        except RayError:  # restarting (ActorUnavailableError) or unreachable: look again
            w.state = "probing"
            w.probe_at = time.monotonic() + 0.5
            return
        if kind == "probe":
            log.info("worker %s is back (pid %s)", info["worker"], info["pid"])
        else:
            self.progress.phase(f"running {model}")
            self.engines.setdefault(model, info["engine"])
            if info.get("max_batch_size"):
                self.engine_batch.setdefault(model, int(info["max_batch_size"]))
            self._record_worker(model, info)
            log.info(
                "worker %s ready on node %s, accelerators %s (load %.1fs)",
                info["worker"],
                (info["node"] or "?")[:8],
                ",".join(info["accelerator_ids"]) or "-",
                info["load_seconds"],
            )
        w.name = info["worker"]
        w.state = "ready"


def _last_line(exc: BaseException) -> str:
    """The informative end of a Ray error (the remote exception), without the traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _plan(
    units: Iterable[UnitLike],
    to_requests: ToRequests,
    skip: set[str],
    prior_attempts: Mapping[str, int],
    models: Collection[str] | None = None,
    defer: Collection[str] = (),
) -> tuple[dict[str, list[_Task]], dict[str, int], dict[str, dict[str, Any]],
           dict[str, _Task]]:
    """Units -> tasks of only the cells still to run, per model, in the units' order.

    Units of models outside `models` count in the plan (the manifest's planned cells, which
    `status` reports) but get no tasks. Cells in `defer` (derived from a natural twin) get
    coordinates but no task; their one-cell tasks are returned apart, to run only if the
    twin's row cannot be had."""
    deferred: dict[str, _Task] = {}
    tasks: dict[str, list[_Task]] = {}
    planned: dict[str, int] = {}
    coords: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for unit in units:
        planned[unit.model] = planned.get(unit.model, 0) + len(unit.cells)
        todo: dict[str, Any] = {}
        for cell in unit.cells:
            if cell.cell_id in seen:
                raise ValueError(f"cell {cell.cell_id} appears twice in the grid")
            seen.add(cell.cell_id)
            if cell.cell_id not in skip and (models is None or unit.model in models):
                todo[cell.cell_id] = cell
        if not todo:
            continue
        requests = [r for r in to_requests(unit) if r.cell_id in todo]
        missing = set(todo) - {r.cell_id for r in requests}
        if missing:
            raise ValueError(f"unit {unit.unit_id}: no request for cells {sorted(missing)[:3]}")
        for cid, cell in todo.items():
            c = _coordinates(cell)
            c.setdefault("model", unit.model)
            c["cell_id"] = cid
            c["unit_id"] = unit.unit_id
            coords[cid] = c
        attempt = 1 + max((prior_attempts.get(cid, 0) for cid in todo), default=0)
        for req in [r for r in requests if r.cell_id in defer]:
            deferred[req.cell_id] = _Task(unit.unit_id, unit.model, [req],
                                          1 + prior_attempts.get(req.cell_id, 0))
        requests = [r for r in requests if r.cell_id not in defer]
        if requests:
            tasks.setdefault(unit.model, []).append(
                _Task(unit.unit_id, unit.model, requests, attempt))
    return tasks, planned, coords, deferred


def _pack(tasks: list[_Task], pack_cells: int) -> list[_Task]:
    """Tasks of exactly `pack_cells` cells (the last of an attempt may be short).

    A unit is all cells of one (source, target) pair; natural-only sweeps have one cell
    per unit, and a batch of one wastes most of a decode step. The engine packs rows of
    different prompts into one batch (left padding, exact), so one call can serve many
    units, and a unit may be split between two calls: every row keeps its own unit id
    (from the cell coordinates), and resume and derivation work per cell. Filling each
    call to the engine's batch size is what lets a sweep run at the engine's own speed:
    whole units only (6 + 6 cells of 16) leave a quarter of each batch empty.
    """
    if pack_cells <= 1:
        return tasks
    packed: list[_Task] = []
    for task in tasks:
        requests = list(task.requests)
        while requests:
            last = packed[-1] if packed else None
            room = pack_cells - len(last.requests) if last is not None else 0
            if last is None or last.attempt != task.attempt or room <= 0:
                packed.append(_Task(task.unit_id, task.model, requests[:pack_cells],
                                    task.attempt))
                requests = requests[pack_cells:]
                continue
            base, _, more = last.unit_id.partition("+")  # "u0+2": u0 and 2 more units
            packed[-1] = _Task(f"{base}+{int(more or 0) + 1}", last.model,
                               [*last.requests, *requests[:room]], last.attempt)
            requests = requests[room:]
    return packed


def run_sweep(
    units: Iterable[UnitLike],
    store: ResultStore,
    engine_factory: EngineFactory,
    to_requests: ToRequests,
    config: DriverConfig | None = None,
    *,
    models: Collection[str] | None = None,
    backend: str = BACKEND_RAY,
    derivations: Derivations | None = None,
) -> SweepResult:
    """Run every cell of `units` not yet done in `store`; resumable at any point.

    `store` must be prepared (`ResultStore.prepare`). `backend="ray"`: Ray initialised or
    started here (`ray_session`), models one after another, each on its own set of
    workers. `backend="local"`: one replica per model in this process, no Ray, the same
    store and exactly-once semantics (notebooks, debugging, one machine). `models`
    restricts the run to some models (the others stay planned, not run). `derivations`
    (`derive.plan_derivations`): cells written as copies of their natural twin instead of
    decoded, and the sentinels checked against it. Returns a `SweepResult`; its
    `exit_code` is what the CLI exits with (0, 1, 130).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    cfg = config or DriverConfig()
    if not store.exists():
        raise StoreError(f"{store.uri} has no manifest; call store.prepare(spec) first")
    t0 = time.monotonic()
    units = list(units)
    _check_plan(store, units)
    done = store.done_cell_ids()
    failed_before = store.failed_cell_ids()
    skip = done if cfg.retry_failed else done | failed_before
    not_retried = 0 if cfg.retry_failed else sum(
        1 for u in units if models is None or u.model in models
        for c in u.cells if c.cell_id in failed_before)
    prior = store.attempts() if failed_before else {}
    if models is not None:
        unknown = set(models) - {u.model for u in units}
        if unknown:
            raise ValueError(f"models {sorted(unknown)} are not in the grid")
    derive = derivations or Derivations()
    tasks, planned, coords, deferred = _plan(units, to_requests, skip, prior, models,
                                             defer=set(derive.derived))
    units_to_run = sum(len(ts) for ts in tasks.values())  # one task per unit before packing
    tasks = {m: _pack(ts, cfg.pack_cells) for m, ts in tasks.items()}
    total = sum(planned.values())
    already = sum(1 for u in units for c in u.cells if c.cell_id in skip)
    not_selected = sum(
        1
        for u in units
        if models is not None and u.model not in models
        for c in u.cells
        if c.cell_id not in skip
    )
    to_run = sum(len(t.requests) for ts in tasks.values() for t in ts) + len(deferred)

    with contextlib.ExitStack() as stack:
        use_gpus = False
        cluster: dict[str, Any] = {"backend": backend}
        if backend == BACKEND_RAY:
            import ray

            if not ray.is_initialized():
                stack.enter_context(ray_session())
            resources = ray.cluster_resources()
            nodes = _node_resources()
            use_gpus = (cfg.use_gpus if cfg.use_gpus is not None
                        else resources.get("GPU", 0) > 0)
            if use_gpus and _replica_slots(nodes, "GPU", cfg.gpus_per_worker) < 1:
                per_node = sorted((n.get("GPU", 0) for n in nodes), reverse=True)
                raise DriverError(
                    f"GPU workers need {cfg.gpus_per_worker} GPUs each, on one node; the "
                    f"cluster has {resources.get('GPU', 0)} GPUs, per node {per_node}"
                )
            cluster.update(
                ray_address=ray.get_runtime_context().gcs_address,
                cluster_resources={k: v for k, v in resources.items() if "node:" not in k},
            )
        store.start_run(
            planned=planned,
            cells_to_run=to_run,
            cells_already_done=already,
            models=sorted(models) if models is not None else None,
            driver_config=asdict(cfg),
            **cluster,
        )
        log.info(
            "sweep %s: %d cells planned in %d units, %d already done, %d to run "
            "(%d units, packed into %d tasks of up to %d cells)",
            store.name,
            total,
            len(units),
            already,
            to_run,
            units_to_run,
            sum(len(t) for t in tasks.values()),
            max(1, cfg.pack_cells),
        )
        latch = stack.enter_context(_SigintLatch(cfg.handle_sigint))
        progress = _Progress(total, already, _progress_enabled(cfg), cfg.log_every)
        run = _Run(store, engine_factory, cfg, coords, progress, latch)
        run.derive_setup(derive, deferred)
        status = SWEEP_FAILED
        write_error: StoreWriteError | None = None
        try:
            for model in {**tasks, **{t.model: [] for t in deferred.values()}}:
                model_tasks = tasks.get(model, [])
                if latch.stop:
                    break
                try:
                    # a second pass decodes derived cells whose natural twin failed
                    for pass_tasks in (model_tasks, None):
                        if pass_tasks is None:
                            pass_tasks = run.undeliverable(model)
                            if not pass_tasks or latch.stop:
                                break
                        if not pass_tasks:
                            continue
                        if backend == BACKEND_LOCAL:
                            run.run_model_local(model, pass_tasks)
                        else:
                            nodes = _node_resources()  # nodes that joined since the last
                            n_workers = min(_default_workers(cfg, use_gpus, nodes),
                                            len(pass_tasks))
                            cpus = _worker_cpus(cfg, use_gpus, nodes, n_workers)
                            run.run_model(model, pass_tasks, n_workers, use_gpus, cpus)
                except DriverError as exc:
                    log.error("%s", exc)
                    run.errors.append(str(exc))
                run.flush()
            status = SWEEP_INTERRUPTED if latch.stop else SWEEP_COMPLETE
        except KeyboardInterrupt:
            status = SWEEP_INTERRUPTED
            log.warning("interrupted; flushing finished cells")
        except StoreWriteError as exc:
            write_error = exc
            status = SWEEP_FAILED
            log.error("%s", exc)
        finally:
            progress.phase("writing")
            try:
                if write_error is None:
                    run.flush()
            except StoreWriteError as exc:
                write_error = exc
                status = SWEEP_FAILED
            finally:
                progress.close("interrupted" if status == SWEEP_INTERRUPTED else
                               "write failed" if write_error is not None else "done")
                lost = run.writer.discard()
                remaining = to_run - run.ok - len(run.failed_ids) + lost
                if status == SWEEP_COMPLETE and (run.failed_ids or remaining or run.errors):
                    status = SWEEP_FAILED
                if status == SWEEP_COMPLETE and not_retried:
                    status = SWEEP_INCOMPLETE
                result = SweepResult(
                    status=status,
                    planned=total,
                    skipped=already,
                    ok=run.ok,
                    failed=len(run.failed_ids),
                    remaining=remaining,
                    seconds=time.monotonic() - t0,
                    failed_cell_ids=run.failed_ids,
                    errors=run.errors,
                    failed_not_retried=not_retried,
                )
                if status == SWEEP_COMPLETE and not_selected:
                    result.status = SWEEP_PARTIAL
                try:
                    store.finish_run(
                        result.status,
                        cells_ok=result.ok,
                        cells_failed=result.failed,
                        cells_remaining=remaining,
                        engines=run.engines,
                        workers=run.workers,
                        errors=run.errors,
                    )
                except StoreWriteError as exc:
                    write_error = write_error or exc
    if write_error is not None:
        raise write_error
    log.debug("%s", result.message)  # the caller reports it (the CLI prints it once)
    return result


def _check_plan(store: ResultStore, units: Sequence[UnitLike]) -> None:
    """Record the plan of a store prepared without one; refuse cells outside the plan.

    Rows of unplanned cells would be invisible to every reader, so running them would
    spend compute on nothing: that is a caller error (prepare the store with the plan).
    """
    plan = store.read_plan()
    if plan is None:
        store.write_plan(Plan.from_units(units))
        return
    planned = plan.ids
    outside = [c.cell_id for u in units for c in u.cells if c.cell_id not in planned]
    if outside:
        raise StoreError(
            f"{len(outside)} cells to run are not in the plan of {store.uri} (e.g. "
            f"{outside[0]}); prepare the store with this grid's plan first"
        )
