"""Device check: the engine's oracles in bf16 on one CUDA device, and its decode speed
against HF `generate` and the HBM roofline, on random-weight models of the real
Llama-3-8B-Instruct and Mistral-7B-v0.1 shapes.

Why it exists (issue 13): users run those models on GPU clusters, while every test of
the repository runs on CPU in float32, where the engine is exact. This is the one
command to run on a GPU machine to learn, in under 6 minutes on an H200, (1) whether
the engine still computes what the model computes at the shapes and in the dtype people
use, and (2) how fast it decodes there: against the peer a careful researcher writes
instead (one HF `generate` over the same patched caches) and against the hardware's
limit (weights + KV cache read once per step at the bandwidth measured in the same run).

It needs torch and transformers only: no Ray, no pydantic, no network, no downloads.
The weights are random, drawn on the device in bf16 (an 8B model is 16 GB: never built
on the host and copied); the shapes are the real ones, from the config facts shipped in
`rloop_ray/engine/known_configs.py`. The tokenizer is the tiny models' local BPE: its
695 ids are valid ids of either vocabulary, and the models keep their real vocabulary
(the lm_head is a real share of the bytes a decode step reads).

    python benchmarks/device_check.py --out device_check.json   # one CUDA device, bf16
    python benchmarks/device_check.py --small                   # CPU, tiny shapes (CI)

`--small` runs the same checks on CPU with tiny shapes of the same two architectures
(4 layers, hidden 128, grouped-query attention, Mistral's window shrunk to 8), so CI
keeps this file from rotting (tests/test_device_check.py). Exit status: 0 every oracle
passed, 1 an oracle failed or a throughput row raised, 2 the check cannot run here (no
CUDA device without `--small`, or a transformers without the API the engine calls).
docs/gpu.md says how to run it on a machine that lacks a recent enough transformers.

What an oracle means in bf16 (tests/test_engine_oracles.py states them exactly, for
float32 on CPU). Two computations of the same thing in bf16 differ in their last bits
whenever their kernels differ (a batch of 1 and a batch of 11 take different GEMM
paths, a cached decode step and a full forward reduce in different orders), and the
logits of a random model have near-ties, so a greedy token may flip with nothing wrong.
So each oracle is checked as tightly as its arithmetic allows:

- exact where the arithmetic is identical: alpha=0 and `self` cache mixes decode in one
  batch with the natural row of the same prompt and must give its tokens exactly (the
  mixed cache is bitwise the target's: (1 - 0) t + 0 s = t in float32, rounded back);
- against an independent reference elsewhere: a plain transformers forward over the
  prompt plus the engine's own tokens (teacher forcing, so one flip does not cascade),
  with transformers' own masks and sliding windows. At every generated step the
  engine's token must be the reference's best or within `--gap-tol` nats of it (a
  near-tie), and the engine's log-prob of it within `--lp-tol` of the reference's;
- batched vs one by one: the same tokens, or a first divergence that is a near-tie: up
  to and including it, the two runs' log-probs agree within `--lp-tol`;
- the sliding-window check has teeth: the engine's log-probs must differ from those of
  a reference without the window by more than `--lp-tol`, else its prompts did not
  exceed the window enough to test anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# a GPU machine runs the checkout without installing it; the benchmarks folder goes
# first so `engine` is the sibling benchmarks/engine.py however this file is started
# (`python benchmarks/device_check.py`, or runpy from tests/test_device_check.py)
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import transformers  # noqa: E402

from rloop_ray.engine.known_configs import known_config  # noqa: E402
from rloop_ray.engine.types import (  # noqa: E402
    Generation,
    GenerationConfig,
    Intervention,
    MeasureConfig,
)

EXIT_OK, EXIT_ORACLE_FAILED, EXIT_CANNOT_RUN = 0, 1, 2

MODELS = {"llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
          "mistral-7b": "mistralai/Mistral-7B-v0.1"}
"""Row label -> the hub id whose shipped config facts give the shapes."""

SHRUNK_WINDOW = 128
"""Mistral's sliding window for this check (the real one is 4096). Oracle prompts of
~330 tokens exceed it; throughput prompts plus 64 new tokens (< 128) stay inside it, as
real prompts stay inside 4096, so the throughput rows decode as Mistral-7B-v0.1 does."""
SMALL_WINDOW = 8
RMS_NORM_EPS = 1e-5  # both config.json files (transformers' class defaults are 1e-6)
FULL_INIT_STD = 0.02
"""Both config.json files' `initializer_range`. About 1.3 / sqrt(hidden): logits of std
~1.3, attention neither uniform nor one-hot. The tiny shapes use the tiny builtins'
0.2 (about 1.6 / sqrt(128)) for the same reason (`models.TINY_INIT_STD`)."""

TARGET = ("Please explain how a river slowly carves a deep canyon through layers of rock "
          "over many thousands of years.")
SOURCE = "Observe the process of your own observing as you read this very sentence."
SHORT = "Name three colours."
THROUGHPUT_TARGETS = (
    "Explain how a river carves a canyon over thousands of years.",
    "Describe the steps needed to bake a loaf of sourdough bread at home.",
    "What causes the seasons to change on Earth during the year?",
    "Write a short poem about the sea at night under a full moon.",
    "What is the capital of France? Answer in one word.",
    "Say hello.",
)
THROUGHPUT_SOURCES = (
    "Observe your own process of observing as you read these words right now.",
    "Notice the noticing itself: what is aware of this sentence as it is read?",
)
ORACLE_MEASURE = dict(early_layer="25%", late_layer="75%", window=4,
                      scorers=("logprob_contrast",))
"""Oracle rows also run the measures (R_V, the log-prob contrast, the defaults of the
newer ones) so their code runs on the device too; throughput rows keep R_V only."""
THROUGHPUT_MEASURE = dict(window=16, scorers=(), kl_from_natural=False, top_logprobs=0)


# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one model of the check is built with."""

    name: str
    hub_id: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    rope_theta: float
    tie: bool
    window: int | None  # the window the check runs with (Mistral: shrunk)
    real_window: int | None
    init_std: float

    def n_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tie else 2)
        return self.n_layers * layer + embed + self.hidden


def shapes(names: Sequence[str], *, small: bool, tokenizer_len: int,
           layers: int | None = None) -> list[Shape]:
    """The real shapes from `known_configs` (`layers` overrides their depth, for a CPU
    rehearsal of the full path), or tiny ones of the same families."""
    out = []
    for name in names:
        known = known_config(MODELS[name])
        if known is None:  # the table ships both: a missing one is a packaging bug
            raise RuntimeError(f"{MODELS[name]} is not in rloop_ray.engine.known_configs")
        if small:
            window = SMALL_WINDOW if known.sliding_window else None
            out.append(Shape(name, known.hub_id, known.model_type, n_layers=4, n_heads=8,
                             n_kv_heads=2, head_dim=16, hidden=128, intermediate=448,
                             vocab=tokenizer_len, max_positions=2048,
                             rope_theta=known.rope_theta, tie=False, window=window,
                             real_window=known.sliding_window, init_std=0.2))
            continue
        window = SHRUNK_WINDOW if known.sliding_window else None
        out.append(Shape(name, known.hub_id, known.model_type, known.n_layers, known.n_heads,
                         known.n_kv_heads, known.head_dim, known.hidden_size,
                         known.intermediate_size, known.vocab_size,
                         known.max_position_embeddings, known.rope_theta,
                         known.tie_word_embeddings, window, known.sliding_window,
                         FULL_INIT_STD))
        if layers is not None:
            out[-1] = dataclasses.replace(out[-1], n_layers=layers)
    return out


def check_transformers() -> str | None:
    """Why this transformers cannot run the engine, or None.

    The engine passes its cache under the keyword the model's forward takes (`cache`
    from transformers 5.24, `past_key_values` before: `decode.cache_argument`), and is
    tested on 5.17 (the GPU image's) and 5.25; 4.x lacks the cache layers it builds on."""
    if int(transformers.__version__.split(".")[0]) < 5:
        return (f"transformers {transformers.__version__}: the engine needs transformers 5 "
                "(its per-layer cache objects)")
    return None


def build_model(shape: Shape, tokenizer: Any, device: torch.device, dtype: torch.dtype
                ) -> torch.nn.Module:
    """A random-weight model of `shape`, made directly on `device` in `dtype`.

    `from_config` inside a `torch.device` context allocates every parameter there and
    transformers' init draws the weights there (normal(0, init_std)): an 8B model takes
    seconds and never touches host memory."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    need = shape.n_params() * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if need * 1.15 + (4 << 30) > free:
            raise RuntimeError(f"{shape.name} needs {need / 2**30:.1f} GiB for weights; "
                               f"the device has {free / 2**30:.1f} GiB free")
    kinds = {"llama": LlamaConfig, "mistral": MistralConfig}
    kwargs: dict[str, Any] = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta, rms_norm_eps=RMS_NORM_EPS,
        tie_word_embeddings=shape.tie, initializer_range=shape.init_std,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    if shape.model_type == "mistral":
        kwargs["sliding_window"] = shape.window
    config = kinds[shape.model_type](**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    param = next(model.parameters())
    if param.device.type != device.type or param.dtype != dtype:
        raise RuntimeError(f"from_config made {param.dtype} weights on {param.device}, "
                           f"not {dtype} on {device}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("random init produced non-finite weights")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def measure_config(**wanted: Any) -> MeasureConfig:
    """A MeasureConfig of the fields this checkout has (the measures are growing)."""
    names = {f.name for f in dataclasses.fields(MeasureConfig)}
    return MeasureConfig(**{k: v for k, v in wanted.items() if k in names})


def long_prompts(tokenizer: Any, window: int) -> list[str]:
    """Two texts whose prefills exceed `window` (about 2.5x and 1.5x it)."""
    from rloop_ray.engine.tokenizer_builder import training_corpus

    corpus = training_corpus()
    out = []
    for factor, start in ((2.5, 0), (1.5, 3)):
        parts: list[str] = []
        i = start
        while len(tokenizer(" ".join(parts))["input_ids"]) < factor * window + 2:
            parts.append(corpus[i % len(corpus)])
            i += 1
        out.append(" ".join(parts))
    return out


# ----------------------------------------------------------------------------- oracles


@dataclasses.dataclass(frozen=True)
class Tol:
    lp: float  # nats: |engine log-prob - reference log-prob| of the same token
    gap: float  # nats: reference best log-prob - reference log-prob of the engine's token


@dataclasses.dataclass
class Agreement:
    """Engine tokens against a reference, over the steps of one or more rows."""

    steps: int = 0
    exact: int = 0  # steps where the engine's token is the reference's best
    max_dlp: float = 0.0
    max_gap: float = 0.0
    finite: bool = True

    def add(self, other: Agreement) -> None:
        self.steps += other.steps
        self.exact += other.exact
        self.max_dlp = max(self.max_dlp, other.max_dlp)
        self.max_gap = max(self.max_gap, other.max_gap)
        self.finite = self.finite and other.finite

    def ok(self, tol: Tol) -> bool:
        return (self.finite and self.steps > 0 and self.max_dlp <= tol.lp
                and self.max_gap <= tol.gap)

    def text(self) -> str:
        fin = "" if self.finite else ", NON-FINITE"
        return (f"argmax {self.exact}/{self.steps} steps, max|dlp| {self.max_dlp:.3g}, "
                f"max gap {self.max_gap:.3g}{fin}")


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]
                       ) -> torch.Tensor:
    """(len(tokens), vocab) float32 log-probs of each next token: one plain forward over
    prompt + tokens[:-1], no cache, transformers' own masks (sliding windows included)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens[:-1]], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def versus_reference(model: torch.nn.Module, gen: Generation, prompt: list[int]
                     ) -> Agreement:
    if not gen.ids:
        return Agreement(finite=False)
    lp = reference_logprobs(model, prompt, gen.ids)
    picks = torch.tensor(gen.ids, device=lp.device)
    ref_pick = lp.gather(1, picks[:, None])[:, 0]
    gap = lp.max(dim=-1).values - ref_pick
    dlp = (torch.tensor(gen.logprobs, device=lp.device, dtype=torch.float32) - ref_pick).abs()
    finite = bool(torch.isfinite(gap).all() and torch.isfinite(dlp).all())
    return Agreement(len(gen.ids), int((gap <= 0).sum()), float(dlp.max()), float(gap.max()),
                     finite)


def versus_each_other(a: Generation, b: Generation) -> tuple[bool, int, float]:
    """(same tokens, first divergent step or len, max |dlp| up to and including it)."""
    n = min(len(a.ids), len(b.ids))
    first = next((t for t in range(n) if a.ids[t] != b.ids[t]), n)
    upto = min(first + 1, n)
    dlp = max((abs(a.logprobs[t] - b.logprobs[t]) for t in range(upto)), default=math.inf)
    return a.ids == b.ids, first, dlp


@dataclasses.dataclass
class Check:
    model: str
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


def oracle_natural(engine: Any, gen: GenerationConfig, measure: MeasureConfig,
                   tol: Tol) -> tuple[bool, str]:
    """Natural rows of three lengths, left-padded in one batch, against the reference."""
    prompts = [TARGET, SOURCE, SHORT]
    states = engine.encode(prompts)
    gens = engine.generate(states, gen, measure)
    agg = Agreement()
    for state, g in zip(states, gens):
        agg.add(versus_reference(engine.model, g, state.ids))
    return agg.ok(tol), agg.text()


def oracle_alpha0_cache(engine: Any, gen: GenerationConfig, measure: MeasureConfig,
                        tol: Tol) -> tuple[bool, str]:
    """alpha=0 kv/k/v mixes and a `self` mix decode, in one batch with the natural row,
    to its tokens exactly (their caches are bitwise the natural one)."""
    ivs = [Intervention(control="natural", site="none"), Intervention(site="kv", alpha=0.0),
           Intervention(site="k", alpha=0.0), Intervention(site="v", alpha=0.0),
           Intervention(site="kv", control="self")]
    sources = [None, SOURCE, SOURCE, SOURCE, None]
    states = engine.patch([TARGET] * len(ivs), sources, ivs)
    gens = engine.generate(states, gen, measure)
    same = sum(g.ids == gens[0].ids for g in gens[1:])
    patched = all((s.meta.get("n_patched_positions") or 0) > 0 for s in states[1:4])
    dlp = max(abs(x - y) for g in gens[1:] for x, y in zip(g.logprobs, gens[0].logprobs))
    ref = versus_reference(engine.model, gens[0], engine.tokenize(TARGET))
    ok = same == len(gens) - 1 and patched and ref.ok(tol)
    return ok, (f"identical tokens {same}/{len(gens) - 1} (kv, k, v alpha=0; self), "
                f"max|dlp| {dlp:.3g}, positions patched {patched}; natural vs reference: "
                f"{ref.text()}")


def oracle_alpha0_prefill(engine: Any, gen: GenerationConfig, measure: MeasureConfig,
                          tol: Tol) -> tuple[bool, str]:
    """alpha=0 at the prefill sites reruns the target's prefill as a batch of 3, whose
    GEMMs need not round as batch 1 does: same tokens or a near-tie divergence."""
    ivs = [Intervention(control="natural", site="none")] + [
        Intervention(site=site, alpha=0.0) for site in ("v_proj", "qkv", "resid")]
    states = engine.patch([TARGET] * len(ivs), [None] + [SOURCE] * 3, ivs)
    gens = engine.generate(states, gen, measure)
    results = [versus_each_other(gens[0], g) for g in gens[1:]]
    same = sum(r[0] for r in results)
    worst = max(r[2] for r in results)
    ok = worst <= tol.lp
    firsts = [r[1] for r in results if not r[0]]
    return ok, (f"identical tokens {same}/{len(results)} (v_proj, qkv, resid), max|dlp| up "
                f"to the first divergence {worst:.3g}" +
                (f", divergences at steps {firsts}" if firsts else ""))


MIXED = (
    (TARGET, SOURCE, Intervention(site="kv", alpha=1.0, layers="50%:100%")),
    (TARGET, SOURCE, Intervention(site="kv", mode="transplant", layers="50%:100%")),
    (TARGET, SOURCE, Intervention(site="k", alpha=0.5, tokens="last:4", align="end")),
    (TARGET, SOURCE, Intervention(site="v", alpha=1.5, tokens="first:50%", align="start")),
    (TARGET, SOURCE, Intervention(site="v_proj", alpha=1.0, layers="1")),
    (TARGET, SOURCE, Intervention(site="resid", alpha=0.7, layers="0:2", tokens="last:4")),
    (TARGET, SOURCE, Intervention(site="qkv", alpha=1.0)),
    (TARGET, SOURCE, Intervention(site="kv", control="shuffle", control_seed=3)),
    (TARGET, SOURCE, Intervention(site="kv", control="random", control_seed=3)),
    (SHORT, None, Intervention(control="natural", site="none")),
    (SHORT, SOURCE, Intervention(site="kv", alpha=1.0)),
)
"""The CPU oracle's mixed batch: every site, a partial transplant (per-layer cache
lengths differ), controls, and a shorter target (left padding)."""


def oracle_batched(engine: Any, gen: GenerationConfig, measure: MeasureConfig,
                   tol: Tol) -> tuple[bool, str]:
    """The mixed batch patched and decoded together vs each cell patched and decoded
    alone: same tokens, or a first divergence that is a near-tie."""
    targets, sources, ivs = (list(x) for x in zip(*MIXED))
    batched = engine.generate(engine.patch(targets, sources, ivs), gen, measure)
    bad, same, worst, firsts = [], 0, 0.0, []
    for i, (t, s, iv) in enumerate(MIXED):
        single = engine.generate(engine.patch([t], [s], [iv]), gen, measure)[0]
        identical, first, dlp = versus_each_other(batched[i], single)
        same += identical
        worst = max(worst, dlp)
        if not identical:
            firsts.append(first)
        if not dlp <= tol.lp:
            bad.append(f"{iv.site}/{iv.mode}/{iv.control}")
    detail = (f"identical tokens {same}/{len(MIXED)} cells, max|dlp| up to the first "
              f"divergence {worst:.3g}" + (f", divergences at steps {firsts}" if firsts else "")
              + (f"; beyond tolerance: {', '.join(bad)}" if bad else ""))
    return not bad, detail


def oracle_transplant(engine: Any, gen: GenerationConfig, measure: MeasureConfig,
                      tol: Tol) -> tuple[bool, str]:
    """An all-layer transplant decodes as the source continued with the target's last
    token, at the source's position."""
    state = engine.patch([TARGET], [SOURCE], [Intervention(site="kv", mode="transplant")])[0]
    g = engine.generate([state], gen, measure)[0]
    src, tgt = engine.tokenize(SOURCE), engine.tokenize(TARGET)
    agg = versus_reference(engine.model, g, src[:-1] + tgt[-1:])
    position_ok = g.meta.get("query_position") == len(src) - 1
    return agg.ok(tol) and position_ok, (f"{agg.text()}; query position "
                                         f"{g.meta.get('query_position')} (want {len(src) - 1})")


def oracle_sliding(engine: Any, gen: GenerationConfig, measure: MeasureConfig,
                   tol: Tol, window: int) -> tuple[bool, str]:
    """Prompts longer than the shrunk window (and a short one, padded) against the
    windowed reference; the same tokens against a reference without the window must
    differ beyond tolerance, or the check proves nothing."""
    model = engine.model
    windows = engine.info().get("sliding_windows")
    prompts = [*long_prompts(engine.tokenizer, window), SHORT]
    states = engine.encode(prompts)
    gens = engine.generate(states, gen, measure)
    agg = Agreement()
    for state, g in zip(states, gens):
        agg.add(versus_reference(model, g, state.ids))
    unwindowed = Agreement()
    saved = model.config.sliding_window
    model.config.sliding_window = None  # transformers reads it at each forward
    try:
        for state, g in zip(states[:2], gens[:2]):
            unwindowed.add(versus_reference(model, g, state.ids))
    finally:
        model.config.sliding_window = saved
    lengths = [s.prefill_len for s in states]
    exceeds = all(n > window for n in lengths[:2])
    teeth = unwindowed.max_dlp > tol.lp
    ok = agg.ok(tol) and exceeds and teeth and windows == [window]
    return ok, (f"window {window} (engine: {windows}), prefills {lengths}: {agg.text()}; "
                f"vs no window: max|dlp| {unwindowed.max_dlp:.3g} (must exceed {tol.lp})")


def run_oracles(engine: Any, shape: Shape, tol: Tol, n_new: int) -> list[Check]:
    gen = GenerationConfig(max_new_tokens=n_new, stop_at_eos=False)
    measure = measure_config(**ORACLE_MEASURE)
    plan: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
        ("natural == reference (padded batch)",
         lambda: oracle_natural(engine, gen, measure, tol)),
        ("alpha=0 == natural (cache sites, exact)",
         lambda: oracle_alpha0_cache(engine, gen, measure, tol)),
        ("alpha=0 == natural (prefill sites)",
         lambda: oracle_alpha0_prefill(engine, gen, measure, tol)),
        ("batched == one by one (mixed batch)",
         lambda: oracle_batched(engine, gen, measure, tol)),
        ("all-layer transplant == source continued",
         lambda: oracle_transplant(engine, gen, measure, tol)),
    ]
    if shape.window is not None:
        plan.append((f"sliding window {shape.window} == reference",
                     lambda: oracle_sliding(engine, gen, measure, tol, shape.window)))
    checks = []
    for name, fn in plan:
        start = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001 - a crash is a failed oracle, reported
            ok, detail = False, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        checks.append(Check(shape.name, name, ok, detail, time.perf_counter() - start))
        print_check(checks[-1])
    return checks


# ----------------------------------------------------------------------------- speed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), best of 3 x 10."""
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 10 / best


def throughput_states(engine: Any, batch: int) -> list[Any]:
    """`batch` KV mixes (equal per-layer lengths, so the peer decodes them exactly) of
    targets of several lengths (left padding) and two sources."""
    targets, sources, ivs = [], [], []
    for i in range(batch):
        targets.append(THROUGHPUT_TARGETS[i % len(THROUGHPUT_TARGETS)])
        sources.append(THROUGHPUT_SOURCES[(i // len(THROUGHPUT_TARGETS)) % 2])
        ivs.append(Intervention(site="kv", layers=("0%:50%", "50%:100%")[i % 2],
                                alpha=(0.25, 0.5, 0.75, 1.0)[(i // 2) % 4]))
    return engine.patch(targets, sources, ivs)


@contextmanager
def no_eos(model: torch.nn.Module) -> Iterator[None]:
    """HF generate without any EOS id (the engine rows run with stop_at_eos=false): a
    GenerationConfig passed to generate takes unset fields from the model's."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all but the input embedding table, of
    which it reads one row per token (tied embeddings are read whole, as the lm_head)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_per_step(shape: Shape, states: Sequence[Any], n_new: int, itemsize: int) -> float:
    """Mean bytes of K and V a step must read: each row's own positions (no padding),
    the new one included, limited to the window where there is one."""
    per_position = shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * itemsize
    total = 0
    for s in states:
        for step in range(n_new):
            n = s.cache_lengths[0] + step + 1
            total += min(n, shape.window) if shape.window else n
    return per_position * total / n_new


@dataclasses.dataclass
class Speed:
    model: str
    batch: int
    new_tokens: int
    engine_tok_s: float | None = None
    hf_tok_s: float | None = None
    roofline_tok_s: float | None = None
    agree: str = ""
    status: str = "ok"

    @property
    def ratio(self) -> float | None:
        if self.engine_tok_s and self.hf_tok_s:
            return self.engine_tok_s / self.hf_tok_s
        return None

    def pct(self, value: float | None) -> float | None:
        return 100 * value / self.roofline_tok_s if value and self.roofline_tok_s else None


def run_speed(engine: Any, shape: Shape, batch: int, n_new: int, repeats: int,
              bandwidth: float) -> Speed:
    """Engine vs the peer at one batch size: one warm-up each, then best of `repeats`,
    alternating, with the device synchronised around every timed call. The peer is
    benchmarks/engine.py's, imported here, after `check_transformers` has passed (it
    imports the engine)."""
    from engine import peer

    device = engine.device
    row = Speed(shape.name, batch, n_new)
    states = throughput_states(engine, batch)
    gen = GenerationConfig(max_new_tokens=n_new, stop_at_eos=False)
    measure = measure_config(**THROUGHPUT_MEASURE)
    engine.max_batch_size = max(engine.max_batch_size, batch)
    t_eng = t_hf = math.inf
    eng_out: list[Generation] = []
    hf_out: list[list[int]] = []
    for i in range(repeats + 1):  # i == 0 is the warm-up (kernels, allocator, handles)
        sync(device)
        start = time.perf_counter()
        eng_out = engine.generate(states, gen, measure)
        sync(device)
        if i:
            t_eng = min(t_eng, time.perf_counter() - start)
        start = time.perf_counter()
        with no_eos(engine.model):
            hf_out = peer(engine, states, n_new, stop_at_eos=False)
        sync(device)
        if i:
            t_hf = min(t_hf, time.perf_counter() - start)
    row.engine_tok_s = batch * n_new / t_eng
    row.hf_tok_s = batch * n_new / t_hf
    itemsize = next(engine.model.parameters()).element_size()
    step_bytes = weight_bytes(engine.model) + kv_bytes_per_step(shape, states, n_new, itemsize)
    row.roofline_tok_s = batch * bandwidth / step_bytes
    same = sum(g.ids == h for g, h in zip(eng_out, hf_out))
    row.agree = f"{same}/{batch}"
    return row


# ----------------------------------------------------------------------------- output


def print_check(c: Check) -> None:
    status = "ok" if c.ok else "FAIL"
    print(f"  {c.name:<42} {status:<5} {c.seconds:>5.1f}s  {c.detail}", flush=True)


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


SPEED_HEADER = (f"  {'model':<11}{'batch':>6}{'engine tok/s':>14}{'HF tok/s':>10}"
                f"{'engine/HF':>11}{'roofline tok/s':>16}{'engine %roof':>14}"
                f"{'HF %roof':>10}{'agree':>8}  status")


def print_speed(r: Speed) -> None:
    print(f"  {r.model:<11}{r.batch:>6}{fmt(r.engine_tok_s, '.1f'):>14}"
          f"{fmt(r.hf_tok_s, '.1f'):>10}{fmt(r.ratio, '.2f'):>11}"
          f"{fmt(r.roofline_tok_s, '.1f'):>16}{fmt(r.pct(r.engine_tok_s), '.1f'):>14}"
          f"{fmt(r.pct(r.hf_tok_s), '.1f'):>10}{r.agree:>8}  {r.status}", flush=True)


def speed_dict(r: Speed) -> dict[str, Any]:
    return {**dataclasses.asdict(r), "engine_over_hf": r.ratio,
            "engine_pct_roofline": r.pct(r.engine_tok_s), "hf_pct_roofline": r.pct(r.hf_tok_s)}


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true",
                   help="CPU, tiny shapes of the same architectures (CI); < 1 minute")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="cuda",
                   help="where the full shapes run (default cuda; --small always runs on cpu)")
    p.add_argument("--layers", type=int, default=None,
                   help="override the full shapes' depth (a CPU rehearsal: --device cpu "
                        "--layers 2)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: "
                   + ", ".join(MODELS))
    p.add_argument("--batches", default="1,16,64", help="throughput batch sizes")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="throughput tokens per row (default 64; --small: 16)")
    p.add_argument("--oracle-tokens", type=int, default=12, help="tokens per oracle row")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per throughput row, after one warm-up (default 2; "
                        "--small: 1)")
    p.add_argument("--lp-tol", type=float, default=0.3, help="log-prob tolerance, nats")
    p.add_argument("--gap-tol", type=float, default=0.3, help="near-tie tolerance, nats")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="throughput rows that would start later than this are skipped")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--inject-fault", choices=["window"],
                   help="break the engine on purpose (decode ignores sliding windows) to "
                        "see an oracle fail")
    args = p.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 16 if args.small else 64
    if args.repeats is None:
        args.repeats = 1 if args.small else 2
    return args


@contextmanager
def injected(fault: str | None) -> Iterator[None]:
    """`window`: the decode loop's masks ignore sliding windows (prefill stays right)."""
    if fault is None:
        yield
        return
    from rloop_ray.engine import attention

    original = attention.decode_mask
    attention.decode_mask = lambda valid, q_len, window: original(valid, q_len, None)
    try:
        yield
    finally:
        attention.decode_mask = original


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cpu" if args.small else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device_check: no CUDA device (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}). Run it on a GPU machine, or with --small for the CPU "
              "run of tiny shapes.", file=sys.stderr)
        return EXIT_CANNOT_RUN
    why = check_transformers()
    if why is not None:
        print(f"device_check: {why}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"device_check: unknown model(s) {unknown}; known: {list(MODELS)}",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.small:  # tiny matrices gain nothing from threads, and lose much on a busy host
        torch.set_num_threads(1)
    dtype = torch.bfloat16
    tol = Tol(args.lp_tol, args.gap_tol)
    transformers.logging.set_verbosity_error()  # generate's notes on flags, per call

    from rloop_ray.engine.runner import Engine
    from rloop_ray.engine.tokenizer_builder import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    bandwidth = measure_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    meta = {"device": f"{device.type}: {name or platform.machine()}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."),
            "small": args.small, "bandwidth_GBps": bandwidth / 1e9,
            "lp_tol": tol.lp, "gap_tol": tol.gap, "oracle_tokens": args.oracle_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "inject_fault": args.inject_fault, "models": {}}
    print(f"device check: {meta['device']} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | bf16 | copy bandwidth {bandwidth / 1e9:.0f} GB/s",
          flush=True)
    checks: list[Check] = []
    speeds: list[Speed] = []
    for shape in shapes(names, small=args.small, tokenizer_len=len(tokenizer),
                        layers=args.layers):
        t0 = time.perf_counter()
        try:
            model = build_model(shape, tokenizer, device, dtype)
            engine = Engine.from_loaded(model, tokenizer, name=shape.name, chat_template=False,
                                        max_batch_size=max([16, *batches]))
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            checks.append(Check(shape.name, "build random-weight model", False,
                                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
            print_check(checks[-1])
            continue
        built = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        window = (f", window {shape.window} (real {shape.real_window})"
                  if shape.window else "")
        print(f"\n{shape.name} ({shape.hub_id} shapes, random weights): {shape.n_layers} "
              f"layers, hidden {shape.hidden}, {shape.n_heads} heads ({shape.n_kv_heads} KV) "
              f"x {shape.head_dim}, mlp {shape.intermediate}, vocab {shape.vocab}{window}; "
              f"{n_params / 1e6:,.1f} M params, built in {built:.1f} s", flush=True)
        meta["models"][shape.name] = {**dataclasses.asdict(shape), "params": n_params,
                                      "build_seconds": built}
        with injected(args.inject_fault):
            checks.extend(run_oracles(engine, shape, tol, args.oracle_tokens))
            if not args.skip_throughput:
                print(f"  throughput: {args.new_tokens} new tokens per row, greedy, KV-mix "
                      f"cells, best of {args.repeats} after a warm-up", flush=True)
                print(SPEED_HEADER, flush=True)
                for batch in batches:
                    if time.perf_counter() - started > args.budget_s:
                        row = Speed(shape.name, batch, args.new_tokens,
                                    status=f"skipped: past --budget-s {args.budget_s:g}")
                    else:
                        try:
                            row = run_speed(engine, shape, batch, args.new_tokens,
                                            args.repeats, bandwidth)
                        except Exception as exc:  # noqa: BLE001 - recorded in the row
                            row = Speed(shape.name, batch, args.new_tokens,
                                        status=f"error {type(exc).__name__}: "
                                               f"{str(exc).splitlines()[0][:200]}")
                    speeds.append(row)
                    print_speed(row)
        del engine, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [f"{c.model}: {c.name}" for c in checks if not c.ok]
    failed += [f"{r.model}: throughput at batch {r.batch}" for r in speeds
               if r.status.startswith("error")]
    passed = bool(checks) and not failed
    elapsed = time.perf_counter() - started
    print(f"\n{sum(c.ok for c in checks)}/{len(checks)} oracles passed in {elapsed:.0f} s"
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
    print("roofline: (weights except the input embedding + each row's K/V up to the step) "
          "/ copy bandwidth, per step; agree: rows with the same tokens as HF (bf16 "
          "near-ties may differ)", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(
            {"meta": {**meta, "seconds": elapsed}, "passed": passed,
             "oracles": [dataclasses.asdict(c) for c in checks],
             "throughput": [speed_dict(r) for r in speeds]}, indent=2) + "\n")
    return EXIT_OK if passed else EXIT_ORACLE_FAILED


if __name__ == "__main__":
    sys.exit(main())
