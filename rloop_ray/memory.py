"""GPU memory model: KV-cache and weight bytes of a model, and the batch that fits.

Why it exists: on a GPU the batch size is the knob between throughput and
out-of-memory, and whether a model needs one GPU or several (`gpus_per_replica`,
accelerate's `device_map`) is decided before a cluster is paid for. Both follow from a
few config numbers, so they are computed here from the config alone (no torch, no
weights): `kv_bytes_per_token`, `weight_bytes`, `choose_batch_size`, `gpus_per_replica`.
`rloop-ray validate` prints `replica_estimate` for each model of a grid: the bytes of one
replica at the grid's batch size and the largest batch that fits a device.

The model is an estimate for planning. It follows what `engine.runner.Engine` holds on
the device (see `sequence_bytes` and `shared_bytes`); a wrong estimate is made safe by
the `safety` factor and, at run time, by splitting a unit that runs out of memory
(docs/cluster.md, "Out of memory").

Units: bytes (int). KiB/MiB/GiB are powers of 1024.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rloop_ray.lookup import did_you_mean

__all__ = [
    "A10G_BYTES",
    "CUDA_CONTEXT_BYTES",
    "DTYPE_BYTES",
    "ENGINE_PROMPT_CACHE",
    "Device",
    "GiB",
    "InsufficientMemoryError",
    "KiB",
    "MiB",
    "ModelShape",
    "REFERENCE_MODELS",
    "ReferenceModel",
    "ReplicaEstimate",
    "capture_bytes_per_token",
    "choose_batch_size",
    "device_free_bytes",
    "dtype_bytes",
    "estimate_n_params",
    "format_bytes",
    "gpus_per_replica",
    "host_ram_bytes",
    "parse_device",
    "replica_estimate",
    "kv_bytes",
    "kv_bytes_per_token",
    "reference_markdown",
    "reference_table",
    "sequence_bytes",
    "shared_bytes",
    "weight_bytes",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per element of the dtypes a grid file may name (`models[].dtype`)."""

CUDA_CONTEXT_BYTES = 768 * MiB
"""What a process loses on each GPU before its first tensor (CUDA context, cuBLAS
workspace, allocator slack). Rough on purpose; only the planning helpers
(`gpus_per_replica`, `reference_table`) use it, because `choose_batch_size` is given
memory measured after the model is loaded."""

SCORED_TOKENS = 48
"""Positions whose logits one row may hold at once. The `logprob_contrast` scorer
teacher-forces both continuations from every row at once (two rows of 1 + ~20 tokens:
42 positions); the decode loop also keeps each row's first-step log-probs and its
target's natural ones for `kl_from_natural` (2 more), and plain decoding needs 1."""

LOGIT_COPIES = 2
"""float32 copies of those logits alive together (the logits cast to float32 and their
log-softmax, or the sort of top-p), on top of the logits in the model's own dtype."""

FIRST_STEP_COPIES = 1
"""float32 log-prob vectors each encoded prompt keeps next to its cache: its natural
first-step distribution, the reference of `kl_from_natural` (computed once per prompt)."""

ACTIVATION_FLOATS = 16
"""float32 values per hidden unit per in-flight token: the residual, attention output and
the gated MLP's wide intermediate (~3.5x hidden, twice) with headroom."""

CAPTURE_SITES = ("v_proj", "qkv", "resid")
"""Prefill sites whose activations an encoded prompt keeps next to its cache."""


class ModelShape(Protocol):
    """What the memory model needs of a model (`engine.models.ModelInfo` has all of it).

    Optional, read with getattr when present: `n_heads` (for `qkv` captures),
    `sliding_window` and `layer_windows` (for `kv_bytes(..., windowed=True)`).
    """

    @property
    def n_layers(self) -> int: ...

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...


class InsufficientMemoryError(ValueError):
    """Not even one sequence fits: a bigger GPU, more GPUs per replica, or fewer tokens."""


# --------------------------------------------------------------------------- elements


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of `dtype`: a name (`"bfloat16"`, `"torch.float16"`) or a torch dtype.

    Names are those of grid files; a torch dtype answers through its `itemsize`, so
    torch is never imported here.
    """
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPE_BYTES:
            return DTYPE_BYTES[name]
        raise ValueError(
            f"Unknown dtype {dtype!r}.{did_you_mean(name, DTYPE_BYTES)} "
            f"Available: {', '.join(sorted(DTYPE_BYTES))}"
        )
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int) and itemsize > 0:
        return itemsize
    raise ValueError(f"Unknown dtype {dtype!r}: neither a dtype name nor a torch dtype")


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# --------------------------------------------------------------------------- KV cache


def kv_bytes_per_token(info: ModelShape, dtype: Any = "bfloat16") -> int:
    """Bytes one token adds to the KV cache: 2 (K and V) * layers * KV heads * head_dim * bytes.

    Grouped-query attention is why this is small: Llama-3-8B has 32 query heads but
    8 KV heads, so 2 * 32 * 8 * 128 * 2 bytes = 128 KiB per token in bf16/fp16.
    """
    return 2 * info.n_layers * info.n_kv_heads * info.head_dim * dtype_bytes(dtype)


def _layer_windows(info: ModelShape) -> list[int | None]:
    """Per layer: its sliding window or None (all None when the model has none)."""
    windows = getattr(info, "layer_windows", None)
    if windows is not None and len(windows) == info.n_layers:
        return list(windows)
    window = getattr(info, "sliding_window", None)
    return [window] * info.n_layers


def kv_bytes(info: ModelShape, n_tokens: int, dtype: Any = "bfloat16", *,
             windowed: bool = False) -> int:
    """KV-cache bytes of one sequence of `n_tokens` tokens.

    `windowed=False` (the default) counts every position of every layer, which is what
    the engine keeps: its prefill caches are never window-truncated, because a patch
    addresses absolute positions. `windowed=True` caps each sliding layer at its window,
    as a serving cache would (Mistral-7B-v0.1: 4096; Gemma-3: 5 of every 6 layers).
    """
    _check_count("n_tokens", n_tokens)
    per_layer_token = 2 * info.n_kv_heads * info.head_dim * dtype_bytes(dtype)
    if not windowed:
        return per_layer_token * info.n_layers * n_tokens
    kept = sum(n_tokens if w is None else min(n_tokens, w) for w in _layer_windows(info))
    return per_layer_token * kept


def capture_bytes_per_token(info: ModelShape, sites: Sequence[str],
                            dtype: Any = "bfloat16") -> int:
    """Bytes per prompt token of the prefill activations an encoded prompt keeps.

    A patch at `v_proj`, `qkv` or `resid` reads the source prompt's activations at every
    layer, so the engine captures them at encode time and keeps them with the prompt:
    `v_proj` is as wide as V, `qkv` as q + k + v, `resid` as the hidden state.
    """
    unknown = sorted(set(sites) - set(CAPTURE_SITES))
    if unknown:
        raise ValueError(
            f"Unknown capture site {unknown[0]!r}. Available: {', '.join(CAPTURE_SITES)}"
        )
    kv_width = info.n_kv_heads * info.head_dim
    n_heads = getattr(info, "n_heads", None) or info.hidden_size // info.head_dim
    width = {
        "v_proj": kv_width,
        "qkv": n_heads * info.head_dim + 2 * kv_width,
        "resid": info.hidden_size,
    }
    return sum(width[s] for s in set(sites)) * info.n_layers * dtype_bytes(dtype)


# --------------------------------------------------------------------------- weights


def weight_bytes(n_params: int, dtype: Any = "bfloat16") -> int:
    """Bytes of the weights: parameters * bytes per element (no optimizer: inference only).

    Llama-3-8B (8.03e9 parameters) is 16.1 GB in bf16 and 32.1 GB in float32, which is
    why a 24 GB card holds it only in 16-bit and float32 needs `gpus_per_replica: 2`.
    """
    _check_count("n_params", n_params)
    return n_params * dtype_bytes(dtype)


# --------------------------------------------------------------------------- batches


def sequence_bytes(info: ModelShape, prompt_tokens: int, new_tokens: int,
                   dtype: Any = "bfloat16") -> int:
    """Device bytes one batch row adds while it decodes.

    * its patched copy of the target's prefill cache (prompt_tokens),
    * the batched generation cache that grows to prompt_tokens + new_tokens,
    * logits of up to SCORED_TOKENS positions, in the model's dtype and LOGIT_COPIES
      times in float32,
    * transient activations of those positions (ACTIVATION_FLOATS per hidden unit).
    """
    _check_count("prompt_tokens", prompt_tokens)
    _check_count("new_tokens", new_tokens)
    caches = kv_bytes(info, prompt_tokens, dtype) + kv_bytes(info, prompt_tokens + new_tokens,
                                                            dtype)
    logits = SCORED_TOKENS * info.vocab_size * (4 * LOGIT_COPIES + dtype_bytes(dtype))
    activations = SCORED_TOKENS * info.hidden_size * ACTIVATION_FLOATS * 4
    return caches + logits + activations


def shared_bytes(info: ModelShape, prompt_tokens: int, dtype: Any = "bfloat16", *,
                 cached_prompts: int = 2, capture_sites: Sequence[str] = ()) -> int:
    """Device bytes held once per replica whatever the batch: the encoded prompts.

    The engine encodes each prompt once and keeps its prefill cache (and any captured
    activations, and its natural first-step log-probs once a patched row asked for
    them) in an LRU of `prompt_cache_size` prompts on the device. Two are needed at
    least (a unit's source and target); pass the LRU size to budget a full cache.
    """
    _check_count("cached_prompts", cached_prompts)
    per_token = kv_bytes_per_token(info, dtype) + capture_bytes_per_token(
        info, capture_sites, dtype
    )
    first_step = FIRST_STEP_COPIES * info.vocab_size * 4
    return cached_prompts * (prompt_tokens * per_token + first_step)


def choose_batch_size(free_bytes: int, model_info: ModelShape, prompt_tokens: int,
                      new_tokens: int, dtype: Any = "bfloat16", safety: float = 0.8, *,
                      cached_prompts: int = 2, capture_sites: Sequence[str] = (),
                      max_batch: int | None = None) -> int:
    """The largest batch whose rows fit in `safety * free_bytes`, at least 1.

    `free_bytes` is the device memory free *after* the weights are loaded (in a worker:
    `device_free_bytes()`), so weights and the CUDA context are already paid. From it
    come the encoded prompts (`shared_bytes`) and then `sequence_bytes` per row.
    `safety` leaves room for allocator fragmentation and what the model does not count.

    Raises InsufficientMemoryError when not even one row fits: the remedy is more
    GPUs per replica, a smaller dtype, shorter prompts or fewer new tokens, or a
    smaller prompt LRU; never a silently empty batch.
    """
    if not 0.0 < safety <= 1.0:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    shared = shared_bytes(model_info, prompt_tokens, dtype, cached_prompts=cached_prompts,
                          capture_sites=capture_sites)
    usable = int(free_bytes * safety) - shared
    row = sequence_bytes(model_info, prompt_tokens, new_tokens, dtype)
    batch = usable // row if usable > 0 else 0
    if batch < 1:
        raise InsufficientMemoryError(
            f"one row of {prompt_tokens}+{new_tokens} tokens needs {format_bytes(row)} and "
            f"{cached_prompts} encoded prompt(s) need {format_bytes(shared)}, but only "
            f"{format_bytes(int(free_bytes * safety))} of {format_bytes(free_bytes)} free "
            f"is usable at safety {safety}"
        )
    return int(min(batch, max_batch)) if max_batch is not None else int(batch)


def gpus_per_replica(n_params: int, model_info: ModelShape, gpu_bytes: int,
                     prompt_tokens: int, new_tokens: int, dtype: Any = "bfloat16",
                     safety: float = 0.8, *, min_batch: int = 1, cached_prompts: int = 2,
                     max_gpus: int = 8) -> int:
    """Fewest GPUs (1, 2, 4, 8) of `gpu_bytes` each that hold one replica with `min_batch` rows.

    accelerate's `device_map` spreads layers over the replica's GPUs, so weights and
    caches divide across them; each GPU also loses CUDA_CONTEXT_BYTES. The answer is
    the value for the grid's `resources.gpus_per_replica`.
    """
    weights = weight_bytes(n_params, dtype)
    k = 1
    while k <= max_gpus:
        free = k * (gpu_bytes - CUDA_CONTEXT_BYTES) - weights
        try:
            if choose_batch_size(free, model_info, prompt_tokens, new_tokens, dtype, safety,
                                 cached_prompts=cached_prompts) >= min_batch:
                return k
        except InsufficientMemoryError:
            pass  # not enough on k GPUs: try twice as many
        k *= 2
    raise InsufficientMemoryError(
        f"{format_bytes(weights)} of weights plus {min_batch} row(s) do not fit on "
        f"{max_gpus} GPUs of {format_bytes(gpu_bytes)}"
    )


def device_free_bytes(device: Any = None) -> int | None:
    """Free bytes on a CUDA device as the driver reports them; None without CUDA.

    The worker calls it after loading its model, so the answer is what
    `choose_batch_size` expects. torch is imported here only.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def format_bytes(n: int) -> str:
    """`131072` -> `128 KiB`; three significant digits, powers of 1024."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ReferenceModel:
    """Published config numbers of a well-known model, for the docs table and tests."""

    name: str
    hub_id: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    n_params: int
    sliding_window: int | None = None
    layer_windows: tuple[int | None, ...] | None = None


def _gemma3_windows(n_layers: int, window: int, every: int = 6) -> tuple[int | None, ...]:
    """Gemma-3: five sliding layers, then one global layer, repeated."""
    return tuple(None if (i + 1) % every == 0 else window for i in range(n_layers))


REFERENCE_MODELS: tuple[ReferenceModel, ...] = (
    ReferenceModel("Llama-3-8B", "meta-llama/Meta-Llama-3-8B", n_layers=32, n_heads=32,
                   n_kv_heads=8, head_dim=128, hidden_size=4096, vocab_size=128256,
                   n_params=8_030_261_248),
    ReferenceModel("Mistral-7B", "mistralai/Mistral-7B-v0.1", n_layers=32, n_heads=32,
                   n_kv_heads=8, head_dim=128, hidden_size=4096, vocab_size=32000,
                   n_params=7_241_732_096, sliding_window=4096),
    ReferenceModel("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", n_layers=30, n_heads=9,
                   n_kv_heads=3, head_dim=64, hidden_size=576, vocab_size=49152,
                   n_params=134_515_008),
    ReferenceModel("Gemma-3-270M", "google/gemma-3-270m", n_layers=18, n_heads=4,
                   n_kv_heads=1, head_dim=256, hidden_size=640, vocab_size=262144,
                   n_params=268_098_176, sliding_window=512,
                   layer_windows=_gemma3_windows(18, 512)),
)
"""Parameter counts are those of the checkpoints (embeddings included; tied embeddings
counted once, as SmolLM2 and Gemma-3 tie them)."""

A10G_BYTES = 23028 * MiB
"""A 24 GB A10G (or L4) as `nvidia-smi` reports it."""


def reference_table(gpu_bytes: int = A10G_BYTES, prompt_tokens: int = 512,
                    new_tokens: int = 128, dtype: Any = "bfloat16",
                    context_tokens: int = 8192) -> list[dict[str, Any]]:
    """One row per reference model: KV per token, KV of a long sequence, weights, GPUs, batch."""
    rows = []
    for m in REFERENCE_MODELS:
        gpus = gpus_per_replica(m.n_params, m, gpu_bytes, prompt_tokens, new_tokens, dtype)
        free = gpus * (gpu_bytes - CUDA_CONTEXT_BYTES) - weight_bytes(m.n_params, dtype)
        rows.append({
            "model": m.name,
            "hub_id": m.hub_id,
            "n_layers": m.n_layers,
            "n_kv_heads": m.n_kv_heads,
            "head_dim": m.head_dim,
            "sliding_window": m.sliding_window,
            "kv_bytes_per_token": kv_bytes_per_token(m, dtype),
            "kv_bytes_context": kv_bytes(m, context_tokens, dtype),
            "kv_bytes_context_windowed": kv_bytes(m, context_tokens, dtype, windowed=True),
            "n_params": m.n_params,
            "weight_bytes": weight_bytes(m.n_params, dtype),
            "weight_bytes_float32": weight_bytes(m.n_params, "float32"),
            "gpus_per_replica": gpus,
            "batch_size": choose_batch_size(free, m, prompt_tokens, new_tokens, dtype),
        })
    return rows


def reference_markdown(gpu_bytes: int = A10G_BYTES, prompt_tokens: int = 512,
                       new_tokens: int = 128, dtype: Any = "bfloat16",
                       context_tokens: int = 8192) -> str:
    """`reference_table` as the Markdown table of docs/cluster.md (a test keeps them equal)."""
    head = (
        f"| model | layers | KV heads x head_dim | window | KV / token | "
        f"KV, {context_tokens} tokens (windowed) | params | weights (float32) | "
        f"GPUs | batch |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in reference_table(gpu_bytes, prompt_tokens, new_tokens, dtype, context_tokens):
        window = str(r["sliding_window"]) if r["sliding_window"] else "-"
        lines.append(
            f"| {r['model']} | {r['n_layers']} | {r['n_kv_heads']} x {r['head_dim']} | "
            f"{window} | {format_bytes(r['kv_bytes_per_token'])} | "
            f"{format_bytes(r['kv_bytes_context'])} "
            f"({format_bytes(r['kv_bytes_context_windowed'])}) | "
            f"{r['n_params'] / 1e9:.3g} B | {format_bytes(r['weight_bytes'])} "
            f"({format_bytes(r['weight_bytes_float32'])}) | {r['gpus_per_replica']} | "
            f"{r['batch_size']} |"
        )
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- validate


ENGINE_PROMPT_CACHE = 64
"""`Engine(prompt_cache_size=...)`'s default, the LRU of encoded prompts a replica keeps
(a test keeps the two equal; torch is not imported here)."""


def estimate_n_params(info: Any) -> int | None:
    """Parameters of a Llama-like decoder from its config, or None when fields are missing.

    Embeddings (twice unless tied), per layer q/k/v/o and a gated MLP (3 x hidden x
    intermediate), two RMSNorms (four on Gemma-2/3), Qwen3/Gemma-3 q/k norms, Qwen2's
    q/k/v biases, and the final norm. It reproduces the checkpoints' counts of
    Llama-3-8B, Mistral-7B, SmolLM2-135M and Gemma-3-270M exactly (a test checks it);
    a multimodal wrapper's vision tower is not counted.
    """
    inter = getattr(info, "intermediate_size", None)
    tied = getattr(info, "tie_word_embeddings", None)
    n_heads = getattr(info, "n_heads", None)
    if not isinstance(inter, int) or tied is None or not isinstance(n_heads, int):
        return None
    h, hd, kv = info.hidden_size, info.head_dim, info.n_kv_heads
    model_type = str(getattr(info, "model_type", ""))
    q_width, kv_width = n_heads * hd, kv * hd
    per_layer = h * q_width + 2 * h * kv_width + q_width * h + 3 * h * inter
    per_layer += (4 if model_type.startswith("gemma") else 2) * h
    if model_type in ("qwen3", "gemma3_text", "gemma3"):
        per_layer += 2 * hd
    if model_type == "qwen2":
        per_layer += q_width + 2 * kv_width
    embed = info.vocab_size * h
    return embed * (1 if tied else 2) + info.n_layers * per_layer + h


def host_ram_bytes() -> int | None:
    """Physical memory of this host (what a CPU replica can use at most), None if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Device:
    """Memory a replica may use: `count` GPUs of `bytes_each`, or the host's RAM."""

    name: str
    bytes_each: int
    count: int = 1
    gpu: bool = True

    @property
    def usable(self) -> int:
        """Bytes before the weights: each GPU loses CUDA_CONTEXT_BYTES, RAM loses nothing."""
        lost = CUDA_CONTEXT_BYTES if self.gpu else 0
        return self.count * (self.bytes_each - lost)

    def label(self) -> str:
        if not self.gpu:
            return f"{format_bytes(self.bytes_each)} {self.name}"
        return f"{self.count} x {self.name} ({format_bytes(self.bytes_each)})"


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4}


def parse_device(text: str, *, gpus: int = 1) -> Device:
    """`cpu` (this host's RAM), `a10g` (the 24 GB reference card) or a per-GPU size such
    as `80GiB`, `24GB`, `81920MiB`; `gpus` is the replica's GPU count."""
    value = text.strip().lower()
    if value == "cpu":
        ram = host_ram_bytes()
        if ram is None:
            raise ValueError("cannot read this host's RAM size; give a size like '64GiB'")
        return Device("CPU RAM", ram, 1, gpu=False)
    if value in ("a10g", "l4"):
        return Device(value.upper(), A10G_BYTES, max(1, gpus))
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", value)
    if not found or found.group(2) not in _SIZE_UNITS:
        raise ValueError(f"bad device memory {text!r}: use cpu, a10g, or a size like "
                         "'80GiB', '24GB', '81920MiB'")
    size = int(float(found.group(1)) * _SIZE_UNITS[found.group(2)])
    if size <= CUDA_CONTEXT_BYTES:
        raise ValueError(f"device memory {text!r} is smaller than a CUDA context "
                         f"({format_bytes(CUDA_CONTEXT_BYTES)})")
    return Device("GPU", size, max(1, gpus))


@dataclass(frozen=True)
class ReplicaEstimate:
    """One replica of a model at a grid's settings, against one device."""

    dtype: str
    n_params: int
    weights: int
    shared: int
    """Encoded prompts the engine keeps (its LRU), captured activations included."""
    per_row: int
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    device: Device
    max_batch: int | None
    """Largest batch that fits `device` at safety 0.8; None when not even one row does."""
    gpus_needed: int | None = None
    """When one replica does not fit: the GPUs of this size it would need (1, 2, 4, 8)."""

    @property
    def total(self) -> int:
        return self.weights + self.shared + self.batch_size * self.per_row

    def fit_text(self) -> str:
        """`batch <= 41 on 1 x A10G (22.5 GiB)`, or why the replica does not fit."""
        where = ("in " if not self.device.gpu else "on ") + self.device.label()
        if self.max_batch is not None:
            text = f"batch <= {self.max_batch} {where}"
            if self.batch_size > self.max_batch:
                text += (f" (resources.batch_size {self.batch_size} is larger: expect "
                         "out-of-memory splits)")
            return text
        if self.weights >= self.device.usable:
            text = (f"does not fit {where}: the weights alone are "
                    f"{format_bytes(self.weights)}")
        else:
            text = f"does not fit {where}: not one row fits beside the weights"
        if self.gpus_needed is not None and self.device.gpu:
            text += f"; it needs resources.gpus_per_replica: {self.gpus_needed}"
        elif self.device.gpu:
            text += "; use bfloat16 or more GPUs per replica"
        return text


def replica_estimate(
    info: ModelShape,
    *,
    dtype: str,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int,
    device: Device,
    n_prompts: int = ENGINE_PROMPT_CACHE,
    capture_sites: Sequence[str] = (),
    safety: float = 0.8,
    companions: bool = False,
) -> ReplicaEstimate | None:
    """Memory of one replica and the largest batch `device` holds; None when the config
    lacks what the parameter count needs (`intermediate_size`, `tie_word_embeddings`).

    `prompt_tokens` is the longest prompt (every row and cached prompt is budgeted at
    it, an upper bound); `n_prompts` the distinct prompts a replica encodes, capped at
    the engine's LRU of ENGINE_PROMPT_CACHE. `companions`: some cells patch during
    generation, so a batch row may bring its source decoding alongside (an upper bound
    of two decoding rows per cell).
    """
    n_params = estimate_n_params(info)
    if n_params is None:
        return None
    cached = max(2, min(n_prompts, ENGINE_PROMPT_CACHE))
    weights = weight_bytes(n_params, dtype)
    shared = shared_bytes(info, prompt_tokens, dtype, cached_prompts=cached,
                          capture_sites=capture_sites)
    rows_per_cell = 2 if companions else 1
    row = rows_per_cell * sequence_bytes(info, prompt_tokens, new_tokens, dtype)
    free = device.usable - weights
    max_batch: int | None = None
    needed: int | None = None
    if free > 0:
        try:
            max_batch = choose_batch_size(free, info, prompt_tokens, new_tokens, dtype, safety,
                                          cached_prompts=cached, capture_sites=capture_sites)
        except InsufficientMemoryError:
            max_batch = None
        if max_batch is not None and max_batch < rows_per_cell:
            max_batch = None
        elif max_batch is not None:
            max_batch //= rows_per_cell
    if max_batch is None and device.gpu:
        try:
            needed = gpus_per_replica(n_params, info, device.bytes_each, prompt_tokens,
                                      new_tokens, dtype, safety, cached_prompts=cached)
        except InsufficientMemoryError:
            needed = None
    return ReplicaEstimate(dtype=dtype, n_params=n_params, weights=weights, shared=shared,
                           per_row=row, batch_size=batch_size, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, device=device, max_batch=max_batch,
                           gpus_needed=needed)
