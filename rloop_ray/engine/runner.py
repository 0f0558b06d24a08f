"""The engine: encode prompts once, patch, generate in batches, measure. No Ray here.

Semantics (DESIGN §3): a prompt's *prefill* is the forward pass over all tokens but the
last, kept as the cache; the last prompt token is the first query of generation. An
intervention edits either that cache (`kv`, `k`, `v`) or activations during the
target's prefill (`v_proj`, `qkv`, `resid`). Generation runs every prepared row of a
batch together, each layer with its own mask (see `attention.py`), so caches of
unequal length (transplants, packed prompts) decode exactly.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rloop_ray.engine import attention
from rloop_ray.engine.geometry import r_v, spectrum
from rloop_ray.engine.hooks import hooks
from rloop_ray.engine.interventions import (
    PositionMap,
    matched_noise,
    mix_positions,
    permutation,
    position_map,
)
from rloop_ray.engine.selectors import resolve_layer, resolve_layers
from rloop_ray.engine.types import (
    CACHE_SITES,
    CONTROLS,
    MODES,
    SITES,
    CellRequest,
    Intervention,
)

log = logging.getLogger(__name__)


class _PreallocatedLayer(DynamicLayer):
    """A cache layer with room reserved for the tokens still to come.

    transformers' `DynamicLayer` concatenates at every step, copying the whole cache
    each time (quadratic in the number of steps); decoding a batch of 32 rows spends a
    visible share of its time there. Writing into a reserved buffer is the same
    computation without the copies; past the reserve it falls back to concatenation.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int) -> None:
        super().__init__()
        bsz, heads, length, _ = keys.shape
        self._k = keys.new_empty((bsz, heads, length + reserve, keys.shape[3]))
        self._v = values.new_empty((bsz, values.shape[1], length + reserve, values.shape[3]))
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self._len = length
        self.lazy_initialization(keys, values)
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self._len + n > self._k.shape[2]:
            self._k = torch.cat([self._k[:, :, :self._len], key_states], dim=-2)
            self._v = torch.cat([self._v[:, :, :self._len], value_states], dim=-2)
        else:
            self._k[:, :, self._len:self._len + n] = key_states
            self._v[:, :, self._len:self._len + n] = value_states
        self._len += n
        self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]
        return self.keys, self.values


def _cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
           reserve: int) -> DynamicCache:
    """A DynamicCache over per-layer (B, H, T_l, D) tensors with `reserve` free slots."""
    cache = DynamicCache()
    cache.layers = [_PreallocatedLayer(k, v, reserve) for k, v in zip(keys, values)]
    return cache

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
    """A cell that cannot run as specified; recorded as a failed row, never raised out."""


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


@dataclass
class PromptState:
    """A prompt encoded once: its ids and the prefill cache of tokens 0..L-2."""

    ids: list[int]
    keys: list[torch.Tensor]  # per layer (kv_heads, L-1, head_dim)
    values: list[torch.Tensor]
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per layer (L-1, D)

    @property
    def prefill_len(self) -> int:
        return len(self.ids) - 1


@dataclass
class PreparedRow:
    """One cell ready to decode: its (patched) cache and where generation starts."""

    index: int
    request: CellRequest
    keys: list[torch.Tensor]  # per layer (kv_heads, n_l, head_dim); n_l may differ per layer
    values: list[torch.Tensor]
    first_token: int
    position: int  # rotary position of the first query
    meta: dict[str, Any]


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"status": "failed", "error_type": type(exc).__name__,
            "error": "".join(traceback.format_exception(exc))}


class Engine:
    """One model replica serving batched encode / patch / generate / measure."""

    def __init__(self, model: str, *, dtype: str = "float32", device: str = "cpu",
                 device_map: str | dict | None = None, chat_template: bool | None = False,
                 trust_remote_code: bool = False, revision: str | None = None,
                 max_batch_size: int = 32, prompt_cache_size: int = 64) -> None:
        from rloop_ray.engine.models import auto_chat_template, load_model

        self.loaded = load_model(model, dtype=dtype, device=device, device_map=device_map,
                                 trust_remote_code=trust_remote_code, revision=revision)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.adapter = self.loaded.adapter
        self.model_name = model
        # None = auto: instruct models (a tokenizer with a template) get their template
        self.chat_template = (auto_chat_template(model, self.tokenizer)
                              if chat_template is None else chat_template)
        self.max_batch_size = max_batch_size
        self.n_layers = self.loaded.n_layers
        self.device = next(self.model.parameters()).device
        self.model.set_attn_implementation(attention.register())
        self._windows = [self.adapter.sliding_window(i) for i in range(self.n_layers)]
        self._prompts: OrderedDict[str, PromptState] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._eos = self._eos_ids()
        self._max_positions = getattr(self.model.config.get_text_config(),
                                      "max_position_embeddings", None)
        self._continuation_ids = {
            name: self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for name, text in (("recursive", RECURSIVE_CONTINUATION),
                               ("neutral", NEUTRAL_CONTINUATION))}

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

    def encode(self, text: str, capture: Sequence[str] = (),
               shuffle_seed: int | None = None) -> PromptState:
        """Prefill of prompt[:-1], cached per prompt; `capture` adds module outputs.

        `shuffle_seed` encodes the prompt with its tokens permuted (all but the first,
        seeded): the `shuffle` control. Permuting the *slots* of a finished cache would
        be vacuous: keys already carry their rotary position and attention is invariant
        to the order of (key, value) pairs, so later queries would see the same cache.
        """
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
            acts={n: list(v) for n, v in acts.items()})  # type: ignore[misc]
        self._prompts[key] = state
        self._prompts.move_to_end(key)
        while len(self._prompts) > self._prompt_cache_size:
            self._prompts.popitem(last=False)
        return state

    @torch.no_grad()
    def _prefill(self, input_ids: torch.Tensor, pairs) -> DynamicCache:
        """Forward over `input_ids` (B, T) with hooks; a full (never window-truncated) cache."""
        self._check_context(input_ids.shape[1])
        cache = DynamicCache()  # no config: every layer keeps every position
        with hooks(pairs):
            # only the cache is wanted: skip the (T x vocab) logits of every prompt position
            self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
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

    # ------------------------------------------------------------------ run
    def run(self, requests: Sequence[CellRequest]) -> list[dict[str, Any]]:
        """Run cells; one result dict per request, in order. Never raises for a bad cell."""
        results: list[dict[str, Any] | None] = [None] * len(requests)
        prepared: list[PreparedRow] = []
        started = time.perf_counter()
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, req in enumerate(requests):
            groups.setdefault((req.target_text, req.source_text), []).append(i)
        for indices in groups.values():
            for i, row in self._prepare_group([(i, requests[i]) for i in indices]):
                if isinstance(row, PreparedRow):
                    prepared.append(row)
                else:
                    results[i] = row
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
                return [{**batch[0].meta, **_failure(exc)}]
            log.warning("batch of %d failed (%s); retrying rows one by one", len(batch), exc)
            out = []
            for row in batch:
                out.extend(self._generate_isolated([row]))
            return out

    # ------------------------------------------------------------------ patch
    def _prepare_group(self, items: list[tuple[int, CellRequest]]):
        """Yield (index, PreparedRow | failure dict) for cells sharing target and source."""
        prefill_items = []
        for i, req in items:
            try:
                self._validate(req)
                if req.intervention.control == "natural" or req.intervention.site == "none":
                    yield i, self._prepare_natural(i, req)
                elif req.intervention.site in CACHE_SITES:
                    yield i, self._prepare_cache_patch(i, req)
                else:
                    prefill_items.append((i, req))
            except Exception as exc:  # noqa: BLE001 - errors are data
                yield i, _failure(exc)
        for start in range(0, len(prefill_items), self.max_batch_size):
            chunk = prefill_items[start:start + self.max_batch_size]
            try:
                rows = self._prepare_prefill_patch(chunk)
                yield from ((row.index, row) for row in rows)
            except Exception as exc:  # noqa: BLE001 - isolate the failing cell
                if len(chunk) == 1:
                    yield chunk[0][0], _failure(exc)
                    continue
                for item in chunk:
                    try:
                        row = self._prepare_prefill_patch([item])[0]
                        yield row.index, row
                    except Exception as exc_one:  # noqa: BLE001
                        yield item[0], _failure(exc_one)

    def _validate(self, req: CellRequest) -> None:
        iv = req.intervention
        if iv.control not in CONTROLS:
            raise CellError(f"unknown control {iv.control!r}; allowed: {', '.join(CONTROLS)}")
        if iv.control == "natural" or iv.site == "none":
            return
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
        if req.source_text is None and iv.control != "self":
            raise CellError(f"control {iv.control!r} needs a source prompt")

    def _base_meta(self, req: CellRequest, target: PromptState) -> dict[str, Any]:
        iv = req.intervention
        return {"status": "ok", "n_target_tokens": len(target.ids), "n_source_tokens": None,
                "n_patched_positions": 0, "n_unpatched_positions": 0, "patched_layers": [],
                "rope_consistent": True,
                "alpha_extrapolated": bool(not 0.0 <= float(iv.alpha) <= 1.0)
                if iv.control != "natural" else False}

    def _prepare_natural(self, i: int, req: CellRequest) -> PreparedRow:
        target = self.encode(req.target_text)
        return PreparedRow(i, req, list(target.keys), list(target.values), target.ids[-1],
                           target.prefill_len, self._base_meta(req, target))

    def _source_text(self, req: CellRequest) -> str:
        return req.target_text if req.intervention.control == "self" else req.source_text  # type: ignore[return-value]

    def _encode_source(self, req: CellRequest, capture: Sequence[str] = ()) -> PromptState:
        iv = req.intervention
        seed = iv.control_seed if iv.control == "shuffle" else None
        return self.encode(self._source_text(req), capture=capture, shuffle_seed=seed)

    def _prepare_cache_patch(self, i: int, req: CellRequest) -> PreparedRow:
        iv = req.intervention
        target = self.encode(req.target_text)
        source = self._encode_source(req)
        layers = resolve_layers(iv.layers, self.n_layers)
        src_k, src_v = self._controlled_cache(source, iv.control, iv.control_seed, layers)
        keys, values = list(target.keys), list(target.values)
        meta = self._base_meta(req, target)
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
        else:
            pmap = position_map(iv.tokens, iv.align, target.prefill_len, source.prefill_len)
            _require_positions(pmap, iv, target.prefill_len, source.prefill_len)
            for layer in layers:
                if touch_k:
                    keys[layer] = mix_positions(keys[layer], src_k[layer], pmap, iv.alpha, dim=1)
                if touch_v:
                    values[layer] = mix_positions(values[layer], src_v[layer], pmap, iv.alpha,
                                                  dim=1)
            meta["n_patched_positions"] = len(pmap.target)
            meta["n_unpatched_positions"] = pmap.n_unmatched
            meta["rope_consistent"] = pmap.rope_consistent or not touch_k
        position = keys[0].shape[1]  # transformers' rule: the query follows layer 0's cache
        meta["query_position"] = position
        return PreparedRow(i, req, keys, values, target.ids[-1], position, meta)

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

    def _prepare_prefill_patch(self, items: list[tuple[int, CellRequest]]) -> list[PreparedRow]:
        """Rerun the target prefill once for all items, each row with its own patch."""
        req0 = items[0][1]
        names = sorted({n for _, r in items for n in _PREFILL_MODULES[r.intervention.site]})
        target = self.encode(req0.target_text)
        sources = {id(r): self._encode_source(r, capture=names) for _, r in items}
        plans = []  # per row: (layers, pmap, alpha, source_state, control, seed, names)
        metas = []
        for _, req in items:
            iv = req.intervention
            source = sources[id(req)]
            layers = resolve_layers(iv.layers, self.n_layers)
            pmap = position_map(iv.tokens, iv.align, target.prefill_len, source.prefill_len)
            _require_positions(pmap, iv, target.prefill_len, source.prefill_len)
            plans.append((set(layers), pmap, float(iv.alpha), source, iv.control,
                          iv.control_seed, _PREFILL_MODULES[iv.site]))
            meta = self._base_meta(req, target)
            meta.update(n_source_tokens=len(source.ids), patched_layers=layers,
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
        ids = torch.tensor([target.ids[:-1]] * len(items), device=self.device)
        cache = self._prefill(ids, pairs)
        rows = []
        for row, ((i, req), meta) in enumerate(zip(items, metas)):
            keys = [cache.layers[l_].keys[row] for l_ in range(self.n_layers)]
            values = [cache.layers[l_].values[row] for l_ in range(self.n_layers)]
            rows.append(PreparedRow(i, req, keys, values, target.ids[-1], target.prefill_len,
                                    meta))
        return rows

    # ------------------------------------------------------------------ generate
    def _stack(self, rows: list[PreparedRow]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                        list[torch.Tensor]]:
        """Left-pad each layer's per-row caches to one (B, H, T_l, D) tensor + validity."""
        keys, values, valid = [], [], []
        prev_lens: list[int] | None = None
        for layer in range(self.n_layers):
            lens = [r.keys[layer].shape[1] for r in rows]
            t_max = max(lens)
            k0 = rows[0].keys[layer]
            k = k0.new_zeros((len(rows), k0.shape[0], t_max, k0.shape[2]))
            v0 = rows[0].values[layer]
            v = v0.new_zeros((len(rows), v0.shape[0], t_max, v0.shape[2]))
            for b, (row, n) in enumerate(zip(rows, lens)):
                if n:
                    k[b, :, t_max - n:] = row.keys[layer]
                    v[b, :, t_max - n:] = row.values[layer]
            if lens != prev_lens:  # layers with equal lengths share one validity tensor
                ok = torch.zeros((len(rows), t_max), dtype=torch.bool, device=k0.device)
                for b, n in enumerate(lens):
                    ok[b, t_max - n:] = n > 0
                prev_lens = lens
            keys.append(k)
            values.append(v)
            valid.append(ok)
        return keys, values, valid

    @torch.no_grad()
    def _forward(self, cache: DynamicCache, valid: list[torch.Tensor], input_ids: torch.Tensor,
                 positions: torch.Tensor, q_valid: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of (B, q) new tokens on `cache`; extends `valid` in place. Logits fp32."""
        q_len = input_ids.shape[1]
        new_valid = torch.ones((input_ids.shape[0], q_len), dtype=torch.bool,
                               device=input_ids.device) if q_valid is None else q_valid
        # layers sharing a validity tensor (no transplant) share one mask: build each once
        grown: dict[int, torch.Tensor] = {}
        for layer in range(self.n_layers):
            key = id(valid[layer])
            if key not in grown:
                grown[key] = torch.cat([valid[layer], new_valid], dim=1)
            valid[layer] = grown[key]
        built: dict[tuple[int, int | None], torch.Tensor] = {}
        masks = []
        for layer in range(self.n_layers):
            key2 = (id(valid[layer]), self._windows[layer])
            if key2 not in built:
                built[key2] = attention.decode_mask(valid[layer], q_len, self._windows[layer])
            masks.append(built[key2])
        with attention.layer_masks(masks):
            out = self.model(input_ids=input_ids, position_ids=positions, cache=cache,
                             use_cache=True)
        return out.logits.float()

    def _sample(self, logits: torch.Tensor, rows: list[PreparedRow],
                generators: list[torch.Generator | None]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        picks = []
        for b, row in enumerate(rows):
            gen = row.request.generation
            if gen.temperature <= 0:
                picks.append(int(greedy[b]))
                continue
            probs = torch.softmax(logits[b].cpu() / gen.temperature, dim=-1)
            if gen.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < gen.top_p
                probs = torch.zeros_like(probs).index_copy_(0, order[keep], sorted_p[keep])
                probs = probs / probs.sum()
            picks.append(int(torch.multinomial(probs, 1, generator=generators[b]).item()))
        return picks

    def _generate_and_measure(self, rows: list[PreparedRow]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        keys, values, valid = self._stack(rows)
        base = [k.shape[2] for k in keys]  # slot of the first query, per layer
        contrast = self._logprob_contrast(rows, keys, values, valid) \
            if any("logprob_contrast" in r.request.measure.scorers for r in rows) else None
        for r in rows:
            self._check_context(r.position + r.request.generation.max_new_tokens + 1)
        cache = _cache(keys, values, reserve=max(r.request.generation.max_new_tokens
                                                  for r in rows) + 1)
        valid = list(valid)
        bsz = len(rows)
        positions = torch.tensor([r.position for r in rows], device=self.device)
        tokens = [r.first_token for r in rows]
        limits = [r.request.generation.max_new_tokens for r in rows]
        generated: list[list[int]] = [[] for _ in rows]
        stop = ["max_new_tokens"] * bsz
        done = [lim <= 0 for lim in limits]
        generators = [torch.Generator().manual_seed(int(r.request.generation.seed))
                      if r.request.generation.temperature > 0 else None for r in rows]
        step = 0
        while True:
            logits = self._forward(cache, valid, torch.tensor([tokens], device=self.device).T,
                                   (positions + step)[:, None])
            step += 1
            if all(done):
                break  # this last feed only stored V of each row's final token
            picks = self._sample(logits[:, -1], rows, generators)
            for b in range(bsz):
                if done[b]:
                    continue
                tokens[b] = picks[b]
                generated[b].append(picks[b])
                if row_eos := (rows[b].request.generation.stop_at_eos and picks[b] in self._eos):
                    stop[b] = "eos"
                if row_eos or len(generated[b]) >= limits[b]:
                    done[b] = True
        gen_seconds = time.perf_counter() - started
        results = []
        for b, row in enumerate(rows):
            res = dict(row.meta)
            res.update(generated_ids=generated[b], n_generated=len(generated[b]),
                       generated_text=self.tokenizer.decode(generated[b],
                                                            skip_special_tokens=True),
                       stop_reason=stop[b], query_position=row.position,
                       generate_seconds=gen_seconds / bsz)
            res.update(self._measure(row, cache, valid, base, b, len(generated[b])))
            if contrast is not None and "logprob_contrast" in row.request.measure.scorers:
                res["score_logprob_contrast"] = contrast[b]
            res.update(self._text_scores(row, res["generated_text"]))
            results.append(res)
        return results

    # ------------------------------------------------------------------ measure
    def _v_rows(self, cache: DynamicCache, layer: int, b: int, start: int,
                stop: int) -> torch.Tensor:
        """V of slots [start, stop) of row b at `layer`, as (T, kv_heads * head_dim)."""
        v = cache.layers[layer].values[b, :, start:stop, :]  # (H, T, D)
        return v.permute(1, 0, 2).reshape(v.shape[1], -1)

    def _measure(self, row: PreparedRow, cache: DynamicCache, valid: list[torch.Tensor],
                 base: list[int], b: int, n_gen: int) -> dict[str, Any]:
        m = row.request.measure
        early = resolve_layer(m.early_layer, self.n_layers)
        late = resolve_layer(m.late_layer, self.n_layers)
        gen_e = self._v_rows(cache, early, b, base[early] + 1, base[early] + 1 + n_gen)
        gen_l = self._v_rows(cache, late, b, base[late] + 1, base[late] + 1 + n_gen)
        res = r_v(gen_e, gen_l, window=m.window, center=m.centering)
        out: dict[str, Any] = {"layer_early": early, "layer_late": late, "rv": res.rv,
                               "pr_early": res.pr_early, "pr_late": res.pr_late,
                               "erank_early": res.erank_early, "erank_late": res.erank_late,
                               "rv_status": res.status, "rv_window": m.window,
                               "rv_centered": m.centering}
        # prompt side (step 0): the last W prompt tokens = cached prefill + the first query
        n_real = int(min(valid[early][b, :base[early] + 1].sum(),
                         valid[late][b, :base[late] + 1].sum()))
        pe = self._v_rows(cache, early, b, base[early] + 1 - n_real, base[early] + 1)
        pl = self._v_rows(cache, late, b, base[late] + 1 - n_real, base[late] + 1)
        prompt = r_v(pe, pl, window=m.window, center=m.centering)
        out["rv_prompt"] = prompt.rv
        out["rv_prompt_status"] = prompt.status
        if m.trajectory:
            # step t: the W tokens ending at generated token t (t=0: the last prompt token)
            full_e = self._v_rows(cache, early, b, base[early] + 1 - n_real,
                                  base[early] + 1 + n_gen)
            full_l = self._v_rows(cache, late, b, base[late] + 1 - n_real,
                                  base[late] + 1 + n_gen)
            traj = []
            for t in range(n_gen + 1):
                end = n_real + t
                traj.append(r_v(full_e[:end], full_l[:end], window=m.window,
                                center=m.centering).rv)
            out["rv_trajectory"] = traj
        else:
            out["rv_trajectory"] = None
        return out

    def _text_scores(self, row: PreparedRow, text: str) -> dict[str, Any]:
        names = [n for n in row.request.measure.scorers if n != "logprob_contrast"]
        if not names:
            return {}
        from rloop_ray.scoring import score_text

        return score_text(text, names)

    @torch.no_grad()
    def _logprob_contrast(self, rows: list[PreparedRow], keys: list[torch.Tensor],
                          values: list[torch.Tensor], valid: list[torch.Tensor]) -> list[float]:
        """Mean log-prob per token of the recursive continuation minus the neutral one,
        teacher-forced from each row's patched state (no sampling, low variance)."""
        conts = [self._continuation_ids["recursive"], self._continuation_ids["neutral"]]
        bsz = len(rows)
        q_len = 1 + max(len(c) for c in conts)
        inputs = torch.full((2 * bsz, q_len), self.tokenizer.pad_token_id or 0,
                            device=self.device)
        q_valid = torch.zeros((2 * bsz, q_len), dtype=torch.bool, device=self.device)
        for half, cont in enumerate(conts):
            for b, row in enumerate(rows):
                seq = [row.first_token, *cont]
                inputs[half * bsz + b, :len(seq)] = torch.tensor(seq)
                q_valid[half * bsz + b, :len(seq)] = True
        cache = _cache([k.repeat(2, 1, 1, 1) for k in keys],
                       [v.repeat(2, 1, 1, 1) for v in values], reserve=q_len)
        positions = torch.tensor([r.position for r in rows] * 2, device=self.device)
        positions = positions[:, None] + torch.arange(q_len, device=self.device)[None, :]
        doubled: dict[int, torch.Tensor] = {}
        valid2 = [doubled.setdefault(id(v), v.repeat(2, 1)) for v in valid]
        logits = self._forward(cache, valid2, inputs, positions, q_valid=q_valid)
        logp = torch.log_softmax(logits, dim=-1)
        means = []
        for half, cont in enumerate(conts):
            target = torch.tensor(cont, device=self.device)
            lp = logp[half * bsz:(half + 1) * bsz, :len(cont)].gather(
                -1, target[None, :, None].expand(bsz, -1, 1))[..., 0]
            means.append(lp.mean(dim=1))
        return (means[0] - means[1]).tolist()
