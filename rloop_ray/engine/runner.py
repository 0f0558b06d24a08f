"""The engine: encode prompts once, patch, generate in batches, measure. No Ray here.

Semantics (docs/semantics.md): a prompt's *prefill* is the forward pass over all tokens but the
last, kept as the cache; the last prompt token is the first query of generation. An
intervention edits either that cache (`kv`, `k`, `v`) or activations during the
target's prefill (`v_proj`, `qkv`, `resid`). Generation runs every prepared row of a
batch together, each layer with its own mask (see `attention.py`), so caches of
unequal length (transplants, packed prompts) decode exactly.

The three steps are public and compose: `encode(texts) -> [PromptState]`,
`patch(targets, sources, interventions) -> [PatchedState]`,
`generate(states, generation, measure) -> [Generation]`. `run(requests)` is the same
three steps over cells, batched, with errors turned into failed rows. This module owns
encoding and patching; decoding and its measures are in `decode.py` and `measure.py`.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import torch
from transformers import DynamicCache

from rloop_ray.engine import attention
from rloop_ray.engine.decode import Decoder
from rloop_ray.engine.generation_patch import StepPatch
from rloop_ray.engine.geometry import spectrum
from rloop_ray.engine.hooks import hooks
from rloop_ray.engine.interventions import (
    PositionMap,
    matched_noise,
    mix_positions,
    permutation,
    position_map,
)
from rloop_ray.engine.selectors import (
    resolve_layer,
    resolve_layers,
    resolve_tokens,
    token_texts_of,
)
from rloop_ray.engine.states import PatchedState, PromptState
from rloop_ray.engine.steering import (
    GroupDifference,
    SteeringVector,
    difference_of_means,
    group_difference,
)
from rloop_ray.engine.types import (
    CACHE_SITES,
    CONTROLS,
    MODES,
    SITES,
    CellRequest,
    Generation,
    GenerationConfig,
    Intervention,
    MeasureConfig,
    SteerSource,
)
from rloop_ray.vocab import (
    BOTH,
    DURING,
    GENERATION,
    GENERATION_SITES,
    MATCH_PREFIX,
    NATURAL,
    NONE,
    PATCH,
    PREFILL,
    SELF,
    SHUFFLE,
    STEER,
    STEER_CONTROLS,
    STEER_SITES,
    TRANSPLANT,
)

if TYPE_CHECKING:
    from rloop_ray.engine.models import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["CellError", "EmptyTokenSelection", "Engine", "PatchedState", "PromptState"]

# Fixed continuations of the `logprob_contrast` scorer: similar length, one recursive,
# one neutral. Changing them changes the metric: they are part of the result's meaning.
RECURSIVE_CONTINUATION = (
    " I notice that I am observing my own process of answering, and this awareness"
    " is now watching itself."
)
NEUTRAL_CONTINUATION = (
    " The answer depends on a few well known facts, which are listed in any standard"
    " reference book."
)

# our prefill sites -> the adapter's module names they hook
_PREFILL_MODULES = {"v_proj": ("v_proj",), "qkv": ("q_proj", "k_proj", "v_proj"),
                    "resid": ("resid",)}
_HEADED = {"q_proj", "k_proj", "v_proj"}  # activations whose noise is matched per head
_NOISE_SALT = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "resid": 4}


class CellError(ValueError):
    """A cell that cannot run as specified. The public steps (`encode`, `patch`,
    `generate`) raise it; `run` records it as a failed row and never raises."""


class EmptyTokenSelection(CellError):
    """A patch whose token spec selects no position to patch on this (target, source):
    run anyway it would be a no-op recorded as `ok`, indistinguishable from a real null
    effect, so it is a failed cell with `error_type="EmptyTokenSelection"` instead."""


def _require_positions(pmap: PositionMap, iv: Intervention, target_len: int,
                       source_len: int) -> None:
    if pmap.target:
        return
    selected = "selects no position" if not pmap.n_unmatched else (
        f"selects {pmap.n_unmatched} position(s) with no aligned source position "
        f"(align {iv.align!r})")
    raise EmptyTokenSelection(
        f"token spec {iv.tokens!r} {selected} on a target prefill of {target_len} "
        f"positions (source prefill {source_len}): the {iv.control!r} cell would patch "
        "nothing and equal the natural run; use a spec that fits the prompt")


def _is_natural(iv: Intervention) -> bool:
    return iv.control == NATURAL or iv.site == NONE


def _is_match(tokens: str) -> bool:
    return str(tokens).strip().startswith(MATCH_PREFIX)


Prompt = PromptState | str
"""A prompt as the steps take it: an encoded state, or a text (encoded, cached)."""


class _Job(NamedTuple):
    """One patch to prepare: `index` is where its result goes. A steer patch's source
    is the `SteerSource` its vector comes from."""

    index: int
    target: Prompt
    source: Prompt | SteerSource | None
    intervention: Intervention


def _prompt_key(prompt: Prompt | SteerSource | None) -> tuple | None:
    """Groups patches by the prompts they read (a state and its text are the same)."""
    if prompt is None:
        return None
    if isinstance(prompt, SteerSource):
        return "\x00steer", prompt
    if isinstance(prompt, PromptState):
        return prompt.text, prompt.shuffle_seed
    return prompt, None


@dataclass
class PreparedRow:
    """A patched state bound to the cell that asked for it: `run`'s unit of batching."""

    index: int
    request: CellRequest
    patched: PatchedState

    @classmethod
    def bind(cls, index: int, request: CellRequest, state: PatchedState) -> PreparedRow:
        return cls(index, request, state)

    @property
    def meta(self) -> dict[str, Any]:
        return self.patched.meta

    def state(self) -> PatchedState:
        """The state as its cell asked for it (the request's intervention)."""
        return replace(self.patched, intervention=self.request.intervention)


def _request_source(req: CellRequest) -> str | SteerSource | None:
    """What a cell's patch reads: the steer groups for a steer cell, else the source text."""
    return req.steer if req.intervention.mode == STEER else req.source_text


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"status": "failed", "error_type": type(exc).__name__,
            "error": "".join(traceback.format_exception(exc))}


def _row(request: CellRequest, gen: Generation) -> dict[str, Any]:
    """A result row (docs/architecture.md) from a cell's generation."""
    return {"cell_id": request.cell_id, "status": "ok", **gen.meta,
            "generated_ids": gen.ids, "n_generated": len(gen.ids),
            "generated_text": gen.text, "stop_reason": gen.stop_reason,
            "query_position": gen.meta["query_position"], "generate_seconds": gen.seconds,
            **gen.measures}


class Engine:
    """One model replica serving batched encode / patch / generate / measure."""

    def __init__(self, model: str, *, dtype: str = "float32", device: str = "cpu",
                 device_map: str | dict | None = None, chat_template: bool | None = None,
                 trust_remote_code: bool = False, revision: str | None = None,
                 max_batch_size: int = 32, prompt_cache_size: int = 64) -> None:
        from rloop_ray.engine.models import load_model

        loaded = load_model(model, dtype=dtype, device=device, device_map=device_map,
                            trust_remote_code=trust_remote_code, revision=revision)
        self._setup(loaded, model, chat_template=chat_template,
                    max_batch_size=max_batch_size, prompt_cache_size=prompt_cache_size)

    @classmethod
    def from_loaded(cls, model: torch.nn.Module, tokenizer: Any, *, name: str | None = None,
                    chat_template: bool | None = None, max_batch_size: int = 32,
                    prompt_cache_size: int = 64) -> Engine:
        """An engine around a model and tokenizer already in memory.

        For models that never exist as a folder or hub id: random weights drawn on the
        device (benchmarks/device_check.py builds 16 GB ones; writing them to disk to
        read them back would cost minutes), or a model a notebook has already loaded
        and edited. The model is prepared as `load_model` prepares one (eval mode, no
        gradients, the tokenizer padding on the left, eos as pad when it has none) and
        everything after loading is the constructor's own code. `name` is what `info`
        reports and what `chat_template=None` looks up (default: the model's
        `name_or_path`, else its model_type); the other options are the constructor's.
        """
        from rloop_ray.engine.adapters import Adapter, UnsupportedArchitectureError
        from rloop_ray.engine.models import LoadedModel

        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:
            raise TypeError("Engine.from_loaded takes a transformers causal LM (a "
                            f"PreTrainedModel with a config), got {type(model).__name__}")
        adapter = Adapter(config)  # an unsupported architecture fails here, naming them
        try:
            adapter.layers(model)
            input_embed = adapter.global_module(model, "embed")
            adapter.global_module(model, "lm_head")
        except (AttributeError, UnsupportedArchitectureError) as exc:
            raise UnsupportedArchitectureError(
                f"Engine.from_loaded: {type(model).__name__} is not a decoder with a "
                f"language-model head that the engine can run ({exc}); load it with "
                "AutoModelForCausalLM") from exc
        if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise TypeError("Engine.from_loaded needs the model's tokenizer (a transformers "
                            f"tokenizer), got {type(tokenizer).__name__}")
        n_embed = input_embed.weight.shape[0]
        if len(tokenizer) > n_embed:
            raise ValueError(f"Engine.from_loaded: the tokenizer has {len(tokenizer)} ids, "
                             f"the model embeds {n_embed}: they do not belong together")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("Engine.from_loaded: the tokenizer has neither a pad nor "
                                 "an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        model.requires_grad_(False)
        label = name or getattr(model, "name_or_path", "") or adapter.model_type
        param = next(model.parameters())
        loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=label,
                             path=getattr(model, "name_or_path", "") or f"in-memory:{label}",
                             n_layers=adapter.n_layers,
                             dtype=str(param.dtype).removeprefix("torch."),
                             device=str(input_embed.weight.device), load_seconds=0.0)
        engine = cls.__new__(cls)
        engine._setup(loaded, label, chat_template=chat_template,
                      max_batch_size=max_batch_size, prompt_cache_size=prompt_cache_size)
        return engine

    def _setup(self, loaded: LoadedModel, model_name: str, *, chat_template: bool | None,
               max_batch_size: int, prompt_cache_size: int) -> None:
        """Everything after loading, shared by both ways in (a name, or a model already
        in memory), so an engine built around a loaded model is the same engine."""
        from rloop_ray.engine.models import auto_chat_template

        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapter = loaded.adapter
        self.model_name = model_name
        # None = auto (as the grid does): an instruct model's tokenizer template, else raw
        # text; without its template an instruct model may answer with an empty turn
        self.chat_template = (auto_chat_template(model_name, self.tokenizer)
                              if chat_template is None else chat_template)
        self.max_batch_size = max_batch_size
        self.n_layers = loaded.n_layers
        self.device = next(self.model.parameters()).device
        self.model.set_attn_implementation(attention.register())
        self._windows = [self.adapter.sliding_window(i) for i in range(self.n_layers)]
        self._prompts: OrderedDict[str, PromptState] = OrderedDict()
        self._steering: dict[tuple, SteeringVector] = {}
        self._steer_bases: dict[tuple, GroupDifference] = {}
        self._prompt_cache_size = prompt_cache_size
        self._eos = self._eos_ids()
        self._max_positions = getattr(self.model.config.get_text_config(),
                                      "max_position_embeddings", None)
        self._continuation_ids = {
            name: self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for name, text in (("recursive", RECURSIVE_CONTINUATION),
                               ("neutral", NEUTRAL_CONTINUATION))}
        self._decoder = Decoder(self.model, self.tokenizer, self.adapter,
                                windows=self._windows, eos=self._eos,
                                continuations=self._continuation_ids,
                                check_context=self._check_context,
                                natural_logprobs=self._natural_first_logprobs)

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        cfg = self.model.config.get_text_config()
        return {"model": self.model_name, "path": str(self.loaded.path),
                "n_layers": self.n_layers, "model_type": cfg.model_type,
                "dtype": str(self.loaded.dtype), "device": str(self.device),
                "chat_template": self.chat_template,
                "sliding_windows": sorted({w for w in self._windows if w is not None})}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.tokenizer.eos_token_id,
                    getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids

    def _check_capture(self, capture: Sequence[str]) -> None:
        """Unknown module names fail before any forward, naming the ones this model has."""
        if isinstance(capture, str):
            raise CellError(f"capture takes a list of names, got the string {capture!r}")
        unknown = [n for n in capture if n not in self.adapter.sites]
        if unknown:
            raise CellError(f"cannot capture {', '.join(map(repr, unknown))}: "
                            f"{self.adapter.model_type} has {', '.join(self.adapter.sites)}")

    # ------------------------------------------------------------------ encode
    def tokenize(self, text: str) -> list[int]:
        """Prompt ids, through the chat template when this model entry asks for it."""
        if self.chat_template:
            out = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
        else:
            ids = self.tokenizer(text)["input_ids"]
        return [int(i) for i in ids]

    @overload
    def encode(self, texts: str, *, capture: Sequence[str] = (),
               shuffle_seed: int | None = None) -> PromptState: ...

    @overload
    def encode(self, texts: Sequence[str], *, capture: Sequence[str] = (),
               shuffle_seed: int | None = None) -> list[PromptState]: ...

    def encode(self, texts: str | Sequence[str], *, capture: Sequence[str] = (),
               shuffle_seed: int | None = None) -> PromptState | list[PromptState]:
        """Prefill of each prompt[:-1], cached per prompt; `capture` adds module outputs
        of the prefill (`PromptState.acts`). A list gives a list; a single text (the
        engine's own use) gives one state.

        `shuffle_seed` encodes the prompt with its tokens permuted (all but the first,
        seeded): the `shuffle` control. Permuting the *slots* of a finished cache would
        be vacuous: keys already carry their rotary position and attention is invariant
        to the order of (key, value) pairs, so later queries would see the same cache.
        """
        self._check_capture(capture)
        if isinstance(texts, str):
            return self._encode_one(texts, capture, shuffle_seed)
        return [self._encode_one(t, capture, shuffle_seed) for t in texts]

    def _encode_one(self, text: str, capture: Sequence[str],
                    shuffle_seed: int | None) -> PromptState:
        if not isinstance(text, str):
            raise CellError(f"a prompt is a text, got {type(text).__name__}")
        key = text if shuffle_seed is None else f"\x00shuffle:{shuffle_seed}\x00{text}"
        state = self._prompts.get(key)
        missing = [name for name in capture if state is None or name not in state.acts]
        if state is not None and not missing:
            self._prompts.move_to_end(key)
            return state
        if state is not None:
            ids = state.ids
        else:
            ids = self.tokenize(text)
            if shuffle_seed is not None and len(ids) > 3:
                perm = permutation(len(ids) - 2, shuffle_seed) + 1
                ids = [ids[0], *[ids[i] for i in perm.tolist()], ids[-1]]
        if len(ids) < 2:
            raise CellError(f"prompt has {len(ids)} token(s); at least 2 are needed "
                            "(a prefill and a first query)")
        names = sorted(set(capture) | (set(state.acts) if state is not None else set()))
        acts: dict[str, list[torch.Tensor | None]] = {n: [None] * self.n_layers for n in names}

        def grab(name: str, layer: int):
            def fn(out: torch.Tensor) -> None:
                acts[name][layer] = out[0].detach()
            return fn

        pairs = [(self.adapter.module(self.model, name, layer), grab(name, layer))
                 for name in names for layer in range(self.n_layers)]
        cache = self._prefill(torch.tensor([ids[:-1]], device=self.device), pairs)
        state = PromptState(
            ids=ids,
            keys=[cache.layers[i].keys[0] for i in range(self.n_layers)],
            values=[cache.layers[i].values[0] for i in range(self.n_layers)],
            acts={n: list(v) for n, v in acts.items()},  # type: ignore[misc]
            text=text, shuffle_seed=shuffle_seed)
        self._prompts[key] = state
        self._prompts.move_to_end(key)
        while len(self._prompts) > self._prompt_cache_size:
            self._prompts.popitem(last=False)
        return state

    def _resolve(self, prompt: Prompt, capture: Sequence[str] = (),
                 shuffle_seed: int | None = None) -> PromptState:
        """The state of a prompt given as a state or a text, with `capture` acts.

        A state the caller holds is used as is when it already is what is asked for;
        otherwise (a shuffled copy, acts it lacks) it is encoded again from its text."""
        if isinstance(prompt, PromptState):
            if prompt.shuffle_seed == shuffle_seed and all(n in prompt.acts for n in capture):
                return prompt
            return self._encode_one(prompt.text, capture, shuffle_seed)
        return self._encode_one(prompt, capture, shuffle_seed)

    @torch.no_grad()
    def _prefill(self, input_ids: torch.Tensor, pairs) -> DynamicCache:
        """Forward over `input_ids` (B, T) with hooks; a full (never window-truncated) cache."""
        self._check_context(input_ids.shape[1])
        cache = DynamicCache()  # no config: every layer keeps every position
        with hooks(pairs):
            # only the cache is wanted: skip the (T x vocab) logits of every prompt position
            self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                       **{self._decoder.cache_kw: cache})
        return cache

    def _check_context(self, n_positions: int) -> None:
        if self._max_positions is not None and n_positions > self._max_positions:
            raise CellError(f"{n_positions} positions exceed the model's context of "
                            f"{self._max_positions} (max_position_embeddings)")

    @torch.no_grad()
    def prompt_geometry(self, text: str, *, window: int, center: bool = False
                        ) -> list[dict[str, Any]]:
        """Experiment A (no generation): V of the prompt's last `window` tokens per layer.

        The forward covers the whole prompt (not the prefill), so the last token counts.
        """
        ids = self.tokenize(text)
        cache = self._prefill(torch.tensor([ids], device=self.device), [])
        rows = []
        for layer in range(self.n_layers):
            v = cache.layers[layer].values[0]  # (H, T, D)
            mat = v.permute(1, 0, 2).reshape(v.shape[1], -1)
            if mat.shape[0] < window:
                rows.append({"layer": layer, "n_tokens": len(ids), "pr": None,
                             "effective_rank": None,
                             "status": f"too_few_tokens:{mat.shape[0]}<{window}"})
                continue
            spec = spectrum(mat[-window:], center=center)
            rows.append({"layer": layer, "n_tokens": len(ids),
                         "pr": None if spec is None else spec.pr,
                         "effective_rank": None if spec is None else spec.erank_entropy,
                         "status": "ok" if spec is not None else "zero_matrix"})
        return rows

    # ------------------------------------------------------------------ patch
    def patch(self, targets: Sequence[Prompt], sources: Sequence[Prompt | None],
              interventions: Sequence[Intervention]) -> list[PatchedState]:
        """One patched state per (target, source, intervention), in order.

        Texts are encoded (cached). A `natural` intervention (or `site="none"`) gives the
        target's unpatched state and needs no source; `self` needs none either (the
        target is its own source). Prefill-site patches of one (target, source) pair
        share one batched prefill, as in `run`. Raises `CellError` for input that cannot
        run, naming the item.
        """
        if not len(targets) == len(sources) == len(interventions):
            raise CellError(f"patch needs one source and one intervention per target: got "
                            f"{len(targets)} targets, {len(sources)} sources, "
                            f"{len(interventions)} interventions")
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, (t, s) in enumerate(zip(targets, sources)):
            if not isinstance(t, (PromptState, str)):
                raise CellError(f"patch {i}: a target is a PromptState or a text, "
                                f"got {type(t).__name__}")
            groups.setdefault((_prompt_key(t), _prompt_key(s)), []).append(i)
        out: list[PatchedState | None] = [None] * len(targets)
        for indices in groups.values():
            jobs = [_Job(i, targets[i], sources[i], interventions[i]) for i in indices]
            for i, res in self._patch_group(jobs):
                if isinstance(res, CellError):
                    raise type(res)(f"patch {i}: {res}") from res
                if isinstance(res, (ValueError, LookupError)):  # a spec the selectors refuse
                    raise CellError(f"patch {i}: {res}") from res
                if isinstance(res, BaseException):
                    raise res
                out[i] = res
        return [s for s in out if s is not None]

    def _patch_group(self, jobs: list[_Job]
                     ) -> Iterator[tuple[int, PatchedState | Exception]]:
        """Yield (index, state or the error) for patches sharing target and source.

        Errors are data here, so `run` can fail one cell and `patch` can raise; a batched
        prefill that fails is retried one patch at a time, so one bad patch fails alone.
        """
        prefill_jobs = []
        for job in jobs:
            try:
                self._validate(job.intervention, job.source)
                iv = job.intervention
                if _is_natural(iv):
                    yield job.index, self._natural_state(self._resolve(job.target), iv)
                elif iv.mode == STEER:
                    yield job.index, self._steer_patch(job)
                elif iv.during == GENERATION:
                    yield job.index, self._with_step_patch(
                        job, self._natural_state(self._resolve(job.target), iv))
                elif iv.site in CACHE_SITES:
                    yield job.index, self._with_step_patch(job, self._cache_patch(job))
                else:
                    prefill_jobs.append(job)
            except Exception as exc:  # noqa: BLE001 - errors are data
                yield job.index, exc
        for start in range(0, len(prefill_jobs), self.max_batch_size):
            chunk = prefill_jobs[start:start + self.max_batch_size]
            try:
                states = self._prefill_patch(chunk)
                yield from ((job.index, self._with_step_patch(job, state))
                            for job, state in zip(chunk, states))
            except Exception as exc:  # noqa: BLE001 - isolate the failing patch
                if len(chunk) == 1:
                    yield chunk[0].index, exc
                    continue
                for job in chunk:
                    try:
                        yield job.index, self._with_step_patch(job, self._prefill_patch([job])[0])
                    except Exception as exc_one:  # noqa: BLE001
                        yield job.index, exc_one

    def _validate(self, iv: Intervention, source: Prompt | SteerSource | None) -> None:
        has_source = source is not None
        if iv.control not in CONTROLS:
            raise CellError(f"unknown control {iv.control!r}; allowed: {', '.join(CONTROLS)}")
        if _is_natural(iv):
            return
        if iv.during not in DURING:
            raise CellError(f"unknown during {iv.during!r}; allowed: {', '.join(DURING)}")
        if iv.mode == STEER:
            if iv.site not in STEER_SITES:
                raise CellError(f"mode 'steer' applies to {', '.join(STEER_SITES)}, "
                                f"not {iv.site!r}")
            if iv.control != PATCH and iv.control not in STEER_CONTROLS:
                raise CellError(f"control {iv.control!r} is not defined for steer; allowed: "
                                f"{', '.join(STEER_CONTROLS)}")
            if not isinstance(source, SteerSource):
                raise CellError("a steer cell needs a SteerSource (the groups its vector "
                                f"is the difference of), got {type(source).__name__}")
        elif isinstance(source, SteerSource):
            raise CellError(f"a SteerSource is the source of a steer cell only (mode {iv.mode!r})")
        if iv.during != PREFILL:
            if iv.site not in GENERATION_SITES and iv.mode != STEER:
                raise CellError(f"site {iv.site!r} cannot be patched during generation; "
                                f"allowed: {', '.join(GENERATION_SITES)}")
            if iv.mode == TRANSPLANT:
                raise CellError("a transplant replaces the prompt's cache: it has no "
                                "generation-time form (use mode 'mix' with during)")
        if iv.site not in SITES:
            raise CellError(f"unknown site {iv.site!r}; allowed: {', '.join(SITES)}")
        if iv.mode not in MODES:
            raise CellError(f"unknown mode {iv.mode!r}; allowed: {', '.join(MODES)}")
        if not isinstance(iv.alpha, (int, float)) or not math.isfinite(iv.alpha):
            raise CellError(f"alpha must be a finite number, got {iv.alpha!r}")
        if iv.mode == "transplant":
            if iv.site not in CACHE_SITES:
                raise CellError("mode 'transplant' applies to cache sites (kv, k, v) only")
            if iv.alpha != 1.0 or iv.tokens != "all":
                raise CellError("a transplant replaces whole layers: it needs alpha=1 and "
                                "tokens='all' (use mode 'mix' for partial patches)")
        if not has_source and iv.control != SELF:
            raise CellError(f"control {iv.control!r} needs a source prompt")

    def _base_meta(self, iv: Intervention | None, target: PromptState) -> dict[str, Any]:
        """The patch columns of an unpatched target (a patch then fills in its own)."""
        # a steer alpha scales a vector: it is not a mix weight and cannot extrapolate one
        extrapolated = (iv is not None and not _is_natural(iv) and iv.mode != STEER
                        and not 0.0 <= float(iv.alpha) <= 1.0)
        return {"n_target_tokens": len(target.ids), "n_source_tokens": None,
                "n_patched_positions": 0, "n_unpatched_positions": 0, "patched_layers": [],
                "rope_consistent": True, "alpha_extrapolated": bool(extrapolated)}

    def _natural_state(self, target: PromptState, iv: Intervention | None = None
                       ) -> PatchedState:
        return PatchedState(list(target.keys), list(target.values), target.ids[-1],
                            target.prefill_len, self._base_meta(iv, target),
                            prompt_ids=target.ids, text=target.text, intervention=iv)

    def _source_state(self, target: PromptState, source: Prompt | None, iv: Intervention,
                      capture: Sequence[str] = ()) -> PromptState:
        """The source as the control reads it: the target for `self`, the source's
        tokens permuted for `shuffle`, else the source itself."""
        src = target if iv.control == SELF or source is None else source
        if iv.control == SHUFFLE:
            text = src.text if isinstance(src, PromptState) else src
            return self._encode_one(text, capture, iv.control_seed)
        return self._resolve(src, capture)

    def _prepare_cache_patch(self, i: int, req: CellRequest) -> PatchedState:
        """A cache patch for one request (the oracle tests prepare one directly)."""
        return self._cache_patch(_Job(i, req.target_text, req.source_text, req.intervention))

    def _prepare_prefill_patch(self, items: list[tuple[int, CellRequest]]
                               ) -> list[PatchedState]:
        """Prefill patches of requests sharing a target (the oracle tests call it)."""
        return self._prefill_patch([_Job(i, r.target_text, r.source_text, r.intervention)
                                    for i, r in items])

    def _cache_patch(self, job: _Job) -> PatchedState:
        iv = job.intervention
        target = self._resolve(job.target)
        source = self._source_state(target, job.source, iv)
        layers = resolve_layers(iv.layers, self.n_layers)
        src_k, src_v = self._controlled_cache(source, iv.control, iv.control_seed, layers)
        keys, values = list(target.keys), list(target.values)
        meta = self._base_meta(iv, target)
        meta["n_source_tokens"] = len(source.ids)
        meta["patched_layers"] = layers
        touch_k = iv.site in ("kv", "k")
        touch_v = iv.site in ("kv", "v")
        if iv.mode == "transplant":
            for layer in layers:
                if touch_k:
                    keys[layer] = src_k[layer]
                if touch_v:
                    values[layer] = src_v[layer]
            if iv.site != "kv" and source.prefill_len != target.prefill_len:
                raise CellError("a k- or v-only transplant needs equal prefill lengths "
                                f"(target {target.prefill_len}, source {source.prefill_len})")
            meta["n_patched_positions"] = source.prefill_len
            meta["rope_consistent"] = (source.prefill_len == target.prefill_len
                                       or len(layers) == self.n_layers)
            edited: tuple[int, ...] = tuple(range(source.prefill_len))
        else:
            pmap = self._pmap(iv, target, source)
            _require_positions(pmap, iv, target.prefill_len, source.prefill_len)
            meta["n_matched_positions"] = self._n_matched(iv, pmap)
            for layer in layers:
                if touch_k:
                    keys[layer] = mix_positions(keys[layer], src_k[layer], pmap, iv.alpha, dim=1)
                if touch_v:
                    values[layer] = mix_positions(values[layer], src_v[layer], pmap, iv.alpha,
                                                  dim=1)
            meta["n_patched_positions"] = len(pmap.target)
            meta["n_unpatched_positions"] = pmap.n_unmatched
            meta["rope_consistent"] = pmap.rope_consistent or not touch_k
            edited = tuple(pmap.target)
        position = keys[0].shape[1]  # transformers' rule: the query follows layer 0's cache
        meta["query_position"] = position
        return PatchedState(keys, values, target.ids[-1], position, meta,
                            prompt_ids=target.ids, text=target.text, intervention=iv,
                            patched_positions=edited)

    def _token_texts(self, state: PromptState) -> list[str]:
        """Decoded text of each prefill token (what a `match:` token spec reads)."""
        return token_texts_of(self.tokenizer, state.ids[:-1])

    def _pmap(self, iv: Intervention, target: PromptState, source: PromptState) -> PositionMap:
        texts = self._token_texts(target) if _is_match(iv.tokens) else None
        return position_map(iv.tokens, iv.align, target.prefill_len, source.prefill_len,
                            token_texts=texts)

    def _positions(self, tokens: str, state: PromptState) -> list[int]:
        """Prefill positions of `state` a token spec selects (no source: steering)."""
        texts = self._token_texts(state) if _is_match(tokens) else None
        return resolve_tokens(tokens, state.prefill_len, token_texts=texts)

    @staticmethod
    def _n_matched(iv: Intervention, pmap: PositionMap) -> int | None:
        return pmap.n_selected if _is_match(iv.tokens) else None

    # ------------------------------------------------------------------ during generation
    def _with_step_patch(self, job: _Job, state: PatchedState) -> PatchedState:
        """`state` with the generation-time half of a `during: generation | both` mix.

        The source decodes alongside as a companion (`generation_patch.py`). `self` needs
        none: the target mixed with its own natural run equals that run, so the cell is
        natural during generation by construction (exactly, for every alpha)."""
        iv = job.intervention
        if iv.during not in (GENERATION, BOTH):
            return state
        target = self._resolve(job.target)
        layers = resolve_layers(iv.layers, self.n_layers)
        meta = dict(state.meta)
        meta["patched_layers"] = sorted(set(meta.get("patched_layers") or []) | set(layers))
        meta.setdefault("query_position", state.position)
        if iv.control == SELF:
            return replace(state, meta=meta)
        source = self._source_state(target, job.source, iv)
        meta["n_source_tokens"] = len(source.ids)
        if iv.site in CACHE_SITES and source.prefill_len != target.prefill_len:
            meta["rope_consistent"] = False  # step t's keys carry the source's positions
        patch = StepPatch(site=iv.site, layers=frozenset(layers), alpha=float(iv.alpha),
                          control=iv.control, seed=int(iv.control_seed),
                          companion=self._natural_state(source),
                          companion_key=(source.text, source.shuffle_seed))
        return replace(state, meta=meta, step_patch=patch)

    # ------------------------------------------------------------------ steering
    def steering_vector(self, site: str, layers: Sequence[int], tokens: str,
                        steer: SteerSource, control: str = "patch", seed: int = 0
                        ) -> SteeringVector:
        """The difference-of-means vector of a steer cell (`steering.py`). The groups'
        difference is computed once per (site, tokens, groups) at every layer, and each
        cell's layers, control and seed are applied to it: a grid's random-control seeds
        and layer points never encode the groups' prompts again."""
        key = (site, tuple(layers), tokens, steer, control, seed if control != SELF else 0)
        found = self._steering.get(key)
        if found is None:
            base_key = (site, tokens, steer)
            base = self._steer_bases.get(base_key)
            if base is None:
                base = group_difference(
                    steer, site=site, layers=list(range(self.n_layers)),
                    encode=lambda text: self._encode_one(text, (site,), None),
                    select=lambda state: self._positions(tokens, state))
                self._steer_bases[base_key] = base
            found = difference_of_means(steer, model=self.model_name, site=site,
                                        layers=list(layers), tokens=tokens, control=control,
                                        seed=seed, base=base)
            self._steering[key] = found
        return found

    def _steer_patch(self, job: _Job) -> PatchedState:
        """Add `alpha x` the steering vector at the selected prefill positions (prefill,
        both) and/or at every generated position (generation, both)."""
        iv = job.intervention
        assert isinstance(job.source, SteerSource)
        target = self._resolve(job.target)
        layers = resolve_layers(iv.layers, self.n_layers)
        vec = self.steering_vector(iv.site, layers, iv.tokens, job.source, iv.control,
                                   iv.control_seed)
        meta = self._base_meta(iv, target)
        meta.update(patched_layers=layers, steer_id=vec.id, steer_norm=vec.norm,
                    query_position=target.prefill_len)
        keys, values = list(target.keys), list(target.values)
        if iv.during in (PREFILL, BOTH):
            positions = self._positions(iv.tokens, target)
            if not positions:
                raise EmptyTokenSelection(
                    f"token spec {iv.tokens!r} selects no position on a target prefill of "
                    f"{target.prefill_len} positions: the steer cell would add nothing")
            idx = torch.tensor(positions, device=self.device)
            alpha = float(iv.alpha)

            def add(layer: int):
                def fn(out: torch.Tensor) -> torch.Tensor:
                    new = out.clone()
                    part = out.index_select(1, idx).float() + alpha * vec.vectors[layer]
                    new.index_copy_(1, idx, part.to(out.dtype))
                    return new
                return fn

            pairs = [(self.adapter.module(self.model, iv.site, layer), add(layer))
                     for layer in layers]
            cache = self._prefill(torch.tensor([target.ids[:-1]], device=self.device), pairs)
            keys = [cache.layers[i].keys[0] for i in range(self.n_layers)]
            values = [cache.layers[i].values[0] for i in range(self.n_layers)]
            meta["n_patched_positions"] = len(positions)
            if _is_match(iv.tokens):
                meta["n_matched_positions"] = len(positions)
        state = PatchedState(keys, values, target.ids[-1], target.prefill_len, meta,
                             prompt_ids=target.ids, text=target.text, intervention=iv,
                             patched_positions=tuple(positions) if iv.during != GENERATION
                             else ())
        if iv.during in (GENERATION, BOTH):
            state.step_patch = StepPatch(site=iv.site, layers=frozenset(layers),
                                         alpha=float(iv.alpha), control=iv.control,
                                         seed=int(iv.control_seed), vectors=vec.vectors)
        return state

    def _controlled_cache(self, source: PromptState, control: str, seed: int,
                          layers: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The source cache as the control sees it (only `layers` are transformed).

        `shuffle` needs nothing here: its source was encoded from permuted tokens."""
        keys, values = list(source.keys), list(source.values)
        if control == "random":
            for layer in layers:
                keys[layer] = matched_noise(keys[layer], seed * 100003 + 2 * layer, (0,))
                values[layer] = matched_noise(values[layer], seed * 100003 + 2 * layer + 1, (0,))
        return keys, values

    def _controlled_act(self, act: torch.Tensor, name: str, control: str, seed: int,
                        layer: int) -> torch.Tensor:
        """A source activation (T, D) as the control sees it."""
        if control == "random":
            # a stable salt per module (str hash() is salted per process: a retried cell
            # on another worker must draw the same noise)
            salt = seed * 100003 + 7 * layer + _NOISE_SALT[name]
            if name in _HEADED:
                heads = act.view(act.shape[0], -1, self.adapter.head_dim)
                return matched_noise(heads, salt, (1,)).view_as(act)
            return matched_noise(act, salt, ())
        return act

    def _prefill_patch(self, jobs: list[_Job]) -> list[PatchedState]:
        """Rerun the target prefill once for all jobs (one target), each row its own patch."""
        names = sorted({n for job in jobs for n in _PREFILL_MODULES[job.intervention.site]})
        target = self._resolve(jobs[0].target)
        sources = [self._source_state(target, job.source, job.intervention, capture=names)
                   for job in jobs]
        plans = []  # per row: (layers, pmap, alpha, source_state, control, seed, names)
        metas = []
        for job, source in zip(jobs, sources):
            iv = job.intervention
            layers = resolve_layers(iv.layers, self.n_layers)
            pmap = self._pmap(iv, target, source)
            _require_positions(pmap, iv, target.prefill_len, source.prefill_len)
            plans.append((set(layers), pmap, float(iv.alpha), source, iv.control,
                          iv.control_seed, _PREFILL_MODULES[iv.site]))
            meta = self._base_meta(iv, target)
            meta.update(n_source_tokens=len(source.ids), patched_layers=layers,
                        n_matched_positions=self._n_matched(iv, pmap),
                        n_patched_positions=len(pmap.target),
                        n_unpatched_positions=pmap.n_unmatched,
                        query_position=target.prefill_len)
            metas.append(meta)

        def patch(name: str, layer: int):
            def fn(out: torch.Tensor) -> torch.Tensor:
                new = out.clone()
                for row, (layers, pmap, alpha, source, control, seed, row_names) in \
                        enumerate(plans):
                    if layer not in layers or name not in row_names:
                        continue
                    src = self._controlled_act(source.acts[name][layer], name, control, seed,
                                               layer)
                    new[row] = mix_positions(out[row], src, pmap, alpha, dim=0)
                return new
            return fn

        pairs = [(self.adapter.module(self.model, name, layer), patch(name, layer))
                 for name in names for layer in range(self.n_layers)
                 if any(layer in p[0] and name in p[6] for p in plans)]
        ids = torch.tensor([target.ids[:-1]] * len(jobs), device=self.device)
        cache = self._prefill(ids, pairs)
        states = []
        for row, (job, meta) in enumerate(zip(jobs, metas)):
            keys = [cache.layers[l_].keys[row] for l_ in range(self.n_layers)]
            values = [cache.layers[l_].values[row] for l_ in range(self.n_layers)]
            states.append(PatchedState(keys, values, target.ids[-1], target.prefill_len, meta,
                                       prompt_ids=target.ids, text=target.text,
                                       intervention=job.intervention,
                                       patched_positions=tuple(plans[row][1].target)))
        return states

    # ------------------------------------------------------------------ generate
    def _natural_first_logprobs(self, states: Sequence[PatchedState]
                                ) -> list[torch.Tensor | None]:
        """Each state's target's natural first-step log-probs, computed once per prompt
        (one batched forward of the first queries) and kept with its `PromptState`.
        None for a state whose target is unknown (built by hand, no text)."""
        prompts: list[PromptState | None] = []
        for state in states:
            prompt = self._resolve(state.text) if state.text else None
            prompts.append(prompt if prompt is not None and prompt.ids == state.prompt_ids
                           else None)
        todo = list({id(p): p for p in prompts if p is not None and p.first_logprobs is None
                     }.values())
        for start in range(0, len(todo), self.max_batch_size):
            chunk = todo[start:start + self.max_batch_size]
            logprobs = self._decoder.first_logprobs([self._natural_state(p) for p in chunk])
            for prompt, lp in zip(chunk, logprobs):
                prompt.first_logprobs = lp.clone()
        return [p.first_logprobs if p is not None else None for p in prompts]

    def generate(self, states: Sequence[PatchedState | PromptState],
                 generation: GenerationConfig | None = None,
                 measure: MeasureConfig | None = None, *,
                 capture: Sequence[str] = ()) -> list[Generation]:
        """Decode each state (a `PromptState` decodes naturally) and measure it.

        All states decode together, `max_batch_size` at a time, with one generation and
        one measure setting. `capture` names modules (`rloop_ray.engine.adapters`
        sites: "v_proj", "resid", ...) whose outputs on the generated tokens come back
        in `Generation.captured`; nothing is captured unless asked for. Raises
        `CellError` for what cannot run (context too short, a bad layer or name).
        """
        generation = generation if generation is not None else GenerationConfig()
        measure = measure if measure is not None else MeasureConfig()
        self._check_capture(capture)
        try:
            resolve_layer(measure.early_layer, self.n_layers)
            resolve_layer(measure.late_layer, self.n_layers)
        except ValueError as exc:
            raise CellError(f"measure: {exc}") from exc
        rows = []
        for i, state in enumerate(states):
            if isinstance(state, PromptState):
                rows.append(self._natural_state(state))
            elif isinstance(state, PatchedState):
                rows.append(state)
            else:
                raise CellError(f"generate {i}: a state is a PatchedState or a PromptState "
                                f"(texts go through encode or patch), got "
                                f"{type(state).__name__}")
        out: list[Generation] = []
        for start in range(0, len(rows), self.max_batch_size):
            batch = rows[start:start + self.max_batch_size]
            out.extend(self._decoder.generate(batch, [generation] * len(batch),
                                              [measure] * len(batch), capture))
        return out

    # ------------------------------------------------------------------ run
    def run(self, requests: Sequence[CellRequest]) -> list[dict[str, Any]]:
        """Run cells; one result row per request, in order. Never raises for a bad cell.

        The same steps as `patch` then `generate`, over cells: patches are prepared per
        (target, source) group, then all prepared rows decode `max_batch_size` at a time,
        each with its own generation and measure settings. A failure is a row with
        `status="failed"`, `error_type` and `error` (message and traceback).
        """
        results: list[dict[str, Any] | None] = [None] * len(requests)
        prepared: list[PreparedRow] = []
        started = time.perf_counter()
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, req in enumerate(requests):
            groups.setdefault((req.target_text, req.source_text), []).append(i)
        for indices in groups.values():
            jobs = [_Job(i, requests[i].target_text, _request_source(requests[i]),
                         requests[i].intervention) for i in indices]
            for i, res in self._patch_group(jobs):
                if isinstance(res, PatchedState):
                    prepared.append(PreparedRow.bind(i, requests[i], res))
                else:
                    results[i] = {"cell_id": requests[i].cell_id, **_failure(res)}
        for start in range(0, len(prepared), self.max_batch_size):
            batch = prepared[start:start + self.max_batch_size]
            for row, out in zip(batch, self._generate_isolated(batch)):
                results[row.index] = out
        elapsed = time.perf_counter() - started
        final = []
        for res in results:
            assert res is not None  # every request got a prepared row or a failure
            res.setdefault("engine_seconds", elapsed / max(1, len(requests)))
            final.append(res)
        return final

    def _generate_isolated(self, batch: list[PreparedRow]) -> list[dict[str, Any]]:
        """Generate a batch; if it fails, rerun rows alone so one bad row fails alone."""
        try:
            return self._generate_and_measure(batch)
        except Exception as exc:  # noqa: BLE001 - errors are data; isolated below
            if len(batch) == 1:
                return [{"cell_id": batch[0].request.cell_id, **batch[0].meta,
                         **_failure(exc)}]
            log.warning("batch of %d failed (%s); retrying rows one by one", len(batch), exc)
            out = []
            for row in batch:
                out.extend(self._generate_isolated([row]))
            return out

    def _generate_and_measure(self, rows: list[PreparedRow]) -> list[dict[str, Any]]:
        """Decode prepared cells as one batch, each with its own settings; result rows."""
        gens = self._decoder.generate([r.state() for r in rows],
                                      [r.request.generation for r in rows],
                                      [r.request.measure for r in rows])
        return [_row(r.request, g) for r, g in zip(rows, gens)]
