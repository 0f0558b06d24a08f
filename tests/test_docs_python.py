"""docs/python.md runs as written: its Python blocks, in order, in a fresh folder.

The page is the user's first contact with the API; a block that stopped working would
teach the wrong thing, so each block is executed and any exception fails the test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def test_every_python_block_of_docs_python_runs(tmp_path, monkeypatch):
    blocks = BLOCK.findall(PAGE.read_text())
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
