"""Every statistic of rloop_ray.analysis against a direct scipy computation.

The synthetic sweeps (tests/synthetic.py, written through the store) have known effects;
the direct computations here read the rows as written, without going through the loader,
so a bug in loading, grouping or pairing shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss
from synthetic import Effects, Point, make_sweep

from rloop_ray.analysis import derive_notes, load_results, run_stats, write_tables
from rloop_ray.analysis.effects import transfer_efficiency
from rloop_ray.analysis.estimators import d_confidence_interval, spearman
from rloop_ray.analysis.labels import normalise_cells
from rloop_ray.plan import Plan
from rloop_ray.store import ResultStore

N_BOOT = 300
MODEL = "llama-tiny"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stats")
    return make_sweep(
        root, "effects", models=(MODEL, "mistral-tiny"), n_prompts=12,
        points=(Point(layers="16:32", gain=1.0), Point(layers="0:16", gain=0.0)),
        alphas=(0.0, 0.5, 1.0), fail_every=41, nan_rv_every=31, stale_rows=3,
        duplicate_rows=2, effects=Effects(model_scale={"mistral-tiny": 0.5}), seed=3,
    )


@pytest.fixture(scope="module")
def result(sweep):
    return run_stats(sweep.path, n_resamples=N_BOOT, seed=7)


def _ok(frame: pd.DataFrame, **where: object) -> pd.DataFrame:
    sel = frame["status"] == "ok"
    for col, val in where.items():
        sel &= frame[col] == val
    return frame[sel]


def _values(frame: pd.DataFrame, metric: str, **where: object) -> np.ndarray:
    return _ok(frame, **where)[metric].dropna().to_numpy(float)


def _row(table: pd.DataFrame, **where: object) -> pd.Series:
    sel = pd.Series(True, index=table.index)
    for col, val in where.items():
        sel &= table[col] == val
    hit = table[sel]
    assert len(hit) == 1, f"expected one row for {where}, got {len(hit)}"
    return hit.iloc[0]


# --- per condition --------------------------------------------------------------------------


def test_condition_summary_matches_scipy(sweep, result):
    w = sweep.written
    natural_a = w[(w["model"] == MODEL) & (w["control"] == "natural")
                  & (w["target_group"] == "baseline")]
    values = _values(natural_a, "rv")
    row = _row(result.conditions, model=MODEL, letter="A", metric="rv")
    assert row["n"] == len(natural_a)
    assert row["n_failed"] == int((natural_a["status"] == "failed").sum())
    assert row["n_nan"] == int(_ok(natural_a)["rv"].isna().sum())
    assert row["n_valid"] == len(values)
    assert row["mean"] == pytest.approx(np.mean(values))
    assert row["sd"] == pytest.approx(np.std(values, ddof=1))
    low, high = ss.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                              scale=ss.sem(values))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))


def test_every_metric_and_condition_is_summarised(sweep, result):
    for metric in ("rv", "score_keywords", "score_self_ref", "score_logprob_contrast",
                   "rv_prompt", "pr_early", "pr_late", "score_technical"):
        assert metric in result.metrics
    per_model = result.conditions.groupby("model")["condition"].nunique()
    # natural A, B + 2 points x 3 alphas x (C, D, 4 controls)
    assert per_model.to_dict() == {MODEL: 2 + 2 * 3 * 6, "mistral-tiny": 2 + 2 * 3 * 6}


def test_failed_and_nan_cells_are_counted_not_dropped(sweep, result):
    w = sweep.written
    rv = result.conditions[result.conditions["metric"] == "rv"]
    assert rv["n"].sum() == len(w)  # every written cell is in exactly one condition
    assert rv["n_failed"].sum() == int((w["status"] == "failed").sum())
    assert rv["n_nan"].sum() == int(_ok(w)["rv"].isna().sum())
    reasons = " ".join(rv["nan_reasons"])
    assert "too_few_tokens:5<16" in reasons
    comp = result.completeness
    assert comp.n_failed == int((w["status"] == "failed").sum())
    assert comp.n_duplicate_rows == 2
    assert comp.n_stale_rows == 3  # rows of cells outside the plan: excluded, counted
    assert comp.n_done == len(w) == comp.n_expected


# --- comparisons ----------------------------------------------------------------------------


def test_welch_comparison_matches_scipy(sweep, result):
    w = sweep.written[sweep.written["model"] == MODEL]
    nat = w[w["control"] == "natural"]
    b = _values(nat, "score_keywords", target_group="recursive")
    a = _values(nat, "score_keywords", target_group="baseline")
    row = _row(result.comparisons, comparison="group_effect", model=MODEL,
               metric="score_keywords", a="B: natural recursive", b="A: natural baseline")
    assert row["test"] == "welch_t" and row["effect_size"] == "d_pooled"
    ref = ss.ttest_ind(b, a, equal_var=False)
    assert row["statistic"] == pytest.approx(ref.statistic)
    assert row["p"] == pytest.approx(ref.pvalue)
    assert row["df"] == pytest.approx(ref.df)
    pooled = math.sqrt(((len(b) - 1) * b.var(ddof=1) + (len(a) - 1) * a.var(ddof=1))
                       / (len(a) + len(b) - 2))
    assert row["cohens_d"] == pytest.approx((b.mean() - a.mean()) / pooled)
    assert row["diff"] == pytest.approx(b.mean() - a.mean())
    assert (row["n_a"], row["n_b"]) == (len(b), len(a))
    mw = ss.mannwhitneyu(b, a, alternative="two-sided")
    assert row["mw_statistic"] == pytest.approx(mw.statistic)
    assert row["mw_p"] == pytest.approx(mw.pvalue)
    assert row["d_ci_low"] < row["cohens_d"] < row["d_ci_high"]


def test_paired_comparison_matches_scipy(sweep, result):
    w = _ok(sweep.written, model=MODEL)
    c = w[(w["control"] == "patch") & (w["target_group"] == "baseline")
          & (w["layers"] == "16:32") & (w["alpha"] == 1.0)]
    a = w[(w["control"] == "natural") & (w["target_group"] == "baseline")]
    metric = "score_logprob_contrast"
    joined = c[["target_id", metric]].dropna().merge(
        a[["target_id", metric]].dropna(), on="target_id", suffixes=("_c", "_a"))
    x, y = joined[f"{metric}_c"].to_numpy(), joined[f"{metric}_a"].to_numpy()
    row = _row(result.comparisons, comparison="sufficiency", model=MODEL, metric=metric,
               layers="16:32", alpha=1.0)
    assert row["test"] == "paired_t" and row["effect_size"] == "d_z"
    assert row["n_pairs"] == len(joined)
    ref = ss.ttest_rel(x, y)
    assert row["statistic"] == pytest.approx(ref.statistic)
    assert row["p"] == pytest.approx(ref.pvalue)
    diff = x - y
    assert row["cohens_d"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    wx = ss.wilcoxon(x, y)
    assert row["wilcoxon_p"] == pytest.approx(wx.pvalue)
    assert row["diff"] == pytest.approx(diff.mean())
    assert row["diff"] > 0  # the recursive source raises the contrast (known effect)


def test_d_interval_inverts_the_noncentral_t():
    d, n_a, n_b = 0.8, 15, 18
    low, high = d_confidence_interval(d, n_a, n_b, 0.95)
    scale = math.sqrt(n_a * n_b / (n_a + n_b))
    t_obs, df = d * scale, n_a + n_b - 2
    assert ss.nct.cdf(t_obs, df, low * scale) == pytest.approx(0.975, abs=1e-6)
    assert ss.nct.cdf(t_obs, df, high * scale) == pytest.approx(0.025, abs=1e-6)
    # paired: d_z with n pairs, t = d_z * sqrt(n)
    low_z, high_z = d_confidence_interval(-1.5, 10, None, 0.95)
    assert ss.nct.cdf(-1.5 * math.sqrt(10), 9, low_z * math.sqrt(10)) == pytest.approx(
        0.975, abs=1e-6)
    assert low_z < -1.5 < high_z
    # large samples: close to the normal approximation
    low_l, high_l = d_confidence_interval(0.5, 2000, 2000, 0.95)
    se = math.sqrt(4000 / (2000 * 2000) + 0.25 / 8000)
    assert low_l == pytest.approx(0.5 - 1.96 * se, abs=0.01)
    assert high_l == pytest.approx(0.5 + 1.96 * se, abs=0.01)


def test_classic_comparisons_and_controls_are_planned(result):
    names = set(result.comparisons["comparison"])
    assert {"group_effect", "sufficiency", "necessity", "control:shuffle", "control:random",
            "control:other", "control:self", "control_vs_patch:shuffle"} <= names
    ctrl = result.comparisons[(result.comparisons["comparison"] == "control:shuffle")
                              & (result.comparisons["model"] == MODEL)]
    # one per intervention point (2 layer ranges x 3 alphas) and metric
    assert ctrl.groupby(["layers", "alpha"]).ngroups == 6
    assert set(ctrl["b"]) == {"A: natural baseline"}


def test_known_effects_are_found(result):
    cmp = result.comparisons
    strong = cmp[(cmp["comparison"] == "sufficiency") & (cmp["layers"] == "16:32")
                 & (cmp["alpha"] == 1.0) & (cmp["metric"].isin(["rv", "score_keywords"]))]
    assert len(strong) == 4 and (strong["p_fdr"] < 0.05).all()
    assert (strong.loc[strong["metric"] == "rv", "diff"] < 0).all()
    # alpha = 0 reproduces the unpatched run: no effect anywhere
    zero = cmp[(cmp["comparison"] == "sufficiency") & (cmp["alpha"] == 0.0)]
    assert (zero["p_fdr"] >= 0.05).all()


def test_fdr_is_one_family_over_every_test(result):
    ps = np.concatenate([
        result.comparisons["p"].to_numpy(float), result.dose["p"].to_numpy(float),
        result.correlations["pearson_p"].to_numpy(float),
        result.correlations["spearman_p"].to_numpy(float),
    ])
    finite = np.isfinite(ps)
    expected = np.full_like(ps, np.nan)
    expected[finite] = ss.false_discovery_control(ps[finite])
    got = np.concatenate([
        result.comparisons["p_fdr"].to_numpy(float), result.dose["p_fdr"].to_numpy(float),
        result.correlations["pearson_p_fdr"].to_numpy(float),
        result.correlations["spearman_p_fdr"].to_numpy(float),
    ])
    np.testing.assert_allclose(got, expected, equal_nan=True)
    assert result.fdr_family_size == int(finite.sum())
    assert (result.comparisons["significant"] == (result.comparisons["p_fdr"] < 0.05)).all()


def test_null_sweep_nothing_survives_fdr(tmp_path):
    sw = make_sweep(tmp_path, "null", models=(MODEL,), n_prompts=12, effects=Effects.null(),
                    alphas=(0.5, 1.0), seed=11)
    res = run_stats(sw.path, n_resamples=N_BOOT)
    tested = res.comparisons[res.comparisons["p"].notna()]
    assert len(tested) > 100
    assert (tested["p_fdr"] >= 0.05).all()
    assert not res.comparisons["significant"].any()
    assert (res.dose["p_fdr"].dropna() >= 0.05).all()
    notes = " ".join(n.text for n in derive_notes(res))
    assert "No comparison survives the correction" in notes


# --- transfer, dose-response, correlations --------------------------------------------------


def test_transfer_efficiency_and_bootstrap_match_scipy(sweep, result):
    w = _ok(sweep.written, model=MODEL).sort_values("cell_id")  # the order stats uses
    metric = "score_keywords"
    a = w.loc[(w["control"] == "natural") & (w["target_group"] == "baseline"), metric]
    b = w.loc[(w["control"] == "natural") & (w["target_group"] == "recursive"), metric]
    c = w.loc[(w["control"] == "patch") & (w["target_group"] == "baseline")
              & (w["layers"] == "16:32") & (w["alpha"] == 1.0), metric]
    a, b, c = (s.dropna().to_numpy(float) for s in (a, b, c))
    row = _row(result.transfer, model=MODEL, metric=metric, layers="16:32", alpha=1.0)
    assert row["efficiency"] == pytest.approx((c.mean() - a.mean()) / (b.mean() - a.mean()))

    def ratio(c_, a_, b_, axis=-1):
        return (c_.mean(axis) - a_.mean(axis)) / (b_.mean(axis) - a_.mean(axis))

    ref = ss.bootstrap((c, a, b), ratio, n_resamples=N_BOOT, vectorized=True,
                       method="percentile", rng=np.random.default_rng(7))
    assert row["eff_ci_low"] == pytest.approx(ref.confidence_interval.low)
    assert row["eff_ci_high"] == pytest.approx(ref.confidence_interval.high)
    assert 0.6 < row["efficiency"] < 1.4  # gain 1, alpha 1: the full gap (known effect)
    null_point = _row(result.transfer, model=MODEL, metric=metric, layers="0:16", alpha=1.0)
    assert null_point["eff_ci_low"] < 0.0 < null_point["eff_ci_high"]


def test_transfer_bootstrap_is_seeded_and_independent_of_row_order(sweep):
    cells = load_results(sweep.path).cells
    cells = cells[cells["model"] == MODEL]
    metrics = ["rv"]
    one = transfer_efficiency(cells, metrics, seed=5, n_resamples=N_BOOT)
    shuffled = cells.sample(frac=1.0, random_state=0)  # as if written in other shards
    two = transfer_efficiency(shuffled, metrics, seed=5, n_resamples=N_BOOT)
    pd.testing.assert_frame_equal(one, two)
    other = transfer_efficiency(cells, metrics, seed=6, n_resamples=N_BOOT)
    assert not np.allclose(one["eff_ci_low"], other["eff_ci_low"], equal_nan=True)


def test_dose_response_matches_scipy(sweep, result):
    w = _ok(sweep.written, model=MODEL)
    fam = w[(w["control"] == "patch") & (w["target_group"] == "baseline")
            & (w["layers"] == "16:32")]
    frame = fam[["alpha", "rv"]].dropna()
    ref = ss.spearmanr(frame["alpha"], frame["rv"])
    dose = result.dose
    row = _row(dose, factor="alpha", model=MODEL, metric="rv", layers="16:32",
               control="patch", target_group="baseline")
    assert row["rho"] == pytest.approx(ref.statistic)
    assert row["p"] == pytest.approx(ref.pvalue)
    assert row["rho"] < 0 and row["n_levels"] == 3
    nat = w[(w["control"] == "natural") & (w["target_group"] == "recursive")]
    frame = nat[["target_level", "rv"]].dropna()
    ref = ss.spearmanr(frame["target_level"], frame["rv"])
    row = _row(dose, factor="target_level", model=MODEL, metric="rv")
    assert row["rho"] == pytest.approx(ref.statistic)
    assert row["n"] == len(frame)


def test_correlations_match_scipy(sweep, result):
    from rloop_ray.analysis.identity import identity_mask

    w = _ok(sweep.written, model=MODEL)
    # identity cells (alpha = 0, self) are natural measured again: counted once
    frame = w[~identity_mask(w)][["rv", "score_self_ref"]].dropna()
    pr = ss.pearsonr(frame["rv"], frame["score_self_ref"])
    sr = ss.spearmanr(frame["rv"], frame["score_self_ref"])
    row = _row(result.correlations, model=MODEL, scope="all", y="score_self_ref")
    assert row["pearson_r"] == pytest.approx(pr.statistic)
    assert row["pearson_p"] == pytest.approx(pr.pvalue)
    assert row["spearman_rho"] == pytest.approx(sr.statistic)
    assert row["pearson_ci_low"] == pytest.approx(pr.confidence_interval().low)
    assert row["pearson_r"] < 0  # lower R_V goes with more self-reference (known effect)
    natural = _row(result.correlations, model=MODEL, scope="natural", y="score_self_ref")
    assert natural["n"] == len(w[w["control"] == "natural"][["rv", "score_self_ref"]].dropna())


def test_models_side_by_side(result):
    side = result.side_by_side
    assert not side.empty
    for model in (MODEL, "mistral-tiny"):
        for col in ("diff", "cohens_d", "p_fdr", "n_a"):
            assert f"{col}[{model}]" in side.columns
    row = side[(side["comparison"] == "sufficiency") & (side["metric"] == "rv")
               & side["comparison_id"].str.contains("L=16:32 T=all align=end alpha=1 ")].iloc[0]
    long = result.comparisons
    for model in (MODEL, "mistral-tiny"):
        ref = long[(long["comparison_id"] == row["comparison_id"]) & (long["metric"] == "rv")
                   & (long["model"] == model)].iloc[0]
        assert row[f"diff[{model}]"] == pytest.approx(ref["diff"])
    # mistral was built with half the gap
    assert abs(row["diff[mistral-tiny]"]) < abs(row[f"diff[{MODEL}]"])
    assert not result.transfer_side_by_side.empty


# --- notes, partial sweeps, edge cases ------------------------------------------------------


def test_transplant_all_note_and_source_natural_comparison(tmp_path):
    sw = make_sweep(tmp_path, "transplant", models=(MODEL,), n_prompts=12,
                    points=(Point(mode="transplant", layers="all"), Point(layers="16:32")),
                    controls=())
    res = run_stats(sw.path, n_resamples=N_BOOT)
    src = res.comparisons[res.comparisons["comparison"] == "source_natural"]
    assert len(src) and set(src["layers"]) == {"all"}
    c_rows = src[src["a"].str.startswith("C:")]
    assert set(c_rows["b"]) == {"B: natural recursive"}
    assert (c_rows["test"] == "paired_t").all()  # C's source_id pairs with B's target_id
    notes = derive_notes(res)
    text = " ".join(n.text for n in notes if n.kind == "transplant_all")
    assert "same computation as continuing the source prompt" in text
    assert "source-natural" in text
    assert "not distinguishable" in text  # the synthetic transplant moves C all the way to B
    assert res.transfer.loc[res.transfer["layers"] == "all", "transplant_all"].all()
    assert not res.transfer.loc[res.transfer["layers"] == "16:32", "transplant_all"].any()


def test_control_that_moves_as_much_as_the_patch_is_reported(tmp_path):
    sw = make_sweep(tmp_path, "controls", models=(MODEL,), n_prompts=16,
                    controls=("shuffle", "random"),
                    effects=Effects(controls={"shuffle": 1.0, "random": 0.0}), seed=2)
    res = run_stats(sw.path, n_resamples=N_BOOT)
    notes = [n for n in derive_notes(res) if n.kind == "control_as_large"]
    text = " ".join(n.text for n in notes)
    assert "'shuffle' control moved the metric as much as the patch" in text
    assert "'random'" not in text


def test_self_control_check(tmp_path):
    sw = make_sweep(tmp_path, "selfcheck", models=(MODEL,), n_prompts=12, controls=("self",))
    res = run_stats(sw.path, n_resamples=N_BOOT)
    notes = {n.kind: n.text for n in derive_notes(res)}
    assert "indistinguishable from natural" in notes["self_check"]
    bad = make_sweep(tmp_path, "selfbad", models=(MODEL,), n_prompts=12, controls=("self",),
                     effects=Effects(controls={"self": 1.0}))
    res = run_stats(bad.path, n_resamples=N_BOOT)
    notes = {n.kind: n.text for n in derive_notes(res)}
    assert "suspect the intervention code" in notes["self_check"]


def test_partial_sweep_is_analysed_and_says_what_is_missing(tmp_path):
    sw = make_sweep(tmp_path, "partial", models=(MODEL,), n_prompts=12, keep_fraction=0.6,
                    seed=4)
    res = run_stats(sw.path, n_resamples=N_BOOT)
    comp = res.completeness
    assert comp.partial
    assert comp.n_expected == sw.n_total
    assert comp.n_done == len(sw.written)
    assert comp.n_missing == sw.n_total - len(sw.written)
    assert not res.comparisons.empty and not res.transfer.empty
    text = " ".join(n.text for n in derive_notes(res))
    assert f"Partial sweep: {comp.n_done} of {sw.n_total} cells done" in text
    assert f"{comp.n_missing} missing" in text


def test_planned_cells_come_from_the_plan(tmp_path):
    sw = make_sweep(tmp_path, "planned", models=(MODEL,), n_prompts=12, keep_fraction=0.8)
    comp = run_stats(sw.path, n_resamples=N_BOOT).completeness
    assert comp.n_expected == len(sw.cells)
    assert comp.by_model[0]["planned"] == len(sw.cells)
    assert comp.by_model[0]["missing"] == len(sw.cells) - len(sw.written)


def test_legacy_manifest_planned_cells_without_a_plan(tmp_path):
    sw = make_sweep(tmp_path, "legacy", models=(MODEL,), n_prompts=12, keep_fraction=0.8,
                    write_plan=False)
    ResultStore(sw.path).update_manifest(planned_cells={MODEL: len(sw.cells)})
    comp = run_stats(sw.path, n_resamples=N_BOOT).completeness
    assert comp.n_expected == len(sw.cells)
    assert comp.n_missing == len(sw.cells) - len(sw.written)


def test_missing_plan_and_missing_conditions_are_stated(tmp_path):
    def recursive_patch(row: dict) -> bool:
        return row["control"] == "patch" and row["target_group"] == "recursive"

    sw = make_sweep(tmp_path, "nod", models=(MODEL,), n_prompts=12, write_plan=False,
                    skip=recursive_patch)
    res = run_stats(sw.path, n_resamples=N_BOOT)
    assert res.completeness.n_expected is None and res.completeness.n_missing is None
    assert res.completeness.missing_conditions == {MODEL: ["D"]}
    assert "necessity" not in set(res.comparisons["comparison"])
    text = " ".join(n.text for n in derive_notes(res))
    assert "no ok cell for condition(s) D" in text
    assert "completeness cannot be checked" in text
    assert res.transfer["necessity_fraction"].isna().all()


def test_empty_sweep(tmp_path):
    ids = tuple(f"cell{i}" for i in range(10))
    ResultStore(tmp_path / "empty").prepare(
        {"name": "empty"}, plan=Plan(ids, ids, (MODEL,) * len(ids)))
    res = run_stats(tmp_path / "empty")
    assert res.conditions.empty and res.comparisons.empty
    assert res.completeness.n_missing == 10
    assert "no cells yet" in derive_notes(res)[0].text
    written = write_tables(res)
    assert all(p.exists() for p in written)


def test_stale_rows_are_excluded_and_reported(sweep, result):
    notes = [n for n in derive_notes(result) if n.kind == "stale"]
    assert len(notes) == 1 and notes[0].level == "warning"
    assert "3 stale rows from an earlier plan were excluded" in notes[0].text
    assert not result.results.cells["cell_id"].str.startswith("stale").any()


def test_retried_cells_count_once_and_as_recovered(tmp_path):
    sw = make_sweep(tmp_path, "retried", models=(MODEL,), n_prompts=6, fail_every=5)
    failed = set(sw.written.loc[sw.written["status"] == "failed", "cell_id"])
    retried = [r for r in sw.rows if r["cell_id"] in failed]
    ResultStore(sw.path).write_cells([{**r, "attempt": 2} for r in retried])
    res = run_stats(sw.path, n_resamples=N_BOOT)
    comp = res.completeness
    assert comp.n_failed == 0 and comp.n_ok == comp.n_done == len(sw.cells)
    assert comp.n_recovered == len(retried) == comp.n_duplicate_rows
    assert len(res.results.failures) == len(retried)  # the failure history stays readable
    text = " ".join(n.text for n in derive_notes(res))
    assert f"{len(retried)} cells failed once and succeeded on a retry" in text


def test_a_local_path_and_a_file_uri_give_identical_tables(tmp_path):
    """The same sweep written through the store to a path and to a file:// URI."""
    local = make_sweep(tmp_path / "local", "same", models=(MODEL,), n_prompts=8,
                       alphas=(0.5, 1.0), fail_every=9, seed=1)
    remote = make_sweep(f"file://{tmp_path}/uri", "same", models=(MODEL,), n_prompts=8,
                        alphas=(0.5, 1.0), fail_every=9, seed=1)
    one = write_tables(run_stats(local.path, n_resamples=N_BOOT))
    two = write_tables(run_stats(remote.path, n_resamples=N_BOOT))
    assert two[0].parent == tmp_path / "uri" / "same" / "stats"  # file:// is local
    parquet = [p.name for p in one if p.suffix == ".parquet"]
    assert parquet and parquet == [p.name for p in two if p.suffix == ".parquet"]
    for name in parquet:
        pd.testing.assert_frame_equal(pd.read_parquet(one[0].parent / name),
                                      pd.read_parquet(two[0].parent / name))


def test_unknown_metric_names_the_alternatives(sweep):
    with pytest.raises(ValueError, match="Available"):
        run_stats(sweep.path, metrics=["rvv"])


def test_tables_are_written_as_parquet(sweep, result, tmp_path):
    written = write_tables(result, tmp_path / "stats")
    names = {p.name for p in written}
    assert {"conditions.parquet", "comparisons.parquet", "transfer.parquet",
            "dose_response.parquet", "correlations.parquet", "models_side_by_side.parquet",
            "summary.json"} <= names
    back = pd.read_parquet(tmp_path / "stats" / "comparisons.parquet")
    for col in ("comparison", "metric", "model", "a", "b", "n_a", "n_b", "mean_a", "mean_b",
                "diff", "cohens_d", "d_ci_low", "d_ci_high", "test", "statistic", "p", "p_fdr",
                "mw_statistic", "mw_p"):
        assert col in back.columns
    assert len(back) == len(result.comparisons)


def test_natural_cells_normalise_whatever_the_writer_put_there():
    frame = pd.DataFrame({
        "cell_id": ["a", "b"], "model": ["m", "m"], "control": ["natural", "natural"],
        "site": [None, "none"], "layers": ["16:32", None], "alpha": [1.0, None],
        "source_group": ["recursive", None], "target_group": ["baseline", "baseline"],
        "status": ["ok", "ok"], "rv": [0.9, 0.95],
    })
    norm = normalise_cells(frame)
    assert norm["condition"].nunique() == 1
    assert set(norm["letter"]) == {"A"}
    assert norm["alpha"].isna().all()


def test_small_n_spearman_uses_an_exact_permutation_p():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([1.0, 2.0, 3.0, 5.0, 4.0])
    rho, p, note = spearman(x, y)
    assert rho == pytest.approx(ss.spearmanr(x, y).statistic)
    assert p == pytest.approx(10 / 120)  # 5 of 120 orderings reach |rho| >= 0.9 each side
    assert "permutation" in note
    rho3, p3, _ = spearman(x[:3], y[:3])
    assert rho3 == pytest.approx(1.0) and p3 == pytest.approx(1 / 3)  # not the t-approx 0
    big = np.arange(30.0)
    _, p_big, note_big = spearman(big, big ** 2 % 7)
    assert p_big == pytest.approx(ss.spearmanr(big, big ** 2 % 7).pvalue) and note_big == ""


def test_alpha_zero_check(result):
    notes = {n.kind: n for n in derive_notes(result)}
    assert "indistinguishable from natural" in notes["alpha_zero"].text
    assert notes["alpha_zero"].level == "info"
