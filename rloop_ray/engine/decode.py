"""The `generate` step: decode a batch of patched states together, then measure each row.

Rows may come from any mix of targets, sources and transplants: each layer's caches are
left-padded to one tensor and masked by their own valid slots (`attention.py`), so rows
of unequal (even per-layer unequal) length decode exactly as they would alone. Greedy or
sampled (temperature, top-p) from a per-row generator seeded by the row's own seed, so a
row's tokens do not depend on what else is in its batch. A row that has stopped (EOS or
its own `max_new_tokens`) leaves the batch after the forward that stores its last
token's V (compaction): the rest decode on fewer rows, and what its measures need is
kept aside when it leaves, so they are those of the uncompacted loop. When no row can
stop early (greedy, `stop_at_eos=false`) the picks stay on the device and are read once
per compaction (`Decoder.sync_free`), so on a GPU the host never waits on a step. Per-step
log-probabilities come from logits the loop has anyway; module outputs are captured only
when asked for. The first step's distribution gives `top_ids`/`top_logprobs` and
`kl_from_natural` (against the target's natural first step, which the engine computes
once per prompt and keeps with it); `measure.attention` probes the attention of the
generated tokens' queries (`attention.AttentionProbe`); `measure.layers` keeps V of the
profile layers for `pr_by_layer`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rloop_ray.engine import attention
from rloop_ray.engine.generation_patch import StepPatcher
from rloop_ray.engine.hooks import hooks
from rloop_ray.engine.measure import (
    first_step,
    geometry,
    layer_profile,
    profile_layers,
    text_scores,
)
from rloop_ray.engine.selectors import resolve_layer
from rloop_ray.engine.states import PatchedState
from rloop_ray.engine.types import Generation, GenerationConfig, MeasureConfig

HOST = torch.device("cpu")
"""Where a row's measures are computed once it has decoded (see `_Retired`)."""


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
        self.transform: Callable[[torch.Tensor, torch.Tensor],
                                 tuple[torch.Tensor, torch.Tensor]] | None = None
        """Edits the entries a forward writes before attention reads them (a `kv` patch
        during generation, `generation_patch.StepPatcher.cache_transform`)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is not None:
            key_states, value_states = self.transform(key_states, value_states)
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

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (compaction): one copy now, fewer rows every step after."""
        self._k = self._k.index_select(0, rows)
        self._v = self._v.index_select(0, rows)
        self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's forward takes its cache by: `cache` from transformers 5.24,
    `past_key_values` before (GPU images often pin an older release). Read off the
    signature, so a cache is never passed under a name the model would silently drop."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
           reserve: int) -> DynamicCache:
    """A DynamicCache over per-layer (B, H, T_l, D) tensors with `reserve` free slots."""
    cache = DynamicCache()
    cache.layers = [_PreallocatedLayer(k, v, reserve) for k, v in zip(keys, values)]
    return cache


class _Retired:
    """What a row's measures read once it leaves the batch: V of the layers they use,
    as a batch of one shaped like the cache (`measure.geometry` reads `.layers[l]
    .values`), and those layers' validity. Copied, because compaction reuses no slot,
    and copied to the host: the measures (small float64 SVDs, scalar reads) run there,
    so on a GPU they cost one copy per row instead of a device sync per scalar."""

    class _Layer:
        def __init__(self, values: torch.Tensor) -> None:
            self.values = values

    def __init__(self, values: dict[int, torch.Tensor], valid: dict[int, torch.Tensor]
                 ) -> None:
        n = max(values) + 1
        self.layers: list[_Retired._Layer | None] = [None] * n
        self.valid: list[torch.Tensor | None] = [None] * n
        for layer, v in values.items():
            self.layers[layer] = self._Layer(v)
            self.valid[layer] = valid[layer]


class _Segment:
    """The steps between two compactions: which rows the batch slots held (`live`),
    each step's log-prob of the pick (B,), the picks themselves (B,) when the loop runs
    without reading them back (`Decoder.sync_free`), and captured outputs name -> layer
    -> (B, 1, D)."""

    def __init__(self, live: list[int], capture: Sequence[str], n_layers: int) -> None:
        self.live = live
        self.logprobs: list[torch.Tensor] = []
        self.picks: list[torch.Tensor] = []
        self.grab: dict[str, list[list[torch.Tensor]]] = {
            n: [[] for _ in range(n_layers)] for n in capture}


class Decoder:
    """Batched decoding and measuring on one loaded model (the engine owns one)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, adapter: Any, *,
                 windows: Sequence[int | None], eos: set[int],
                 continuations: dict[str, list[int]],
                 check_context: Callable[[int], None],
                 natural_logprobs: Callable[[Sequence[PatchedState]],
                                            list[torch.Tensor | None]] | None = None) -> None:
        """`continuations`: the `logprob_contrast` scorer's token ids ("recursive",
        "neutral"); `check_context(n)` raises when n positions exceed the model's;
        `natural_logprobs(states)`: each state's target's natural first-step log-probs
        (None where unknown), for `kl_from_natural`."""
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.windows = list(windows)
        self.n_layers = len(self.windows)
        self.eos = eos
        self.continuations = continuations
        self.check_context = check_context
        self.natural_logprobs = natural_logprobs
        self.device = next(model.parameters()).device
        self.cache_kw = cache_argument(model)
        self.sync_free = True
        """Decode batches whose rows cannot stop early (greedy, `stop_at_eos=false`)
        without reading each step's picks back to the host: every row's last step is
        known from its `max_new_tokens`, so compaction needs no token, and on a GPU the
        host queues the next steps while the device computes. False: read them every
        step (the same tokens; tests compare both)."""

    # ------------------------------------------------------------------ batching
    def stack(self, rows: Sequence[PatchedState]) -> tuple[
            list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
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
    def forward(self, cache: DynamicCache, valid: list[torch.Tensor], input_ids: torch.Tensor,
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
            key2 = (id(valid[layer]), self.windows[layer])
            if key2 not in built:
                built[key2] = attention.decode_mask(valid[layer], q_len, self.windows[layer])
            masks.append(built[key2])
        with attention.layer_masks(masks):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True,
                             **{self.cache_kw: cache})
        return out.logits.float()

    @staticmethod
    def _sample(logits: torch.Tensor, gens: Sequence[GenerationConfig],
                generators: list[torch.Generator | None]) -> tuple[list[int], torch.Tensor]:
        """The picks as ints (the one host sync of a step: the loop needs them for EOS;
        the sync-free loop does not call this) and as a (B,) tensor on the device, to
        feed back without a copy."""
        greedy_t = logits.argmax(dim=-1)
        greedy = greedy_t.tolist()
        if all(gen.temperature <= 0 for gen in gens):
            return [int(t) for t in greedy], greedy_t
        picks = []
        for b, gen in enumerate(gens):
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
        return picks, torch.tensor(picks, device=logits.device)

    # ------------------------------------------------------------------ generate
    def generate(self, rows: Sequence[PatchedState], gens: Sequence[GenerationConfig],
                 measures: Sequence[MeasureConfig], capture: Sequence[str] = ()
                 ) -> list[Generation]:
        """Decode `rows` as one batch (row b with `gens[b]`), then measure each row.

        Slot s of the running batch holds row `live[s]`. After each forward, rows that
        had already stopped (their final token's V is now cached) retire: the V and
        validity their measures read are copied out, and the cache, masks and positions
        keep only the rows still decoding."""
        started = time.perf_counter()
        n_real = len(rows)
        rows, gens, measures, patcher, targets_of = self._with_companions(rows, gens, measures)
        keys, values, valid = self.stack(rows)
        base = [k.shape[2] for k in keys]  # slot of the first query, per layer
        contrast = self.logprob_contrast(rows, keys, values, valid, patcher) \
            if any("logprob_contrast" in m.scorers for m in measures[:n_real]) else None
        for r, g in zip(rows, gens):
            self.check_context(r.position + g.max_new_tokens + 1)
        cache = _cache(keys, values, reserve=max(g.max_new_tokens for g in gens) + 1)
        del keys, values
        valid = list(valid)
        bsz = len(rows)
        live = list(range(bsz))
        positions = torch.tensor([r.position for r in rows], device=self.device)
        feed = torch.tensor([r.first_token for r in rows], device=self.device)
        limits = [g.max_new_tokens for g in gens]
        generated: list[list[int]] = [[] for _ in rows]
        stop = ["max_new_tokens"] * bsz
        done = [lim <= 0 for lim in limits]
        generators = [torch.Generator().manual_seed(int(g.seed)) if g.temperature > 0
                      else None for g in gens]
        profiles = [profile_layers(m, self.n_layers) for m in measures]
        needed = [sorted({resolve_layer(m.early_layer, self.n_layers),
                          resolve_layer(m.late_layer, self.n_layers), *prof})
                  for m, prof in zip(measures, profiles)]
        references = self._natural_references(rows[:n_real], measures[:n_real])
        first_logprobs: torch.Tensor | None = None
        probe = self._probe(rows, valid, base) \
            if any(m.attention for m in measures[:n_real]) else None
        kept: list[_Retired | None] = [None] * bsz
        segments = [_Segment(live, capture, self.n_layers)]
        # no row can stop before its limit: each row's last step is known up front
        sync_free = self.sync_free and all(g.temperature <= 0 and not g.stop_at_eos
                                           for g in gens)
        n_picked = [0] * bsz
        step = 0
        fed = [0] * bsz  # forwards each row took part in (its generation-time patches)
        patch_hooks = []
        if patcher is not None:
            for layer_idx, layer in enumerate(cache.layers):
                layer.transform = patcher.cache_transform(layer_idx)
            patcher.layout(live)
            patch_hooks = patcher.hooks(lambda n, l_: self.adapter.module(self.model, n, l_))
        # patch hooks first: a capture then records what the patched row really computed
        with hooks([*patch_hooks, *self._capture_hooks(segments, capture)]), \
                attention.probing(probe):
            while True:
                if patcher is not None:
                    patcher.step = step
                if probe is not None:  # step 0's query is the last prompt token
                    probe.active = step > 0
                logits = self.forward(cache, valid, feed[:, None], (positions + step)[:, None])
                if step == 0:  # no compaction yet: slot b holds row b
                    first_logprobs = torch.log_softmax(logits[:n_real, -1], dim=-1)
                step += 1
                for b in live:
                    fed[b] += 1
                finished = [s for s, b in enumerate(live) if done[b]]
                if finished:  # this feed stored V (and captures) of their final tokens
                    for s in finished:
                        b = live[s]
                        if b >= n_real:  # a companion: nothing of it is measured
                            continue
                        kept[b] = _Retired(
                            {layer: cache.layers[layer].values[s:s + 1].to(HOST, copy=True)
                             for layer in needed[b]},
                            {layer: valid[layer][s:s + 1].to(HOST) for layer in needed[b]})
                    if len(finished) == len(live):
                        break
                    slots = [s for s, b in enumerate(live) if not done[b]]
                    idx = torch.tensor(slots, device=self.device)
                    for layer in cache.layers:
                        layer.select(idx)
                    shrunk: dict[int, torch.Tensor] = {}
                    valid = [shrunk.setdefault(id(v), v.index_select(0, idx)) for v in valid]
                    positions = positions.index_select(0, idx)
                    logits = logits.index_select(0, idx)
                    live = [live[s] for s in slots]
                    segments.append(_Segment(live, capture, self.n_layers))
                    if patcher is not None:
                        patcher.layout(live)
                    if probe is not None:
                        probe.layout(live)
                last = logits[:, -1]
                if sync_free:  # greedy, and the picks stay on the device until the end
                    feed = last.argmax(dim=-1)
                    segments[-1].picks.append(feed)
                else:
                    picks, feed = self._sample(last, [gens[b] for b in live],
                                               [generators[b] for b in live])
                segments[-1].logprobs.append(last.gather(1, feed[:, None])[:, 0]
                                             - torch.logsumexp(last, dim=-1))
                for s, b in enumerate(live):
                    n_picked[b] += 1
                    if sync_free:
                        done[b] = done[b] or n_picked[b] >= limits[b]
                        continue
                    generated[b].append(picks[s])
                    if row_eos := (gens[b].stop_at_eos and picks[s] in self.eos):
                        stop[b] = "eos"
                    if row_eos or n_picked[b] >= limits[b]:
                        done[b] = True
                for c, targets in targets_of.items():  # a companion runs as long as they do
                    done[c] = done[c] or all(done[t] for t in targets)
        logprobs: list[list[float]] = [[] for _ in rows]
        captured: list[dict[str, list[list[torch.Tensor]]]] = [
            {n: [[] for _ in range(self.n_layers)] for n in capture} for _ in rows]
        for seg in segments:
            if seg.picks:  # the sync-free loop's tokens: one read per segment
                for s, ids in enumerate(torch.stack(seg.picks, dim=1).tolist()):
                    generated[seg.live[s]].extend(int(t) for t in ids)
            lp = torch.stack(seg.logprobs, dim=1).tolist() if seg.logprobs else None
            acts = {n: [torch.cat(steps, dim=1) for steps in layers]
                    for n, layers in seg.grab.items()}
            for s, b in enumerate(seg.live):
                if lp is not None:
                    logprobs[b].extend(lp[s])
                for n, layers in acts.items():
                    for layer, a in enumerate(layers):
                        captured[b][n][layer].append(a[s])
        gen_seconds = time.perf_counter() - started  # after the reads: the device is done
        attn = probe.means() if probe is not None else None
        assert first_logprobs is not None  # the loop ran at least one forward
        first_host = first_logprobs.to(HOST)  # (n_real, V): one copy, then per-row reads
        out = []
        for b, (row, m) in enumerate(zip(rows[:n_real], measures[:n_real])):
            n_gen = len(generated[b])
            ret = kept[b]
            assert ret is not None  # every row retires once, after its final feed
            meas = geometry(m, self.n_layers, ret, ret.valid, base, 0, n_gen)
            meas.update(layer_profile(m, profiles[b], ret, ret.valid, base, 0, n_gen))
            ref = references[b]
            meas.update(first_step(m, first_host[b], None if ref is None else ref.to(HOST),
                                   row.is_natural))
            meas["token_logprobs"] = [float(x) for x in logprobs[b][:n_gen]] \
                if m.token_logprobs else None
            has_patch = bool(row.patched_positions) or row.step_patch is not None
            for name in ("attn_entropy", "attn_mass_prompt", "attn_mass_generated",
                         "attn_mass_patched"):
                meas[name] = attn[name][b] if attn is not None and m.attention else None
            if not has_patch:
                meas["attn_mass_patched"] = None  # no patched position to put mass on
            if contrast is not None and "logprob_contrast" in m.scorers:
                meas["score_logprob_contrast"] = contrast[b]
            text = self.tokenizer.decode(generated[b], skip_special_tokens=True)
            meas.update(text_scores(m.scorers, text))
            grabbed = {
                n: torch.stack([torch.cat(parts, dim=0)[1:1 + n_gen] for parts in layers]
                               ).float().cpu().numpy()
                for n, layers in captured[b].items()}
            out.append(Generation(
                ids=generated[b], text=text, stop_reason=stop[b],
                logprobs=[float(x) for x in logprobs[b][:n_gen]], measures=meas,
                captured=grabbed, meta={**row.meta, "query_position": row.position,
                                        "n_generation_patched_steps":
                                            fed[b] if row.step_patch is not None else 0},
                seconds=gen_seconds / n_real))
        return out

    def _natural_references(self, rows: Sequence[PatchedState],
                            measures: Sequence[MeasureConfig]) -> list[torch.Tensor | None]:
        """Per row, its target's natural first-step log-probs, for the rows whose
        `kl_from_natural` needs them (patched rows that ask for it); else None."""
        wanted = [b for b, (r, m) in enumerate(zip(rows, measures))
                  if m.kl_from_natural and not r.is_natural]
        out: list[torch.Tensor | None] = [None] * len(rows)
        if not wanted or self.natural_logprobs is None:
            return out
        for b, ref in zip(wanted, self.natural_logprobs([rows[b] for b in wanted])):
            out[b] = ref
        return out

    @torch.no_grad()
    def first_logprobs(self, rows: Sequence[PatchedState]) -> torch.Tensor:
        """(B, V) first-step log-probs of `rows` decoded unpatched: one forward of each
        row's first query on its own cache, as the decode loop's step 0 computes it."""
        keys, values, valid = self.stack(rows)
        cache = _cache(keys, values, reserve=1)
        positions = torch.tensor([r.position for r in rows], device=self.device)
        feed = torch.tensor([r.first_token for r in rows], device=self.device)
        logits = self.forward(cache, list(valid), feed[:, None], positions[:, None])
        return torch.log_softmax(logits[:, -1], dim=-1)

    def _probe(self, rows: Sequence[PatchedState], valid: Sequence[torch.Tensor],
               base: Sequence[int]) -> attention.AttentionProbe:
        """The attention probe of a stacked batch: per layer, which slots of each row are
        its prompt (cached prefix + the first query) and which its patch edited."""
        prompt, patched = [], []
        for layer in range(self.n_layers):
            slots = valid[layer]
            prompt.append(torch.cat([slots, torch.ones_like(slots[:, :1])], dim=1))
            edited = torch.zeros_like(prompt[-1])
            at_rows, at_slots = [], []
            for b, row in enumerate(rows):
                n_cached = int(row.keys[layer].shape[1])
                offset = base[layer] - n_cached  # left padding of row b at this layer
                kept = [offset + p for p in row.patched_positions if 0 <= p < n_cached]
                at_rows.extend([b] * len(kept))
                at_slots.extend(kept)
            if at_rows:
                edited[torch.tensor(at_rows, device=edited.device),
                       torch.tensor(at_slots, device=edited.device)] = True
            patched.append(edited)
        during = torch.tensor([r.step_patch is not None for r in rows], device=self.device)
        return attention.AttentionProbe(prompt, patched, during)

    def _with_companions(self, rows: Sequence[PatchedState], gens: Sequence[GenerationConfig],
                         measures: Sequence[MeasureConfig]
                         ) -> tuple[list[PatchedState], list[GenerationConfig],
                                    list[MeasureConfig], StepPatcher | None,
                                    dict[int, list[int]]]:
        """The batch with each generation-time mix's source appended as a companion row.

        Targets that read the same source (same prompt and control, and for sampled
        decoding the same settings and seed) share one companion. A companion decodes
        greedily or with its first target's settings, does not stop at EOS and runs for
        its longest target, so every step of a target has a source step to mix with.
        Returns (rows, gens, measures, patcher or None, companion row -> its targets)."""
        patches = [r.step_patch for r in rows]
        if all(p is None for p in patches):
            return list(rows), list(gens), list(measures), None, {}
        all_rows, all_gens, all_measures = list(rows), list(gens), list(measures)
        companion_of: list[int | None] = [None] * len(rows)
        index: dict[tuple, int] = {}
        targets_of: dict[int, list[int]] = {}
        for b, p in enumerate(patches):
            if p is None or p.companion is None:
                continue
            g = gens[b]
            key = (p.companion_key, g.temperature, g.top_p,
                   g.seed if g.temperature > 0 else None)
            c = index.get(key)
            if c is None:
                c = index[key] = len(all_rows)
                all_rows.append(p.companion)  # type: ignore[arg-type]
                all_gens.append(g)
                all_measures.append(measures[b])
                targets_of[c] = []
            companion_of[b] = c
            targets_of[c].append(b)
        for c, targets in targets_of.items():
            all_gens[c] = replace(all_gens[c], stop_at_eos=False,
                                  max_new_tokens=max(gens[t].max_new_tokens for t in targets))
        n_extra = len(all_rows) - len(rows)
        patcher = StepPatcher([*patches, *[None] * n_extra], [*companion_of, *[None] * n_extra],
                              self.adapter.head_dim, self.device)
        return all_rows, all_gens, all_measures, patcher, targets_of

    def _capture_hooks(self, segments: list[_Segment], capture: Sequence[str]):
        """Hooks that keep each step's module output (B, 1, D) in the running segment
        (the batch's rows change at each compaction), for `capture`."""
        def keep(name: str, layer: int):
            def fn(out: torch.Tensor) -> None:
                segments[-1].grab[name][layer].append(out.detach())
            return fn

        return [(self.adapter.module(self.model, name, layer), keep(name, layer))
                for name in capture for layer in range(self.n_layers)]

    # ------------------------------------------------------------------ measure
    @torch.no_grad()
    def logprob_contrast(self, rows: Sequence[PatchedState], keys: list[torch.Tensor],
                         values: list[torch.Tensor], valid: list[torch.Tensor],
                         patcher: StepPatcher | None = None) -> list[float]:
        """Mean log-prob per token of the recursive continuation minus the neutral one,
        teacher-forced from each row's patched state (no sampling, low variance).

        Generation-time patches act on the teacher-forced positions too: a companion is
        fed the same continuation, and each position is mixed with the companion's."""
        conts = [self.continuations["recursive"], self.continuations["neutral"]]
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
        patch_hooks = []
        if patcher is not None:
            patcher.step = 0
            patcher.layout([*range(bsz), *range(bsz)], [0] * bsz + [1] * bsz)
            for layer_idx, layer in enumerate(cache.layers):
                layer.transform = patcher.cache_transform(layer_idx)
            patch_hooks = patcher.hooks(lambda n, l_: self.adapter.module(self.model, n, l_))
        with hooks(patch_hooks):
            logits = self.forward(cache, valid2, inputs, positions, q_valid=q_valid)
        logp = torch.log_softmax(logits, dim=-1)
        means = []
        for half, cont in enumerate(conts):
            target = torch.tensor(cont, device=self.device)
            lp = logp[half * bsz:(half + 1) * bsz, :len(cont)].gather(
                -1, target[None, :, None].expand(bsz, -1, 1))[..., 0]
            means.append(lp.mean(dim=1))
        return (means[0] - means[1]).tolist()

