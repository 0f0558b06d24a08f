"""docs/findings.md: every number comes from a committed stats table, and every sweep that
the findings name validates offline.

`scripts/findings.py build` renders docs/findings.md from docs/findings/template.md and the
tables under docs/findings/<sweep>/stats/. These tests re-render it (so the document
cannot drift from the tables), check a sample of its numbers against the tables read
directly with pandas (so the queries cannot silently read the wrong row), and run
`rloop-ray validate` on every grid under sweeps/ with the hub unreachable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from rloop_ray.cli import app

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "findings.md"
TABLES = REPO / "docs" / "findings"
SWEEPS = sorted((REPO / "sweeps").rglob("*.yaml"))


def _load_findings():
    spec = importlib.util.spec_from_file_location("findings", REPO / "scripts" / "findings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["findings"] = module
    spec.loader.exec_module(module)
    return module


F = _load_findings()


def test_the_document_is_rendered_from_the_committed_tables() -> None:
    assert DOC.read_text() == F.render(), "run: python scripts/findings.py build"


def test_every_claim_and_next_step_has_a_row_with_a_verdict_per_model() -> None:
    keys = [f.key for f in F.findings()]
    assert keys == [f"P{i}" for i in range(1, 10)] + [f"N{i}" for i in range(1, 8)]
    text, values = DOC.read_text(), F.values()
    table = text[text.index("| # |"):]
    for key in keys:
        assert f"| [{key}](#{key.lower()}) |" in table
        for model in F.MODELS:
            assert values[f"{key}.{model}.verdict"], (key, model)


def _comparison(sweep: str, **where: object) -> pd.Series:
    df = pd.read_parquet(TABLES / sweep / "stats" / "comparisons.parquet")
    for key, want in where.items():
        if key == "a_has":
            df = df[df["a"].str.contains(want, regex=False)]
        else:
            df = df[df[key].astype(str) == str(want)]
    assert len(df) == 1, where
    return df.iloc[0]


SAMPLE = [  # (sweep, filters): one row each of comparisons.parquet
    ("smollm2_p5_kv_transfer", {"model": "smollm2-135m", "comparison": "sufficiency",
                                "metric": "score_logprob_contrast", "mode": "transplant"}),
    ("smollm2_p5_kv_transfer", {"model": "gemma3-270m", "comparison": "sufficiency",
                                "metric": "score_logprob_contrast", "mode": "transplant"}),
    ("smollm2_p1_rv_layers", {"model": "smollm2-135m", "comparison": "group_effect",
                              "metric": "rv_prompt", "a": "B: natural recursive",
                              "b": "A: natural baseline"}),
    ("smollm2_p4_resid_patch", {"model": "gemma3-270m", "comparison": "sufficiency",
                                "metric": "score_logprob_contrast", "layers": "all"}),
    ("smollm2_p7_token_localization", {"model": "smollm2-135m", "comparison": "sufficiency",
                                       "metric": "score_logprob_contrast",
                                       "layers": "84.375%", "tokens": "last:16"}),
    ("smollm2_next_keyword_positions", {"model": "gemma3-270m", "comparison": "necessity",
                                        "metric": "score_logprob_contrast",
                                        "tokens": F.KW}),
]


@pytest.mark.parametrize(("sweep", "where"), SAMPLE, ids=[s for s, _ in SAMPLE])
def test_a_sample_of_numbers_matches_the_tables(sweep: str, where: dict) -> None:
    row = _comparison(sweep, **where)
    expected = (f"d = {row['cohens_d']:+.2f} [{row['d_ci_low']:.2f}, {row['d_ci_high']:.2f}], "
                f"p_fdr = {F.fmt_p(row['p_fdr'])}")
    assert expected in DOC.read_text()


def test_transfer_and_dose_numbers_match_the_tables() -> None:
    text = DOC.read_text()
    t = pd.read_parquet(TABLES / "smollm2_p6_layer_localization" / "stats" / "transfer.parquet")
    row = t[(t.model == "smollm2-135m") & (t.layers == "50%:100%")
            & (t.metric == "score_logprob_contrast")].iloc[0]
    assert (f"transfer 50%:100%: {100 * row['efficiency']:.0f}% [{100 * row['eff_ci_low']:.0f}, "
            f"{100 * row['eff_ci_high']:.0f}]") in text
    d = pd.read_parquet(TABLES / "smollm2_p8_alpha_mixing" / "stats" / "dose_response.parquet")
    row = d[(d.model == "gemma3-270m") & (d.factor == "alpha") & (d.layers == "50%:100%")
            & (d.control == "patch") & (d.metric == "score_logprob_contrast")].iloc[0]
    assert f"rho = {row['rho']:+.2f} (n = {row['n']}), p_fdr = {F.fmt_p(row['p_fdr'])}" in text


def test_every_committed_table_is_small() -> None:
    files = [p for p in TABLES.rglob("*") if p.is_file()]
    assert files
    largest = max(files, key=lambda p: p.stat().st_size)
    assert largest.stat().st_size < 1_000_000, largest


def test_the_old_path_points_here() -> None:
    old = (REPO / "docs" / "findings-smollm2.md").read_text()
    assert "(findings.md)" in old


@pytest.mark.parametrize("path", SWEEPS, ids=[str(p.relative_to(REPO)) for p in SWEEPS])
def test_every_sweep_validates_offline(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub ids: the shipped config table
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("OK")
