"""Geometry of value space: participation ratio, effective rank and R_V.

All in float64 on the singular values of a (W tokens x d_v) matrix. A measurement that
cannot be made returns `None` together with a reason string, never a silent NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spectrum:
    """Summary of one V window: participation ratio and two effective ranks."""

    pr: float
    erank_entropy: float  # exp(entropy of s^2 / sum s^2)
    erank_simpson: float  # inverse Simpson of the same distribution (== PR)


def spectrum(v: torch.Tensor, *, center: bool = False) -> Spectrum | None:
    """Spectrum of `v` (W, d_v); None if the matrix is all zeros (no spread to measure)."""
    x = v.detach().to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s**2
    total = p.sum()
    if not torch.isfinite(total) or total <= 0:
        return None
    pr = float(total**2 / (p**2).sum())
    q = p / total
    q = q[q > 0]
    entropy = float(-(q * q.log()).sum())
    return Spectrum(pr=pr, erank_entropy=float(torch.exp(torch.tensor(entropy))),
                    erank_simpson=float(1.0 / (q**2).sum()))


def participation_ratio(v: torch.Tensor, *, center: bool = False) -> float | None:
    """PR = (sum s^2)^2 / sum s^4 of the singular values of `v` (W, d_v)."""
    spec = spectrum(v, center=center)
    return None if spec is None else spec.pr


@dataclass(frozen=True)
class RvResult:
    """R_V of one row: PR(late) / PR(early) plus the parts; `status` says why a value is None."""

    rv: float | None
    pr_early: float | None
    pr_late: float | None
    erank_early: float | None
    erank_late: float | None
    status: str


def r_v(v_early: torch.Tensor, v_late: torch.Tensor, *, window: int,
        center: bool = False) -> RvResult:
    """R_V on the last `window` rows of two (T, d_v) matrices (tokens in order)."""
    n = min(v_early.shape[0], v_late.shape[0])
    if window < 2:
        return RvResult(None, None, None, None, None, f"window_too_small:{window}<2")
    if n < window:
        return RvResult(None, None, None, None, None, f"too_few_tokens:{n}<{window}")
    early = spectrum(v_early[-window:], center=center)
    late = spectrum(v_late[-window:], center=center)
    if early is None or late is None:
        return RvResult(None, early and early.pr, late and late.pr, None, None, "zero_matrix")
    return RvResult(late.pr / early.pr, early.pr, late.pr, early.erank_entropy,
                    late.erank_entropy, "ok")
