"""Steering vectors: the difference of two groups' mean activations, per layer.

`vector(layer) = mean_source - mean_target`, where each group's mean is over its
prompts of each prompt's mean activation over the cell's token selection of its own
prefill. A prompt whose selection is empty (a `match:` spec that finds nothing in it)
does not count; a group left with no prompt is an error, never a zero vector. Means are
taken in float32 whatever the model's dtype.

The controls of a steer point: `self` steers by the zero vector (a group minus itself;
the cell must equal natural), `random` by a seeded Gaussian direction with the same norm
as the real vector at each layer (is the effect the direction's or the push's?).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rloop_ray.engine.states import PromptState
from rloop_ray.engine.types import SteerSource
from rloop_ray.vocab import RANDOM, SELF


@dataclass(frozen=True)
class SteeringVector:
    """One computed vector set, as the rows record it (`steer_id`, `steer_norm`)."""

    id: str  # sha256 prefix of everything the vector is a function of
    vectors: dict[int, torch.Tensor]  # layer -> (D,) float32, on the model's device
    norm: float  # mean over layers of the vectors' L2 norms
    n_source_prompts: int
    n_target_prompts: int


def steer_id(model: str, site: str, layers: Sequence[int], tokens: str, control: str,
             seed: int, steer: SteerSource) -> str:
    """A stable id: equal inputs give the same id on every worker and run."""
    blob = json.dumps([model, site, list(layers), tokens, control,
                       seed if control == RANDOM else None, steer.source_group,
                       steer.target_group, list(steer.source_texts),
                       list(steer.target_texts)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _group_mean(texts: Sequence[str], encode: Callable[[str], PromptState], name: str,
                layers: Sequence[int], select: Callable[[PromptState], list[int]],
                group: str) -> tuple[dict[int, torch.Tensor], int]:
    sums: dict[int, torch.Tensor] = {}
    used = 0
    for text in texts:
        state = encode(text)
        positions = select(state)
        if not positions:
            continue
        used += 1
        idx = torch.tensor(positions, device=state.acts[name][layers[0]].device)
        for layer in layers:
            mean = state.acts[name][layer].index_select(0, idx).float().mean(dim=0)
            sums[layer] = mean if layer not in sums else sums[layer] + mean
    if not used:
        raise ValueError(f"steering: no prompt of group {group!r} has a selected position "
                         f"({len(texts)} prompts): the group mean is undefined")
    return {layer: v / used for layer, v in sums.items()}, used


@dataclass(frozen=True)
class GroupDifference:
    """mean(source group) - mean(target group) at every layer, before any control: what
    every steer cell of one (site, token selection, groups) shares, whatever its layers,
    control or seed, so the groups' prompts are encoded and averaged once."""

    vectors: dict[int, torch.Tensor]  # layer -> (D,) float32
    n_source_prompts: int
    n_target_prompts: int


def group_difference(steer: SteerSource, *, site: str, layers: Sequence[int],
                     encode: Callable[[str], PromptState],
                     select: Callable[[PromptState], list[int]]) -> GroupDifference:
    """The raw difference of the two groups' means at `layers`. `encode(text)` gives a
    prompt state with the site's prefill activations captured; `select(state)` the
    positions averaged over."""
    name = site  # the steer sites are module names themselves (resid, v_proj)
    src, n_src = _group_mean(steer.source_texts, encode, name, layers, select,
                             steer.source_group)
    tgt, n_tgt = _group_mean(steer.target_texts, encode, name, layers, select,
                             steer.target_group)
    return GroupDifference({layer: src[layer] - tgt[layer] for layer in layers}, n_src, n_tgt)


def difference_of_means(steer: SteerSource, *, model: str, site: str, layers: Sequence[int],
                        tokens: str, control: str, seed: int,
                        encode: Callable[[str], PromptState] | None = None,
                        select: Callable[[PromptState], list[int]] | None = None,
                        base: GroupDifference | None = None) -> SteeringVector:
    """The steering vector of a steer cell: the groups' difference at `layers` (from
    `base` when given, else computed with `encode` and `select`), as its control sees it."""
    if base is None:
        if encode is None or select is None:
            raise ValueError("difference_of_means needs `base` or both `encode` and `select`")
        base = group_difference(steer, site=site, layers=layers, encode=encode, select=select)
    vectors = {layer: base.vectors[layer] for layer in layers}
    if control == SELF:
        vectors = {layer: torch.zeros_like(v) for layer, v in vectors.items()}
    elif control == RANDOM:
        out = {}
        for layer, v in vectors.items():
            gen = torch.Generator().manual_seed(seed * 100003 + 11 * layer + 17)
            direction = torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.device)
            out[layer] = direction / direction.norm() * v.norm()
        vectors = out
    norm = float(torch.stack([v.norm() for v in vectors.values()]).mean())
    return SteeringVector(steer_id(model, site, layers, tokens, control, seed, steer),
                          vectors, norm, base.n_source_prompts, base.n_target_prompts)
