"""benchmarks/device_check.py keeps running: its `--small` CPU run, with Ray and pydantic
unimportable (the GPU machine has neither), passes every oracle and prints every row.

The script is run in a subprocess through a wrapper that installs a meta path finder
refusing `ray` and `pydantic`, so an import of either anywhere below the script (the
engine included) fails the test instead of passing here and breaking on the GPU.
Timings are not asserted: only behaviour (oracles, rows, exit codes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"

WRAPPER = """
import runpy, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pydantic"):
            raise ImportError(f"{name} is blocked: the GPU machine has no {name}")
        return None

sys.meta_path.insert(0, Refuse())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

ORACLES = ["natural == reference (padded batch)", "alpha=0 == natural (cache sites, exact)",
           "alpha=0 == natural (prefill sites)", "batched == one by one (mixed batch)",
           "all-layer transplant == source continued"]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    wrapper = tmp_path / "blocked.py"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "device_check.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(wrapper), str(SCRIPT), *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_small_run_passes_every_oracle_without_ray_or_pydantic(tmp_path):
    proc, result = run_check(tmp_path, "--small")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result is not None and result["passed"] is True
    checks = {(c["model"], c["name"]): c for c in result["oracles"]}
    want = [("llama3-8b", n) for n in ORACLES] + [("mistral-7b", n) for n in ORACLES]
    want.append(("mistral-7b", "sliding window 8 == reference"))
    assert sorted(checks) == sorted(want)
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    rows = {(r["model"], r["batch"]): r for r in result["throughput"]}
    assert sorted(rows) == sorted((m, b) for m in ("llama3-8b", "mistral-7b")
                                  for b in (1, 16, 64))
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["engine_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["roofline_tok_s"] > 0
        assert row["new_tokens"] == 16
    meta = result["meta"]
    assert meta["dtype"] == "bfloat16" and meta["small"] is True
    assert meta["models"]["mistral-7b"]["window"] == 8
    assert meta["models"]["mistral-7b"]["real_window"] == 4096
    assert meta["models"]["llama3-8b"]["window"] is None
    # the printed table: one line per oracle and per throughput row
    lines = proc.stdout.splitlines()
    for _model, name in want:
        assert any(name in line and " ok " in line for line in lines), name
    for model, batch in rows:
        assert any(re.match(rf"\s+{model}\s+{batch}\s+[\d.]+\s", line) for line in lines), \
            (model, batch)
    assert "engine tok/s" in proc.stdout and "11/11 oracles passed" in proc.stdout


def test_a_broken_engine_fails_the_run(tmp_path):
    """With the decode masks ignoring the window, the window oracle fails: exit 1."""
    proc, result = run_check(tmp_path, "--small", "--models", "mistral-7b",
                             "--skip-throughput", "--inject-fault", "window")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert result is not None and result["passed"] is False
    failed = {c["name"] for c in result["oracles"] if not c["ok"]}
    assert "sliding window 8 == reference" in failed
    assert "FAILED" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_full_run_says_so_and_exits_2(tmp_path):
    proc, result = run_check(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "--small" in proc.stderr
    assert result is None
