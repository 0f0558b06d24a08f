"""The memory model: exact KV/weight arithmetic, batch sizing, and the docs table.

Shapes are plain dataclasses (the `ModelShape` protocol), never downloaded configs;
one test runs the real `engine.models.model_info` on a builtin tiny model to keep the
protocol and `ModelInfo` in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from rloop_ray import memory
from rloop_ray.memory import (
    GiB,
    InsufficientMemoryError,
    KiB,
    MiB,
    choose_batch_size,
    dtype_bytes,
    gpus_per_replica,
    kv_bytes,
    kv_bytes_per_token,
    sequence_bytes,
    shared_bytes,
    weight_bytes,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int = 4096
    vocab_size: int = 32000


@dataclass(frozen=True)
class WindowedShape(Shape):
    sliding_window: int | None = None
    layer_windows: tuple[int | None, ...] | None = None


LLAMA3_8B = Shape(32, 8, 128, hidden_size=4096, vocab_size=128256)


def test_llama3_8b_is_128_kib_per_token_in_16_bit() -> None:
    assert kv_bytes_per_token(LLAMA3_8B, "float16") == 128 * KiB == 131072
    assert kv_bytes_per_token(LLAMA3_8B, "bfloat16") == 128 * KiB
    assert kv_bytes_per_token(LLAMA3_8B, "float32") == 256 * KiB


@pytest.mark.parametrize(
    ("shape", "per_token"),
    [
        (Shape(32, 8, 128), 128 * KiB),  # Mistral-7B
        (Shape(30, 3, 64), 23040),  # SmolLM2-135M: 22.5 KiB
        (Shape(18, 1, 256), 18 * KiB),  # Gemma-3-270M
    ],
)
def test_reference_kv_figures(shape: Shape, per_token: int) -> None:
    assert kv_bytes_per_token(shape, "bfloat16") == per_token


def test_kv_formula_by_hand() -> None:
    shape = Shape(n_layers=3, n_kv_heads=2, head_dim=5)
    assert kv_bytes_per_token(shape, "float32") == 2 * 3 * 2 * 5 * 4
    assert kv_bytes(shape, 7, "float32") == 7 * 2 * 3 * 2 * 5 * 4
    assert kv_bytes(shape, 0) == 0


def test_windows_cap_only_when_asked() -> None:
    mistral = WindowedShape(32, 8, 128, sliding_window=4096)
    full = kv_bytes(mistral, 8192)
    assert full == 8192 * 128 * KiB  # the engine keeps every position
    assert kv_bytes(mistral, 8192, windowed=True) == 4096 * 128 * KiB
    assert kv_bytes(mistral, 1000, windowed=True) == kv_bytes(mistral, 1000)
    # Gemma-3 style: per-layer windows win over the scalar window
    gemma = WindowedShape(6, 1, 256, sliding_window=512,
                          layer_windows=(512, 512, 512, 512, 512, None))
    per_layer_token = 2 * 1 * 256 * 2
    assert kv_bytes(gemma, 1024, windowed=True) == per_layer_token * (5 * 512 + 1024)


def test_weights_from_parameter_count() -> None:
    assert weight_bytes(8_030_261_248, "bfloat16") == 16_060_522_496
    assert weight_bytes(1000, "float32") == 4000
    with pytest.raises(ValueError, match=">= 0"):
        weight_bytes(-1)


def test_dtype_names_and_torch_dtypes() -> None:
    assert dtype_bytes("float32") == 4
    assert dtype_bytes("torch.bfloat16") == 2  # as Engine.info() reports it
    with pytest.raises(ValueError, match="Did you mean 'bfloat16'"):
        dtype_bytes("bfloat61")
    torch = pytest.importorskip("torch")
    assert dtype_bytes(torch.float16) == 2
    assert dtype_bytes(torch.float32) == 4


def test_batch_is_floor_of_usable_over_row() -> None:
    prompt, new = 512, 128
    row = sequence_bytes(LLAMA3_8B, prompt, new)
    shared = shared_bytes(LLAMA3_8B, prompt)
    free = 8 * GiB
    expected = (int(free * 0.8) - shared) // row
    assert choose_batch_size(free, LLAMA3_8B, prompt, new, "bfloat16") == expected
    assert choose_batch_size(free, LLAMA3_8B, prompt, new, "bfloat16", max_batch=4) == 4
    # one more row's worth of memory gives exactly one more row
    more = free + int(row / 0.8) + 1
    assert choose_batch_size(more, LLAMA3_8B, prompt, new, "bfloat16") == expected + 1


def test_batch_monotone() -> None:
    sizes = [choose_batch_size(g * GiB, LLAMA3_8B, 256, 64) for g in (2, 4, 8, 16)]
    assert sizes == sorted(sizes) and sizes[0] >= 1
    longer = choose_batch_size(8 * GiB, LLAMA3_8B, 2048, 64)
    assert longer < choose_batch_size(8 * GiB, LLAMA3_8B, 256, 64)
    assert choose_batch_size(8 * GiB, LLAMA3_8B, 256, 64, "float32") < choose_batch_size(
        8 * GiB, LLAMA3_8B, 256, 64, "bfloat16"
    )


def test_row_counts_patched_copy_and_growing_cache() -> None:
    base = sequence_bytes(LLAMA3_8B, 0, 0)  # logits + activations only
    # logits of both teacher-forced continuations (2 x 21 positions) and the two
    # first-step vectors, in bf16 and twice in float32
    assert base >= 44 * LLAMA3_8B.vocab_size * (2 + 2 * 4)
    assert sequence_bytes(LLAMA3_8B, 100, 0) - base == 2 * kv_bytes(LLAMA3_8B, 100)
    assert sequence_bytes(LLAMA3_8B, 100, 50) - sequence_bytes(LLAMA3_8B, 100, 0) == kv_bytes(
        LLAMA3_8B, 50
    )


def test_prompt_cache_and_captures_are_shared_costs() -> None:
    two = shared_bytes(LLAMA3_8B, 512)
    # each prompt: its cache and its natural first-step log-probs (float32, one vocab)
    assert two == 2 * kv_bytes(LLAMA3_8B, 512) + 2 * LLAMA3_8B.vocab_size * 4
    assert shared_bytes(LLAMA3_8B, 512, cached_prompts=256) == 128 * two
    resid = shared_bytes(LLAMA3_8B, 512, capture_sites=["resid"])
    assert resid - two == 2 * 512 * 32 * 4096 * 2
    with pytest.raises(ValueError, match="Available: v_proj, qkv, resid"):
        shared_bytes(LLAMA3_8B, 512, capture_sites=["mlp"])


def test_nothing_fits_is_an_error_not_zero() -> None:
    with pytest.raises(InsufficientMemoryError, match="one row of 512\\+128 tokens"):
        choose_batch_size(10 * MiB, LLAMA3_8B, 512, 128)
    # the engine's default prompt LRU (256) of an 8B model does not fit beside its weights
    free = memory.A10G_BYTES - memory.CUDA_CONTEXT_BYTES - weight_bytes(8_030_261_248)
    with pytest.raises(InsufficientMemoryError):
        choose_batch_size(free, LLAMA3_8B, 512, 128, cached_prompts=256)
    with pytest.raises(ValueError, match="safety"):
        choose_batch_size(GiB, LLAMA3_8B, 1, 1, safety=0.0)


def test_gpus_per_replica() -> None:
    n = 8_030_261_248
    a10g = memory.A10G_BYTES
    assert gpus_per_replica(n, LLAMA3_8B, a10g, 512, 128, "bfloat16") == 1
    assert gpus_per_replica(n, LLAMA3_8B, a10g, 512, 128, "float32") == 2
    assert gpus_per_replica(70 * 10**9, LLAMA3_8B, 80 * GiB, 512, 128, "bfloat16") == 2
    with pytest.raises(InsufficientMemoryError, match="do not fit on 8 GPUs"):
        gpus_per_replica(10**12, LLAMA3_8B, a10g, 512, 128, "bfloat16")


def test_reference_table_numbers() -> None:
    rows = {r["model"]: r for r in memory.reference_table()}
    assert rows["Llama-3-8B"]["kv_bytes_per_token"] == 128 * KiB
    assert rows["Llama-3-8B"]["gpus_per_replica"] == 1
    assert rows["Mistral-7B"]["kv_bytes_context_windowed"] == 4096 * 128 * KiB
    assert rows["SmolLM2-135M"]["kv_bytes_per_token"] == 23040
    assert rows["Gemma-3-270M"]["kv_bytes_per_token"] == 18 * KiB
    # Gemma-3-270M: layers 5, 11, 17 are global, the other 15 slide over 512 tokens
    gemma = next(m for m in memory.REFERENCE_MODELS if m.name == "Gemma-3-270M")
    assert [i for i, w in enumerate(gemma.layer_windows or ()) if w is None] == [5, 11, 17]


def test_docs_table_is_the_functions_output() -> None:
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"<!-- memory-table:start -->\n(.*?)<!-- memory-table:end -->", text,
                      re.S)
    assert found, "docs/cluster.md lost its memory-table markers"
    assert found.group(1) == memory.reference_markdown(), (
        "regenerate the table: python -c 'from rloop_ray.memory import reference_markdown;"
        " print(reference_markdown())'"
    )


def test_format_bytes() -> None:
    assert memory.format_bytes(131072) == "128 KiB"
    assert memory.format_bytes(23040) == "22.5 KiB"
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(16 * GiB) == "16 GiB"


def test_device_free_bytes_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    free = memory.device_free_bytes()
    if torch.cuda.is_available():
        assert isinstance(free, int) and free > 0
    else:
        assert free is None


def test_model_info_satisfies_the_protocol() -> None:
    """The real `ModelInfo` of a builtin tiny model works as a `ModelShape`."""
    from rloop_ray.engine.models import model_info

    info = model_info("tiny-mistral")  # config only: no weights are built or loaded
    per_token = kv_bytes_per_token(info, "float32")
    assert per_token == 2 * info.n_layers * info.n_kv_heads * info.head_dim * 4
    assert kv_bytes(info, 100, "float32", windowed=True) <= kv_bytes(info, 100, "float32")
    assert choose_batch_size(GiB, info, 16, 8, "float32") >= 1


# --------------------------------------------------------------------------- validate's estimate


def test_parameter_count_from_config_matches_the_checkpoints() -> None:
    """`estimate_n_params` (what validate uses) reproduces every reference count."""
    shapes = {
        "Llama-3-8B": dict(intermediate_size=14336, model_type="llama"),
        "Mistral-7B": dict(intermediate_size=14336, model_type="mistral"),
        "SmolLM2-135M": dict(intermediate_size=1536, model_type="llama", tied=True),
        "Gemma-3-270M": dict(intermediate_size=2048, model_type="gemma3_text", tied=True),
    }
    for ref in memory.REFERENCE_MODELS:
        extra = shapes[ref.name]
        info = SimpleNamespace(
            n_layers=ref.n_layers, n_heads=ref.n_heads, n_kv_heads=ref.n_kv_heads,
            head_dim=ref.head_dim, hidden_size=ref.hidden_size, vocab_size=ref.vocab_size,
            intermediate_size=extra["intermediate_size"], model_type=extra["model_type"],
            tie_word_embeddings=extra.get("tied", False))
        assert memory.estimate_n_params(info) == ref.n_params, ref.name
    assert memory.estimate_n_params(Shape(32, 8, 128)) is None  # no intermediate_size


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def test_parameter_count_equals_a_loaded_model(
    name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rloop_ray.engine import models

    path = request.getfixturevalue(f"{name.replace('-', '_')}_path")
    monkeypatch.setenv(models.CACHE_ENV, str(path.parent))
    loaded = models.load_model(name)
    real = sum(p.numel() for p in loaded.model.parameters())
    assert memory.estimate_n_params(models.model_info(name)) == real


def test_reference_rows_agree_with_the_shipped_config_table() -> None:
    from rloop_ray.engine.known_configs import known_config

    for ref in memory.REFERENCE_MODELS[:2]:
        known = known_config(ref.hub_id)
        assert known is not None, ref.hub_id
        assert (known.n_layers, known.n_heads, known.n_kv_heads, known.head_dim,
                known.hidden_size, known.vocab_size, known.sliding_window) == (
            ref.n_layers, ref.n_heads, ref.n_kv_heads, ref.head_dim, ref.hidden_size,
            ref.vocab_size, ref.sliding_window)
        assert memory.estimate_n_params(known) == ref.n_params


def test_engine_prompt_cache_default_is_the_budgeted_one() -> None:
    import inspect

    from rloop_ray.engine import Engine

    default = inspect.signature(Engine.__init__).parameters["prompt_cache_size"].default
    assert default == memory.ENGINE_PROMPT_CACHE


def test_replica_estimate_fp32_8b_needs_two_a10g() -> None:
    from rloop_ray.engine.known_configs import known_config

    llama = known_config("meta-llama/Meta-Llama-3-8B-Instruct")
    a10g = memory.parse_device("a10g")
    fp16 = memory.replica_estimate(llama, dtype="float16", prompt_tokens=120, new_tokens=64,
                                   batch_size=32, device=a10g, n_prompts=200)
    assert fp16 is not None and fp16.max_batch is not None and fp16.max_batch >= 32
    assert fp16.weights == 2 * 8_030_261_248
    assert fp16.shared == memory.shared_bytes(llama, 120, "float16",
                                              cached_prompts=memory.ENGINE_PROMPT_CACHE)
    assert fp16.total == fp16.weights + fp16.shared + 32 * fp16.per_row
    assert fp16.fit_text().startswith(f"batch <= {fp16.max_batch} on 1 x A10G")
    fp32 = memory.replica_estimate(llama, dtype="float32", prompt_tokens=120, new_tokens=64,
                                   batch_size=32, device=a10g)
    assert fp32 is not None and fp32.max_batch is None and fp32.gpus_needed == 2
    assert "weights alone are 29.9 GiB" in fp32.fit_text()
    assert "gpus_per_replica: 2" in fp32.fit_text()
    small = memory.replica_estimate(llama, dtype="float16", prompt_tokens=120, new_tokens=64,
                                    batch_size=512, device=a10g)
    assert small is not None and "expect out-of-memory splits" in small.fit_text()


def test_parse_device() -> None:
    assert memory.parse_device("80GiB").bytes_each == 80 * GiB
    assert memory.parse_device("24GB", gpus=2).usable == 2 * (24 * 10**9
                                                              - memory.CUDA_CONTEXT_BYTES)
    cpu = memory.parse_device("cpu")
    assert not cpu.gpu and cpu.usable == memory.host_ram_bytes()
    with pytest.raises(ValueError, match="bad device memory"):
        memory.parse_device("lots")
    with pytest.raises(ValueError, match="smaller than a CUDA context"):
        memory.parse_device("100MB")


def test_generation_time_patches_budget_a_companion_per_row() -> None:
    """`during: generation` decodes each cell's source alongside: two rows per cell."""
    from rloop_ray.engine.known_configs import known_config

    llama = known_config("meta-llama/Meta-Llama-3-8B-Instruct")
    a10g = memory.parse_device("a10g")
    kw = dict(dtype="float16", prompt_tokens=120, new_tokens=64, batch_size=32, device=a10g)
    alone = memory.replica_estimate(llama, **kw)
    paired = memory.replica_estimate(llama, **kw, companions=True)
    assert alone is not None and paired is not None
    assert paired.per_row == 2 * alone.per_row
    assert alone.max_batch is not None and paired.max_batch is not None
    assert paired.max_batch == alone.max_batch // 2
