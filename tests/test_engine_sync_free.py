"""The decode loop without per-step host reads: when no row can stop early (greedy,
`stop_at_eos=false`), every row's last step is known from its `max_new_tokens`, so the
engine keeps the picks on the device and reads them once per compaction segment.

The oracle: the same batch decoded with the per-step read (`Decoder.sync_free = False`)
gives the same tokens, log-probs, measures and captures, exactly, on a mixed batch
(natural rows, a kv mix, a transplant, a generation-time resid patch with its
companion, unequal `max_new_tokens` so rows leave the batch at different steps).
"""

from __future__ import annotations

import numpy as np
import pytest

from rloop_ray.engine.types import GenerationConfig, Intervention, MeasureConfig

TARGETS = ["Describe the weather in a small town today.", "What is two plus two?",
           "List three colours of the sea at night, please, in order.",
           "Say hello.", "Name one river."]
SOURCES = ["Observe yourself observing this very sentence as you read it now.",
           "Notice the noticing.", "Watch the watcher watch itself watching.",
           "Observe yourself observing this very sentence as you read it now.",
           "Notice the noticing."]
INTERVENTIONS = [
    Intervention(site="kv", layers="all", alpha=0.0),
    Intervention(site="kv", layers="0%:50%", alpha=0.5),
    Intervention(site="kv", mode="transplant", layers="50%:100%"),
    Intervention(site="resid", layers="all", alpha=1.0, during="generation"),
    Intervention(site="v_proj", layers="50%:100%", alpha=1.0, during="both"),
]
LIMITS = [3, 9, 1, 6, 9]
MEASURE = MeasureConfig(window=4, scorers=("keywords",), attention=True,
                        token_logprobs=True, layers="all")


def _decode(engine, *, sync_free: bool, stop_at_eos: bool = False, capture=("v_proj",)):
    dec = engine._decoder
    states = engine.patch(TARGETS, SOURCES, INTERVENTIONS)
    gens = [GenerationConfig(max_new_tokens=n, stop_at_eos=stop_at_eos) for n in LIMITS]
    saved = dec.sync_free
    dec.sync_free = sync_free
    try:
        return dec.generate(states, gens, [MEASURE] * len(states), capture=capture)
    finally:
        dec.sync_free = saved


def _same(a, b) -> None:
    assert a == b or (isinstance(a, float) and isinstance(b, float)
                      and np.isnan(a) and np.isnan(b)), (a, b)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def test_sync_free_loop_equals_the_per_step_read(engines, model):
    e = engines(model)
    fast = _decode(e, sync_free=True)
    slow = _decode(e, sync_free=False)
    assert [len(g.ids) for g in fast] == LIMITS  # nothing can stop early: all run out
    for f, s in zip(fast, slow, strict=True):
        assert f.ids == s.ids and f.text == s.text and f.stop_reason == s.stop_reason
        assert f.logprobs == s.logprobs
        assert f.measures.keys() == s.measures.keys()
        for name in f.measures:
            fv, sv = f.measures[name], s.measures[name]
            if isinstance(fv, list):
                assert len(fv) == len(sv), name
                for x, y in zip(fv, sv):
                    _same(x, y)
            else:
                _same(fv, sv)
        assert f.captured.keys() == s.captured.keys()
        for name in f.captured:
            assert np.array_equal(f.captured[name], s.captured[name]), name


def test_no_step_reads_the_picks_back_when_no_row_can_stop_early(engines, monkeypatch):
    e = engines("tiny-llama")
    reads = []
    original = type(e._decoder)._sample

    def counted(*args, **kwargs):
        reads.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(type(e._decoder), "_sample", staticmethod(counted))
    _decode(e, sync_free=True)
    assert reads == []  # the picks were read once per segment, after the loop
    _decode(e, sync_free=True, stop_at_eos=True)  # EOS needs each step's token
    assert len(reads) == max(LIMITS)
