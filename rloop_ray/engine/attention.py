"""Per-layer attention masks for decoding from caches of unequal lengths.

transformers derives one attention mask (and the query position) from layer 0's cache
length. After a partial transplant, or when rows of a batch are left-padded by
different amounts per layer, each layer needs its own mask. We register an attention
function `rloop` that behaves exactly like `sdpa` unless a per-layer mask context is
active, in which case it uses the mask of `module.layer_idx` from that context.

The same function serves `measure.attention`: inside `probing(probe)` it also hands each
decode step's query, keys and mask to an `AttentionProbe`, which recomputes the step's
attention weights (one query row per batch row, so (B, heads, 1, K): never the full
T x T matrix) and folds them at once into per-row, per-layer sums of entropy and of the
mass on prompt, generated and patched slots. The attention output itself is still
SDPA's, so measuring changes no token.
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



class AttentionProbe:
    """Per-row, per-layer attention statistics of the decode steps' queries.

    Built once per `Decoder.generate` from the stacked batch: `prompt[l]` (B, P_l) marks
    row b's prompt slots at layer l (its cached prefix and the first query's slot
    P_l - 1), `patched[l]` (B, P_l) the prompt slots its intervention edited, and
    `generated_patched` (B,) the rows patched at every generated position (`during:
    generation|both`, steering while generating). Slots past P_l - 1 are generated
    tokens. Sums stay on the device until `means()`, so a step costs no host sync.
    """

    def __init__(self, prompt: Sequence[torch.Tensor], patched: Sequence[torch.Tensor],
                 generated_patched: torch.Tensor) -> None:
        n_layers, bsz = len(prompt), int(generated_patched.shape[0])
        device = generated_patched.device
        self.prompt = [m.to(torch.float32) for m in prompt]
        self.patched = [m.to(torch.float32) for m in patched]
        self.generated_patched = generated_patched
        zeros = torch.zeros((n_layers, bsz), dtype=torch.float64, device=device)
        self.entropy, self.mass_prompt = zeros.clone(), zeros.clone()
        self.mass_generated, self.mass_patched = zeros.clone(), zeros.clone()
        self.count = torch.zeros((n_layers, bsz), dtype=torch.float64, device=device)
        self.rows = torch.arange(bsz, device=device)
        self.active = False  # the decode loop turns it on for generated tokens' queries

    def layout(self, live: Sequence[int]) -> None:
        """Batch slot s now holds row `live[s]` (after a compaction)."""
        self.rows = torch.tensor(list(live), device=self.rows.device)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                mask: torch.Tensor, scaling: float | None, softcap: float | None) -> None:
        """Fold one forward's attention at `layer` into the sums (q_len must be 1)."""
        if query.shape[2] != 1:
            raise ValueError("the attention probe measures decode steps (one query per row)")
        n_rep = query.shape[1] // key.shape[1]
        keys = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, H, 1, K), masked slots exactly 0
        entropy = torch.special.entr(weights).sum(-1).mean(dim=(1, 2))  # (B,)
        per_slot = weights.mean(dim=(1, 2))  # (B, K): the heads' mean attention
        n_prompt = self.prompt[layer].shape[1]
        on_prompt = (per_slot[:, :n_prompt] * self.prompt[layer][self.rows]).sum(-1)
        on_generated = per_slot[:, n_prompt:].sum(-1)
        on_patched = (per_slot[:, :n_prompt] * self.patched[layer][self.rows]).sum(-1) \
            + torch.where(self.generated_patched[self.rows], on_generated, 0.0)
        rows = self.rows
        self.entropy[layer].index_add_(0, rows, entropy.double())
        self.mass_prompt[layer].index_add_(0, rows, on_prompt.double())
        self.mass_generated[layer].index_add_(0, rows, on_generated.double())
        self.mass_patched[layer].index_add_(0, rows, on_patched.double())
        self.count[layer].index_add_(0, rows, torch.ones_like(entropy, dtype=torch.float64))

    def means(self) -> dict[str, list[list[float | None]]]:
        """Per measure, per row, per layer: the mean over the observed queries (None for a
        row with none: it generated nothing)."""
        out: dict[str, list[list[float | None]]] = {}
        count = self.count.cpu()
        for name, total in (("attn_entropy", self.entropy), ("attn_mass_prompt",
                            self.mass_prompt), ("attn_mass_generated", self.mass_generated),
                            ("attn_mass_patched", self.mass_patched)):
            mean = (total.cpu() / count.clamp(min=1)).T.tolist()  # (B, layers)
            seen = (count > 0).T.tolist()
            out[name] = [[v if ok else None for v, ok in zip(row, oks)]
                         for row, oks in zip(mean, seen)]
        return out


_PROBE: contextvars.ContextVar[AttentionProbe | None] = contextvars.ContextVar(
    "rloop_attention_probe", default=None)


@contextlib.contextmanager
def probing(probe: AttentionProbe | None) -> Iterator[None]:
    """Feed every attention call inside the block to `probe` while it is active."""
    token = _PROBE.set(probe)
    try:
        yield
    finally:
        _PROBE.reset(token)


def _rloop_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    masks = _LAYER_MASKS.get()
    if masks is not None:
        attention_mask = masks[module.layer_idx]
        kwargs.pop("is_causal", None)
    probe = _PROBE.get()
    if probe is not None and probe.active:
        if attention_mask is None or attention_mask.dtype != torch.bool:
            raise ValueError("measure.attention needs the engine's boolean decode masks")
        probe.observe(module.layer_idx, query, key, attention_mask, kwargs.get("scaling"),
                      kwargs.get("softcap"))
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
