"""The Ray actor that pins one model replica and runs whole work units on it.

Ray is the transport, not the logic: `ModelWorker` is a plain class around an engine
(`engine.Engine`, or `NullEngine` in tests and benchmarks) that `remote_worker` wraps
with `ray.remote`. The model is loaded once, in the constructor; every unit reuses it.
Errors are data (submitit style): a unit whose engine call raises comes back as failed
rows with the traceback instead of killing the actor, so only a dead process (OOM, kill,
segfault) surfaces as a Ray error for the driver to handle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from rloop_ray.engine.types import CellRequest
from rloop_ray.store import now_utc
from rloop_ray.vocab import STATUS_FAILED, STATUS_OK

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


def _set_torch_threads(threads: int | None) -> int | None:
    """Give torch the replica's CPUs as intra-op threads (None: leave torch's default).

    Inside a Ray actor torch starts with one thread per CPU Ray *assigned* at process start
    (often 1), whatever the actor later asks for; setting it after the model load is
    enough, since only later ops use it. Engines that never imported torch are left alone.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if threads is not None and threads >= 1:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())


def failed_rows(
    requests: Sequence[CellRequest], error_type: str, error: str
) -> list[dict[str, Any]]:
    """Engine-shaped rows for cells that never got a result (errors as data)."""
    return [
        {"cell_id": r.cell_id, "status": STATUS_FAILED, "error_type": error_type, "error": error}
        for r in requests
    ]


class ModelWorker:
    """One model replica. Construct with `remote_worker(...)` to run it as a Ray actor."""

    def __init__(self, engine_factory: EngineFactory, model: str, index: int = 0,
                 threads: int | None = None) -> None:
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
        self.threads = _set_torch_threads(threads)
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
            "threads": self.threads,
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
            merged.setdefault("status", STATUS_OK)
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
    threads: int | None = None,
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
    ).remote(engine_factory, model, index, threads)


GPU_MEMORY_FRACTION = 0.9
"""Share of each assigned GPU's free memory that a multi-GPU `device_map` may fill with
weights; the rest is left to the KV caches and activations of a batch."""


def _local_gpu_indices(accelerator_ids: Sequence[str]) -> list[int]:
    """CUDA ordinals, inside this process, of the GPUs Ray assigned.

    Ray narrows `CUDA_VISIBLE_DEVICES` to the assigned ids, so they are `0..n-1` here;
    with `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES` every GPU stays visible and the
    assigned ids are the ordinals themselves.
    """
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "") not in ("", "0"):
        return [int(i) for i in accelerator_ids]
    return list(range(len(accelerator_ids)))


class SpecEngineFactory:
    """Picklable `model id -> engine.Engine` built from the grid's model table.

    The device is decided on the worker, not the driver (`engine_kwargs`): a replica that
    Ray gave one GPU (CUDA_VISIBLE_DEVICES already narrowed to it) loads on `cuda`, a CPU
    replica on `cpu`, a replica with several GPUs (`gpus_per_replica: 2`) through
    accelerate's `device_map` over exactly those GPUs, and a model with its own
    `device_map` keeps it.
    """

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        """`models`: model id -> {"name_or_path": ..., plus `Engine` keyword arguments}."""
        self.models = {k: dict(v) for k, v in models.items()}

    def gpu_free_bytes(self, index: int) -> int | None:
        """Free memory of local CUDA device `index`, None where torch sees no such GPU."""
        import torch

        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return None
        return int(torch.cuda.mem_get_info(index)[0])

    def engine_kwargs(
        self, model: str, accelerator_ids: Sequence[str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """(name or path, `Engine` keyword arguments) for a replica holding these GPUs.

        `accelerator_ids`: the GPUs Ray assigned to this worker (default: asked of Ray).
        Several GPUs and no explicit map: `device_map="auto"` with `max_memory` naming only
        the assigned GPUs (a fraction of each one's free memory, no "cpu" entry), so
        accelerate spreads the layers over them and never offloads to the host.
        """
        if model not in self.models:
            raise KeyError(f"unknown model {model!r}; the sweep has {sorted(self.models)}")
        if accelerator_ids is None:
            accelerator_ids = _runtime_ids()["accelerator_ids"]
        ids = list(accelerator_ids)
        kwargs = dict(self.models[model])
        path = kwargs.pop("name_or_path", None) or model
        device_map = kwargs.pop("device_map", None) or None
        if len(ids) > 1 and device_map is None:
            device_map = "auto"
        if device_map is None:
            # logical GPUs on a machine without CUDA (tests, CPU clusters) run on the CPU
            kwargs.setdefault("device", "cuda" if ids and _cuda_available() else "cpu")
            return path, kwargs
        kwargs["device_map"] = device_map
        if len(ids) > 1 and isinstance(device_map, str) and "max_memory" not in kwargs:
            budget = {i: self.gpu_free_bytes(i) for i in _local_gpu_indices(ids)}
            if all(b is not None for b in budget.values()):
                kwargs["max_memory"] = {
                    i: int(GPU_MEMORY_FRACTION * b) for i, b in budget.items() if b is not None
                }
            else:  # logical GPUs without CUDA (tests): accelerate places on what exists
                log.warning("GPUs %s assigned but torch sees no CUDA device", ",".join(ids))
        return path, kwargs

    def __call__(self, model: str) -> EngineLike:
        from rloop_ray.engine import Engine

        with quiet_model_loading():
            return self._load(model, Engine)

    def _load(self, model: str, engine_cls: Callable[..., EngineLike]) -> EngineLike:
        path, kwargs = self.engine_kwargs(model)
        max_memory = kwargs.pop("max_memory", None)
        if max_memory is not None:  # resolved here: `Engine` takes a device_map only
            kwargs["device_map"] = gpu_device_map(
                path,
                max_memory,
                strategy=kwargs["device_map"],
                dtype=kwargs.get("dtype", "float32"),
                trust_remote_code=kwargs.get("trust_remote_code", False),
                revision=kwargs.get("revision"),
            )
        return engine_cls(path, **kwargs)


VERBOSE_ENV = "RLOOP_VERBOSE"
"""`1` in the workers of a verbose driver's local cluster (set by `driver.ray_session`)."""


@contextlib.contextmanager
def quiet_model_loading() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off while a model loads.

    A worker's "Loading weights" bar is forwarded by Ray onto the driver's progress line, or,
    in the local backend, drawn over it; the driver shows the phase (`loading <model>`)
    instead. Kept on when the sweep runs verbose (`RLOOP_VERBOSE=1` in the worker, or this
    process logging rloop_ray at DEBUG). The previous setting is restored afterwards, so a
    notebook that loads models itself keeps its bars.
    """
    if (os.environ.get(VERBOSE_ENV) == "1"
            or logging.getLogger("rloop_ray").isEnabledFor(logging.DEBUG)):
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def gpu_device_map(
    name_or_path: str,
    max_memory: dict[int, int],
    *,
    strategy: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> dict[str, int]:
    """An explicit accelerate `device_map` of a model over the GPUs in `max_memory`.

    What `from_pretrained(device_map=strategy, max_memory=...)` would compute, done on an
    empty (meta) model from the config alone, so it needs no GPU and no weights. `auto`,
    `balanced` and `balanced_low_0` balance the layers over the GPUs, `sequential` fills
    them in order. A model that does not fit (accelerate would offload to "cpu" or
    "disk") is refused: raise `gpus_per_replica` or use a 16-bit dtype.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    from rloop_ray.engine.models import _torch_dtype, resolve_model

    source = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(
        source.location, revision=revision, trust_remote_code=trust_remote_code
    )
    torch_dtype = _torch_dtype(dtype)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(
            config,
            dtype=None if torch_dtype == "auto" else torch_dtype,
            trust_remote_code=trust_remote_code,
        )
    empty.tie_weights()
    no_split = getattr(empty, "_no_split_modules", None)
    budget: dict[int | str, int | str] = dict(max_memory)
    if strategy != "sequential":
        budget = get_balanced_memory(
            empty,
            max_memory=budget,
            no_split_module_classes=no_split,
            low_zero=strategy == "balanced_low_0",
        )
    device_map = dict(
        infer_auto_device_map(empty, max_memory=budget, no_split_module_classes=no_split)
    )
    off_gpu = sorted(k for k, v in device_map.items() if not isinstance(v, int))
    if off_gpu:
        raise ValueError(
            f"{name_or_path} ({dtype}) does not fit on GPUs {sorted(max_memory)} "
            f"({', '.join(f'{b / 2**30:.1f} GiB' for b in max_memory.values())} for weights): "
            f"{', '.join(off_gpu[:3])} would be offloaded. Raise gpus_per_replica or use "
            f"dtype bfloat16."
        )
    return device_map


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
