"""Oracles of the second-wave measures (docs/semantics.md: next-token distribution,
layer profile, attention).

`kl_from_natural` and `top_logprobs` against a plain forward with a plain `v_proj` hook,
`token_logprobs` against teacher forcing, `pr_by_layer` against `pr_early`/`pr_late`,
the attention measures against transformers' eager attention weights, and every one of
them batched (padding, mixed lengths) against the same cell run alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from _engine_helpers import ALL_MODELS, FAST_MODELS, SHORT, SOURCE, TARGET, Cells

from rloop_ray.engine import Engine
from rloop_ray.engine.types import MeasureConfig

N_NEW = 8
MEASURE = MeasureConfig(early_layer="25%", late_layer="75%", window=4, scorers=(),
                        attention=True, layers="all", token_logprobs=True, top_logprobs=5)
CELLS = Cells(N_NEW, MEASURE)
req, natural = CELLS.req, CELLS.natural


def layers_of(engine: Engine) -> torch.nn.ModuleList:
    return engine.model.model.layers


def equal_length_source(engine: Engine) -> str:
    """A source text with as many tokens as TARGET under this tokenizer (a v_proj patch
    with align end then maps every prefill position onto itself): TARGET with as many of
    its words replaced by SOURCE's as keep the token count."""
    n = len(engine.tokenize(TARGET))
    words = TARGET.split()
    pool = SOURCE.rstrip(".").split()
    for i in range(len(words)):
        for w in pool:
            trial = [*words[:i], w, *words[i + 1:]]
            if len(engine.tokenize(" ".join(trial))) == n:
                words = trial
                pool.remove(w)
                break
    text = " ".join(words)
    assert len(engine.tokenize(text)) == n and text != TARGET
    return text


def last_logprobs(engine: Engine, ids: list[int], hooks=()) -> torch.Tensor:
    """log-softmax of the last position of one plain forward (no cache), with hooks."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    return torch.log_softmax(logits, -1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    p = p_log.double().exp()
    return float((p * (p_log.double() - q_log.double())).sum())


@contextmanager
def eager(engine: Engine) -> Iterator[None]:
    """transformers' own eager attention (it returns the weights) for the block."""
    current = engine.model.config._attn_implementation
    engine.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        engine.model.set_attn_implementation(current)


# ---------------------------------------------------------------- next-token measures
@pytest.mark.parametrize("model", ALL_MODELS)
def test_kl_of_a_v_proj_patch_equals_a_plain_hook(engines, model):
    """KL(patched || natural) of the first step equals one computed from two plain
    forwards, the patched one with a `v_proj` hook mixing the source's outputs in."""
    engine = engines(model)
    source = equal_length_source(engine)
    layer, alpha = engine.n_layers // 2, 0.75
    out = engine.run([req("vp", source, site="v_proj", layers=str(layer), alpha=alpha)])[0]
    assert out["status"] == "ok", out.get("error")
    t_ids, s_ids = engine.tokenize(TARGET), engine.tokenize(source)
    assert len(t_ids) == len(s_ids)
    v_proj = layers_of(engine)[layer].self_attn.v_proj
    grabbed: dict[str, torch.Tensor] = {}
    last_logprobs(engine, s_ids, [(v_proj, lambda _m, _i, o: grabbed.__setitem__("s", o))])
    n_prefill = len(t_ids) - 1

    def mix(_m, _i, o):
        new = o.clone()
        mixed = (1 - alpha) * o[0, :n_prefill].float() + alpha * grabbed["s"][0, :n_prefill].float()
        new[0, :n_prefill] = mixed.to(o.dtype)
        return new

    want = kl(last_logprobs(engine, t_ids, [(v_proj, mix)]), last_logprobs(engine, t_ids))
    assert want > 1e-6  # the patch moved the distribution: the test can fail
    assert out["kl_from_natural"] == pytest.approx(want, abs=1e-4, rel=1e-3)


@pytest.mark.parametrize("model", FAST_MODELS)
def test_kl_is_zero_for_natural_and_self(engines, model):
    engine = engines(model)
    outs = engine.run([natural(), req("self_kv", None, control="self", site="kv", alpha=0.5),
                       req("self_vp", None, control="self", site="v_proj", layers="all"),
                       req("zero", site="resid", layers="all", alpha=0.0),
                       req("patch", site="kv", layers="all", alpha=1.0)])
    assert all(o["status"] == "ok" for o in outs), [o.get("error") for o in outs]
    by = {o["cell_id"]: o for o in outs}
    assert by["nat"]["kl_from_natural"] == 0.0  # the natural run is its own reference
    for cid in ("self_kv", "self_vp", "zero"):
        assert by[cid]["kl_from_natural"] == pytest.approx(0.0, abs=1e-6), cid
        assert by[cid]["top_ids"] == by["nat"]["top_ids"]
    assert by["patch"]["kl_from_natural"] > 1e-3


@pytest.mark.parametrize("model", FAST_MODELS)
def test_top_and_token_logprobs_equal_teacher_forcing(engines, model):
    engine = engines(model)
    out = engine.run([natural()])[0]
    ids = engine.tokenize(TARGET)
    ref = last_logprobs(engine, ids)
    top = torch.topk(ref, 5)
    assert out["top_ids"] == top.indices.tolist()
    assert out["top_logprobs"] == pytest.approx(top.values.tolist(), abs=1e-4)
    gen = out["generated_ids"]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids + gen])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(ids) - 1:-1].gather(-1, torch.tensor(gen)[:, None])
    assert out["token_logprobs"] == pytest.approx(lp[:, 0].tolist(), abs=1e-4)
    assert len(out["token_logprobs"]) == out["n_generated"]


def test_measures_off_leave_columns_null(engines):
    engine = engines("tiny-llama")
    off = MeasureConfig(early_layer="25%", late_layer="75%", window=4, scorers=(),
                        kl_from_natural=False, top_logprobs=0)
    out = engine.run([req("p", site="kv", measure=off)])[0]
    for col in ("kl_from_natural", "top_ids", "top_logprobs", "token_logprobs",
                "profile_layers", "pr_by_layer", "pr_prompt_by_layer", "attn_entropy",
                "attn_mass_prompt", "attn_mass_generated", "attn_mass_patched"):
        assert out[col] is None, col


# ---------------------------------------------------------------- layer profile
@pytest.mark.parametrize("model", ALL_MODELS)
def test_pr_by_layer_at_early_and_late_is_pr_early_and_late(engines, model):
    engine = engines(model)
    outs = engine.run([natural(), req("kv", site="kv", layers="50%:100%")])
    for out in outs:
        assert out["status"] == "ok", out.get("error")
        layers = out["profile_layers"]
        assert layers == list(range(engine.n_layers))
        early, late = out["layer_early"], out["layer_late"]
        assert out["pr_by_layer"][layers.index(early)] == out["pr_early"]
        assert out["pr_by_layer"][layers.index(late)] == out["pr_late"]
        ratio = (out["pr_prompt_by_layer"][layers.index(late)]
                 / out["pr_prompt_by_layer"][layers.index(early)])
        assert ratio == pytest.approx(out["rv_prompt"], rel=1e-12)


def test_profile_of_listed_layers(engines):
    engine = engines("tiny-llama")
    m = MeasureConfig(early_layer="0", late_layer="-1", window=4, scorers=(),
                      layers=("-1", "0", "50%"))
    out = engine.run([natural(measure=m)])[0]
    assert out["profile_layers"] == sorted({0, engine.n_layers - 1, engine.n_layers // 2})
    assert out["pr_by_layer"][0] == out["pr_early"]
    assert out["pr_by_layer"][-1] == out["pr_late"]


# ---------------------------------------------------------------- attention
def eager_attention(engine: Engine, prompt_ids: list[int], gen: list[int],
                    patched: set[int] = frozenset()) -> dict[str, list[float]]:
    """Per layer, from eager weights of one plain forward over prompt + generated tokens:
    the generated queries' mean entropy (over heads and queries) and their mean mass on
    the prompt, on the generated tokens and on the `patched` prompt positions."""
    n = len(prompt_ids)
    with eager(engine), torch.no_grad():
        out = engine.model(input_ids=torch.tensor([prompt_ids + gen]), output_attentions=True)
    res: dict[str, list[float]] = {"entropy": [], "prompt": [], "generated": [],
                                   "patched": []}
    for w in out.attentions:  # (1, H, T, T)
        q = w[0, :, n:n + len(gen)].double()  # the generated tokens' queries
        ent = -(torch.where(q > 0, q * q.log(), torch.zeros_like(q))).sum(-1)
        res["entropy"].append(float(ent.mean()))
        res["prompt"].append(float(q[..., :n].sum(-1).mean()))
        res["generated"].append(float(q[..., n:].sum(-1).mean()))
        res["patched"].append(float(q[..., sorted(patched)].sum(-1).mean()) if patched else 0.0)
    return res


@pytest.mark.parametrize("model", ALL_MODELS)
def test_attention_measures_equal_eager_weights(engines, model):
    """Natural rows, in one batch with a shorter prompt (padding): entropy and masses
    equal those of transformers' eager attention weights over the same tokens."""
    engine = engines(model)
    outs = engine.run([natural(), natural("short", SHORT)])
    for out, text in zip(outs, (TARGET, SHORT)):
        assert out["status"] == "ok", out.get("error")
        want = eager_attention(engine, engine.tokenize(text), out["generated_ids"])
        assert out["attn_entropy"] == pytest.approx(want["entropy"], abs=1e-4)
        assert out["attn_mass_prompt"] == pytest.approx(want["prompt"], abs=1e-5)
        assert out["attn_mass_generated"] == pytest.approx(want["generated"], abs=1e-5)
        assert out["attn_mass_patched"] is None  # nothing patched
        assert all(abs(a + b - 1) < 1e-5 for a, b in
                   zip(out["attn_mass_prompt"], out["attn_mass_generated"]))


@pytest.mark.parametrize("model", FAST_MODELS)
def test_attention_mass_on_patched_positions_equals_eager(engines, model):
    """A v_proj patch of prefill positions 2..5 at every layer: the eager forward with
    the same hook gives the same mass on those positions."""
    engine = engines(model)
    source = equal_length_source(engine)
    out = engine.run([req("vp", source, site="v_proj", layers="all", tokens="2:6",
                          alpha=1.0)])[0]
    assert out["status"] == "ok", out.get("error")
    s_ids, t_ids = engine.tokenize(source), engine.tokenize(TARGET)
    grabbed: dict[int, torch.Tensor] = {}
    layers = layers_of(engine)
    last_logprobs(engine, s_ids, [(layer.self_attn.v_proj,
                                   lambda _m, _i, o, i=i: grabbed.__setitem__(i, o))
                                  for i, layer in enumerate(layers)])

    def mix(i: int):
        def fn(_m, _i, o):
            new = o.clone()
            if o.shape[1] >= 6:  # the prompt forward, not a later one-token step
                new[0, 2:6] = grabbed[i][0, 2:6]
            return new
        return fn

    handles = [layer.self_attn.v_proj.register_forward_hook(mix(i))
               for i, layer in enumerate(layers)]
    try:
        want = eager_attention(engine, t_ids, out["generated_ids"], {2, 3, 4, 5})
    finally:
        for h in handles:
            h.remove()
    assert out["attn_mass_patched"] == pytest.approx(want["patched"], abs=1e-5)
    assert out["attn_entropy"] == pytest.approx(want["entropy"], abs=1e-4)


def test_attention_measures_change_no_token(engines):
    engine = engines("tiny-llama")
    plain = MeasureConfig(early_layer="25%", late_layer="75%", window=4, scorers=())
    a = engine.run([natural(), req("kv", site="kv")])
    b = engine.run([natural(measure=plain), req("kv", site="kv", measure=plain)])
    assert [o["generated_ids"] for o in a] == [o["generated_ids"] for o in b]
    assert [o["rv"] for o in a] == [o["rv"] for o in b]


def test_generation_time_patch_counts_generated_positions_as_patched(engines):
    engine = engines("tiny-llama")
    out = engine.run([req("g", site="resid", layers="all", during="generation")])[0]
    assert out["status"] == "ok", out.get("error")
    assert out["attn_mass_patched"] == pytest.approx(out["attn_mass_generated"], abs=1e-12)


# ---------------------------------------------------------------- batched == one by one
@pytest.mark.parametrize("model", FAST_MODELS)
def test_new_measures_batched_equal_one_by_one(engines, model):
    engine = engines(model)
    cells = [natural(), natural("short", SHORT),
             req("kv", site="kv", layers="50%:100%", alpha=0.5),
             req("vp_short", SOURCE, SHORT, site="v_proj", layers="all", tokens="1:4"),
             req("tr", site="kv", mode="transplant", layers="all"),
             req("gen", site="resid", layers="all", during="generation", alpha=0.5),
             req("kv_both", SOURCE, SHORT, site="kv", during="both", alpha=0.3)]
    batched = engine.run(cells)
    alone = [engine.run([c])[0] for c in cells]
    for b, a in zip(batched, alone):
        assert b["status"] == a["status"] == "ok", (b.get("error"), a.get("error"))
        assert b["generated_ids"] == a["generated_ids"], b["cell_id"]
        assert b["top_ids"] == a["top_ids"], b["cell_id"]
        assert b["kl_from_natural"] == pytest.approx(a["kl_from_natural"], abs=1e-5)
        assert b["top_logprobs"] == pytest.approx(a["top_logprobs"], abs=1e-4)
        assert b["token_logprobs"] == pytest.approx(a["token_logprobs"], abs=1e-4)
        assert b["pr_by_layer"] == pytest.approx(a["pr_by_layer"], rel=1e-4)
        assert b["pr_prompt_by_layer"] == pytest.approx(a["pr_prompt_by_layer"], rel=1e-4)
        for col in ("attn_entropy", "attn_mass_prompt", "attn_mass_generated"):
            assert b[col] == pytest.approx(a[col], abs=1e-5), (b["cell_id"], col)
        if a["attn_mass_patched"] is None:
            assert b["attn_mass_patched"] is None
        else:
            assert b["attn_mass_patched"] == pytest.approx(a["attn_mass_patched"], abs=1e-5)
