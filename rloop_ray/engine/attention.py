"""Per-layer attention masks for decoding from caches of unequal lengths.

transformers derives one attention mask (and the query position) from layer 0's cache
length. After a partial transplant, or when rows of a batch are left-padded by
different amounts per layer, each layer needs its own mask. We register an attention
function `rloop` that behaves exactly like `sdpa` unless a per-layer mask context is
active, in which case it uses the mask of `module.layer_idx` from that context.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTN_IMPLEMENTATION = "rloop"

# layer index -> bool mask (B, 1, q, kv), True = attend
_LAYER_MASKS: contextvars.ContextVar[Sequence[torch.Tensor] | None] = contextvars.ContextVar(
    "rloop_layer_masks", default=None)


def _rloop_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    masks = _LAYER_MASKS.get()
    if masks is not None:
        attention_mask = masks[module.layer_idx]
        kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Register the `rloop` attention (idempotent) and return its name."""
    if ATTN_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _rloop_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


@contextlib.contextmanager
def layer_masks(masks: Sequence[torch.Tensor]) -> Iterator[None]:
    """Use `masks[layer]` (B, 1, q, kv_len_of_that_layer) inside the block."""
    token = _LAYER_MASKS.set(masks)
    try:
        yield
    finally:
        _LAYER_MASKS.reset(token)


def decode_mask(valid: torch.Tensor, q_len: int, window: int | None) -> torch.Tensor:
    """Mask (B, 1, q, K) for `q_len` new queries occupying the last slots of `valid` (B, K).

    Query j sits at slot K - q_len + j; it sees valid slots at or before it and, with a
    sliding window w, only the last w slots (itself included), as transformers' sliding
    mask does (kv_idx > q_idx - w). Slot order equals position order for every real key
    because padding is always on the left.
    """
    bsz, k_len = valid.shape
    slots = torch.arange(k_len, device=valid.device)
    q_slots = torch.arange(k_len - q_len, k_len, device=valid.device)
    allowed = slots[None, :] <= q_slots[:, None]  # (q, K)
    if window is not None:
        allowed = allowed & (slots[None, :] > q_slots[:, None] - window)
    return (valid[:, None, None, :] & allowed[None, None, :, :]).expand(bsz, 1, q_len, k_len)
