"""Measures of one decoded row, read off the batch's cache after generation.

V of a layer is the cached value, so R_V needs no extra forward: the decode loop feeds
the final generated token once more and the generated tokens' V are then slots
`base+1 .. base+n` of each layer (`base`: the first query's slot). Text scores come from
`rloop_ray/scoring.py`; `logprob_contrast` is a forward pass, in `decode.py`. The layer
profile (`measure.layers`) is the same participation ratio at every listed layer, so its
values at the early and late layers are `pr_early` and `pr_late` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from rloop_ray.engine.geometry import participation_ratio, r_v
from rloop_ray.engine.selectors import resolve_layer
from rloop_ray.engine.types import MeasureConfig


def v_rows(cache: DynamicCache, layer: int, b: int, start: int, stop: int) -> torch.Tensor:
    """V of slots [start, stop) of row b at `layer`, as (T, kv_heads * head_dim)."""
    v = cache.layers[layer].values[b, :, start:stop, :]  # (H, T, D)
    return v.permute(1, 0, 2).reshape(v.shape[1], -1)


def geometry(m: MeasureConfig, n_layers: int, cache: DynamicCache,
             valid: Sequence[torch.Tensor], base: Sequence[int], b: int,
             n_gen: int) -> dict[str, Any]:
    """R_V, PR and effective ranks of row b's generated tokens, its prompt side (step 0)
    and, when asked, the trajectory; every missing value comes with its reason."""
    early = resolve_layer(m.early_layer, n_layers)
    late = resolve_layer(m.late_layer, n_layers)
    gen_e = v_rows(cache, early, b, base[early] + 1, base[early] + 1 + n_gen)
    gen_l = v_rows(cache, late, b, base[late] + 1, base[late] + 1 + n_gen)
    res = r_v(gen_e, gen_l, window=m.window, center=m.centering)
    out: dict[str, Any] = {"layer_early": early, "layer_late": late, "rv": res.rv,
                           "pr_early": res.pr_early, "pr_late": res.pr_late,
                           "erank_early": res.erank_early, "erank_late": res.erank_late,
                           "rv_status": res.status, "rv_window": m.window,
                           "rv_centered": m.centering}
    # prompt side (step 0): the last W prompt tokens = cached prefill + the first query
    n_real = int(min(valid[early][b, :base[early] + 1].sum(),
                     valid[late][b, :base[late] + 1].sum()))
    pe = v_rows(cache, early, b, base[early] + 1 - n_real, base[early] + 1)
    pl = v_rows(cache, late, b, base[late] + 1 - n_real, base[late] + 1)
    prompt = r_v(pe, pl, window=m.window, center=m.centering)
    out["rv_prompt"] = prompt.rv
    out["rv_prompt_status"] = prompt.status
    if m.trajectory:
        # step t: the W tokens ending at generated token t (t=0: the last prompt token)
        full_e = v_rows(cache, early, b, base[early] + 1 - n_real, base[early] + 1 + n_gen)
        full_l = v_rows(cache, late, b, base[late] + 1 - n_real, base[late] + 1 + n_gen)
        traj = []
        for t in range(n_gen + 1):
            end = n_real + t
            traj.append(r_v(full_e[:end], full_l[:end], window=m.window,
                            center=m.centering).rv)
        out["rv_trajectory"] = traj
    else:
        out["rv_trajectory"] = None
    return out


def profile_layers(m: MeasureConfig, n_layers: int) -> list[int]:
    """The layers of `measure.layers` on this model, sorted: none, every one ("all"), or
    each listed layer point ("4", "-1", "84%")."""
    if m.layers is None:
        return []
    if m.layers == "all":
        return list(range(n_layers))
    points = (m.layers,) if isinstance(m.layers, (str, int)) else m.layers
    return sorted({resolve_layer(p, n_layers) for p in points})


def _pr(v: torch.Tensor, m: MeasureConfig) -> float | None:
    """PR of the last W rows of `v`, as `r_v` computes it; None with too few rows (the
    row's `rv_status` says why)."""
    if m.window < 2 or v.shape[0] < m.window:
        return None
    return participation_ratio(v[-m.window:], center=m.centering)


def layer_profile(m: MeasureConfig, layers: Sequence[int], cache: DynamicCache,
                  valid: Sequence[torch.Tensor], base: Sequence[int], b: int,
                  n_gen: int) -> dict[str, Any]:
    """`pr_by_layer` (generated tokens) and `pr_prompt_by_layer` (the last W prompt
    tokens) at each profile layer of row b; all three columns None without a profile."""
    if not layers:
        return {"profile_layers": None, "pr_by_layer": None, "pr_prompt_by_layer": None}
    generated, prompt = [], []
    for layer in layers:
        start = base[layer] + 1
        generated.append(_pr(v_rows(cache, layer, b, start, start + n_gen), m))
        n_prompt = int(valid[layer][b, :start].sum())
        prompt.append(_pr(v_rows(cache, layer, b, start - n_prompt, start), m))
    return {"profile_layers": list(layers), "pr_by_layer": generated,
            "pr_prompt_by_layer": prompt}


def first_step(m: MeasureConfig, logprobs: torch.Tensor, natural: torch.Tensor | None,
               is_natural: bool) -> dict[str, Any]:
    """`kl_from_natural` and `top_ids`/`top_logprobs` from the first generated step's
    log-probs (V,) of a row, and those of its target's natural run.

    KL(patched || natural) = sum p (log p - log q), in float64; exactly 0 for the natural
    run itself (it is its own reference), and clipped at 0 where rounding of two nearly
    equal distributions would make it negative. None when not asked for, or when the
    natural reference is unknown (a state built by hand, without its prompt's text)."""
    out: dict[str, Any] = {"kl_from_natural": None, "top_ids": None, "top_logprobs": None}
    if m.kl_from_natural:
        if is_natural:
            out["kl_from_natural"] = 0.0
        elif natural is not None:
            lp, lq = logprobs.double(), natural.double()
            p = lp.exp()
            terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
            out["kl_from_natural"] = max(0.0, float(terms.sum()))
    if m.top_logprobs > 0:
        top = torch.topk(logprobs, min(m.top_logprobs, logprobs.shape[-1]))
        out["top_ids"] = [int(i) for i in top.indices.tolist()]
        out["top_logprobs"] = [float(x) for x in top.values.tolist()]
    return out


def text_scores(scorers: Sequence[str], text: str) -> dict[str, Any]:
    """The text scorers' columns (`logprob_contrast` is not one: it needs the model)."""
    names = [n for n in scorers if n != "logprob_contrast"]
    if not names:
        return {}
    from rloop_ray.scoring import score_text

    return score_text(text, names)
