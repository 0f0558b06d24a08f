"""Per-architecture tables: our stable site names -> module paths, and sliding windows.

The engine speaks one vocabulary (`v_proj`, `k_proj`, `resid`, ...) for every model;
this module is the only place that knows where those live in a given HF
implementation (TransformerLens/pyvene style). Supporting a new decoder is one entry
in `ARCHITECTURES`, not a fork of the engine. Everything here works from the config
alone, so `rloop-ray validate` can use it without loading weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from rloop_ray.lookup import did_you_mean

if TYPE_CHECKING:
    from torch import nn

SITE_DOCS: Mapping[str, str] = MappingProxyType(
    {
        "q_proj": "query projection output, before RoPE (and before q_norm where there is one)",
        "k_proj": "key projection output, before RoPE/k_norm: NOT the cached key",
        "v_proj": "value projection output (B, T, n_kv_heads*head_dim): equals the cached value",
        "o_proj": "attention output projection",
        "attn": "the whole self-attention block (output is its first return value)",
        "mlp": "the feed-forward block",
        "resid": "the decoder layer output, i.e. the residual stream after layer l",
        "input_norm": "the norm in front of attention",
    }
)
"""Stable site names and what the module's output is."""

_LLAMA_SITES: Mapping[str, str] = MappingProxyType(
    {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "attn": "self_attn",
        "mlp": "mlp",
        "resid": "",  # "" is the decoder layer itself
        "input_norm": "input_layernorm",
    }
)
_QK_NORM_SITES: Mapping[str, str] = MappingProxyType(
    {**_LLAMA_SITES, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
)
_DECODER_GLOBALS: Mapping[str, str] = MappingProxyType(
    {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
)


@dataclass(frozen=True)
class ArchTable:
    """Where things live in one HF architecture. Paths are `nn.Module.get_submodule` paths."""

    layers: str = "model.layers"
    """The `nn.ModuleList` of decoder layers, from the `*ForCausalLM` root."""
    sites: Mapping[str, str] = field(default_factory=lambda: _LLAMA_SITES)
    """Site name -> path relative to one decoder layer ("" = the layer itself)."""
    globals: Mapping[str, str] = field(default_factory=lambda: _DECODER_GLOBALS)
    """Model-level modules (embedding, final norm, unembedding)."""
    note: str = ""


ARCHITECTURES: dict[str, ArchTable] = {
    "llama": ArchTable(),
    "mistral": ArchTable(note="all layers slide when config.sliding_window is set"),
    "qwen2": ArchTable(note="layers >= max_window_layers slide when use_sliding_window"),
    "qwen3": ArchTable(sites=_QK_NORM_SITES),
    "gemma2": ArchTable(note="alternating sliding/full layers (config.layer_types)"),
    "gemma3_text": ArchTable(sites=_QK_NORM_SITES, note="sliding/full from config.layer_types"),
    "gemma3": ArchTable(
        layers="model.language_model.layers",
        sites=_QK_NORM_SITES,
        globals=MappingProxyType(
            {
                "embed": "model.language_model.embed_tokens",
                "final_norm": "model.language_model.norm",
                "lm_head": "lm_head",
            }
        ),
        note="multimodal wrapper (Gemma3ForConditionalGeneration); text tower only",
    ),
}
"""model_type -> table. Adding a Llama-like decoder is one line here."""


class UnsupportedArchitectureError(ValueError):
    """The model's `model_type` has no entry in `ARCHITECTURES`."""


class UnknownSiteError(KeyError):
    """A site name that the architecture's table does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it as `text_config`)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Per-layer sliding window (None = full attention), from the config only.

    Mirrors what transformers does itself (`cache_utils.get_layer_types_and_kwargs`):
    `config.layer_types` when present (Gemma2/3, Qwen2, ...), otherwise every layer
    slides if `config.sliding_window` is set (Mistral). A window of W means a query
    sees itself and the W-1 positions before it.
    """
    cfg = text_config(config)
    n_layers = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) != n_layers:
            raise ValueError(
                f"config.layer_types has {len(layer_types)} entries for {n_layers} layers"
            )
        if "sliding_attention" in layer_types and window is None:
            raise ValueError("config.layer_types has sliding layers but no sliding_window")
        windows = [int(window) if kind == "sliding_attention" else None for kind in layer_types]
        return tuple(windows)
    if window is not None:
        return tuple(int(window) for _ in range(n_layers))
    return tuple(None for _ in range(n_layers))


def _unsupported_message(model_type: str) -> str:
    hint = did_you_mean(model_type, ARCHITECTURES, n=3, cutoff=0.5)
    return (
        f"Unsupported architecture (model_type) {model_type!r}.{hint} "
        f"Supported: {', '.join(supported_architectures())}. Adding a Llama-like decoder is "
        "one entry in ARCHITECTURES in rloop_ray/engine/adapters.py (layers path + site paths)."
    )


def get_table(model_type: str) -> ArchTable:
    """The table of one model_type, or a clear error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(_unsupported_message(model_type)) from None


class Adapter:
    """One model's view through its architecture table; built from the config only.

    Shapes the engine relies on: cached K/V are (B, n_kv_heads, T, head_dim); the
    `v_proj` site's output is (B, T, n_kv_heads * head_dim).
    """

    def __init__(self, config: Any) -> None:
        cfg = text_config(config)
        outer_type = getattr(config, "model_type", None) or cfg.model_type
        # A multimodal wrapper has its own entry (different layers path); a bare text
        # config is looked up by its own type.
        self.model_type: str = outer_type if outer_type in ARCHITECTURES else cfg.model_type
        self.table: ArchTable = get_table(self.model_type)
        self.config = cfg
        self.n_layers: int = int(cfg.num_hidden_layers)
        self.n_heads: int = int(cfg.num_attention_heads)
        self.n_kv_heads: int = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.hidden_size: int = int(cfg.hidden_size)
        self.head_dim: int = int(
            getattr(cfg, "head_dim", None) or self.hidden_size // self.n_heads
        )
        self.layer_windows: tuple[int | None, ...] = layer_windows(cfg)

    @classmethod
    def from_model(cls, model: nn.Module) -> Adapter:
        return cls(model.config)

    def __repr__(self) -> str:
        return (
            f"Adapter({self.model_type}, layers={self.n_layers}, heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim})"
        )

    # --- names -------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.table.sites)

    def _check_layer(self, layer: int) -> int:
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for {self.n_layers} layers")
        return layer % self.n_layers

    def _site_path(self, site: str) -> str:
        try:
            return self.table.sites[site]
        except KeyError:
            hint = did_you_mean(site, self.table.sites, n=3, cutoff=0.5)
            raise UnknownSiteError(
                f"Unknown site {site!r} for {self.model_type}.{hint} "
                f"Available: {', '.join(self.table.sites)}"
            ) from None

    def module_path(self, site: str, layer: int) -> str:
        """The `get_submodule` path, e.g. `model.layers.6.self_attn.v_proj`."""
        rel = self._site_path(site)
        base = f"{self.table.layers}.{self._check_layer(layer)}"
        return f"{base}.{rel}" if rel else base

    def hook_name(self, site: str, layer: int) -> str:
        """Stable, architecture-independent name, e.g. `blocks.6.v_proj`."""
        self._site_path(site)
        return f"blocks.{self._check_layer(layer)}.{site}"

    # --- modules -----------------------------------------------------------------
    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, in order."""
        try:
            layer_list = model.get_submodule(self.table.layers)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no {self.table.layers!r} although its model_type "
                f"is {self.model_type!r}; fix the `layers` path of its ARCHITECTURES entry"
            ) from None
        layers = list(layer_list)
        if len(layers) != self.n_layers:
            raise ValueError(
                f"{self.table.layers} has {len(layers)} layers, config says {self.n_layers}"
            )
        return layers

    def module(self, model: nn.Module, site: str, layer: int) -> nn.Module:
        """The module whose output is `site` at `layer`."""
        path = self.module_path(site, layer)
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise UnknownSiteError(
                f"site {site!r} -> {path!r} not found in {type(model).__name__}; "
                f"fix the ARCHITECTURES entry for {self.model_type!r}"
            ) from None

    def global_module(self, model: nn.Module, name: str) -> nn.Module:
        """A model-level module: `embed`, `final_norm` or `lm_head`."""
        try:
            path = self.table.globals[name]
        except KeyError:
            raise UnknownSiteError(
                f"Unknown global module {name!r}. Available: {', '.join(self.table.globals)}"
            ) from None
        return model.get_submodule(path)

    # --- sliding windows -----------------------------------------------------------
    def sliding_window(self, layer: int) -> int | None:
        """The window W of `layer` (it attends to itself and W-1 earlier positions), or None."""
        return self.layer_windows[self._check_layer(layer)]

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.layer_windows) if w is not None)

    @property
    def has_sliding_layers(self) -> bool:
        return any(w is not None for w in self.layer_windows)

    def cached_positions(self, layer: int, seq_len: int) -> range:
        """Absolute positions whose K/V a `DynamicCache(config=...)` keeps for `layer`
        after `seq_len` tokens went through it.

        transformers' `DynamicSlidingWindowLayer` keeps only the last W-1 positions
        (the next query supplies the W-th); full layers keep all of them. Cache slot i
        of the layer holds absolute position `cached_positions(...)[i]`.
        """
        window = self.sliding_window(layer)
        if window is None or seq_len < window:
            return range(0, seq_len)
        return range(seq_len - (window - 1), seq_len)
