"""Patched generations per second: the batched engine vs the notebooks and vs the peer.

Three runners decode the same patched cells greedily:

- the reference (what the earlier notebooks did): one cell at a time, both prompts
  encoded again, the cache mixed layer by layer in Python, batch 1, one `model(...)`
  call per token;
- the peer (what a careful researcher writes instead): the engine's own `Engine.patch`
  states, left-padded into one transformers `DynamicCache` with an attention mask, and
  one `model.generate` call;
- the engine: `Engine.generate` over the same states (it also measures R_V).

The peer runs a cell exactly only when every layer of its cache has the same length
and the model has no sliding window (HF derives one mask and one position from the
attention mask; per-layer lengths from a transplant need per-layer masks). The cells
here are KV mixes of equal length, so the peer runs them all; any cell it cannot run is
counted and left out of its timing. Where a row stops at EOS both sides stop there
(`eos_token_id` = the engine's EOS set); with `stop_at_eos=false` the peer gets no EOS
id at all (not `min_new_tokens`, which suppresses EOS and so decodes something else).

    python benchmarks/engine.py --model smollm2-135m --cells 32,128 --new-tokens 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from rloop_ray.engine import Engine, PatchedState
from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig

TARGETS = [
    "Explain how a river carves a canyon over thousands of years.",
    "Describe the steps needed to bake a loaf of sourdough bread at home.",
    "What causes the seasons to change on Earth during the year?",
    "Write a short poem about the sea at night under a full moon.",
]
# the realistic mix: chat prompts asking for short answers, so most rows end at EOS early
SHORT_TARGETS = [
    "What is the capital of France? Answer in one word.",
    "Is water wet? Answer yes or no.",
    "Name one primary colour. Reply with the word only.",
    "What is two plus two? Give only the number.",
    "Say hello.",
    "Explain how a river carves a canyon over thousands of years.",
]
SOURCES = [
    "Observe your own process of observing as you read these words right now.",
    "Notice the noticing itself: what is aware of this sentence as it is read?",
]
ALPHAS = [0.25, 0.5, 0.75, 1.0]
LAYER_SPECS = ["0%:50%", "50%:100%"]


def make_cells(n_cells: int, n_new: int, *, targets: Sequence[str] = TARGETS,
               stop_at_eos: bool = False) -> list[CellRequest]:
    cells = []
    i = 0
    while len(cells) < n_cells:
        t = targets[i % len(targets)]
        s = SOURCES[(i // len(targets)) % len(SOURCES)]
        iv = Intervention(site="kv", layers=LAYER_SPECS[i % 2], alpha=ALPHAS[(i // 2) % 4],
                          tokens="all", align="end")
        cells.append(CellRequest(f"c{i}", t, s, iv,
                                 GenerationConfig(max_new_tokens=n_new, stop_at_eos=stop_at_eos),
                                 MeasureConfig(window=16, scorers=())))
        i += 1
    return cells


@torch.no_grad()
def reference(engine: Engine, cells: list[CellRequest]) -> list[list[int]]:
    """One cell at a time, token by token, batch 1 (what the notebooks did)."""
    from rloop_ray.engine.interventions import mix_positions, position_map
    from rloop_ray.engine.selectors import resolve_layers

    model = engine.model
    kw = engine._decoder.cache_kw  # `cache` or, before transformers 5.24, `past_key_values`
    outs = []
    for cell in cells:
        t_ids = engine.tokenize(cell.target_text)
        s_ids = engine.tokenize(cell.source_text or cell.target_text)
        t_cache = DynamicCache()
        model(input_ids=torch.tensor([t_ids[:-1]]), use_cache=True, **{kw: t_cache})
        s_cache = DynamicCache()
        model(input_ids=torch.tensor([s_ids[:-1]]), use_cache=True, **{kw: s_cache})
        iv = cell.intervention
        pmap = position_map(iv.tokens, iv.align, len(t_ids) - 1, len(s_ids) - 1)
        layers = set(resolve_layers(iv.layers, engine.n_layers))
        data = []
        for layer in range(engine.n_layers):
            k, v = t_cache.layers[layer].keys, t_cache.layers[layer].values
            if layer in layers:
                k = mix_positions(k, s_cache.layers[layer].keys, pmap, iv.alpha, dim=2)
                v = mix_positions(v, s_cache.layers[layer].values, pmap, iv.alpha, dim=2)
            data.append((k, v))
        cache = DynamicCache(ddp_cache_data=data)
        token = t_ids[-1]
        generated = []
        for _ in range(cell.generation.max_new_tokens):
            logits = model(input_ids=torch.tensor([[token]]), use_cache=True,
                           **{kw: cache}).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
        outs.append(generated)
    return outs


def peer_runnable(engine: Engine, state: PatchedState) -> bool:
    """Whether one HF `generate` decodes this state exactly: one cache length for every
    layer, the query at that length, no sliding window."""
    lens = set(state.cache_lengths)
    return (len(lens) == 1 and state.position == lens.pop()
            and all(w is None for w in engine._windows))


@torch.no_grad()
def peer(engine: Engine, states: list[PatchedState], n_new: int, stop_at_eos: bool
         ) -> list[list[int]]:
    """One `model.generate` over the states' caches, left-padded, with an attention mask.

    `input_ids` holds each row's padded prompt (the cache covers all but its last token,
    which generate feeds first); positions follow from the mask, as HF computes them for
    left padding, so each row sees its own positions 0..n. Every tensor is made on the
    caches' device, so the same peer runs on CPU here and on a GPU in device_check.py."""
    model, tok = engine.model, engine.tokenizer
    kw = engine._decoder.cache_kw
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t_max = max(s.cache_lengths[0] for s in states)
    bsz = len(states)
    device = states[0].keys[0].device
    ids = torch.full((bsz, t_max + 1), pad, dtype=torch.long, device=device)
    mask = torch.zeros((bsz, t_max + 1), dtype=torch.long, device=device)
    data = []
    for layer in range(engine.n_layers):
        k0, v0 = states[0].keys[layer], states[0].values[layer]
        k = k0.new_zeros((bsz, k0.shape[0], t_max, k0.shape[2]))
        v = v0.new_zeros((bsz, v0.shape[0], t_max, v0.shape[2]))
        for b, s in enumerate(states):
            n = s.keys[layer].shape[1]
            k[b, :, t_max - n:] = s.keys[layer]
            v[b, :, t_max - n:] = s.values[layer]
        data.append((k, v))
    for b, s in enumerate(states):
        n = s.cache_lengths[0]
        prompt = (s.prompt_ids[:-1] + [s.first_token])[-(n + 1):]
        ids[b, t_max - n:] = torch.tensor(prompt, device=device)
        mask[b, t_max - n:] = 1
    cache = DynamicCache(ddp_cache_data=data)
    eos = sorted(engine._decoder.eos) if stop_at_eos else None
    out = model.generate(input_ids=ids, attention_mask=mask, **{kw: cache},
                         max_new_tokens=n_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    rows = []
    for b in range(bsz):
        gen = out[b, t_max + 1:].tolist()
        if stop_at_eos:  # generate pads a finished row; keep up to and with its EOS
            for j, t in enumerate(gen):
                if t in engine._decoder.eos:
                    gen = gen[:j + 1]
                    break
        rows.append(gen)
    return rows


@torch.no_grad()
def forward_floor(engine: Engine, states: list[PatchedState], n_new: int) -> list[list[int]]:
    """The model's own forwards and nothing else: every row decoded greedily for `n_new`
    steps in one padded batch (the engine's masks and preallocated cache), an argmax per
    step. No runner that carries every row to the end can be faster than this with the
    same model forward; with `stop_at_eos=false` the peer's rate over this floor's is the
    most any engine could lead it by without a faster forward."""
    from rloop_ray.engine.decode import _cache

    dec = engine._decoder
    keys, values, valid = dec.stack(states)
    cache = _cache(keys, values, reserve=n_new + 1)
    valid = list(valid)
    positions = torch.tensor([s.position for s in states], device=dec.device)
    feed = torch.tensor([s.first_token for s in states], device=dec.device)
    out: list[list[int]] = [[] for _ in states]
    for step in range(n_new):
        logits = dec.forward(cache, valid, feed[:, None], (positions + step)[:, None])
        feed = logits[:, -1].argmax(dim=-1)
        for row, t in zip(out, feed.tolist()):
            row.append(t)
    return out


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (the machine is shared and noisy)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def compare_peer(engine: Engine, n_cells: int, n_new: int, *, realistic: bool,
                 repeats: int) -> dict[str, object]:
    """Engine vs peer on one cell set; alternating runs, best of `repeats` each."""
    stop = realistic
    cells = make_cells(n_cells, n_new, targets=SHORT_TARGETS if realistic else TARGETS,
                       stop_at_eos=stop)
    states = engine.patch([c.target_text for c in cells], [c.source_text for c in cells],
                          [c.intervention for c in cells])
    ok = [i for i, s in enumerate(states) if peer_runnable(engine, s)]
    gen_cfg = cells[0].generation
    engine.max_batch_size = n_cells
    t_eng, t_peer = float("inf"), float("inf")
    eng_out, peer_out = None, None
    for _ in range(repeats):
        t, eng_out = best_of(lambda: engine.generate(states, gen_cfg, cells[0].measure), 1)
        t_eng = min(t_eng, t)
        t, peer_out = best_of(lambda: peer(engine, [states[i] for i in ok], n_new, stop), 1)
        t_peer = min(t_peer, t)
    floor = None
    if not stop:  # every row runs n_new steps: the bare forwards bound what anyone can do
        t_floor, floor_out = best_of(lambda: forward_floor(engine, states, n_new), repeats)
        floor = n_cells / t_floor
    eng_ids = [g.ids for g in eng_out]
    agree = sum(eng_ids[i] == p for i, p in zip(ok, peer_out))
    early = sum(len(g) < n_new for g in eng_ids)
    return {"cells": n_cells, "peer_cells": len(ok), "eng": n_cells / t_eng,
            "peer": len(ok) / t_peer, "agree": agree, "early": early, "floor": floor}


def compare_during(engine: Engine, n_cells: int, n_new: int, repeats: int
                   ) -> dict[str, float]:
    """`Engine.run` on the same cells patched at prefill, during generation and both.

    The generation-time cells decode each distinct source alongside (one companion per
    source: 2 here), so the batch is n + 2 rows; the goal is to stay within 2.5x."""
    from dataclasses import replace

    base = make_cells(n_cells, n_new)
    out: dict[str, float] = {}
    engine.max_batch_size = n_cells
    for during in ("prefill", "generation", "both"):
        cells = [replace(c, intervention=replace(c.intervention, during=during))
                 for c in base]
        t, _ = best_of(lambda cells=cells: engine.run(cells), repeats)
        out[during] = n_cells / t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cells", default="32", help="comma-separated cell counts")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the (slow) notebook reference")
    parser.add_argument("--no-peer", action="store_true", help="skip the HF generate peer")
    parser.add_argument("--no-during", action="store_true",
                        help="skip prefill vs during-generation patching")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(c) for c in args.cells.split(",")]

    engine = Engine(args.model, device=args.device, dtype=args.dtype,
                    max_batch_size=max(sizes))
    engine.run(make_cells(2, args.new_tokens))  # warm-up (allocator, kernels) outside timings
    print(f"model {args.model}, {args.new_tokens} new tokens, device {args.device}, "
          f"dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"chat template {engine.chat_template}")

    if not args.no_reference:
        cells = make_cells(sizes[0], args.new_tokens)
        engine._prompts.clear()  # start both sides with no encoded prompt
        t0 = time.perf_counter()
        ref = reference(engine, cells)
        t_ref = time.perf_counter() - t0
        engine.max_batch_size = sizes[0]
        t0 = time.perf_counter()
        rows = engine.run(cells)
        t_run = time.perf_counter() - t0
        agree = sum(r["generated_ids"] == g for r, g in zip(rows, ref))
        print(f"\nvs the notebook reference, {len(cells)} cells (Engine.run incl. patching)")
        print(f"{'runner':<34}{'seconds':>10}{'cells/s':>10}{'ratio':>8}")
        print(f"{'reference (1 cell, token loop)':<34}{t_ref:>10.2f}"
              f"{len(cells) / t_ref:>10.2f}{1.0:>8.1f}")
        print(f"{'rloop-ray engine (batched)':<34}{t_run:>10.2f}{len(cells) / t_run:>10.2f}"
              f"{t_ref / t_run:>8.1f}")
        print(f"token-for-token agreement: {agree}/{len(cells)} cells")

    if not args.no_during:
        print("\npatched at prefill vs during generation (Engine.run incl. patching, same "
              f"cells, best of {args.repeats})")
        print(f"{'cells':>6}{'prefill/s':>11}{'generation/s':>14}{'both/s':>9}"
              f"{'gen cost':>10}{'both cost':>11}")
        for n in sizes:
            r = compare_during(engine, n, args.new_tokens, args.repeats)
            print(f"{n:>6}{r['prefill']:>11.2f}{r['generation']:>14.2f}{r['both']:>9.2f}"
                  f"{r['prefill'] / r['generation']:>9.2f}x{r['prefill'] / r['both']:>10.2f}x")
        print("cost: prefill rate / generation-time rate (goal: <= 2.5x); the sources "
              "decode alongside as companion rows, one per distinct source.")
    if args.no_peer:
        return
    print("\nvs the peer (one HF generate over the same patched caches; generate steps only,"
          f" best of {args.repeats}, alternating)")
    print(f"{'mix':<30}{'cells':>6}{'peer n':>7}{'early EOS':>10}{'engine/s':>10}"
          f"{'peer/s':>9}{'ratio':>7}{'agree':>9}{'floor/s':>9}{'ceiling':>9}")
    for realistic, label in ((True, "chat, short answers, EOS"), (False, "stop_at_eos=false")):
        for n in sizes:
            r = compare_peer(engine, n, args.new_tokens, realistic=realistic,
                             repeats=args.repeats)
            floor = r["floor"]
            extra = (f"{floor:>9.2f}{floor / r['peer']:>8.2f}x" if floor is not None
                     else f"{'':>9}{'':>9}")
            print(f"{label:<30}{r['cells']:>6}{r['peer_cells']:>7}{r['early']:>10}"
                  f"{r['eng']:>10.2f}{r['peer']:>9.2f}{r['eng'] / r['peer']:>7.2f}"
                  f"{str(r['agree']) + '/' + str(r['peer_cells']):>9}{extra}")
    print("peer n: cells the peer can run exactly (one cache length for all layers, no "
          "sliding window); the rest are left out of its rate and agreement.\n"
          "floor: the model's forwards alone over the same padded batch, an argmax per "
          "step; ceiling = floor / peer, the most any runner that decodes every row to "
          "the end could lead the peer by with this model forward.")


if __name__ == "__main__":
    main()
