"""Memory and time of the real builtin models: cached load, peak RSS, tokens/s.

Each model is measured in a fresh process (a child of this script), after its cache
folder exists, so the load time is that of a cached safetensors folder and the peak
RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that model alone, not to a
GGUF conversion or to another model. Generation goes through `Engine.run` with natural
cells (greedy, `stop_at_eos=False`, so every row makes exactly `--new-tokens` tokens):
one cell (unbatched) and `--batch` cells of distinct prompts (batched). Prompt prefill
is included, as in a sweep; a warm-up run on another prompt comes first.

    python benchmarks/models.py                       # smollm2-135m and gemma3-270m
    python benchmarks/models.py --models gemma3-270m --new-tokens 32 --batch 16
    python benchmarks/models.py --threads 1   # on a shared, oversubscribed machine

On a machine shared with other jobs, torch's default of one thread per core can be
several times slower than one thread (OpenMP workers spin while waiting for a core):
the table prints the load average and the thread count so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

SUBJECTS = ["the ocean", "a mountain", "the city", "an old forest"]
ASKS = [
    "Describe {} at dawn in a few sentences.",
    "Explain what lives in {} and why.",
    "Write a short story that begins in {}.",
    "List three facts about {} that surprise people.",
]
PROMPTS = [ask.format(subject) for ask in ASKS for subject in SUBJECTS]
WARMUP = "Say hello."


def _rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cells(prompts: list[str], n_new: int) -> list[Any]:
    from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig

    return [
        CellRequest(f"n{i}", text, None, Intervention(site="none", control="natural"),
                    GenerationConfig(max_new_tokens=n_new, stop_at_eos=False),
                    MeasureConfig(window=16, scorers=()))
        for i, text in enumerate(prompts)
    ]


def measure(model: str, n_new: int, batch: int, repeats: int,
            threads: int | None) -> dict[str, Any]:
    """Runs inside the child process: imports, load, then generation timings."""
    t0 = time.perf_counter()
    import torch

    from rloop_ray.engine import Engine

    import_s = time.perf_counter() - t0
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    engine = Engine(model, max_batch_size=batch)
    load_s = time.perf_counter() - t0
    rss_load = _rss_mib()
    engine.run(_cells([WARMUP], n_new))

    def best_rate(prompts: list[str]) -> float:
        times = []
        for _ in range(repeats):
            engine._prompts.clear()  # each repeat encodes its prompts again
            t = time.perf_counter()
            rows = engine.run(_cells(prompts, n_new))
            times.append(time.perf_counter() - t)
            bad = [r.get("error") for r in rows if r["status"] != "ok"]
            if bad:
                raise RuntimeError(f"{model}: failed cells: {bad[0]}")
        return len(prompts) * n_new / min(times)

    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    unbatched = best_rate(prompts[:1])
    batched = best_rate(prompts)
    return {
        "model": model, "n_layers": engine.n_layers,
        "params_m": sum(p.numel() for p in engine.model.parameters()) / 1e6,
        "import_s": import_s, "load_s": load_s, "rss_load_mib": rss_load,
        "rss_peak_mib": _rss_mib(), "tok_s_1": unbatched, "tok_s_batch": batched,
        "batch": batch, "new_tokens": n_new, "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
    }


def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--child", choices=["build", "measure"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "build":  # make sure the cache exists, in a process of its own
        from rloop_ray.engine.models import builtin_path

        t0 = time.perf_counter()
        path = builtin_path(args.models[0])
        print(json.dumps({"path": str(path), "seconds": time.perf_counter() - t0}))
        return
    if args.child == "measure":
        print(json.dumps(measure(args.models[0], args.new_tokens, args.batch, args.repeats,
                                 args.threads)))
        return

    rows = []
    for model in args.models:
        _child(["--child", "build", "--models", model])
        threads = [] if args.threads is None else ["--threads", str(args.threads)]
        rows.append(_child(["--child", "measure", "--models", model,
                            "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
                            "--repeats", str(args.repeats), *threads]))
    print(f"greedy, {args.new_tokens} new tokens per cell, float32 on CPU ({os.cpu_count()} "
          f"cores), torch threads {rows[0]['threads']}, best of {args.repeats}, load average "
          + ", ".join(f"{r['load_avg']:.1f}" for r in rows))
    print("| model | layers | params (M) | imports (s) | cached load (s) | RSS after load "
          "(MiB) | peak RSS (MiB) | tokens/s, 1 cell | tokens/s, "
          f"{args.batch} cells |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['model']}` | {r['n_layers']} | {r['params_m']:.0f} | {r['import_s']:.1f} "
              f"| {r['load_s']:.1f} | {r['rss_load_mib']:.0f} | {r['rss_peak_mib']:.0f} "
              f"| {r['tok_s_1']:.1f} | {r['tok_s_batch']:.1f} |")


if __name__ == "__main__":
    main()
