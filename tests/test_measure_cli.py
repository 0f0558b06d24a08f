"""`rloop-ray measure` (Experiment A): rows per (prompt, layer), R_V table, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from rloop_ray.cli import app
from rloop_ray.engine import Engine
from rloop_ray.engine.geometry import participation_ratio

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

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
    engine = Engine("tiny-llama", chat_template=False)  # as `measure` encodes by default
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


@pytest.mark.parametrize(("lines", "needle"), [
    ([PROMPTS[0], PROMPTS[1], {**PROMPTS[1], "text": "Another text, same id."}],
     ["p.jsonl:3", "duplicate prompt id 'b1'", "first at line 2"]),
    ([PROMPTS[0], {"id": "e1", "text": "   "}], ["p.jsonl:2", "'e1'", "empty text"]),
    ([PROMPTS[0], {"id": "n1", "text": None}], ["p.jsonl:2", "text must be a string"]),
])
def test_measure_refuses_duplicate_ids_and_empty_texts(tmp_path, lines, needle):
    """A duplicate id used to be averaged into one R_V row; an empty text has no tokens."""
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(p) for p in lines) + "\n")
    out = tmp_path / "x.parquet"
    res = runner.invoke(app, ["measure", "--model", "tiny-llama", "--prompts", str(src),
                              "--out", str(out)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert all(n in text for n in needle), res.output
    assert not out.exists()


def test_measure_reads_a_yaml_prompt_file(tmp_path, tiny_llama_path, monkeypatch):
    from rloop_ray.engine import models

    monkeypatch.setenv(models.CACHE_ENV, str(tiny_llama_path.parent))
    src = tmp_path / "bank.yaml"
    src.write_text("provenance: {}\nprompts:\n"
                   + "".join(f"- {{id: {p['id']}, group: {p['group']}, level: 1, "
                             f"text: '{p['text']}'}}\n" for p in PROMPTS))
    out = tmp_path / "rv.parquet"
    res = runner.invoke(app, ["measure", "--model", "tiny-llama", "--prompts", str(src),
                              "--window", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert set(pd.read_parquet(out).prompt_id) == {"r1", "b1"}
    dup = tmp_path / "dup.yaml"
    dup.write_text("provenance: {}\nprompts:\n- {id: a, group: g, text: x}\n"
                   "- {id: a, group: g, text: y}\n")
    res = runner.invoke(app, ["measure", "--model", "tiny-llama", "--prompts", str(dup),
                              "--out", str(out)])
    assert res.exit_code == 2 and "dup.yaml:4" in res.output and "duplicate prompt id" in \
        res.output


def test_measure_reads_the_shipped_bank_directory():
    from rloop_ray.cli.measure import read_prompts

    rows = read_prompts(REPO / "prompts")
    assert len(rows) == len({r["id"] for r in rows}) >= 100
    assert {r["group"] for r in rows} >= {"baseline", "recursive"}
