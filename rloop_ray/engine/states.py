"""The two tensor-holding states of the engine's steps: encoded prompts and patched ones.

`Engine.encode` makes `PromptState`s, `Engine.patch` turns (target, source,
intervention) into `PatchedState`s, `Engine.generate` decodes either. Both hold the
model's tensors on its device, so they stay in the process (or Ray actor) that made
them; what leaves it is a `Generation` (`engine/types.py`), which holds none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rloop_ray.engine.types import Intervention
from rloop_ray.vocab import NATURAL, NONE

if TYPE_CHECKING:
    from rloop_ray.engine.generation_patch import StepPatch


@dataclass
class PromptState:
    """A prompt encoded once: its ids and the prefill cache of tokens 0..L-2.

    The last token is not in the cache: it is the first query of generation. `text` and
    `shuffle_seed` say how the state was made, so a control that needs the prompt again
    (a shuffled copy, activations not captured yet) can re-encode it from the state.
    """

    ids: list[int]
    keys: list[torch.Tensor]  # per layer (kv_heads, L-1, head_dim)
    values: list[torch.Tensor]
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Captured prefill activations: name -> per layer (L-1, D)."""
    text: str = ""
    shuffle_seed: int | None = None  # the `shuffle` control's permutation, None: as written
    first_logprobs: torch.Tensor | None = None
    """The natural run's first-step next-token log-probs (V,), float32 on the device: what
    `kl_from_natural` compares every patched run of this target with. Computed once, on
    first need, and kept with the prompt."""

    @property
    def prefill_len(self) -> int:
        return len(self.ids) - 1


@dataclass
class PatchedState:
    """A target prompt after one intervention, ready to decode.

    Layers may hold caches of different lengths (a partial transplant); generation masks
    each layer by its own length. `meta` holds the patch's result columns
    (`n_target_tokens`, `n_source_tokens`, `n_patched_positions`,
    `n_unpatched_positions`, `patched_layers`, `rope_consistent`, `alpha_extrapolated`,
    `query_position`), which every row and `Generation` made from the state carries.
    """

    keys: list[torch.Tensor]  # per layer (kv_heads, n_l, head_dim); n_l may differ per layer
    values: list[torch.Tensor]
    first_token: int  # the target's last prompt token: the first query of generation
    position: int  # its rotary position (transformers' rule: layer 0's cache length)
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)  # the target's ids, unpatched
    text: str = ""  # the target's text
    intervention: Intervention | None = None  # None: the unpatched (natural) state
    step_patch: StepPatch | None = None
    """What acts at every decode forward (`during: generation|both`, or a steer vector
    added while generating); None: generation runs unpatched."""
    patched_positions: tuple[int, ...] = ()
    """The target prefill positions the intervention edited (what `attn_mass_patched`
    sums over, at every layer); empty for a natural state or a generation-only patch."""

    @property
    def is_natural(self) -> bool:
        """True for an unpatched state: its run is the target's natural run."""
        iv = self.intervention
        return iv is None or iv.control == NATURAL or iv.site == NONE

    @property
    def cache_lengths(self) -> list[int]:
        """Cached positions per layer (equal everywhere unless a transplant ran)."""
        return [int(k.shape[1]) for k in self.keys]
