"""The one generic patch: mix target and source tensors at chosen positions, in float32.

Every site (cache K/V, projection outputs, residual stream) goes through `mix_positions`;
site-specific code only decides *which* tensors and positions. Controls that transform
the source (`shuffle`, `random`) are functions of the source tensor and a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rloop_ray.engine.selectors import aligned_source_position, resolve_tokens


@dataclass(frozen=True)
class PositionMap:
    """Target positions to patch and the source position feeding each one."""

    target: list[int]
    source: list[int]
    n_unmatched: int  # selected target positions with no source counterpart (left alone)
    n_selected: int | None = None
    """Positions the token spec selected on the target, before alignment: for `match:`
    specs the row's `n_matched_positions`. None (when built by hand) means
    `len(target) + n_unmatched`, which is what `position_map` computes."""

    def __post_init__(self) -> None:
        if self.n_selected is None:
            object.__setattr__(self, "n_selected", len(self.target) + self.n_unmatched)

    @property
    def rope_consistent(self) -> bool:
        """True when every patched key keeps its own rotary position."""
        return all(t == s for t, s in zip(self.target, self.source))


def position_map(tokens: str, align: str, target_len: int, source_len: int,
                 token_texts: Sequence[str] | None = None) -> PositionMap:
    """Resolve a token spec over `target_len` prefill positions against a source prefill.

    `token_texts` (the decoded text of each of the target's `target_len` prefill tokens,
    `selectors.token_texts_of`) is needed by `match:<regex>` specs only; without it such
    a spec raises ValueError.
    """
    tgt, src, unmatched = [], [], 0
    selected = resolve_tokens(tokens, target_len, token_texts)
    for p in selected:
        q = aligned_source_position(p, target_len, source_len, align)
        if q is None:
            unmatched += 1
        else:
            tgt.append(p)
            src.append(q)
    return PositionMap(tgt, src, unmatched, n_selected=len(selected))


def mix_positions(target: torch.Tensor, source: torch.Tensor, pmap: PositionMap, alpha: float,
                  dim: int) -> torch.Tensor:
    """Copy of `target` with positions `pmap.target` (along `dim`) set to
    `(1 - alpha) * target + alpha * source[pmap.source]`, mixed in float32, cast back."""
    out = target.clone()
    if not pmap.target:
        return out
    t_idx = torch.tensor(pmap.target, device=target.device)
    s_idx = torch.tensor(pmap.source, device=source.device)
    t_part = target.index_select(dim, t_idx).float()
    s_part = source.index_select(dim, s_idx).to(target.device).float()
    mixed = (1.0 - alpha) * t_part + alpha * s_part
    out.index_copy_(dim, t_idx, mixed.to(target.dtype))
    return out


def shuffle_positions(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` with its positions (along `dim`) permuted by `perm`."""
    return x.index_select(dim, perm.to(x.device))


def permutation(n: int, seed: int) -> torch.Tensor:
    """Seeded permutation of `n` positions, the same for every layer of a cell."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)


def matched_noise(x: torch.Tensor, seed: int, group_dims: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise shaped like `x`, with the mean and std of `x` computed per group.

    `group_dims` are the dims that index a group (e.g. the head dim of a (heads, T, hd)
    cache tensor), statistics are over all other dims. Seeded on the CPU so the noise is
    the same on every device.
    """
    xf = x.float()
    reduce = tuple(d for d in range(x.dim()) if d not in group_dims)
    mean = xf.mean(dim=reduce, keepdim=True)
    std = xf.std(dim=reduce, keepdim=True) if x.numel() > 1 else torch.zeros_like(mean)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
    return (mean + std * noise).to(x.dtype)
