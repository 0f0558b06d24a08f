"""Plain, picklable request/result types shared by the engine, the worker and the grid.

They are the narrow interface of the engine (lm-eval-harness style): lists of
`CellRequest` in, lists of result dicts out, and `Generation`s out of the composable
`Engine.generate` step. Nothing here imports torch, so the grid, the store, the driver
and a Ray client can use them without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rloop_ray.vocab import (  # noqa: F401  (re-exported: the engine's vocabulary)
    ALIGNS,
    CACHE_SITES,
    CONTROLS,
    MODES,
    PREFILL_SITES,
    SITES,
)

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Intervention:
    """One point of the `site x layers x tokens x alpha x source` vocabulary (`rloop_ray.vocab`)."""

    site: str = "kv"
    layers: str = "all"  # layer spec: "all", "16:32", "50%:100%", "3", "0,4,8"
    tokens: str = "all"  # token spec over the target's prefill positions
    align: str = "end"  # which source position feeds a target position
    alpha: float = 1.0  # patched = (1 - alpha) * target + alpha * source, in float32
    mode: str = "mix"  # kv sites only: "mix" (position-aligned) or "transplant"
    control: str = "patch"
    control_seed: int = 0  # seeds the permutation of `shuffle` and the noise of `random`
    during: str = "prefill"  # "prefill" | "generation" | "both" (vocab.DURING)


@dataclass(frozen=True)
class SteerSource:
    """The prompts a `steer` cell's vector is the difference of means of.

    vector(layer) = mean over `source_texts` - mean over `target_texts` of the site's
    activation at that layer, each prompt averaged over the cell's token selection of its
    own prefill. The grid fills it from the prompt bank (the source group's and the
    target group's prompts of the sweep); the engine computes each distinct vector once.
    """

    source_group: str
    target_group: str
    source_texts: tuple[str, ...]
    target_texts: tuple[str, ...]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0  # per-cell seed (the grid derives it from the cell id)
    stop_at_eos: bool = True


@dataclass(frozen=True)
class MeasureConfig:
    early_layer: str = "12.5%"  # absolute index ("4") or fraction of depth ("12.5%")
    late_layer: str = "84%"
    window: int = 16  # last W generated tokens
    centering: bool = False
    trajectory: bool = False  # R_V over a sliding window at every generation step
    scorers: tuple[str, ...] = ("keywords", "regex", "logprob_contrast")
    attention: bool = False  # attn_entropy / attn_mass_* per layer of the generated queries
    layers: str | tuple[str, ...] | None = None  # None | "all" | layer points: pr_by_layer
    kl_from_natural: bool = True  # KL(patched || natural) of the first generated step
    top_logprobs: int = 5  # top-k ids and log-probs of the first generated step (0: none)
    token_logprobs: bool = False  # the log-prob of each generated token as a list column


@dataclass(frozen=True)
class CellRequest:
    """Everything the engine needs to run one cell; texts are resolved by the grid."""

    cell_id: str
    target_text: str
    source_text: str | None  # None for control="natural"
    intervention: Intervention = field(default_factory=Intervention)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    steer: SteerSource | None = None  # mode "steer" only: the groups the vector comes from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One decoded continuation as plain data: what `Engine.generate` returns.

    No torch tensors (lists, numpy arrays, Python values), so a `Generation` pickles out
    of a Ray actor or into a notebook's cache without dragging the model's device or a
    CUDA context along. `measures` holds exactly the measure columns `Engine.run` puts in
    a row (`rv`, `pr_early`, `rv_status`, `rv_prompt`, `score_*`, ...), `meta` the patch
    columns (`n_patched_positions`, `patched_layers`, `rope_consistent`,
    `query_position`, ...), so a row is `meta | generation | measures`.
    """

    ids: list[int]
    text: str
    stop_reason: str  # "eos" | "max_new_tokens"
    logprobs: list[float]
    """log p(ids[t] | prompt, ids[:t]) under the model itself (temperature 1, no top-p),
    one per step: the model's own belief, whatever the sampling settings were."""
    measures: dict[str, Any] = field(default_factory=dict)
    captured: dict[str, np.ndarray] = field(default_factory=dict)
    """name -> float32 (n_layers, len(ids), dim): each requested module's output at every
    layer for each generated token (the forward that fed that token)."""
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # this row's share of the batch's decode time
