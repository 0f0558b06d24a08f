"""The Ray actor that pins one model replica and runs whole work units on it.

Ray is the transport, not the logic: `ModelWorker` is a plain class around an engine
(`engine.Engine`, or `NullEngine` in tests and benchmarks) that `remote_worker` wraps
with `ray.remote`. The model is loaded once, in the constructor; every unit reuses it.
Errors are data (submitit style): a unit whose engine call raises comes back as failed
rows with the traceback instead of killing the actor, so only a dead process (OOM, kill,
segfault) surfaces as a Ray error for the driver to handle.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from rloop_ray.engine.types import CellRequest
from rloop_ray.store import now_utc

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the worker needs from an engine (docs/architecture.md, "Engine interface")."""

    def run(self, requests: list[CellRequest]) -> list[dict[str, Any]]: ...

    def info(self) -> dict[str, Any]: ...


EngineFactory = Callable[[str], EngineLike]
"""model id -> loaded engine. Must be picklable (a module-level function or a partial)."""


def _runtime_ids() -> dict[str, Any]:
    """Where this process runs: actor id, node id and the accelerators Ray assigned."""
    local: dict[str, Any] = {"actor_id": None, "node_id": None, "accelerator_ids": []}
    try:
        import ray

        if not ray.is_initialized():  # outside Ray (tests, debug): asking would start Ray
            return local
        ctx = ray.get_runtime_context()
        actor_id = ctx.get_actor_id()
        node_id = ctx.get_node_id()
        accel = ctx.get_accelerator_ids()
    except ImportError:
        return local
    return {
        "actor_id": actor_id,
        "node_id": node_id,
        "accelerator_ids": [str(i) for i in accel.get("GPU", [])],
    }


def failed_rows(
    requests: Sequence[CellRequest], error_type: str, error: str
) -> list[dict[str, Any]]:
    """Engine-shaped rows for cells that never got a result (errors as data)."""
    return [
        {"cell_id": r.cell_id, "status": "failed", "error_type": error_type, "error": error}
        for r in requests
    ]


class ModelWorker:
    """One model replica. Construct with `remote_worker(...)` to run it as a Ray actor."""

    def __init__(self, engine_factory: EngineFactory, model: str, index: int = 0) -> None:
        self.model = model
        self.index = index
        ids = _runtime_ids()
        self.actor_id: str | None = ids["actor_id"]
        self.node_id: str | None = ids["node_id"]
        self.accelerator_ids: list[str] = ids["accelerator_ids"]
        self.pid = os.getpid()
        short = (self.actor_id or f"local{self.pid}")[:8]
        self.name = f"w{index}-{short}"
        t0 = time.perf_counter()
        self.engine = engine_factory(model)  # the one model load of this replica
        self.load_seconds = time.perf_counter() - t0
        log.info("worker %s loaded %s in %.1fs", self.name, model, self.load_seconds)

    def ready(self) -> dict[str, Any]:
        """Identity and engine info; the driver calls it once to wait for the model load."""
        return {
            "worker": self.name,
            "index": self.index,
            "actor_id": self.actor_id,
            "node": self.node_id,
            "pid": self.pid,
            "accelerator_ids": self.accelerator_ids,
            "load_seconds": self.load_seconds,
            "max_batch_size": getattr(self.engine, "max_batch_size", None),
            "engine": self.engine.info(),
        }

    def run_unit(
        self,
        requests: list[CellRequest],
        attempt: int = 1,
        max_batch_size: int | None = None,
    ) -> list[dict[str, Any]]:
        """Run one unit's cells; returns one row per request (engine keys + runner keys).

        `max_batch_size` caps the engine's batch for this call only (the driver's retry of
        cells that ran out of GPU memory); engines without that attribute ignore it.
        """
        t0 = time.perf_counter()
        saved = getattr(self.engine, "max_batch_size", None)
        cap = max_batch_size is not None and saved is not None
        try:
            if cap:
                self.engine.max_batch_size = min(saved, max_batch_size)
            rows = self.engine.run(list(requests))
            if len(rows) != len(requests):
                raise RuntimeError(f"engine returned {len(rows)} rows for {len(requests)} requests")
        except Exception as exc:  # the engine broke its never-raise contract
            log.exception("engine raised on a unit of %d cells", len(requests))
            rows = failed_rows(requests, type(exc).__name__, traceback.format_exc())
        finally:
            if cap:
                self.engine.max_batch_size = saved
        seconds = (time.perf_counter() - t0) / max(len(requests), 1)
        finished = now_utc()
        runner = {
            "attempt": attempt,
            "worker": self.name,
            "node": self.node_id,
            "accelerator_ids": self.accelerator_ids,
            "seconds": seconds,
            "finished_at": finished,
        }
        out: list[dict[str, Any]] = []
        for req, row in zip(requests, rows, strict=True):
            merged = {**row, **runner}
            merged["cell_id"] = req.cell_id  # the request's id is authoritative
            merged.setdefault("status", "ok")
            out.append(merged)
        return out


def remote_worker(
    engine_factory: EngineFactory,
    model: str,
    index: int,
    *,
    num_gpus: float = 0,
    num_cpus: float = 1,
    max_restarts: int = 3,
) -> Any:
    """Start one `ModelWorker` actor and return its handle.

    Retries are split on purpose: Ray restarts a dead actor process up to `max_restarts`
    times (the constructor runs again and reloads the model), but `max_task_retries=0`
    so Ray never re-runs a unit by itself: the driver sees the failure, counts the attempt
    and requeues the unit on whichever worker is free, which keeps `attempt` honest and
    lets a unit that keeps killing its worker be recorded as failed instead of looping.
    """
    import ray

    actor_cls = ray.remote(ModelWorker)
    return actor_cls.options(
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        max_restarts=max_restarts,
        max_task_retries=0,
        name=None,
    ).remote(engine_factory, model, index)


class SpecEngineFactory:
    """Picklable `model id -> engine.Engine` built from the grid's model table.

    The device is decided on the worker, not the driver: a replica that Ray gave a GPU
    (CUDA_VISIBLE_DEVICES already narrowed to it) loads on `cuda`, a CPU replica on `cpu`,
    and a model with `device_map` (spread over several GPUs) keeps it.
    """

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        """`models`: model id -> {"name_or_path": ..., plus `Engine` keyword arguments}."""
        self.models = {k: dict(v) for k, v in models.items()}

    def __call__(self, model: str) -> EngineLike:
        from rloop_ray.engine import Engine

        if model not in self.models:
            raise KeyError(f"unknown model {model!r}; the sweep has {sorted(self.models)}")
        kwargs = dict(self.models[model])
        path = kwargs.pop("name_or_path", None) or model
        if not kwargs.get("device_map"):
            kwargs.pop("device_map", None)
            kwargs.setdefault("device", "cuda" if _runtime_ids()["accelerator_ids"] else "cpu")
        return Engine(path, **kwargs)
