"""Oracles of the interventions that act while generating: `during: generation | both`
(the source decodes alongside as a companion) and `mode: steer` (difference of means).

The identities proved and tested here:

* alpha = 0 mixes `(1 - 0) * t + 0 * s = t` exactly, so any site during generation
  equals the natural run token for token; `self` during generation is natural by
  construction (the engine runs no companion).
* `resid` is the decoder layer's output. Patched at every layer with alpha = 1, the
  target's last layer outputs the source's hidden state at every step, so its logits
  are the source's and its tokens are the source's own continuation from step 0.
* `kv` with `both`, every layer, alpha = 1 and equal prefill lengths: the target's
  cache equals the source's after step 0 (prefill entries mixed, the step's own entries
  mixed as they are written). From the first step at which both rows are fed the same
  token, the two rows compute the same thing, so the tokens agree from there on.
* steer with alpha = 0 or the `self` control (zero vector) adds nothing: natural.
"""

from __future__ import annotations

import pytest
import torch

from rloop_ray.engine.runner import CellError
from rloop_ray.engine.selectors import resolve_tokens
from rloop_ray.engine.types import (
    CellRequest,
    GenerationConfig,
    Intervention,
    MeasureConfig,
    SteerSource,
)

TARGETS = ["Describe the weather in a small town today.", "What is two plus two?",
           "List three colours of the sea at night, please, in order."]
SOURCES = ["Observe yourself observing this very sentence as you read it now.",
           "Notice the noticing.", "Watch the watcher watch itself watching."]
GEN = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
MEASURE = MeasureConfig(scorers=("keywords",))
GEN_SITES = ("resid", "v_proj", "qkv", "kv")


def _ids(gens):
    return [g.ids for g in gens]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mistral"])
@pytest.mark.parametrize("site", GEN_SITES)
def test_alpha_zero_during_generation_is_natural(engines, model, site):
    e = engines(model)
    natural = _ids(e.generate(e.encode(TARGETS), GEN, MEASURE))
    for during in ("generation", "both"):
        iv = Intervention(site=site, layers="all", alpha=0.0, during=during)
        states = e.patch(TARGETS, SOURCES, [iv] * 3)
        assert all(s.step_patch is not None for s in states)
        assert _ids(e.generate(states, GEN, MEASURE)) == natural, (site, during)


def test_self_during_generation_is_natural_for_any_alpha(engines):
    e = engines("tiny-llama")
    natural = _ids(e.generate(e.encode(TARGETS), GEN, MEASURE))
    iv = Intervention(site="resid", layers="all", alpha=0.37, control="self",
                      during="generation")
    states = e.patch(TARGETS, [None] * 3, [iv] * 3)
    assert all(s.step_patch is None for s in states)  # no companion: natural by construction
    assert _ids(e.generate(states, GEN, MEASURE)) == natural


def test_resid_every_layer_alpha_one_continues_as_the_source(engines):
    e = engines("tiny-llama")
    source_gens = e.generate(e.encode(SOURCES), GEN, MEASURE)
    source_natural = _ids(source_gens)
    target_natural = _ids(e.generate(e.encode(TARGETS), GEN, MEASURE))
    iv = Intervention(site="resid", layers="all", alpha=1.0, during="generation")
    gens = e.generate(e.patch(TARGETS, SOURCES, [iv] * 3), GEN, MEASURE)
    out = _ids(gens)
    assert out == source_natural
    for g, src in zip(gens, source_gens):  # the same logits, not just the same argmax
        assert g.logprobs == pytest.approx(src.logprobs, abs=1e-5)
    assert out != target_natural  # the identity is not vacuous


def test_kv_both_alpha_one_agrees_from_the_first_shared_feed(engines):
    e = engines("tiny-llama")
    # equal prefill lengths (the keys then keep their rotary positions); both rows end
    # with the chat template's tokens, so they are fed the same token from step 0
    target = "the cat sat on a warm mat and slept"
    t_ids = e.tokenize(target)
    candidates = ["a dog ran in the cold park and hid", "a dog ran in the park and hid",
                  "a dog ran in the cold dark park and then hid", "dogs ran and hid",
                  "a dog ran in the park", "a dog ran in the cold park and hid there"]
    source = next((c for c in candidates if len(e.tokenize(c)) == len(t_ids)), None)
    assert source is not None, [len(e.tokenize(c)) for c in candidates] + [len(t_ids)]
    s_ids = e.tokenize(source)
    src_gen = e.generate([e.encode(source)], GEN, MEASURE)[0].ids
    iv = Intervention(site="kv", layers="all", alpha=1.0, during="both")
    out = e.generate(e.patch([target], [source], [iv]), GEN, MEASURE)[0].ids
    feeds_t = [t_ids[-1], *out[:-1]]
    feeds_s = [s_ids[-1], *src_gen[:-1]]
    shared = next((t for t, (a, b) in enumerate(zip(feeds_t, feeds_s)) if a == b), None)
    assert shared is not None, "no shared feed: pick prompts whose continuations meet"
    assert out[shared:] == src_gen[shared:]
    assert shared < len(out) - 2  # the identity covers most of the continuation
    natural = e.generate([e.encode(target)], GEN, MEASURE)[0].ids
    assert out != natural


@pytest.mark.parametrize("site", ["kv", "v_proj"])
def test_generated_tokens_value_geometry_is_the_sources(engines, site):
    """`kv` (the entries each step writes) and `v_proj` (V itself) at every layer with
    alpha = 1: the generated tokens' cached V are the source's step-t V, so R_V of the
    generated tokens equals the source's natural R_V, whatever tokens the target picks."""
    e = engines("tiny-llama")
    m = MeasureConfig(scorers=("keywords",), window=8)
    src = e.generate(e.encode(SOURCES), GEN, m)
    nat = e.generate(e.encode(TARGETS), GEN, m)
    iv = Intervention(site=site, layers="all", alpha=1.0, during="generation")
    out = e.generate(e.patch(TARGETS, SOURCES, [iv] * 3), GEN, m)
    for o, s_, n in zip(out, src, nat):
        for key in ("pr_early", "pr_late", "rv"):
            assert o.measures[key] == pytest.approx(s_.measures[key], rel=1e-5), key
        assert o.measures["rv"] != pytest.approx(n.measures["rv"], rel=1e-3)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mistral"])
def test_generation_patches_batched_equal_one_by_one(engines, model):
    """Mixed prompt lengths (left padding), sites, controls and alphas in one batch."""
    e = engines(model)
    ivs = [Intervention(site=s, layers=layers, alpha=a, control=c, during=d, control_seed=3)
           for s, layers, a, c, d in [
               ("resid", "50%:100%", 1.0, "patch", "generation"),
               ("v_proj", "all", 0.5, "random", "both"),
               ("qkv", "0:2", 1.0, "shuffle", "generation"),
               ("kv", "all", 0.5, "patch", "both"),
               ("kv", "1", 1.0, "random", "generation")]]
    targets = [TARGETS[i % 3] for i in range(len(ivs))]
    sources = [SOURCES[(i + 1) % 3] for i in range(len(ivs))]
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=True)
    measure = MeasureConfig(scorers=("keywords", "logprob_contrast"))
    batched = e.generate(e.patch(targets, sources, ivs), gen, measure)
    alone = [e.generate(e.patch([t], [s], [iv]), gen, measure)[0]
             for t, s, iv in zip(targets, sources, ivs)]
    assert _ids(batched) == _ids(alone)
    for b, a in zip(batched, alone):
        assert b.measures["score_logprob_contrast"] == pytest.approx(
            a.measures["score_logprob_contrast"], abs=1e-5)
        assert b.meta["n_generation_patched_steps"] == len(b.ids) + 1


def test_logprob_contrast_with_alpha_zero_generation_patch_is_natural(engines):
    e = engines("tiny-llama")
    m = MeasureConfig(scorers=("logprob_contrast",))
    natural = e.generate(e.encode(TARGETS), GEN, m)
    iv = Intervention(site="v_proj", layers="all", alpha=0.0, during="generation")
    out = e.generate(e.patch(TARGETS, SOURCES, [iv] * 3), GEN, m)
    for o, n in zip(out, natural):
        assert o.measures["score_logprob_contrast"] == pytest.approx(
            n.measures["score_logprob_contrast"], abs=1e-6)
    iv1 = Intervention(site="resid", layers="all", alpha=1.0, during="generation")
    moved = e.generate(e.patch(TARGETS, SOURCES, [iv1] * 3), GEN, m)
    assert any(abs(o.measures["score_logprob_contrast"] - n.measures["score_logprob_contrast"])
               > 1e-3 for o, n in zip(moved, natural))


# ---------------------------------------------------------------------- steering

STEER = SteerSource("recursive", "baseline", tuple(SOURCES), tuple(TARGETS))


def test_steering_vector_equals_hand_computed_difference_of_means(engines):
    e = engines("tiny-llama")
    layers = [1, 2]
    for site, tokens in (("resid", "all"), ("v_proj", "last:3")):
        vec = e.steering_vector(site, layers, tokens, STEER)

        def group_mean(texts, layer, site=site, tokens=tokens):
            means = []
            for text in texts:
                st = e.encode(text, capture=[site])
                pos = resolve_tokens(tokens, st.prefill_len)
                means.append(st.acts[site][layer][pos].float().mean(dim=0))
            return torch.stack(means).mean(dim=0)

        for layer in layers:
            hand = group_mean(SOURCES, layer) - group_mean(TARGETS, layer)
            torch.testing.assert_close(vec.vectors[layer], hand, rtol=0, atol=1e-6)
            assert hand.norm() > 0
        assert vec.norm > 0 and len(vec.id) == 16


def test_groups_are_encoded_once_for_every_layer_control_and_seed(engines, monkeypatch):
    """A grid's random-control seeds and layer points share one group difference: the
    groups' prompts are encoded once (re-encoding them per cell made steer sweeps crawl)."""
    from rloop_ray.engine import Engine

    e = Engine("tiny-llama")
    calls = []
    real_encode = e._encode_one
    monkeypatch.setattr(e, "_encode_one",
                        lambda *a, **k: calls.append(a[0]) or real_encode(*a, **k))
    first = e.steering_vector("resid", [1], "all", STEER)
    n_first = len(calls)
    assert n_first == len(SOURCES) + len(TARGETS)
    for layers in ([1], [1, 2], [3]):
        for control, seed in (("patch", 0), ("random", 1), ("random", 2), ("self", 0)):
            e.steering_vector("resid", layers, "all", STEER, control=control, seed=seed)
    assert len(calls) == n_first
    again = e.steering_vector("resid", [1, 2], "all", STEER)
    torch.testing.assert_close(again.vectors[1], first.vectors[1], rtol=0, atol=0)


def test_steer_alpha_zero_and_self_are_natural(engines):
    e = engines("tiny-llama")
    natural = _ids(e.generate(e.encode(TARGETS), GEN, MEASURE))
    for during in ("prefill", "generation", "both"):
        for alpha, control in ((0.0, "patch"), (3.0, "self")):
            iv = Intervention(site="resid", layers="all", alpha=alpha, mode="steer",
                              control=control, during=during)
            out = e.generate(e.patch(TARGETS, [STEER] * 3, [iv] * 3), GEN, MEASURE)
            assert _ids(out) == natural, (during, alpha, control)
    iv = Intervention(site="resid", layers="50%:100%", alpha=8.0, mode="steer", during="both")
    assert _ids(e.generate(e.patch(TARGETS, [STEER] * 3, [iv] * 3), GEN, MEASURE)) != natural


def test_steer_random_has_the_vectors_norm_and_batches_exactly(engines):
    e = engines("tiny-mistral")
    real = e.steering_vector("v_proj", [0, 1], "all", STEER)
    rand = e.steering_vector("v_proj", [0, 1], "all", STEER, control="random", seed=5)
    for layer in (0, 1):
        assert float(rand.vectors[layer].norm()) == pytest.approx(
            float(real.vectors[layer].norm()), rel=1e-5)
        assert not torch.allclose(rand.vectors[layer], real.vectors[layer])
    ivs = [Intervention(site="v_proj", layers="all", alpha=2.0, mode="steer", during=d,
                        control=c, control_seed=5)
           for d, c in (("prefill", "patch"), ("generation", "random"), ("both", "patch"))]
    batched = e.generate(e.patch(TARGETS, [STEER] * 3, ivs), GEN, MEASURE)
    alone = [e.generate(e.patch([t], [STEER], [iv]), GEN, MEASURE)[0]
             for t, iv in zip(TARGETS, ivs)]
    assert _ids(batched) == _ids(alone)


def test_rows_record_what_ran(engines):
    e = engines("tiny-llama")
    reqs = [
        CellRequest("c1", TARGETS[0], SOURCES[0],
                    Intervention(site="kv", alpha=1.0, during="generation"), GEN, MEASURE),
        CellRequest("c2", TARGETS[1], None,
                    Intervention(site="resid", alpha=2.0, mode="steer", during="both"),
                    GEN, MEASURE, steer=STEER),
        CellRequest("c3", TARGETS[2], SOURCES[2],
                    Intervention(site="kv", mode="transplant", during="generation"), GEN,
                    MEASURE),
        CellRequest("c4", TARGETS[2], SOURCES[2],
                    Intervention(site="k", during="generation"), GEN, MEASURE),
        CellRequest("c5", TARGETS[2], None,
                    Intervention(site="kv", mode="steer"), GEN, MEASURE, steer=STEER),
    ]
    rows = {r["cell_id"]: r for r in e.run(reqs)}
    assert rows["c1"]["status"] == "ok"
    assert rows["c1"]["n_generation_patched_steps"] == rows["c1"]["n_generated"] + 1
    assert rows["c1"]["rope_consistent"] is False  # unequal lengths: keys at source positions
    assert rows["c2"]["status"] == "ok" and rows["c2"]["steer_norm"] > 0
    assert rows["c2"]["n_patched_positions"] == rows["c2"]["n_target_tokens"] - 1
    assert rows["c2"]["alpha_extrapolated"] is False
    for cid, words in (("c3", "transplant"), ("c4", "during generation"), ("c5", "steer")):
        assert rows[cid]["status"] == "failed", cid
        assert words in rows[cid]["error"], (cid, rows[cid]["error"][:200])


def test_steer_needs_a_steer_source(engines):
    e = engines("tiny-llama")
    iv = Intervention(site="resid", mode="steer")
    with pytest.raises(CellError, match="SteerSource"):
        e.patch([TARGETS[0]], [SOURCES[0]], [iv])
