"""Exact oracles (docs/semantics.md) on real HF models loaded through from_pretrained.

Each test compares the engine against an independent computation (plain transformers
`generate`, a hand-computed float32 mix, a hook on `v_proj`), never against itself.
"""

from __future__ import annotations

import pytest
import torch
from _engine_helpers import ALL_MODELS, FAST_MODELS, SOURCE, TARGET, Cells

from rloop_ray.engine import Engine
from rloop_ray.engine.geometry import participation_ratio, spectrum
from rloop_ray.engine.hooks import count_hooks
from rloop_ray.engine.types import CellRequest, Intervention, MeasureConfig

N_NEW = 10
MEASURE = MeasureConfig(early_layer="25%", late_layer="75%", window=4,
                        scorers=("logprob_contrast",))
CELLS = Cells(N_NEW, MEASURE)
req, natural = CELLS.req, CELLS.natural


def hf_greedy(engine: Engine, ids: list[int], n_new: int = N_NEW) -> list[int]:
    """Reference: a full forward over the whole sequence at every step, no cache at all
    (transformers' own masks, sliding windows included), argmax, EOS not special."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            logits = engine.model(input_ids=torch.tensor([seq])).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def equal_length_pair(engine: Engine) -> tuple[str, str]:
    """Two different prompts with the same number of tokens under this tokenizer."""
    a = engine.tokenize(TARGET)
    b = engine.tokenize(SOURCE + " " + TARGET)
    text_b = engine.tokenizer.decode(b[:len(a)], skip_special_tokens=True)
    while len(engine.tokenize(text_b)) != len(a):  # re-tokenisation can merge pieces
        b = b[:-1]
        text_b = engine.tokenizer.decode(b[:len(a)], skip_special_tokens=True) + " x"
        if len(engine.tokenize(text_b)) == len(a):
            break
    assert len(engine.tokenize(text_b)) == len(a)
    return TARGET, text_b


@pytest.mark.parametrize("model", ALL_MODELS)
def test_natural_matches_transformers_generate(engines, model):
    engine = engines(model)
    out = engine.run([natural()])[0]
    assert out["status"] == "ok", out.get("error")
    assert out["generated_ids"] == hf_greedy(engine, engine.tokenize(TARGET))


@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.parametrize("site", ["kv", "k", "v", "v_proj", "qkv", "resid"])
def test_alpha_zero_and_self_equal_natural(engines, model, site):
    engine = engines(model)
    outs = engine.run([natural(), req("a0", site=site, alpha=0.0),
                       req("self", None, site=site, control="self")])
    assert all(o["status"] == "ok" for o in outs), [o.get("error") for o in outs]
    assert outs[1]["generated_ids"] == outs[0]["generated_ids"]
    assert outs[2]["generated_ids"] == outs[0]["generated_ids"]
    assert outs[1]["n_patched_positions"] > 0
    assert outs[1]["rv"] == pytest.approx(outs[0]["rv"], rel=1e-5)


@pytest.mark.parametrize("model", ALL_MODELS)
def test_all_layer_transplant_is_source_continued(engines, model):
    engine = engines(model)
    out = engine.run([req("tr", mode="transplant")])[0]
    assert out["status"] == "ok", out.get("error")
    ids = engine.tokenize(SOURCE)[:-1] + engine.tokenize(TARGET)[-1:]
    assert out["generated_ids"] == hf_greedy(engine, ids)
    assert out["query_position"] == len(engine.tokenize(SOURCE)) - 1


@pytest.mark.parametrize("model", FAST_MODELS)
def test_full_mix_of_equal_lengths_is_source_continued(engines, model):
    engine = engines(model)
    target, source = equal_length_pair(engine)
    out = engine.run([req("mix", source, target, alpha=1.0, align="start")])[0]
    ids = engine.tokenize(source)[:-1] + engine.tokenize(target)[-1:]
    assert out["generated_ids"] == hf_greedy(engine, ids)
    assert out["rope_consistent"] is True


MIXED_BATCH = [
    dict(site="kv", alpha=1.0, layers="50%:100%"),
    dict(site="kv", mode="transplant", layers="50%:100%"),  # unequal lengths per layer
    dict(site="k", alpha=0.5, tokens="last:4", align="end"),
    dict(site="v", alpha=1.5, tokens="first:50%", align="start"),
    dict(site="v_proj", alpha=1.0, layers="1"),
    # aligned at the end, mid:4 of the tiny tokenizer's 47-position target has no position
    # in the 22-position source: a no-op cell, which the engine fails (EmptyTokenSelection)
    dict(site="resid", alpha=0.7, layers="0:2", tokens="mid:4", align="start"),
    dict(site="qkv", alpha=1.0),
    dict(site="kv", control="shuffle", control_seed=3),
    dict(site="kv", control="random", control_seed=3),
]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_batched_equals_one_by_one(engines, model):
    engine = engines(model)
    reqs = [req(f"c{i}", **iv) for i, iv in enumerate(MIXED_BATCH)]
    # a different target too, so rows are left-padded against each other
    reqs += [natural("nat-short", target="Name three colours."),
             req("short-kv", target="Name three colours.", alpha=1.0)]
    batched = engine.run(reqs)
    for r, b in zip(reqs, batched):
        assert b["status"] == "ok", (r.cell_id, b.get("error"))
        single = engine.run([r])[0]
        assert single["generated_ids"] == b["generated_ids"], r.cell_id
        assert single["rv"] == pytest.approx(b["rv"], rel=1e-4, abs=1e-6)
        assert single["score_logprob_contrast"] == pytest.approx(
            b["score_logprob_contrast"], abs=1e-3)


@pytest.mark.parametrize("model", FAST_MODELS)
def test_patched_cache_equals_independent_float32_mix(engines, model):
    engine = engines(model)
    iv = Intervention(site="kv", layers="1:3", tokens="last:5", align="end", alpha=0.3)
    row = engine._prepare_cache_patch(0, CellRequest("x", TARGET, SOURCE, iv))
    t, s = engine.encode(TARGET), engine.encode(SOURCE)
    lt, ls = t.prefill_len, s.prefill_len
    for layer in range(engine.n_layers):
        for got, tgt, src in ((row.keys[layer], t.keys[layer], s.keys[layer]),
                              (row.values[layer], t.values[layer], s.values[layer])):
            want = tgt.clone()
            if layer in (1, 2):
                for p in range(lt - 5, lt):
                    q = p - lt + ls
                    want[:, p] = (0.7 * tgt[:, p].float() + 0.3 * src[:, q].float()).to(tgt.dtype)
            assert torch.equal(got, want)
    assert row.meta["n_patched_positions"] == 5


@pytest.mark.parametrize("model", FAST_MODELS)
def test_resid_patch_everywhere_makes_later_caches_the_sources(engines, model):
    engine = engines(model)
    target, source = equal_length_pair(engine)
    layer = 1
    rows = engine._prepare_prefill_patch(
        [(0, CellRequest("r", target, source,
                         Intervention(site="resid", layers=str(layer), alpha=1.0,
                                      align="start")))])
    src = engine.encode(source)
    for later in range(layer + 1, engine.n_layers):
        torch.testing.assert_close(rows[0].keys[later], src.keys[later], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows[0].values[later], src.values[later], rtol=1e-5,
                                   atol=1e-5)
    assert not torch.allclose(rows[0].keys[0], src.keys[0])  # layers <= l keep the target


@pytest.mark.parametrize("model", FAST_MODELS)
def test_sampling_is_seeded_per_cell(engines, model):
    engine = engines(model)
    a = req("s1", temperature=1.0, seed=7, alpha=0.5)
    b = req("s2", temperature=1.0, seed=8, alpha=0.5)
    together = engine.run([a, b])
    assert engine.run([a])[0]["generated_ids"] == together[0]["generated_ids"]
    assert engine.run([b])[0]["generated_ids"] == together[1]["generated_ids"]
    assert together[0]["generated_ids"] != together[1]["generated_ids"]


@pytest.mark.parametrize("model", FAST_MODELS)
def test_v_capture_equals_v_proj_hook(engines, model):
    """R_V parts from the engine equal PR of v_proj outputs hooked in a plain forward."""
    engine = engines(model)
    out = engine.run([natural(measure=MeasureConfig(early_layer="0", late_layer="-1",
                                                    window=6))])[0]
    ids = engine.tokenize(TARGET) + out["generated_ids"]
    grabbed = {}
    layers = engine.model.model.layers if hasattr(engine.model, "model") else None
    assert layers is not None
    handles = [layers[i].self_attn.v_proj.register_forward_hook(
        lambda _m, _i, o, i=i: grabbed.__setitem__(i, o[0])) for i in (0, len(layers) - 1)]
    try:
        with torch.no_grad():
            engine.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    pr_e = participation_ratio(grabbed[0][-6:])
    pr_l = participation_ratio(grabbed[len(layers) - 1][-6:])
    assert out["pr_early"] == pytest.approx(pr_e, rel=1e-4)
    assert out["pr_late"] == pytest.approx(pr_l, rel=1e-4)
    assert out["rv"] == pytest.approx(pr_l / pr_e, rel=1e-4)


@pytest.mark.parametrize("model", FAST_MODELS)
def test_logprob_contrast_matches_direct_teacher_forcing(engines, model):
    from rloop_ray.engine.runner import NEUTRAL_CONTINUATION, RECURSIVE_CONTINUATION

    engine = engines(model)
    out = engine.run([natural()])[0]
    prompt = engine.tokenize(TARGET)

    def mean_lp(text: str) -> float:
        cont = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
        return float(lp.gather(-1, torch.tensor(cont)[:, None]).mean())

    want = mean_lp(RECURSIVE_CONTINUATION) - mean_lp(NEUTRAL_CONTINUATION)
    assert out["score_logprob_contrast"] == pytest.approx(want, abs=1e-3)


def test_controls_run_and_move_the_cache(engines):
    engine = engines("tiny-llama")
    outs = engine.run([natural(), req("sh", control="shuffle"), req("rn", control="random"),
                       req("ot", control="other")])
    assert all(o["status"] == "ok" for o in outs)
    assert outs[1]["generated_ids"] != outs[0]["generated_ids"]
    assert outs[2]["generated_ids"] != outs[0]["generated_ids"]


def test_bad_cells_fail_alone_with_a_reason(engines):
    engine = engines("tiny-llama")
    too_long = " ".join(["word"] * 600)  # tiny models have a 512-position context
    outs = engine.run([natural(), natural("long", target=too_long),
                       req("bad-layer", layers="40"), req("bad-tr", mode="transplant", alpha=0.5)])
    assert outs[0]["status"] == "ok"
    assert [o["status"] for o in outs[1:]] == ["failed"] * 3
    assert "context" in outs[1]["error"]
    assert "out of range" in outs[2]["error"]
    assert "alpha=1" in outs[3]["error"]


def test_no_hook_survives_an_exception(engines, monkeypatch):
    import rloop_ray.engine.runner as runner

    engine = engines("tiny-llama")
    before = count_hooks(engine.model)

    def boom(*_a, **_k):
        raise RuntimeError("injected failure inside a hook")

    monkeypatch.setattr(runner, "mix_positions", boom)
    out = engine.run([req("vp", site="v_proj")])[0]
    assert out["status"] == "failed" and "injected failure" in out["error"]
    assert count_hooks(engine.model) == before == 0


def test_too_few_tokens_is_a_recorded_reason(engines):
    engine = engines("tiny-llama")
    out = engine.run([natural(n_new=3, measure=MeasureConfig(window=8))])[0]
    assert out["rv"] is None and out["rv_status"] == "too_few_tokens:3<8"


def test_trajectory_starts_on_the_prompt_side(engines):
    engine = engines("tiny-llama")
    m = MeasureConfig(early_layer="0", late_layer="-1", window=4, trajectory=True)
    out = engine.run([natural(measure=m)])[0]
    assert len(out["rv_trajectory"]) == N_NEW + 1
    assert out["rv_trajectory"][0] == pytest.approx(out["rv_prompt"])
    assert out["rv_trajectory"][-1] == pytest.approx(out["rv"])


def test_participation_ratio_of_known_matrices():
    torch.manual_seed(0)
    u = torch.randn(12, 1)
    assert participation_ratio(u @ torch.randn(1, 20)) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    assert participation_ratio(q[:7]) == pytest.approx(7.0)
    spec = spectrum(q[:7] * 3.0)
    assert spec is not None
    assert spec.erank_entropy == pytest.approx(7.0) and spec.erank_simpson == pytest.approx(7.0)
    assert participation_ratio(torch.zeros(4, 5)) is None


def test_permuting_cache_slots_is_a_no_op_so_shuffle_permutes_tokens(engines):
    """Why `shuffle` permutes the source's tokens: keys carry their rotary position, so a
    permutation of the cache's (key, value) slots leaves every later query's attention
    unchanged (no sliding window here). The control must therefore scramble the input."""
    from rloop_ray.engine.interventions import permutation, shuffle_positions
    from rloop_ray.engine.runner import PreparedRow
    from rloop_ray.engine.states import PatchedState

    engine = engines("tiny-llama")
    t = engine.encode(TARGET)
    perm = permutation(t.prefill_len, 5)
    row = PreparedRow(0, natural(), PatchedState(
        [shuffle_positions(k, perm, 1) for k in t.keys],
        [shuffle_positions(v, perm, 1) for v in t.values], t.ids[-1], t.prefill_len,
        {"status": "ok"}))
    permuted = engine._generate_and_measure([row])[0]
    assert permuted["generated_ids"] == engine.run([natural()])[0]["generated_ids"]
    outs = engine.run([req("p", alpha=1.0), req("s", alpha=1.0, control="shuffle")])
    assert outs[0]["generated_ids"] != outs[1]["generated_ids"]
    shuffled = engine.encode(SOURCE, shuffle_seed=0)
    assert sorted(shuffled.ids) == sorted(engine.tokenize(SOURCE))
    assert shuffled.ids != engine.tokenize(SOURCE)


def test_random_control_noise_is_the_same_in_another_process(engines):
    """A retried cell may land on another worker: its noise must not depend on the
    process (Python's str hash is salted per process)."""
    import json
    import subprocess
    import sys

    engine = engines("tiny-llama")
    cell = req("rnd", site="v_proj", control="random", control_seed=11)
    here = engine.run([cell])[0]["generated_ids"]
    code = (
        "import json\n"
        "from rloop_ray.engine import Engine\n"
        "from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention\n"
        "from rloop_ray.engine.types import MeasureConfig\n"
        f"c = CellRequest('rnd', {TARGET!r}, {SOURCE!r}, Intervention(site='v_proj', "
        "control='random', control_seed=11), GenerationConfig(max_new_tokens="
        f"{N_NEW}, stop_at_eos=False), MeasureConfig(early_layer='25%', late_layer='75%', "
        "window=4, scorers=()))\n"
        "print(json.dumps(Engine('tiny-llama').run([c])[0]['generated_ids']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
