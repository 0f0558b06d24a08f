"""The second-wave columns in the statistics: `during`, steer cells, `kl_from_natural`,
layer profiles (R_V by depth) and attention per layer.

Each test states numbers computed by hand (or directly with numpy/scipy from the rows as
written), not through the analysis, so a grouping or a reference layer gone wrong shows
up as a mismatch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as ss
from synthetic import Point, make_sweep

from rloop_ray.analysis import make_figures, run_stats, write_report, write_tables
from rloop_ray.analysis.comparisons import IDENTITY_NOTE
from rloop_ray.analysis.labels import identity_kind, metric_columns, normalise_cells
from rloop_ray.analysis.profiles import attention_table, profile_table
from rloop_ray.vocab import GENERATION, PREFILL

N_BOOT = 300
MODEL = "llama-tiny"
C_LABEL = "C: patch recursive->baseline @ kv/mix L=16:32 T=all align=end alpha=1"


def _row(table: pd.DataFrame, **where: object) -> pd.Series:
    sel = pd.Series(True, index=table.index)
    for col, val in where.items():
        sel &= table[col] == val
    hit = table[sel]
    assert len(hit) == 1, f"expected one row for {where}, got {len(hit)}"
    return hit.iloc[0]


def _cells(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Hand-made cells, normalised as the loader does (no `during` unless a row gives it)."""
    base = {"model": "m", "status": "ok", "tokens": "all", "align": "end", "layers": "16:32"}
    return normalise_cells(pd.DataFrame([{**base, "cell_id": f"c{i:02d}", **r}
                                         for i, r in enumerate(rows)]))


NATURAL = {"control": "natural", "site": "none", "alpha": None, "source_id": None,
           "source_group": None}
PATCH = {"control": "patch", "site": "kv", "mode": "mix", "alpha": 1.0,
         "source_group": "recursive", "target_group": "baseline"}


# --- during -----------------------------------------------------------------------------------


def test_during_splits_conditions_and_shows_in_the_label(tmp_path):
    sw = make_sweep(tmp_path, "during", models=(MODEL,), n_prompts=8, controls=("shuffle",),
                    points=(Point(during=PREFILL), Point(during=GENERATION, gain=0.0)), seed=1)
    res = run_stats(sw.path, n_resamples=N_BOOT)
    cond = res.conditions[res.conditions["metric"] == "rv"]
    # natural A, B + 2 points x (C, D, shuffle): the two points are never pooled
    assert len(cond) == 2 + 2 * 3
    gen_label = C_LABEL + " during=generation"
    assert {C_LABEL, gen_label} <= set(cond["condition"])
    w = sw.written
    for during, label in ((PREFILL, C_LABEL), (GENERATION, gen_label)):
        mine = w[(w["control"] == "patch") & (w["target_group"] == "baseline")
                 & (w["during"] == during)]
        row = _row(cond, condition=label)
        assert row["n"] == len(mine) == 8
        assert row["during"] == during
        assert row["mean"] == pytest.approx(mine["rv"].mean())
    suff = res.comparisons[(res.comparisons["comparison"] == "sufficiency")
                           & (res.comparisons["metric"] == "rv")]
    assert sorted(suff["during"]) == [GENERATION, PREFILL]
    # gain 1 at the prefill point, 0 at the generation point: only the first moves R_V
    assert _row(suff, during=PREFILL)["p_fdr"] < 0.05
    assert _row(suff, during=GENERATION)["p_fdr"] >= 0.05
    # the alpha families and the transfer table keep them apart too
    assert sorted(res.transfer.loc[res.transfer["metric"] == "rv", "during"]) == [
        GENERATION, PREFILL]


def test_rows_without_during_keep_the_labels_they_had(tmp_path):
    old = make_sweep(tmp_path, "old", models=(MODEL,), n_prompts=6, controls=("shuffle",))
    new = make_sweep(tmp_path, "new", models=(MODEL,), n_prompts=6, controls=("shuffle",),
                     points=(Point(during=PREFILL),))
    assert "during" not in old.written.columns  # written as before the coordinate existed
    labels = {
        "A: natural baseline", "B: natural recursive", C_LABEL,
        "D: patch baseline->recursive @ kv/mix L=16:32 T=all align=end alpha=1",
        "shuffle recursive->baseline @ kv/mix L=16:32 T=all align=end alpha=1",
    }
    for sw in (old, new):
        res = run_stats(sw.path, n_resamples=N_BOOT)
        assert set(res.conditions["condition"]) == labels
        cells = res.results.cells
        assert set(cells.loc[~cells["is_natural"], "during"]) == {PREFILL}
        assert set(cells.loc[cells["is_natural"], "during"]) == {"-"}
    # a frame built by hand without the column at all reads the same way
    frame = _cells([{**NATURAL, "target_id": "t1", "target_group": "baseline"},
                    {**PATCH, "target_id": "t1", "source_id": "s1"}])
    assert list(frame["condition"]) == ["A: natural baseline", C_LABEL]
    assert list(frame["during"]) == ["-", PREFILL]
    two = _cells([{**PATCH, "target_id": "t1", "source_id": "s1", "during": PREFILL},
                  {**PATCH, "target_id": "t1", "source_id": "s1", "during": "both"}])
    assert two["condition"].nunique() == 2
    assert two["condition"].iloc[1] == C_LABEL + " during=both"


# --- steer ------------------------------------------------------------------------------------


def test_steer_cells_group_by_source_group_and_read_as_a_scale():
    steer = {"control": "patch", "site": "resid", "mode": "steer", "align": "none",
             "target_group": "baseline", "source_id": "mean:recursive"}
    frame = _cells([
        {**steer, "target_id": "t1", "alpha": 2.0, "source_group": "recursive"},
        {**steer, "target_id": "t2", "alpha": 2.0, "source_group": None},  # from the id
        {**steer, "target_id": "t1", "alpha": 2.0, "source_group": "recursive",
         "during": "generation"},
        {**steer, "target_id": "t1", "alpha": 0.0, "source_group": "recursive"},
        {**steer, "target_id": "t1", "alpha": 2.0, "control": "self",
         "source_id": "mean:baseline", "source_group": "baseline"},
    ])
    label = "C: patch recursive->baseline @ resid/steer L=16:32 T=all scale=2"
    assert list(frame["condition"][:3]) == [label, label, label + " during=generation"]
    assert frame["letter"].iloc[1] == "C"
    assert frame["point"].iloc[3] == "resid/steer L=16:32 T=all scale=0"
    kinds = [identity_kind(c, m, a) for c, m, a in
             zip(frame["control"], frame["mode"], frame["alpha"], strict=True)]
    assert kinds == [None, None, None, "alpha0", "self"]


# --- kl_from_natural --------------------------------------------------------------------------


def _first_step(row: dict[str, Any]) -> dict[str, Any]:
    """KL and the top-k lists as the engine writes them: natural rows exactly 0.0; a `self`
    control float noise of 1e-9 (never negative, as KL is); patches a real divergence."""
    i = int(row["pair_index"])
    kl = {"natural": 0.0, "self": 1e-9 * (1 + i % 3), "shuffle": 0.05 + 0.01 * (i % 4)}.get(
        row["control"], 0.2 + 0.03 * i)
    return {"kl_from_natural": kl, "top_ids": [3, 1, 2], "top_logprobs": [-0.1, -2.5, -3.0],
            "token_logprobs": [-0.5] * 4}


@pytest.fixture(scope="module")
def kl_sweep(tmp_path_factory: pytest.TempPathFactory):
    sw = make_sweep(tmp_path_factory.mktemp("kl"), "kl", models=(MODEL,), n_prompts=8,
                    controls=("shuffle", "self"), extra=_first_step, seed=2)
    return sw, run_stats(sw.path, n_resamples=N_BOOT)


def test_kl_is_a_metric_and_the_lists_are_not(kl_sweep):
    sw, res = kl_sweep
    assert "kl_from_natural" in res.metrics
    assert not {"top_ids", "top_logprobs", "token_logprobs"} & set(res.metrics)
    assert not {"top_ids", "top_logprobs"} & set(metric_columns(res.results.cells))
    w = sw.written
    c = w[(w["control"] == "patch") & (w["target_group"] == "baseline")]
    row = _row(res.conditions, condition=C_LABEL, metric="kl_from_natural")
    assert row["n_valid"] == 8
    assert row["mean"] == pytest.approx(np.mean(0.2 + 0.03 * np.arange(8)))
    nat = _row(res.conditions, condition="A: natural baseline", metric="kl_from_natural")
    assert (nat["mean"], nat["sd"]) == (0.0, 0.0)
    # the patch against natural: a paired t of the patched KL against natural's zeros
    suff = _row(res.comparisons, comparison="sufficiency", metric="kl_from_natural")
    ref = ss.ttest_rel(c.sort_values("target_id")["kl_from_natural"].to_numpy(), np.zeros(8))
    assert suff["test"] == "paired_t" and suff["p"] == pytest.approx(ref.pvalue)
    assert np.isfinite(suff["p_fdr"]) and suff["significant"]
    vs = _row(res.comparisons, comparison="control_vs_patch:shuffle", metric="kl_from_natural")
    assert vs["diff"] == pytest.approx(np.mean(0.05 + 0.01 * (np.arange(8) % 4))
                                       - np.mean(0.2 + 0.03 * np.arange(8)))
    assert np.isfinite(vs["p"])


def test_natural_vs_natural_kl_and_an_exact_identity_are_no_tests(kl_sweep):
    _, res = kl_sweep
    cmp = res.comparisons
    group = _row(cmp, comparison="group_effect", metric="kl_from_natural")
    assert math.isnan(group["p"]) and math.isnan(group["cohens_d"])
    assert math.isnan(group["mw_p"]) and math.isnan(group["p_fdr"])
    assert "0 by definition" in group["note"]
    # self: KL of 1e-9..3e-9 against natural's 0. A t test of that noise would give
    # p = 4e-4; it is an identity within tolerance, so there is no test, no d, no rank test.
    self_kl = _row(cmp, comparison="control:self", metric="kl_from_natural")
    noise = 1e-9 * (1 + np.arange(8) % 3)
    assert ss.ttest_1samp(noise, 0.0).pvalue < 1e-3  # what would have been reported
    assert math.isnan(self_kl["p"]) and math.isnan(self_kl["cohens_d"])
    assert math.isnan(self_kl["wilcoxon_p"]) and math.isnan(self_kl["mw_p"])
    assert IDENTITY_NOTE in self_kl["note"]
    assert self_kl["diff"] == pytest.approx(noise.mean())
    # R_V of the synthetic self cells carries fresh noise: not exact, so still tested
    assert np.isfinite(_row(cmp, comparison="control:self", metric="rv")["p"])
    # every p-value that exists is in the one FDR family, and no other
    ps = np.concatenate([cmp["p"].to_numpy(float), res.dose["p"].to_numpy(float),
                         res.correlations["pearson_p"].to_numpy(float),
                         res.correlations["spearman_p"].to_numpy(float)])
    assert res.fdr_family_size == int(np.isfinite(ps).sum())
    assert (cmp["p"].isna() == cmp["p_fdr"].isna()).all()


# --- layer profiles ---------------------------------------------------------------------------


def test_profile_table_hand_computed():
    nat_b = {**NATURAL, "target_group": "baseline"}
    nat_r = {**NATURAL, "target_group": "recursive"}
    frame = _cells([
        {**nat_b, "target_id": "b1", "layer_early": 2, "profile_layers": [2, 4, 6],
         "pr_by_layer": [10.0, 8.0, 5.0], "pr_prompt_by_layer": [12.0, 11.0, 10.0]},
        {**nat_b, "target_id": "b2", "layer_early": 2, "profile_layers": [2, 4, 6],
         "pr_by_layer": [20.0, 10.0, None], "pr_prompt_by_layer": [14.0, 13.0, 12.0]},
        # the early layer (3) is not in the profile: relative to the first profile layer
        {**nat_r, "target_id": "r1", "layer_early": 3, "profile_layers": [2, 4, 6],
         "pr_by_layer": [10.0, 9.0, 6.0], "pr_prompt_by_layer": None},
        # no PR at the reference layer: PR counted, no R_V by depth
        {**nat_r, "target_id": "r2", "layer_early": 3, "profile_layers": [2, 4, 6],
         "pr_by_layer": [None, 7.0, 4.0], "pr_prompt_by_layer": None},
        # no profile recorded: not in the table
        {**nat_r, "target_id": "r3", "layer_early": 3, "profile_layers": None,
         "pr_by_layer": None, "pr_prompt_by_layer": None},
    ])
    prof = profile_table(frame, seed=4, n_resamples=N_BOOT)
    assert len(prof) == 6  # 2 conditions x 3 layers
    b4 = _row(prof, condition="A: natural baseline", layer=4)
    assert (b4["n"], b4["n_valid"], b4["mean_pr"], b4["mean_pr_prompt"]) == (2, 2, 9.0, 12.0)
    assert b4["mean_rv_depth"] == pytest.approx((8 / 10 + 10 / 20) / 2)  # 0.65
    assert (b4["reference"], b4["reference_layer"]) == ("layer_early (L2)", 2.0)
    boot = ss.bootstrap((np.array([8.0, 10.0]),), np.mean, n_resamples=N_BOOT,
                        method="percentile", rng=np.random.default_rng(4)).confidence_interval
    assert (b4["pr_ci_low"], b4["pr_ci_high"]) == pytest.approx((boot.low, boot.high))
    b6 = _row(prof, condition="A: natural baseline", layer=6)
    assert (b6["n"], b6["n_valid"], b6["mean_pr"], b6["mean_rv_depth"]) == (2, 1, 5.0, 0.5)
    assert math.isnan(b6["pr_ci_low"]) and "1 cells without a PR" in b6["note"]
    assert _row(prof, condition="A: natural baseline", layer=2)["mean_rv_depth"] == 1.0
    r4 = _row(prof, condition="B: natural recursive", layer=4)
    assert (r4["n"], r4["mean_pr"], r4["n_rv_valid"]) == (2, 8.0, 1)
    assert r4["mean_rv_depth"] == pytest.approx(0.9)
    assert r4["reference"] == "first profile layer (L2)"
    assert r4["n_prompt_valid"] == 0 and math.isnan(r4["mean_pr_prompt"])
    assert "without a PR at their reference layer" in r4["note"]
    assert _row(prof, condition="B: natural recursive", layer=6)["mean_rv_depth"] == \
        pytest.approx(0.6)


PROFILE = [0, 8, 16, 24]


def _profile(row: dict[str, Any]) -> dict[str, Any]:
    """A layer profile that contracts with depth, more for recursive targets; attention
    with a patched mass only where a position was patched."""
    i = int(row["pair_index"])
    shrink = 0.04 if row["target_group"] == "recursive" else 0.01
    pr = [10.0 + 0.5 * (i % 3) - shrink * layer * (1 + 0.1 * (i % 2)) for layer in PROFILE]
    natural = row["control"] == "natural"
    return {
        "layer_early": 8, "profile_layers": PROFILE, "pr_by_layer": pr,
        "pr_prompt_by_layer": [p + 1.0 for p in pr],
        "attn_entropy": [1.0 + 0.1 * i, 2.0 + 0.1 * i, 3.0],
        "attn_mass_prompt": [0.9, 0.8 - 0.01 * i, 0.7],
        "attn_mass_generated": [0.1, 0.2 + 0.01 * i, 0.3],
        "attn_mass_patched": None if natural else [0.05, 0.02 * i, 0.01],
    }


@pytest.fixture(scope="module")
def profile_sweep(tmp_path_factory: pytest.TempPathFactory):
    sw = make_sweep(tmp_path_factory.mktemp("profiles"), "profiles",
                    models=(MODEL, "mistral-tiny"), n_prompts=6, controls=("shuffle",),
                    extra=_profile, seed=3)
    return sw, run_stats(sw.path, n_resamples=N_BOOT, seed=1)


def test_profile_table_of_a_sweep_matches_the_rows(profile_sweep):
    sw, res = profile_sweep
    prof = res.profiles
    n_conditions = res.conditions.groupby("model")["condition"].nunique().sum()
    assert len(prof) == n_conditions * len(PROFILE)
    w = sw.written[sw.written["model"] == MODEL]
    for group, letter in (("baseline", "A"), ("recursive", "B")):
        mine = w[(w["control"] == "natural") & (w["target_group"] == group)]
        pr = np.array(mine["pr_by_layer"].tolist())
        rv = pr / pr[:, [PROFILE.index(8)]]  # the early layer is in the profile
        for k, layer in enumerate(PROFILE):
            row = _row(prof, model=MODEL, letter=letter, layer=layer)
            assert row["n"] == row["n_valid"] == 6
            assert row["mean_pr"] == pytest.approx(pr[:, k].mean())
            assert row["mean_pr_prompt"] == pytest.approx(pr[:, k].mean() + 1.0)
            assert row["mean_rv_depth"] == pytest.approx(rv[:, k].mean())
            assert row["reference"] == "layer_early (L8)"
            assert row["pr_ci_low"] <= row["mean_pr"] <= row["pr_ci_high"]
    deep_b = _row(prof, model=MODEL, letter="B", layer=24)["mean_rv_depth"]
    deep_a = _row(prof, model=MODEL, letter="A", layer=24)["mean_rv_depth"]
    assert deep_b < deep_a < 1.0  # recursive prompts contract more (as built)
    # the list columns are no metrics
    assert not {"pr_by_layer", "attn_entropy", "profile_layers"} & set(res.metrics)


def test_attention_table_hand_computed():
    frame = _cells([
        {**NATURAL, "target_group": "baseline", "target_id": "b1",
         "attn_entropy": [1.0, 2.0], "attn_mass_prompt": [0.9, 0.6],
         "attn_mass_generated": [0.1, 0.4], "attn_mass_patched": None},
        {**NATURAL, "target_group": "baseline", "target_id": "b2",
         "attn_entropy": [3.0, 5.0], "attn_mass_prompt": [0.7, 0.5],
         "attn_mass_generated": [0.3, 0.5], "attn_mass_patched": None},
        {**PATCH, "target_id": "b1", "source_id": "r1", "attn_entropy": [2.0, 2.5],
         "attn_mass_prompt": [0.8, 0.8], "attn_mass_generated": [0.2, 0.2],
         "attn_mass_patched": [0.3, 0.1]},
        {**PATCH, "target_id": "b2", "source_id": "r2", "attn_entropy": [4.0, 3.5],
         "attn_mass_prompt": [0.6, 0.7], "attn_mass_generated": [0.4, 0.3],
         "attn_mass_patched": [0.5, None]},
    ])
    att = attention_table(frame)
    assert len(att) == 4  # 2 conditions x 2 layers
    a1 = _row(att, condition="A: natural baseline", layer=1)
    assert (a1["n"], a1["mean_entropy"]) == (2, 3.5)
    assert (a1["mean_mass_prompt"], a1["mean_mass_generated"]) == pytest.approx((0.55, 0.45))
    assert a1["n_patched"] == 0 and math.isnan(a1["mean_mass_patched"])
    assert "no cell of this condition patched a position" in a1["note"]
    c0 = _row(att, condition=C_LABEL, layer=0)
    assert (c0["mean_entropy"], c0["n_patched"]) == (3.0, 2)
    assert c0["mean_mass_patched"] == pytest.approx(0.4)
    c1 = _row(att, condition=C_LABEL, layer=1)
    assert (c1["n_patched"], c1["mean_mass_patched"]) == (1, 0.1)
    assert "over the 1 cells that patched" in c1["note"]


def test_attention_table_of_a_sweep_matches_the_rows(profile_sweep):
    sw, res = profile_sweep
    att = res.attention
    w = sw.written[(sw.written["model"] == MODEL) & (sw.written["status"] == "ok")]
    c = w[(w["control"] == "patch") & (w["target_group"] == "baseline")]
    row = _row(att, model=MODEL, condition=C_LABEL, layer=1)
    assert row["n"] == row["n_patched"] == len(c)
    assert row["mean_entropy"] == pytest.approx(np.mean([e[1] for e in c["attn_entropy"]]))
    assert row["mean_mass_patched"] == pytest.approx(
        np.mean([m[1] for m in c["attn_mass_patched"]]))
    nat = _row(att, model=MODEL, letter="A", layer=1)
    assert nat["n_patched"] == 0 and math.isnan(nat["mean_mass_patched"])


def test_tables_figure_and_report(profile_sweep, tmp_path):
    sw, res = profile_sweep
    written = {p.name for p in write_tables(res, tmp_path / "stats")}
    assert {"profiles.parquet", "attention.parquet"} <= written
    back = pd.read_parquet(tmp_path / "stats" / "profiles.parquet")
    assert len(back) == len(res.profiles)
    figures = {f.name: f for f in make_figures(res, tmp_path / "figures")}
    depth = figures["rv_by_depth"]
    assert depth.skipped is None and depth.path.is_file() and depth.svg.is_file()
    with Image.open(depth.path) as im:
        assert min(im.info["dpi"]) >= 159.5 and im.size[0] > 300
    assert "reference" in depth.caption
    out = write_report(sw.path, n_resamples=N_BOOT)
    md = out.markdown.read_text()
    assert "**R_V by depth (natural cells)**" in md and "figures/rv_by_depth.png" in md
    assert "### Layer profiles" in md and "### Attention by layer" in md
    assert "stats/profiles.parquet" in md


def test_no_profile_no_depth_figure_and_no_new_sections(kl_sweep, tmp_path):
    _, res = kl_sweep
    assert res.profiles.empty and res.attention.empty
    names = {f.name for f in make_figures(res, tmp_path / "figures")}
    assert "rv_by_depth" not in names and "rv_by_group" in names
