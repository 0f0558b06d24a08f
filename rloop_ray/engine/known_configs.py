"""Config facts of the hub models the shipped sweeps name, for when the hub cannot be read.

Why it exists: `rloop-ray validate` (and the pre-flight of `rloop-ray sweep`) checks
layer specs, R_V layers and prompt lengths against each model's depth and context. On a
laptop without network, behind a firewall, or for a gated repo without a token, the
hub's `config.json` cannot be read, and a validate that waits ~50 s for retries and
then fails teaches people to pass `--skip-model-check`, which skips every check. These
few numbers are public and do not change for a published revision, so they are kept
here and used only when neither the local HF cache nor the hub answers; `model_info`
then says so in its `note`.

Pure data: no torch, no transformers. Every number is the value of the named field in
the repository's `config.json` on the hub's `main` branch (head_dim where the file has
no `head_dim` is `hidden_size / num_attention_heads`, as transformers computes it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KNOWN_CONFIGS", "KnownConfig", "known_config"]


@dataclass(frozen=True)
class KnownConfig:
    """The `config.json` fields that `model_info`, the context check and the memory model use."""

    hub_id: str
    model_type: str
    architecture: str
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None  # Mistral: every layer slides when set
    rope_theta: float
    tie_word_embeddings: bool
    provenance: str

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: its window or None; these architectures slide on every layer or none."""
        return tuple(self.sliding_window for _ in range(self.n_layers))


_LLAMA3_8B = dict(
    model_type="llama", architecture="LlamaForCausalLM", n_layers=32, n_heads=32,
    n_kv_heads=8, head_dim=128, hidden_size=4096, intermediate_size=14336,
    vocab_size=128256, max_position_embeddings=8192, sliding_window=None,
    rope_theta=500000.0, tie_word_embeddings=False,
)
"""Meta-Llama-3-8B and -Instruct share every shape field (they differ in eos_token_id):
num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, hidden_size 4096
(head_dim 4096/32 = 128), intermediate_size 14336, vocab_size 128256,
max_position_embeddings 8192, rope_theta 500000.0, no sliding_window,
tie_word_embeddings false."""

_MISTRAL_7B = dict(
    model_type="mistral", architecture="MistralForCausalLM", n_layers=32, n_heads=32,
    n_kv_heads=8, head_dim=128, hidden_size=4096, intermediate_size=14336,
    max_position_embeddings=32768, tie_word_embeddings=False,
)
"""Shapes common to every Mistral-7B release: num_hidden_layers 32, num_attention_heads
32, num_key_value_heads 8, hidden_size 4096 (head_dim 128), intermediate_size 14336,
max_position_embeddings 32768, tie_word_embeddings false. They differ in vocab_size,
sliding_window and rope_theta (per entry below)."""

KNOWN_CONFIGS: dict[str, KnownConfig] = {
    c.hub_id: c
    for c in (
        KnownConfig("meta-llama/Meta-Llama-3-8B", **_LLAMA3_8B,
                    provenance="config.json of meta-llama/Meta-Llama-3-8B (gated), main"),
        KnownConfig("meta-llama/Meta-Llama-3-8B-Instruct", **_LLAMA3_8B,
                    provenance="config.json of meta-llama/Meta-Llama-3-8B-Instruct (gated), "
                               "main; sweeps/*.yaml model llama3-8b"),
        # v0.1: vocab_size 32000, sliding_window 4096, rope_theta 10000.0
        KnownConfig("mistralai/Mistral-7B-v0.1", **_MISTRAL_7B, vocab_size=32000,
                    sliding_window=4096, rope_theta=10000.0,
                    provenance="config.json of mistralai/Mistral-7B-v0.1, main; "
                               "sweeps/*.yaml model mistral-7b"),
        KnownConfig("mistralai/Mistral-7B-Instruct-v0.1", **_MISTRAL_7B, vocab_size=32000,
                    sliding_window=4096, rope_theta=10000.0,
                    provenance="config.json of mistralai/Mistral-7B-Instruct-v0.1, main"),
        # v0.2 Instruct: the window was dropped (sliding_window null), rope_theta 1e6
        KnownConfig("mistralai/Mistral-7B-Instruct-v0.2", **_MISTRAL_7B, vocab_size=32000,
                    sliding_window=None, rope_theta=1000000.0,
                    provenance="config.json of mistralai/Mistral-7B-Instruct-v0.2, main"),
        # v0.3: the vocabulary was extended to 32768; no window, rope_theta 1e6
        KnownConfig("mistralai/Mistral-7B-v0.3", **_MISTRAL_7B, vocab_size=32768,
                    sliding_window=None, rope_theta=1000000.0,
                    provenance="config.json of mistralai/Mistral-7B-v0.3, main"),
        KnownConfig("mistralai/Mistral-7B-Instruct-v0.3", **_MISTRAL_7B, vocab_size=32768,
                    sliding_window=None, rope_theta=1000000.0,
                    provenance="config.json of mistralai/Mistral-7B-Instruct-v0.3, main "
                               "(docs/models.md example)"),
    )
}
"""Hub id -> its config facts. A test checks that every hub id a shipped sweep names is
here, so `rloop-ray validate sweeps/*.yaml` works offline."""


def known_config(hub_id: str) -> KnownConfig | None:
    """The shipped facts of `hub_id`, or None (matching is exact: ids are case-sensitive)."""
    return KNOWN_CONFIGS.get(hub_id)
