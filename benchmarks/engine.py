"""Patched generations per second: the batched engine vs the earlier notebooks' way.

The reference runs the same cells one at a time: it encodes both prompts again for
every cell, mixes the cache layer by layer in Python and generates token by token with
batch size 1 (transformers' own cache, one `model(...)` call per token). Both sides
run greedy, so the script also reports how many cells agree token for token.

    python benchmarks/engine.py --model smollm2-135m --cells 32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from rloop_ray.engine import Engine
from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig

TARGETS = [
    "Explain how a river carves a canyon over thousands of years.",
    "Describe the steps needed to bake a loaf of sourdough bread at home.",
    "What causes the seasons to change on Earth during the year?",
    "Write a short poem about the sea at night under a full moon.",
]
SOURCES = [
    "Observe your own process of observing as you read these words right now.",
    "Notice the noticing itself: what is aware of this sentence as it is read?",
]


def make_cells(n_cells: int, n_new: int) -> list[CellRequest]:
    alphas = [0.25, 0.5, 0.75, 1.0]
    layer_specs = ["0%:50%", "50%:100%"]
    cells = []
    i = 0
    while len(cells) < n_cells:
        t = TARGETS[i % len(TARGETS)]
        s = SOURCES[(i // len(TARGETS)) % len(SOURCES)]
        iv = Intervention(site="kv", layers=layer_specs[i % 2], alpha=alphas[(i // 2) % 4],
                          tokens="all", align="end")
        cells.append(CellRequest(f"c{i}", t, s, iv,
                                 GenerationConfig(max_new_tokens=n_new, stop_at_eos=False),
                                 MeasureConfig(window=16, scorers=())))
        i += 1
    return cells


@torch.no_grad()
def reference(engine: Engine, cells: list[CellRequest]) -> list[list[int]]:
    """One cell at a time, token by token, batch 1 (what the notebooks did)."""
    from rloop_ray.engine.interventions import mix_positions, position_map
    from rloop_ray.engine.selectors import resolve_layers

    model = engine.model
    outs = []
    for cell in cells:
        t_ids = engine.tokenize(cell.target_text)
        s_ids = engine.tokenize(cell.source_text or cell.target_text)
        t_cache = DynamicCache()
        model(input_ids=torch.tensor([t_ids[:-1]]), cache=t_cache, use_cache=True)
        s_cache = DynamicCache()
        model(input_ids=torch.tensor([s_ids[:-1]]), cache=s_cache, use_cache=True)
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
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
        outs.append(generated)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cells", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    engine = Engine(args.model, device=args.device, dtype=args.dtype, max_batch_size=args.cells)
    cells = make_cells(args.cells, args.new_tokens)
    engine.run(cells[:2])  # warm-up (allocator, kernels) outside the timings
    engine._prompts.clear()  # and start both sides with no encoded prompt

    t0 = time.perf_counter()
    ref = reference(engine, cells)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = engine.run(cells)
    t_eng = time.perf_counter() - t0
    agree = sum(r["generated_ids"] == g for r, g in zip(rows, ref))
    rate_ref, rate_eng = len(cells) / t_ref, len(cells) / t_eng
    torch_threads = torch.get_num_threads()
    print(f"model {args.model}, {len(cells)} cells x {args.new_tokens} new tokens, "
          f"device {args.device}, dtype {args.dtype}, torch threads {torch_threads}")
    print(f"{'runner':<34}{'seconds':>10}{'cells/s':>10}{'ratio':>8}")
    print(f"{'reference (1 cell, token loop)':<34}{t_ref:>10.2f}{rate_ref:>10.2f}{1.0:>8.1f}")
    print(f"{'rloop-ray engine (batched)':<34}{t_eng:>10.2f}{rate_eng:>10.2f}"
          f"{rate_eng / rate_ref:>8.1f}")
    print(f"token-for-token agreement: {agree}/{len(cells)} cells")


if __name__ == "__main__":
    main()
