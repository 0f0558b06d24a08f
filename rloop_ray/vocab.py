"""The vocabulary of a sweep: every name a grid, a cell, a result row or a table uses.

A name that two modules spell separately drifts (one of them learns a new control, the
other silently drops its rows), so each is defined here once and imported everywhere
else: the spec validates against these tuples, the grid expands them, the engine checks
them and the analysis groups by them. Nothing here imports torch, pandas or pydantic.
"""

from __future__ import annotations

# -- where and how an intervention writes ------------------------------------------------

SITES = ("kv", "k", "v", "v_proj", "qkv", "resid")
"""Where an intervention writes: the cache (`kv`, `k`, `v`) or prefill activations."""
CACHE_SITES = ("kv", "k", "v")
"""Sites that edit the prompt's KV cache after the prefill."""
PREFILL_SITES = ("v_proj", "qkv", "resid")
"""Sites that edit activations during the target's prefill (later layers see the edit)."""
MIX = "mix"
TRANSPLANT = "transplant"
STEER = "steer"
MODES = (MIX, TRANSPLANT, STEER)
"""`mix`: position-aligned float32 mix. `transplant`: replace the target's cache by the
source's (cache sites only; lengths may differ). `steer`: add `alpha x` the difference
of the source group's and the target group's mean activation (difference of means)."""
STEER_SITES = ("resid", "v_proj")
"""Sites a steering vector can be added at."""
STEER_CONTROLS = ("natural", "self", "random")
"""Controls defined for `steer` points: `self` steers by the zero vector (target group
minus itself), `random` by a seeded random direction of the same norm per layer."""

PREFILL = "prefill"
GENERATION = "generation"
BOTH = "both"
DURING = (PREFILL, GENERATION, BOTH)
"""When an intervention acts: on the prompt's prefill (the default), on every generated
token (the source decodes alongside the target, step t mixed with its step t), or both."""
GENERATION_SITES = ("kv", "v_proj", "qkv", "resid")
"""Sites that can be patched during generation (`kv`: the generated tokens' cache entries)."""
ALIGNS = ("start", "end")
"""Which source position feeds a target position when the lengths differ."""
MATCH_PREFIX = "match:"
"""Token spec `match:<regex>`: the target prefill positions whose decoded token text
matches the (Python) regex; the number matched is the row's `n_matched_positions`."""
LAYER_EACH = "each"
LAYER_WINDOWS = "windows"
"""Layer-axis expanders: `{each: "10:21"}` is one point per single layer of the range,
`{windows: W, step: S}` (optionally `over: "a:b"`) sliding windows of W layers."""

# -- controls -----------------------------------------------------------------------------

PATCH = "patch"
NATURAL = "natural"
SELF = "self"
SHUFFLE = "shuffle"
RANDOM = "random"
OTHER = "other"
CONTROLS = (PATCH, NATURAL, SELF, SHUFFLE, RANDOM, OTHER)
"""`patch`: the source as given. `natural`: no intervention at all. `self`: the source is
the target itself (must equal `natural`). `shuffle`: the source's token positions
permuted (seeded). `random`: Gaussian noise matched per layer (and head) to the source's
mean/std. `other`: another prompt of the target's own group as source; for the engine it
is a plain patch."""
GRID_CONTROLS = (NATURAL, SELF, SHUFFLE, RANDOM, OTHER)
"""Controls a grid file may list under `controls:` (`patch` is implied by the axes)."""
PATCH_CONTROLS = (SELF, SHUFFLE, RANDOM, OTHER)
"""Controls that run the intervention with a stand-in source, compared with `patch`."""
CONTROL_ORDER = (PATCH, SHUFFLE, RANDOM, OTHER, SELF)
"""Order of the per-pair conditions in the expansion (natural comes first, per target)."""

NONE = "none"
"""The "no intervention" sentinel: site/mode/layers/tokens/align of a natural cell, so the
one natural cell of a target does not multiply with the intervention axes."""
NONE_LABEL = "-"
"""How tables and reports print a coordinate that does not apply (natural cells)."""

# -- prompt groups and the classic conditions ------------------------------------------

BASELINE_GROUP = "baseline"
RECURSIVE_GROUP = "recursive"
LONG_CONTROL_GROUP = "long_control"
"""Length-matched non-recursive prompts: separates "recursive" from "long"."""

CLASSIC_CONDITIONS = {
    "A": "baseline target, natural",
    "B": "recursive target, natural",
    "C": "baseline target, recursive source (patch)",
    "D": "recursive target, baseline source (patch)",
}
"""The four cells of the classic design; a grid's `prompts.conditions` picks among them."""


def classic_condition(control: str, target_group: str, source_group: str | None) -> str | None:
    """A/B/C/D of the classic design, or None for any other cell."""
    if control == NATURAL:
        return {BASELINE_GROUP: "A", RECURSIVE_GROUP: "B"}.get(target_group)
    if control == PATCH:
        if target_group == BASELINE_GROUP and source_group == RECURSIVE_GROUP:
            return "C"
        if target_group == RECURSIVE_GROUP and source_group == BASELINE_GROUP:
            return "D"
    return None


# -- the rest of a grid's closed sets ----------------------------------------------------

CLAIMS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9")
"""Prior claims a sweep can say it re-tests (restated in docs/prior-claims.md)."""
DTYPES = ("float32", "float16", "bfloat16")
SCORERS = ("keywords", "regex", "logprob_contrast")
"""Behaviour scorers a grid may ask for (`scoring.py` text scorers, engine logprobs)."""

# -- row statuses ------------------------------------------------------------------------

STATUS_OK = "ok"
STATUS_FAILED = "failed"
CELL_STATUSES = (STATUS_OK, STATUS_FAILED)

SWEEP_CREATED = "created"
SWEEP_RUNNING = "running"
SWEEP_COMPLETE = "complete"
SWEEP_PARTIAL = "partial"
"""Every selected model finished, but the run was restricted to some models."""
SWEEP_INCOMPLETE = "incomplete"
"""The run ended with planned cells neither ok nor retried (e.g. `--no-retry-failed`)."""
SWEEP_FAILED = "failed"
SWEEP_INTERRUPTED = "interrupted"
SWEEP_STATUSES = (SWEEP_CREATED, SWEEP_RUNNING, SWEEP_COMPLETE, SWEEP_PARTIAL,
                  SWEEP_INCOMPLETE, SWEEP_FAILED, SWEEP_INTERRUPTED)

# -- result columns ----------------------------------------------------------------------

COORDINATE_COLUMNS = (
    "cell_id", "unit_id", "model", "source_id", "target_id", "source_group", "target_group",
    "source_level", "target_level", "pair_index", "site", "mode", "layers", "tokens",
    "align", "alpha", "control", "seed", "during",
)
"""The grid coordinates every result row carries; their Arrow types are in `store.py`."""
DERIVED_FROM = "derived_from"
"""Row column: the natural cell a row was copied from, for cells that are natural by
construction (`derive.py`); null for every decoded row."""
POINT_COLUMNS = ("site", "mode", "layers", "tokens", "align", "alpha", "during")
"""One intervention point: where, how and how strongly a cell was patched."""

# -- steering sources, layer expanders, fields added to the grid later ------------------

STEER_SOURCE_PREFIX = "mean:"
"""`source_id` of a `steer` cell: its vector is a difference of group means, so the
source is a group (`mean:recursive`), never one prompt."""


def steer_source_id(group: str) -> str:
    """The `source_id` of a steer cell whose vector comes from `group`'s mean."""
    return f"{STEER_SOURCE_PREFIX}{group}"


def is_steer_source(source_id: str | None) -> bool:
    """True for a steer cell's group source (`mean:<group>`), False for a prompt id."""
    return bool(source_id) and str(source_id).startswith(STEER_SOURCE_PREFIX)


LAYER_OVER = "over"
"""Optional key of a `windows` expander: the layer range the windows slide over."""
LAYER_STEP = "step"
"""Key of a `windows` expander: layers between the starts of two windows (default 1)."""

LATER_SPEC_DEFAULTS = {
    "interventions.during": [PREFILL],
    "measure.attention": False,
    "measure.layers": None,
    "measure.kl_from_natural": True,
    "measure.top_logprobs": 5,
    "measure.token_logprobs": False,
}
"""Grid fields added after sweeps were first stored, with their defaults. At these values
they are left out of the spec hash, and a recorded spec that lacks them reads as having
them, so a sweep started before they existed still resumes (same hash, same cell ids)."""

# -- measure columns the analysis reads beyond the scalars -------------------------------

KL_FROM_NATURAL = "kl_from_natural"
"""Row column: KL(patched || natural) of the first generated step's next-token
distribution against the same target's natural run; exactly 0.0 for natural rows."""
NATURAL_ZERO_METRICS = (KL_FROM_NATURAL,)
"""Metrics that are 0 by definition for a natural cell (they are measured against it)."""
PROFILE_LAYERS = "profile_layers"
PR_BY_LAYER = "pr_by_layer"
PR_PROMPT_BY_LAYER = "pr_prompt_by_layer"
"""Row columns of a layer profile (`measure.layers`): the layer indices, and the
participation ratio of V at each of them over the last W generated tokens (and on the
prompt side); an element is null when too few tokens were there."""
LAYER_EARLY = "layer_early"
"""Row column: the early layer of R_V (its denominator) as the engine resolved it."""
ATTENTION_COLUMNS = ("attn_entropy", "attn_mass_prompt", "attn_mass_generated",
                     "attn_mass_patched")
"""Row columns of `measure.attention`, one element per layer (index = layer): the mean over
the generated tokens' queries and the heads; `attn_mass_patched` is null for a row that
patched no position."""
