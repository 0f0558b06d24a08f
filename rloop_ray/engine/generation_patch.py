"""Interventions that act at every decode forward: patches during generation, steering.

A prefill patch edits the prompt's cache once, before decoding. The interventions here
act on each forward of the decode loop instead, at the new positions only (one per step;
all the teacher-forced positions of a `logprob_contrast` continuation):

* **mix during generation** (`during: generation | both`): the source decodes alongside
  the target in the same batch, as a *companion* row (its own natural continuation with
  the target's decoding settings, kept in the batch until its last target stops). At
  step t the target's output of the site module at the patched layers is set to
  `(1 - alpha) * target + alpha * control(source at its step t)`, in float32, inside the
  same forward, so later layers of the target see the mix. `kv` mixes the cache entries
  the step writes (after rotary embedding), before attention reads them.
* **steer**: `alpha * vector[layer]` is added to the site module's output at the new
  position of every forward (`resid`, `v_proj`).

The companion itself is never patched, so it is exactly the source's natural run:
batched rows do not interact. `random` replaces the source's step-t activation by
Gaussian noise with its mean/std (per head for headed sites), seeded by the cell's
control seed, the layer and the step, so a row's noise does not depend on its batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rloop_ray.engine.interventions import matched_noise
from rloop_ray.vocab import RANDOM

GENERATION_MODULES = {"v_proj": ("v_proj",), "qkv": ("q_proj", "k_proj", "v_proj"),
                      "resid": ("resid",), "kv": ()}
"""Adapter module names a site hooks during generation (`kv` writes through the cache)."""
_HEADED = {"q_proj", "k_proj", "v_proj"}
_SALT = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "resid": 4, "k": 5, "v": 6}


@dataclass
class StepPatch:
    """What one row does at every decode forward (a field of `PatchedState`)."""

    site: str  # resid | v_proj | qkv | kv
    layers: frozenset[int]
    alpha: float
    control: str = "patch"
    seed: int = 0
    companion: object | None = None  # mix: the source's natural `PatchedState`
    companion_key: tuple | None = None  # rows whose key is equal share one companion
    vectors: dict[int, torch.Tensor] | None = None  # steer: layer -> (D,) float32

    @property
    def is_steer(self) -> bool:
        return self.vectors is not None

    @property
    def modules(self) -> tuple[str, ...]:
        return GENERATION_MODULES[self.site]


@dataclass
class _MixGroup:
    alpha: float
    targets: torch.Tensor  # slots
    sources: torch.Tensor  # their companions' slots


@dataclass
class _Plan:
    """The work of one (module, layer) hook under the current slot layout."""

    mixes: list[_MixGroup]
    randoms: list[tuple[int, int, float, int]]  # (target slot, companion slot, alpha, seed)
    steer_slots: torch.Tensor | None
    steer_add: torch.Tensor | None  # (n, 1, D) float32: alpha * vector


class StepPatcher:
    """Applies the rows' `StepPatch`es of one batch; `layout` says which row each slot holds.

    Built once per decode batch (targets and their companions); after a compaction, or
    for the doubled batch of `logprob_contrast`, `layout` is called again and the hooks
    read the new index tensors.
    """

    def __init__(self, patches: Sequence[StepPatch | None], companion_of: Sequence[int | None],
                 head_dim: int, device: torch.device) -> None:
        self.patches = list(patches)
        self.companion_of = list(companion_of)
        self.head_dim = head_dim
        self.device = device
        self.step = 0
        self._plans: dict[tuple[str, int], _Plan] = {}

    def keys(self) -> set[tuple[str, int]]:
        """(module name, layer) pairs some row patches; name "k"/"v" for cache writes."""
        out: set[tuple[str, int]] = set()
        for p in self.patches:
            if p is None:
                continue
            names = ("k", "v") if p.site == "kv" else p.modules
            out.update((n, layer) for n in names for layer in p.layers)
        return out

    def layout(self, slot_rows: Sequence[int], slot_groups: Sequence[int] | None = None) -> None:
        """Slot s holds row `slot_rows[s]`; a target is paired with its companion's slot in
        the same group (`logprob_contrast` doubles the batch: one group per half)."""
        groups = list(slot_groups) if slot_groups is not None else [0] * len(slot_rows)
        where = {(g, r): s for s, (r, g) in enumerate(zip(slot_rows, groups))}
        mixes: dict[tuple[str, int], dict[float, tuple[list[int], list[int]]]] = defaultdict(dict)
        randoms: dict[tuple[str, int], list[tuple[int, int, float, int]]] = defaultdict(list)
        steers: dict[tuple[str, int], tuple[list[int], list[torch.Tensor]]] = {}
        for s, (r, g) in enumerate(zip(slot_rows, groups)):
            p = self.patches[r]
            if p is None:
                continue
            names = ("k", "v") if p.site == "kv" else p.modules
            if p.is_steer:
                assert p.vectors is not None
                for layer in p.layers:
                    for n in names:
                        slots, adds = steers.setdefault((n, layer), ([], []))
                        slots.append(s)
                        adds.append(float(p.alpha) * p.vectors[layer])
                continue
            c = self.companion_of[r]
            if c is None or (g, c) not in where:
                continue
            cs = where[(g, c)]
            for layer in p.layers:
                for n in names:
                    if p.control == RANDOM:
                        randoms[(n, layer)].append((s, cs, float(p.alpha), int(p.seed)))
                    else:
                        t_list, c_list = mixes[(n, layer)].setdefault(float(p.alpha), ([], []))
                        t_list.append(s)
                        c_list.append(cs)
        self._plans = {}
        for key in set(mixes) | set(randoms) | set(steers):
            groups_ = [_MixGroup(a, self._idx(t), self._idx(c))
                       for a, (t, c) in mixes.get(key, {}).items()]
            steer = steers.get(key)
            self._plans[key] = _Plan(
                groups_, randoms.get(key, []),
                None if steer is None else self._idx(steer[0]),
                None if steer is None else torch.stack(steer[1])[:, None, :].to(self.device))

    def _idx(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ applying
    def _noise(self, src: torch.Tensor, name: str, layer: int, seed: int) -> torch.Tensor:
        """Noise matched to one row's source activation: (q, D), or (H, q, D) for a cache."""
        salt = seed * 100003 + 7 * layer + _SALT[name] + 7919 * (self.step + 1)
        if name in ("k", "v"):
            return matched_noise(src, salt, (0,))
        if name in _HEADED:
            heads = src.view(src.shape[0], -1, self.head_dim)
            return matched_noise(heads, salt, (1,)).view_as(src)
        return matched_noise(src, salt, ())

    def apply(self, name: str, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        """`out` (B, ...) with the plan of (name, layer) applied, or None if it has none.

        Row-wise on dim 0; everything after it is the new positions of that row."""
        plan = self._plans.get((name, layer))
        if plan is None:
            return None
        new = out.clone()
        for g in plan.mixes:
            t = out.index_select(0, g.targets).float()
            s = out.index_select(0, g.sources).float()
            new.index_copy_(0, g.targets, ((1.0 - g.alpha) * t + g.alpha * s).to(out.dtype))
        for t_slot, c_slot, alpha, seed in plan.randoms:
            src = self._noise(out[c_slot], name, layer, seed).float()
            new[t_slot] = ((1.0 - alpha) * out[t_slot].float() + alpha * src).to(out.dtype)
        if plan.steer_slots is not None and plan.steer_add is not None:
            rows = out.index_select(0, plan.steer_slots).float()
            add = plan.steer_add
            if rows.dim() == 4:  # a cache write (n, H, q, D): steering is not defined there
                raise ValueError("steering applies to module outputs, not cache entries")
            new.index_copy_(0, plan.steer_slots, (rows + add).to(out.dtype))
        return new

    def hooks(self, module_of: Callable[[str, int], torch.nn.Module]
              ) -> list[tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor | None]]]:
        """Forward hooks for every module some row patches (cache writes excluded)."""
        def fn(name: str, layer: int):
            return lambda out: self.apply(name, layer, out)

        return [(module_of(n, layer), fn(n, layer))
                for n, layer in sorted(self.keys()) if n not in ("k", "v")]

    def cache_transform(self, layer: int
                        ) -> Callable[[torch.Tensor, torch.Tensor],
                                      tuple[torch.Tensor, torch.Tensor]] | None:
        """For a cache layer: mixes the (B, H, q, D) keys/values a forward writes."""
        keys = self.keys()
        if ("k", layer) not in keys and ("v", layer) not in keys:
            return None

        def transform(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            new_k = self.apply("k", layer, k)
            new_v = self.apply("v", layer, v)
            return (k if new_k is None else new_k), (v if new_v is None else new_v)

        return transform
