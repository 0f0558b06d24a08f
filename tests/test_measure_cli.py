"""`rloop-ray measure` (Experiment A): rows per (prompt, layer), R_V table, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from rloop_ray.cli import app
from rloop_ray.engine import Engine
from rloop_ray.engine.geometry import participation_ratio

runner = CliRunner()

PROMPTS = [
    {"id": "r1", "group": "recursive",
     "text": "Notice the noticing itself as you read this sentence about your reading of it."},
    {"id": "b1", "group": "baseline",
     "text": "Explain how a river carves a canyon through rock over thousands of years."},
]


def test_measure_writes_rows_and_prints_rv_by_group(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    out = tmp_path / "rv.parquet"
    res = runner.invoke(app, ["measure", "--model", "tiny-llama", "--prompts", str(src),
                              "--window", "4", "--out", str(out), "--early", "0",
                              "--late", "3"])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out)
    assert list(table.columns[:6]) == ["prompt_id", "group", "layer", "n_tokens", "pr",
                                       "effective_rank"]
    engine = Engine("tiny-llama")
    assert len(table) == 2 * engine.n_layers
    # oracle: PR of V (the cached values of a plain prefill of the whole prompt)
    import torch
    from transformers import DynamicCache

    ids = engine.tokenize(PROMPTS[0]["text"])
    cache = DynamicCache()
    with torch.no_grad():
        engine.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    v = cache.layers[3].values[0]
    want = participation_ratio(v.permute(1, 0, 2).reshape(len(ids), -1)[-4:])
    got = table[(table.prompt_id == "r1") & (table.layer == 3)].pr.item()
    assert got == pytest.approx(want, rel=1e-6)
    assert "recursive" in res.output and "baseline" in res.output and "R_V" in res.output


def test_measure_names_the_bad_line(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(PROMPTS[0]) + "\n{not json\n")
    res = runner.invoke(app, ["measure", "--model", "tiny-llama", "--prompts", str(src),
                              "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 2
    assert "p.jsonl:2" in res.output
    assert not (tmp_path / "x.parquet").exists()
