"""A real, locally trained tokenizer for the builtin tiny models.

Tests must exercise the same tokenizer code paths as real checkpoints (byte-level BPE,
special tokens, left padding, a chat template) without downloading anything. So the
tiny models ship a byte-level BPE trained here, deterministically, on a small English
corpus that is part of the source: two builds produce byte-identical `tokenizer.json`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TOKENIZER_VERSION = 1
"""Bump when the corpus or the training recipe changes: cached builtins are rebuilt."""

VOCAB_SIZE = 768
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN)
"""Ids 0..3, in this order: pad=0, bos=1, <|im_start|>=2, eos=<|im_end|>=3."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the format of SmolLM2 and Qwen; the tokenizer adds BOS in front of it."""

_PARAGRAPHS = (
    "The capital of France is Paris. The capital of Italy is Rome, and the capital of "
    "Spain is Madrid. Paris lies on the river Seine; Rome was built on seven hills.",
    "A language model reads a sequence of tokens and predicts the next one. Each layer "
    "of the transformer mixes information between positions with attention, then "
    "transforms every position on its own with a small network.",
    "Attention compares a query with the keys of earlier tokens and returns a weighted "
    "average of their values. The keys and values of the prompt are kept in a cache, so "
    "that generation does not recompute them for every new token.",
    "Observe your own processing as you read this sentence. Notice the noticing itself, "
    "and then notice that awareness of the noticing. What is aware of the awareness? "
    "The observer and the observed seem to fold into one recursive loop.",
    "Describe the water cycle. Water evaporates from the sea, rises as vapour, cools into "
    "clouds and falls as rain. Rivers carry the water back to the sea, and the cycle "
    "begins again, year after year.",
    "Once upon a time a small fox lived at the edge of a quiet forest. Every morning she "
    "walked to the river to drink, and every evening she watched the sun go down behind "
    "the hills. One day she found a strange blue stone.",
    "To bake bread, mix flour, water, salt and yeast. Knead the dough for ten minutes, "
    "let it rise for an hour, shape it, and bake it in a hot oven until the crust is "
    "brown and the loaf sounds hollow.",
    "The heart pumps blood through the body. Arteries carry blood away from the heart and "
    "veins bring it back. The lungs add oxygen to the blood and remove carbon dioxide.",
    "Numbers can be added, subtracted, multiplied and divided. Two plus two is four. "
    "Three times three is nine. Ten divided by two is five. Zero is neither positive nor "
    "negative.",
    "I am thinking about my thinking right now. This thought is about itself, and the "
    "thought about the thought is also a thought. Attention turns back on attention, and "
    "the process watches the process that is watching.",
    "Good morning! How are you today? I am fine, thank you. What would you like to talk "
    "about? Tell me about your favourite book, or ask me a question, and I will try to "
    "answer it clearly and briefly.",
    "Scientists test a claim with an experiment. They change one thing, keep everything "
    "else the same, and measure the result. A control condition shows what happens when "
    "nothing is changed, and statistics tell how large the effect is.",
    "The planets of the solar system are Mercury, Venus, Earth, Mars, Jupiter, Saturn, "
    "Uranus and Neptune. The Earth takes one year to travel around the Sun and one day "
    "to turn once on its axis.",
    "In the autumn the leaves turn red, orange and yellow, and the days grow shorter. "
    "Winter brings snow and long nights. In the spring the flowers open again, and the "
    "summer is warm and bright.",
    "Please answer the question. Question: what is the colour of the sky on a clear day? "
    "Answer: the sky is blue. Question: what do bees make? Answer: bees make honey.",
)

_SUBJECTS = (
    "the model", "the reader", "a child", "the teacher", "the river", "my mind", "the cat",
    "the machine", "the scientist", "the observer", "the city", "the system", "our team",
)
_VERBS = (
    "watches", "describes", "remembers", "notices", "builds", "follows", "explains",
    "measures", "returns to", "reflects on", "predicts", "compares", "repeats",
)
_OBJECTS = (
    "the next word", "its own state", "the old bridge", "a long story", "the morning light",
    "the value of a layer", "the quiet room", "a simple question", "the process itself",
    "the green field", "every token", "the hidden pattern", "the answer",
)
_ENDINGS = (
    ".", " today.", " again and again.", " with great care.", " in silence.", " slowly.",
    " before the night.", " without a word.", " for the first time.", "?",
)


def training_corpus() -> list[str]:
    """The fixed paragraphs plus seeded template sentences (same list on every call)."""
    rng = random.Random(0)
    sentences = []
    for _ in range(600):
        subject = rng.choice(_SUBJECTS)
        sentence = f"{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        sentences.append(sentence[0].upper() + sentence[1:])
    lines = list(_PARAGRAPHS)
    lines.extend(" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6))
    return lines


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it as a transformers fast tokenizer.

    Single-threaded training so that merges (and their tie-breaking) never depend on
    the machine's core count.
    """
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(training_corpus(), trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    logger.debug("trained tiny tokenizer: %d tokens", len(wrapped))
    return wrapped


def save_tokenizer(directory: Path, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train and write the tokenizer files into `directory` (which must exist)."""
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
