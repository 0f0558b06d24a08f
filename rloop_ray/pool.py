"""Model replicas as Ray actors that serve encode / patch / generate / run interactively.

`rloop_ray.replicas("smollm2-135m", n=2)` starts `n` actors, each pinning one replica of
the model (one GPU, several via `device_map`, or CPU cores), and returns a `ReplicaPool`.
The pool is what a notebook or a Ray client drives: `encode` prompts, `patch` them, and
`generate` from the patched states, step by step, the same steps `Engine.run` is built
from. Prompt states are tensors and stay inside the actor that made them: what crosses
the wire is a `StateHandle` (replica index, key, text), so a 30-layer cache is never
serialised. Calls are balanced over the replicas (new prompts round-robin, everything
derived from a state on that state's replica) and each replica receives its share as one
batched call. `close()` kills the actors; the pool is also a context manager.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateHandle:
    """A prompt state or patched state living inside replica `replica` of a pool.

    `text` is the target prompt's text, so a state needed on another replica (a source
    encoded elsewhere) is encoded again there instead of moving tensors.
    """

    replica: int
    key: str
    text: str
    kind: str  # "prompt" | "patched"


class ReplicaServer:
    """The actor body: one `Engine`, and the states it made, addressed by key.

    A plain class (Ray wraps it in `replicas`), so it also runs in-process in tests.
    """

    def __init__(self, model: str, engine_kwargs: dict[str, Any], threads: int | None = None
                 ) -> None:
        from rloop_ray.engine import Engine
        from rloop_ray.worker import _set_torch_threads

        self.engine = Engine(model, **engine_kwargs)
        self.threads = _set_torch_threads(threads)
        self._states: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        return {**self.engine.info(), "threads": self.threads, "n_states": len(self._states)}

    def _keep(self, states: Sequence[Any]) -> list[str]:
        keys = []
        for state in states:
            key = uuid.uuid4().hex
            self._states[key] = state
            keys.append(key)
        return keys

    def _state(self, ref: str | tuple[str, str]) -> Any:
        """A kept state by key, or a prompt given by text (encoded here, cached)."""
        if isinstance(ref, tuple):  # ("text", prompt)
            return self.engine.encode([ref[1]])[0]
        try:
            return self._states[ref]
        except KeyError:
            raise KeyError(f"state {ref} is not on this replica (released?)") from None

    def encode(self, texts: list[str], capture: tuple[str, ...] = ()) -> list[str]:
        return self._keep(self.engine.encode(texts, capture=capture))

    def patch(self, targets: list[str | tuple[str, str]],
              sources: list[str | tuple[str, str] | None],
              interventions: list[Intervention]) -> list[str]:
        patched = self.engine.patch(
            [self._state(t) for t in targets],
            [None if s is None else self._state(s) for s in sources],
            interventions,
        )
        return self._keep(patched)

    def generate(self, keys: list[str], generation: GenerationConfig,
                 measure: MeasureConfig, capture: tuple[str, ...] = ()) -> list[Any]:
        return self.engine.generate([self._state(k) for k in keys], generation, measure,
                                    capture=capture)

    def run(self, requests: list[CellRequest]) -> list[dict[str, Any]]:
        return self.engine.run(requests)

    def release(self, keys: list[str]) -> int:
        return sum(self._states.pop(k, None) is not None for k in keys)


class ReplicaPool:
    """Handles on `n` replica actors of one model; see the module docstring."""

    def __init__(self, actors: list[Any], model: str) -> None:
        if not actors:
            raise ValueError("a pool needs at least one replica")
        self.actors = actors
        self.model = model
        self._next = itertools.cycle(range(len(actors)))

    def __len__(self) -> int:
        return len(self.actors)

    def __enter__(self) -> ReplicaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gather(self, calls: dict[int, Any]) -> dict[int, Any]:
        import ray

        keys = list(calls)
        values = ray.get([calls[k] for k in keys])
        return dict(zip(keys, values, strict=True))

    def info(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def encode(self, texts: Sequence[str], *, capture: Sequence[str] = ()) -> list[StateHandle]:
        """Encode prompts, spread round-robin over the replicas (one call per replica)."""
        placed: dict[int, list[int]] = {}
        for i in range(len(texts)):
            placed.setdefault(next(self._next), []).append(i)
        calls = {r: self.actors[r].encode.remote([texts[i] for i in idx], tuple(capture))
                 for r, idx in placed.items()}
        out: list[StateHandle | None] = [None] * len(texts)
        for r, keys in self._gather(calls).items():
            for i, key in zip(placed[r], keys, strict=True):
                out[i] = StateHandle(r, key, texts[i], "prompt")
        return [h for h in out if h is not None]

    @staticmethod
    def _ref(state: StateHandle | str, replica: int) -> str | tuple[str, str]:
        """How replica `replica` finds `state`: its key if it lives there, else its text."""
        if isinstance(state, str):
            return ("text", state)
        if state.replica == replica and state.kind == "prompt":
            return state.key
        return ("text", state.text)

    def patch(self, targets: Sequence[StateHandle | str],
              sources: Sequence[StateHandle | str | None],
              interventions: Sequence[Intervention]) -> list[StateHandle]:
        """Patched states, each made on its target's replica (texts go round-robin)."""
        if not len(targets) == len(sources) == len(interventions):
            raise ValueError("targets, sources and interventions must have equal lengths")
        placed: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            r = t.replica if isinstance(t, StateHandle) else next(self._next)
            placed.setdefault(r, []).append(i)
        calls = {
            r: self.actors[r].patch.remote(
                [self._ref(targets[i], r) for i in idx],
                [None if sources[i] is None else self._ref(sources[i], r)  # type: ignore[arg-type]
                 for i in idx],
                [interventions[i] for i in idx])
            for r, idx in placed.items()
        }
        out: list[StateHandle | None] = [None] * len(targets)
        for r, keys in self._gather(calls).items():
            for i, key in zip(placed[r], keys, strict=True):
                t = targets[i]
                out[i] = StateHandle(r, key, t.text if isinstance(t, StateHandle) else t,
                                     "patched")
        return [h for h in out if h is not None]

    def generate(self, states: Sequence[StateHandle], generation: GenerationConfig | None = None,
                 measure: MeasureConfig | None = None, *, capture: Sequence[str] = ()
                 ) -> list[Any]:
        """Decode from patched (or plain prompt) states; one batched call per replica."""
        generation = generation or GenerationConfig()
        measure = measure or MeasureConfig()
        placed: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            placed.setdefault(s.replica, []).append(i)
        calls = {r: self.actors[r].generate.remote([states[i].key for i in idx], generation,
                                                   measure, tuple(capture))
                 for r, idx in placed.items()}
        out: list[Any] = [None] * len(states)
        for r, gens in self._gather(calls).items():
            for i, g in zip(placed[r], gens, strict=True):
                out[i] = g
        return out

    def run(self, requests: Sequence[CellRequest]) -> list[dict[str, Any]]:
        """Whole cells, split into one contiguous share per replica; rows in request order."""
        n = len(self.actors)
        size = -(-len(requests) // n) if requests else 0
        shares = {r: list(requests[r * size:(r + 1) * size]) for r in range(n)
                  if requests[r * size:(r + 1) * size]}
        calls = {r: self.actors[r].run.remote(share) for r, share in shares.items()}
        rows: list[dict[str, Any]] = []
        for r in sorted(calls):
            rows.extend(self._gather({r: calls[r]})[r])
        return rows

    def release(self, states: Sequence[StateHandle]) -> int:
        """Free states a notebook no longer needs (they are kept until released or closed)."""
        by: dict[int, list[str]] = {}
        for s in states:
            by.setdefault(s.replica, []).append(s.key)
        calls = {r: self.actors[r].release.remote(keys) for r, keys in by.items()}
        return sum(self._gather(calls).values())

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def replicas(model: str, n: int | None = None, *, gpus_per_replica: float | None = None,
             cpus_per_replica: float | None = None, **engine_kwargs: Any) -> ReplicaPool:
    """Start `n` replica actors of `model` and wait until every one has loaded it.

    `n`: default one per GPU (`gpus_per_replica` each), else 1 on CPU. GPUs default to 1
    when the cluster has any, 0 otherwise; a replica with more than one GPU spreads the
    model over them with accelerate's `device_map="auto"`. CPU replicas get the node's
    cores divided among them (their torch threads), unless `cpus_per_replica` is given.
    `engine_kwargs` go to `Engine` (dtype, chat_template, max_batch_size, ...). Ray is
    started locally if it is not initialised.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1")
    resources = ray.cluster_resources()
    has_gpus = resources.get("GPU", 0) > 0
    gpus = (1.0 if has_gpus else 0.0) if gpus_per_replica is None else float(gpus_per_replica)
    if n is None:
        n = max(1, int(resources.get("GPU", 0) // gpus)) if gpus > 0 else 1
    if cpus_per_replica is None:
        cpus_per_replica = 1.0 if gpus > 0 else max(1.0, resources.get("CPU", 1) // n)
    kwargs = dict(engine_kwargs)
    if gpus > 1 and "device_map" not in kwargs:
        kwargs["device_map"] = "auto"
    elif gpus > 0:
        kwargs.setdefault("device", "cuda")
    else:
        kwargs.setdefault("device", "cpu")
    actor_cls = ray.remote(ReplicaServer)
    threads = None if gpus > 0 else int(cpus_per_replica)
    actors = [actor_cls.options(num_gpus=gpus, num_cpus=cpus_per_replica).remote(
        model, kwargs, threads) for _ in range(n)]
    infos = ray.get([a.info.remote() for a in actors])
    log.info("%d replicas of %s ready (%s threads each)", n, model,
             ",".join(str(i.get("threads")) for i in infos))
    return ReplicaPool(actors, model)
