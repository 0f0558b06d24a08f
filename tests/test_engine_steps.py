"""The engine's public steps: encode -> patch -> generate, and `run` built from them.

Each step is checked against an independent computation: `run` for the composition, a
hook on a plain teacher-forced forward for captured activations, `log_softmax` of that
forward for the per-step log-probs. `Generation` must cross Ray: it pickles, no tensors.
"""

from __future__ import annotations

import pickle
from dataclasses import fields

import numpy as np
import pytest
import torch

from rloop_ray.engine import CellError, Engine, Generation, PatchedState, PromptState
from rloop_ray.engine.hooks import count_hooks, hooks
from rloop_ray.engine.runner import EmptyTokenSelection
from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig
from rloop_ray.vocab import NATURAL, NONE, SHUFFLE

TARGET = ("Please explain how a river slowly carves a deep canyon through layers of rock "
          "over many thousands of years.")
SOURCE = "Observe the process of your own observing as you read this very sentence."
GEN = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
MEASURE = MeasureConfig(early_layer="25%", late_layer="75%", window=4, trajectory=True,
                        scorers=("keywords", "regex", "logprob_contrast"))
FAST_MODELS = ["tiny-llama", "tiny-mistral", "tiny-gemma3"]
NAT = Intervention(site=NONE, control=NATURAL)

# natural, kv mix, transplant, resid and a shuffle control: every path `patch` has
MIXED = [
    NAT,
    Intervention(site="kv", layers="50%:100%", alpha=1.0),
    Intervention(site="kv", mode="transplant", layers="50%:100%"),
    Intervention(site="resid", layers="0:2", alpha=0.7),
    Intervention(site="kv", control=SHUFFLE, control_seed=3),
]


def teacher_forced(engine: Engine, ids: list[int], capture: tuple[str, ...] = ()
                   ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Reference: one plain forward over `ids` (no cache, transformers' own masks);
    fp32 logits (T, V) and each module's output per layer (T, D) from a hook."""
    grabbed: dict[str, list[torch.Tensor | None]] = {
        n: [None] * engine.n_layers for n in capture}

    def keep(name: str, layer: int):
        def fn(out: torch.Tensor) -> None:
            grabbed[name][layer] = out[0].detach()
        return fn

    pairs = [(engine.adapter.module(engine.model, n, layer), keep(n, layer))
             for n in capture for layer in range(engine.n_layers)]
    with torch.no_grad(), hooks(pairs):
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits, grabbed  # type: ignore[return-value]


def same(a: object, b: object) -> bool:
    """Equal, floats to 1e-5 (rows decode in another order inside the batch)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_steps_equal_run_token_for_token_and_measure_for_measure(engines):
    engine = engines("tiny-llama")
    target, source = engine.encode([TARGET, SOURCE])
    assert isinstance(target, PromptState) and target.text == TARGET
    patched = engine.patch([target] * len(MIXED), [None, *[source] * (len(MIXED) - 1)], MIXED)
    assert all(isinstance(p, PatchedState) for p in patched)
    gens = engine.generate(patched, GEN, MEASURE)

    requests = [CellRequest(f"c{i}", TARGET, None if i == 0 else SOURCE, iv, GEN, MEASURE)
                for i, iv in enumerate(MIXED)]
    rows = engine.run(requests)
    for req, gen, row in zip(requests, gens, rows):
        assert row["status"] == "ok", (req.cell_id, row.get("error"))
        assert row["cell_id"] == req.cell_id
        assert gen.ids == row["generated_ids"], req.cell_id
        assert (gen.text, gen.stop_reason) == (row["generated_text"], row["stop_reason"])
        assert len(gen.logprobs) == len(gen.ids) == row["n_generated"]
        for key, value in {**gen.meta, **gen.measures}.items():
            assert key in row, key
            assert same(row[key], value), (req.cell_id, key, row[key], value)
        # a row is exactly the patch meta, the generation and the measures
        generation_keys = {"cell_id", "status", "generated_ids", "n_generated",
                           "generated_text", "stop_reason", "generate_seconds",
                           "engine_seconds"}
        assert set(row) == set(gen.meta) | set(gen.measures) | generation_keys
    assert gens[1].meta["n_patched_positions"] > 0 and gens[0].meta["patched_layers"] == []
    assert gens[2].meta["rope_consistent"] is False  # a partial transplant of unequal length


def test_texts_and_states_patch_alike_and_natural_is_the_unpatched_state(engines):
    engine = engines("tiny-llama")
    state = engine.encode([TARGET])[0]
    from_text = engine.patch([TARGET], [SOURCE], [MIXED[3]])[0]
    from_state = engine.patch([state], [engine.encode([SOURCE])[0]], [MIXED[3]])[0]
    for a, b in zip(from_text.keys, from_state.keys):
        assert torch.equal(a, b)
    natural = engine.patch([state, TARGET], [None, SOURCE], [NAT, NAT])
    assert all(torch.equal(k, t) for k, t in zip(natural[0].keys, state.keys))
    plain, nat_none, nat_src = engine.generate([state, *natural], GEN, MEASURE)
    assert plain.ids == nat_none.ids == nat_src.ids
    assert nat_none.meta["n_source_tokens"] is None
    self_patch = engine.patch([state], [None], [Intervention(site="v_proj", control="self")])
    assert engine.generate(self_patch, GEN, MEASURE)[0].ids == plain.ids


@pytest.mark.parametrize("model", FAST_MODELS)
def test_captured_activations_equal_hooks_on_a_teacher_forced_forward(engines, model):
    engine = engines(model)
    state = engine.encode([TARGET])[0]
    gen = engine.generate([state], GEN, MEASURE, capture=("v_proj", "resid"))[0]
    assert len(gen.ids) == GEN.max_new_tokens
    prompt = state.ids
    _, ref = teacher_forced(engine, prompt + gen.ids, ("v_proj", "resid"))
    for name in ("v_proj", "resid"):
        got = gen.captured[name]
        assert got.dtype == np.float32
        assert got.shape == (engine.n_layers, len(gen.ids), ref[name][0].shape[-1])
        for layer in range(engine.n_layers):
            want = ref[name][layer][len(prompt):len(prompt) + len(gen.ids)]
            # one token per step vs all at once: float32 round-off of a few 1e-5
            torch.testing.assert_close(torch.from_numpy(got[layer]), want.float(),
                                       rtol=1e-4, atol=5e-5)
    assert count_hooks(engine.model) == 0
    # the V captured during generation is the V that R_V measures
    late = gen.measures["layer_late"]
    assert torch.allclose(torch.from_numpy(gen.captured["v_proj"][late]),
                          ref["v_proj"][late][len(prompt):].float(), rtol=1e-4, atol=1e-5)


def test_capture_after_a_whole_cache_transplant_is_the_source_continued(engines):
    """The identity of docs/semantics.md, on captured activations: an all-layer
    transplant is the source prompt continued with the target's last token."""
    engine = engines("tiny-llama")
    patched = engine.patch([TARGET], [SOURCE], [Intervention(site="kv", mode="transplant")])
    gen = engine.generate(patched, GEN, MEASURE, capture=("v_proj",))[0]
    ids = engine.tokenize(SOURCE)[:-1] + engine.tokenize(TARGET)[-1:]
    logits, ref = teacher_forced(engine, ids + gen.ids, ("v_proj",))
    for layer in range(engine.n_layers):
        torch.testing.assert_close(torch.from_numpy(gen.captured["v_proj"][layer]),
                                   ref["v_proj"][layer][len(ids):].float(), rtol=1e-4,
                                   atol=1e-5)
    lp = torch.log_softmax(logits, -1)[len(ids) - 1:-1].gather(
        -1, torch.tensor(gen.ids)[:, None])[:, 0]
    assert gen.logprobs == pytest.approx(lp.tolist(), abs=1e-4)


@pytest.mark.parametrize("model", FAST_MODELS)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=0.8, top_p=0.9, seed=5)])
def test_logprobs_equal_log_softmax_of_a_full_forward(engines, model, sampling):
    """Per-step log-probs are the model's own (temperature 1, no top-p), whatever was
    used to sample: log_softmax of a full forward over prompt + generated ids."""
    engine = engines(model)
    state = engine.encode([TARGET])[0]
    gen = engine.generate([state], GenerationConfig(max_new_tokens=8, stop_at_eos=False,
                                                    **sampling), MEASURE)[0]
    logits, _ = teacher_forced(engine, state.ids + gen.ids)
    n = len(state.ids)
    want = torch.log_softmax(logits, -1)[n - 1:n - 1 + len(gen.ids)].gather(
        -1, torch.tensor(gen.ids)[:, None])[:, 0]
    assert len(gen.logprobs) == len(gen.ids) == 8
    assert gen.logprobs == pytest.approx(want.tolist(), abs=1e-4)
    assert all(lp <= 0.0 for lp in gen.logprobs)
    if sampling["temperature"] == 0.0:  # greedy picks the argmax at every step
        full = torch.log_softmax(logits, -1)[n - 1:n - 1 + len(gen.ids)]
        assert gen.ids == full.argmax(-1).tolist()


def _tensors_in(value: object) -> list[str]:
    """Paths of torch tensors anywhere inside a value (dataclass fields, dicts, lists)."""
    if isinstance(value, torch.Tensor):
        return ["<tensor>"]
    if isinstance(value, dict):
        return [f"{k}.{p}" for k, v in value.items() for p in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [f"[{i}].{p}" for i, v in enumerate(value) for p in _tensors_in(v)]
    return []


def test_a_generation_pickles_and_holds_no_tensors(engines):
    engine = engines("tiny-llama")
    patched = engine.patch([TARGET], [SOURCE], [MIXED[1]])
    gen = engine.generate(patched, GEN, MEASURE, capture=("v_proj",))[0]
    found = [f"{f.name}.{p}" for f in fields(gen) for p in _tensors_in(getattr(gen, f.name))]
    assert found == []
    back = pickle.loads(pickle.dumps(gen))
    assert isinstance(back, Generation)
    assert back.ids == gen.ids and back.logprobs == gen.logprobs
    assert back.measures == gen.measures and back.meta == gen.meta
    np.testing.assert_array_equal(back.captured["v_proj"], gen.captured["v_proj"])
    assert all(isinstance(i, int) for i in gen.ids)
    assert all(isinstance(x, float) for x in gen.logprobs)


def test_capture_is_off_by_default_and_run_lacks_it(engines):
    engine = engines("tiny-llama")
    gen = engine.generate(engine.encode([TARGET]), GEN, MEASURE)[0]
    assert gen.captured == {}
    row = engine.run([CellRequest("nat", TARGET, None, NAT, GEN, MEASURE)])[0]
    assert row["cell_id"] == "nat" and "captured" not in row and "logprobs" not in row


def test_bad_input_raises_cell_error_naming_the_item(engines):
    engine = engines("tiny-llama")
    kv = Intervention(site="kv")
    with pytest.raises(CellError, match="one source and one intervention per target"):
        engine.patch([TARGET, TARGET], [SOURCE], [kv])
    with pytest.raises(CellError, match="patch 1: .*out of range"):
        engine.patch([TARGET, TARGET], [SOURCE, SOURCE], [kv, Intervention(layers="40")])
    with pytest.raises(CellError, match="patch 0: .*alpha=1"):
        engine.patch([TARGET], [SOURCE], [Intervention(mode="transplant", alpha=0.5)])
    with pytest.raises(CellError, match="needs a source prompt"):
        engine.patch([TARGET], [None], [kv])
    with pytest.raises(EmptyTokenSelection, match="selects no position"):
        engine.patch([TARGET], [SOURCE], [Intervention(tokens="400:500")])
    with pytest.raises(CellError, match="unknown site"):
        engine.patch([TARGET], [SOURCE], [Intervention(site="kvv")])
    with pytest.raises(CellError, match="context"):
        engine.patch([" ".join(["word"] * 600)], [None], [NAT])
    with pytest.raises(CellError, match="cannot capture 'nope'"):
        engine.generate(engine.encode([TARGET]), GEN, MEASURE, capture=("nope",))
    with pytest.raises(CellError, match="cannot capture"):
        engine.encode([TARGET], capture=("v_projj",))
    with pytest.raises(CellError, match="PatchedState or a PromptState"):
        engine.generate([TARGET], GEN, MEASURE)  # type: ignore[list-item]
    with pytest.raises(CellError, match="measure: .*out of range"):
        engine.generate(engine.encode([TARGET]), GEN, MeasureConfig(late_layer="40"))
    with pytest.raises(CellError, match="context"):
        engine.generate(engine.encode([TARGET]), GenerationConfig(max_new_tokens=600))
    assert count_hooks(engine.model) == 0


def test_encode_takes_a_list_and_captures_prefill_activations(engines):
    engine = engines("tiny-llama")
    states = engine.encode([TARGET, SOURCE, TARGET], capture=["v_proj"])
    assert [s.text for s in states] == [TARGET, SOURCE, TARGET]
    assert states[0] is states[2]  # the per-prompt cache
    assert states[0].ids == engine.tokenize(TARGET)
    v = states[1].acts["v_proj"]
    assert len(v) == engine.n_layers and v[0].shape[0] == states[1].prefill_len
    assert engine.encode([]) == []
    assert isinstance(engine.encode(TARGET), PromptState)  # one text, one state


def test_generate_batches_beyond_max_batch_size_like_alone(engines):
    engine = engines("tiny-llama")
    small = max(1, engine.max_batch_size)
    engine.max_batch_size = 2
    try:
        patched = engine.patch([TARGET] * 3, [SOURCE] * 3,
                               [Intervention(alpha=a) for a in (0.25, 0.5, 1.0)])
        together = engine.generate(patched, GEN, MEASURE)
    finally:
        engine.max_batch_size = small
    alone = [engine.generate([p], GEN, MEASURE)[0] for p in patched]
    assert [g.ids for g in together] == [g.ids for g in alone]


def test_chat_template_defaults_to_the_tokenizers_own():
    """`chat_template=None` (the default) is the grid's auto mode: a tokenizer with a
    template uses it; `False` keeps raw text."""
    auto = Engine("tiny-llama")
    raw = Engine("tiny-llama", chat_template=False)
    assert auto.chat_template is True and raw.chat_template is False
    assert auto.tokenize(TARGET) == auto.tokenizer.apply_chat_template(
        [{"role": "user", "content": TARGET}], add_generation_prompt=True, tokenize=True,
        return_dict=False)
    assert raw.tokenize(TARGET) == raw.tokenizer(TARGET)["input_ids"]


@pytest.mark.slow
def test_documented_instruct_example_generates_text():
    """The issue's symptom: SmolLM2-Instruct fed raw text answered with an empty turn."""
    engine = Engine("smollm2-135m")
    assert engine.chat_template is True
    state = engine.encode(["Describe the water cycle in two sentences."])
    gen = engine.generate(state, GenerationConfig(max_new_tokens=12), MeasureConfig(window=4))
    assert gen[0].text.strip()


def test_compaction_changes_nothing_rows_that_stop_early_equal_rows_alone(engines):
    """Rows that stop (EOS, or their own smaller `max_new_tokens`) leave the batch; the
    rest decode on fewer rows. Every row must still be what it is decoded alone: tokens,
    stop reason, log-probs, measures (R_V, trajectory) and captured activations."""
    engine = engines("tiny-llama")
    patched = engine.patch([TARGET] * 5, [SOURCE] * 4 + [None],
                           [*(Intervention(alpha=a) for a in (0.25, 0.5, 0.75, 1.0)), NAT])
    free = engine.generate(patched, GenerationConfig(max_new_tokens=10, stop_at_eos=False),
                           MEASURE)
    saved = engine._decoder.eos
    engine._decoder.eos = {free[0].ids[1]}  # an "EOS" the rows meet at different steps
    try:
        gen = GenerationConfig(max_new_tokens=10, stop_at_eos=True)
        together = engine.generate(patched, gen, MEASURE, capture=("v_proj",))
        alone = [engine.generate([p], gen, MEASURE, capture=("v_proj",))[0] for p in patched]
        limits = [3, 10, 6, 10, 1]
        requests = [CellRequest(f"c{i}", TARGET, None if i == 4 else SOURCE,
                                [*(Intervention(alpha=a) for a in (0.25, 0.5, 0.75, 1.0)),
                                 NAT][i],
                                GenerationConfig(max_new_tokens=n, stop_at_eos=True), MEASURE)
                    for i, n in enumerate(limits)]
        run_together = engine.run(requests)
        run_alone = [engine.run([r])[0] for r in requests]
    finally:
        engine._decoder.eos = saved
    lengths = [len(g.ids) for g in together]
    assert "eos" in [g.stop_reason for g in together] and len(set(lengths)) > 1, lengths
    for t, a in zip(together, alone):
        assert t.ids == a.ids and t.stop_reason == a.stop_reason
        assert same(t.logprobs, a.logprobs)
        assert set(t.measures) == set(a.measures)
        for key in t.measures:
            assert same(t.measures[key], a.measures[key]), key
        np.testing.assert_allclose(t.captured["v_proj"], a.captured["v_proj"],
                                   rtol=1e-4, atol=1e-5)  # batch-shaped matmuls round apart
        assert t.captured["v_proj"].shape[1] == len(t.ids)
    assert len({r["n_generated"] for r in run_together}) > 1
    for t, a in zip(run_together, run_alone):
        assert t["status"] == a["status"] == "ok"
        for key in set(t) - {"generate_seconds", "engine_seconds"}:
            assert same(t[key], a[key]), key
