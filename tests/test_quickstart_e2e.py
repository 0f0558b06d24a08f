"""The README's main job end to end: quickstart sweep on smollm2-135m, resume, stats.

Slow tier (about 2-3 minutes on 2 CPU cores): real model, real local Ray, the real CLI.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from rloop_ray.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.ray]

runner = CliRunner()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    res = runner.invoke(app, ["sweep", "sweeps/quickstart.yaml", "--results-dir", str(out)])
    assert res.exit_code == 0, res.output
    return out / "quickstart"


def test_quickstart_leaves_a_complete_results_folder(quickstart):
    manifest = json.loads((quickstart / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    cells = pd.read_parquet(quickstart / "cells")
    assert len(cells) == cells.cell_id.nunique() == 54
    assert (cells.status == "ok").all()
    for col in ("cell_id", "model", "source_id", "target_id", "source_group", "target_group",
                "site", "mode", "layers", "tokens", "align", "alpha", "control", "seed",
                "n_patched_positions", "generated_ids", "generated_text", "rv", "pr_early",
                "pr_late", "score_keywords", "score_logprob_contrast", "status", "attempt",
                "worker", "seconds"):
        assert col in cells.columns, col
    # oracles hold in the real table: alpha=0 and self reproduce natural, token for token
    natural = cells[cells.control == "natural"].set_index("target_id").generated_ids
    for _, row in cells[(cells.alpha == 0.0) | (cells.control == "self")].iterrows():
        assert list(row.generated_ids) == list(natural[row.target_id])


def test_resume_of_a_complete_sweep_runs_nothing(quickstart):
    res = runner.invoke(app, ["sweep", "sweeps/quickstart.yaml", "--results-dir",
                              str(quickstart.parent), "--resume"])
    assert res.exit_code == 0, res.output
    cells = pd.read_parquet(quickstart / "cells")
    assert len(cells) == cells.cell_id.nunique() == 54
    st = runner.invoke(app, ["status", str(quickstart)])
    assert st.exit_code == 0 and "54" in st.output


def test_stats_on_the_real_table_match_scipy(quickstart):
    res = runner.invoke(app, ["stats", str(quickstart)])
    assert res.exit_code == 0, res.output
    cells = pd.read_parquet(quickstart / "cells")
    comps = pd.read_parquet(quickstart / "stats" / "comparisons.parquet")
    metric = "score_logprob_contrast"
    row = comps[(comps.comparison == "sufficiency") & (comps.metric == metric)
                & (comps.layers == "50%:100%") & (comps.alpha == 1.0)].iloc[0]
    a = cells[(cells.control == "natural") & (cells.target_group == "baseline")]
    c = cells[(cells.control == "patch") & (cells.layers == "50%:100%") & (cells.alpha == 1.0)]
    a = a.groupby("target_id")[metric].mean()
    c = c.groupby("target_id")[metric].mean()
    want = sps.ttest_rel(c.loc[a.index], a)
    assert row.test == "paired_t"
    assert row.statistic == pytest.approx(want.statistic, rel=1e-9)
    assert row.p == pytest.approx(want.pvalue, rel=1e-9)
    assert (quickstart / "report.md").read_text().count("## ") >= 3
    assert (quickstart / "report.html").exists()
