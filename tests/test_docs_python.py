"""docs/python.md runs as written: its Python blocks, in order, in a fresh folder.

The page is the user's first contact with the API; a block that stopped working would
teach the wrong thing, so each block is executed and any exception fails the test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _run_page(tmp_path, monkeypatch, model: str = "tiny-llama") -> None:
    blocks = [b.replace('"tiny-llama"', f'"{model}"') for b in BLOCK.findall(PAGE.read_text())]
    assert len(blocks) >= 4
    shutil.copytree(REPO / "sweeps", tmp_path / "sweeps")
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{PAGE.name} block {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"docs/python.md block {i + 1} failed: {exc!r}\n{code}") from exc
    assert (tmp_path / "results" / "quickstart" / "report.md").exists()


def test_every_python_block_of_docs_python_runs(tmp_path, monkeypatch):
    _run_page(tmp_path, monkeypatch)


@pytest.mark.slow
def test_docs_python_on_a_real_model(tmp_path, monkeypatch):
    """The same page on SmolLM2-135M-Instruct (its quickstart, engine steps, replicas)."""
    _run_page(tmp_path, monkeypatch, "smollm2-135m")
