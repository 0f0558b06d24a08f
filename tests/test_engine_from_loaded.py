"""`Engine.from_loaded`: an engine around a model and tokenizer already in memory is the
same engine as one loaded by name (benchmarks/device_check.py builds its random-weight
8B models this way), and what cannot be an engine's model or tokenizer is refused
before any forward, with a message that says why.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _engine_helpers import SHORT, Cells
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaModel,
)

from rloop_ray.engine import Engine
from rloop_ray.engine.adapters import UnsupportedArchitectureError
from rloop_ray.engine.types import MeasureConfig

CELLS = Cells(8, MeasureConfig(early_layer="25%", late_layer="75%", window=4,
                               scorers=("logprob_contrast",)))
req, natural = CELLS.req, CELLS.natural


@pytest.fixture(scope="module")
def by_name(engines) -> Engine:
    return engines("tiny-llama")


def load(engine: Engine) -> tuple[Any, Any]:
    """A fresh model and tokenizer from the folder the named engine loaded."""
    path = engine.loaded.path
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def tiny_llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_an_engine_from_a_loaded_model_decodes_as_the_named_one(by_name):
    model, tokenizer = load(by_name)
    engine = Engine.from_loaded(model, tokenizer, name="tiny-llama")
    cells = [natural(), req("kv", alpha=0.5, layers="50%:100%"),
             req("vp", site="v_proj", alpha=1.0), req("tr", mode="transplant"),
             req("resid", site="resid", alpha=0.7, tokens="last:4"),
             natural("short", target=SHORT)]
    got, want = engine.run(cells), by_name.run(cells)
    assert [r["status"] for r in got] == ["ok"] * len(cells), [r.get("error") for r in got]
    assert [r["generated_ids"] for r in got] == [r["generated_ids"] for r in want]
    assert [r["query_position"] for r in got] == [r["query_position"] for r in want]
    info, named = engine.info(), by_name.info()
    assert info["model"] == "tiny-llama" and info["path"] == named["path"]
    for key in ("n_layers", "model_type", "dtype", "device", "chat_template"):
        assert info[key] == named[key], key
    assert engine.model is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_the_name_defaults_to_the_models_and_a_tokenizer_gets_left_padding(by_name):
    model, tokenizer = load(by_name)
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None
    engine = Engine.from_loaded(model, tokenizer, chat_template=by_name.chat_template,
                                max_batch_size=3)
    assert engine.model_name == str(by_name.loaded.path) and engine.max_batch_size == 3
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    cells = [natural(), natural("short", target=SHORT)]  # padded together in one batch
    assert [r["generated_ids"] for r in engine.run(cells)] == \
        [r["generated_ids"] for r in by_name.run(cells)]


def test_a_random_weight_model_without_a_folder_gets_an_in_memory_path(by_name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(by_name.tokenizer)))
    engine = Engine.from_loaded(model, by_name.tokenizer, name="random", chat_template=False)
    assert engine.info()["path"] == "in-memory:random"
    out = engine.run([natural()])[0]
    assert out["status"] == "ok" and len(out["generated_ids"]) == 8


def test_an_encoder_is_refused_naming_the_supported_architectures(by_name):
    bert = BertForMaskedLM(BertConfig(vocab_size=len(by_name.tokenizer), hidden_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="'bert'.*Supported: .*llama"):
        Engine.from_loaded(bert, by_name.tokenizer)


def test_a_decoder_without_a_language_model_head_is_refused(by_name):
    base = LlamaModel(tiny_llama_config(len(by_name.tokenizer)))
    with pytest.raises(UnsupportedArchitectureError,
                       match="LlamaModel is not a decoder with a language-model head.*"
                             "AutoModelForCausalLM"):
        Engine.from_loaded(base, by_name.tokenizer)


def test_something_that_is_not_a_model_is_refused(by_name):
    with pytest.raises(TypeError, match="takes a transformers causal LM.*got str"):
        Engine.from_loaded("tiny-llama", by_name.tokenizer)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokenizer", [None, "not a tokenizer"])
def test_a_missing_tokenizer_is_refused(by_name, tokenizer):
    model, _ = load(by_name)
    with pytest.raises(TypeError, match="needs the model's tokenizer"):
        Engine.from_loaded(model, tokenizer)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(by_name):
    small = AutoModelForCausalLM.from_config(tiny_llama_config(100))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids, the model embeds 100"):
        Engine.from_loaded(small, by_name.tokenizer)
