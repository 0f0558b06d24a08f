"""The findings of docs/findings.md, built from the committed stats tables.

Every number in docs/findings.md comes from a table under docs/findings/<sweep>/stats/
(written by `rloop-ray stats`, copied here by `collect`), through the queries below:
nothing is typed by hand. The reported figures of the earlier work are quoted from
docs/prior-claims.md.

    python scripts/findings.py collect results/smollm2_p4_resid_patch  # copy one sweep's tables
    python scripts/findings.py build                                    # write docs/findings.md
    python scripts/findings.py build --check                            # exit 1 if it is stale

`collect` copies `stats/*.parquet`, `summary.json`, `report.md` and the PNG figures of a
sweep folder (after `rloop-ray stats`), and for sweeps that record per-layer lists
(`measure.layers`, `measure.attention`), which the stats tables only summarise as means,
one small table of per-cell values (`stats/extra_*.parquet`) that the tests below need.

`build` renders docs/findings/template.md: `{{ table }}` becomes the findings table, and
`{{ KEY }}` any value of `values()` (e.g. `{{ P5.smollm2-135m.1 }}`, the first test of
P5 on SmolLM2). A key that does not exist, or a query that does not match exactly one
row of its table, is an error: the document cannot silently lose a number.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

REPO = Path(__file__).resolve().parents[1]
FINDINGS_DIR = REPO / "docs" / "findings"
TEMPLATE = FINDINGS_DIR / "template.md"
OUTPUT = REPO / "docs" / "findings.md"
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
Q = 0.05  # the FDR level of `rloop-ray stats` (its default q)
LOGPROB, KEYWORDS = "score_logprob_contrast", "score_keywords"
NAMES = {LOGPROB: "logprob", KEYWORDS: "keywords", "rv": "R_V gen", "rv_prompt": "R_V prompt",
         "kl_from_natural": "KL"}


class FindingsError(RuntimeError):
    """A query that does not match exactly one row, or a missing table or key."""


# --------------------------------------------------------------------------- tables


@cache
def table(sweep: str, name: str) -> pd.DataFrame:
    path = FINDINGS_DIR / sweep / "stats" / f"{name}.parquet"
    if not path.exists():
        raise FindingsError(f"no table {path.relative_to(REPO)}: run `python "
                            f"scripts/findings.py collect results/{sweep}` after stats")
    return pd.read_parquet(path)


def pick(df: pd.DataFrame, where: str, **filters: object) -> pd.Series:
    """The one row of `df` matching `filters` (`a_has`/`b_has`: substring of a / b)."""
    mask = pd.Series(True, index=df.index)
    for key, want in filters.items():
        if key in ("a_has", "b_has", "scope_has"):
            mask &= df[key.split("_")[0]].astype(str).str.contains(str(want), regex=False)
        elif isinstance(want, float):
            mask &= np.isclose(df[key].astype(float), want)
        else:
            mask &= df[key].astype(str) == str(want)
    rows = df[mask]
    if len(rows) != 1:
        raise FindingsError(f"{where}: {len(rows)} rows match {filters}")
    return rows.iloc[0]


# --------------------------------------------------------------------------- values


def fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def fmt_d(d: float) -> str:
    return f"{d:+.2f}" if math.isfinite(d) else "n/a"


@dataclass(frozen=True)
class Value:
    """One number (or test) from a table, with what a verdict needs."""

    text: str
    effect: float = math.nan  # d, d_z, rho or an efficiency
    p_fdr: float = math.nan
    detectable: float = math.nan  # smallest |effect| with 80% power at this n (t tests)

    def __str__(self) -> str:
        return self.text


def detectable_effect(n_a: int, n_b: int | None) -> float:
    """Smallest |d| a two-sided t test at alpha q detects with 80% power (noncentral t)."""
    df = n_a - 1 if n_b is None else n_a + n_b - 2
    if df < 1:
        return math.nan
    scale = math.sqrt(n_a) if n_b is None else math.sqrt(n_a * n_b / (n_a + n_b))
    crit = sps.t.ppf(1 - Q / 2, df)

    def power(d: float) -> float:  # upper tail only: the lower one is < 1e-3 at 80% power
        return float(sps.nct.sf(crit, df, d * scale))

    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(mid) < 0.8 else (lo, mid)
    return hi


@dataclass(frozen=True)
class Query:
    """A function of the model that reads one value from the tables."""

    fn: Callable[[str], Value]

    def __call__(self, model: str) -> Value:
        return self.fn(model)


def cmp(sweep: str, comparison: str, metric: str = LOGPROB, **where: object) -> Query:
    """A comparison of `stats/comparisons.parquet`: d [95% CI], p_fdr."""

    def get(model: str) -> Value:
        row = pick(table(sweep, "comparisons"), f"{sweep} comparisons", model=model,
                   comparison=comparison, metric=metric, **where)
        paired = row["n_pairs"] >= 3
        n_text = f"n = {int(row['n_pairs'])} pairs" if paired else (
            f"n = {int(row['n_a'] - row['n_nan_a'] - row['n_failed_a'])} vs "
            f"{int(row['n_b'] - row['n_nan_b'] - row['n_failed_b'])}")
        d = float(row["cohens_d"])
        if not math.isfinite(d):
            note = str(row["note"] or "no data").removesuffix(": no test")
            return Value(f"{NAMES.get(metric, metric)}: no test ({note})")
        text = (f"{NAMES.get(metric, metric)} d = {fmt_d(d)} [{row['d_ci_low']:.2f}, "
                f"{row['d_ci_high']:.2f}], p_fdr = {fmt_p(row['p_fdr'])} ({n_text})")
        n_a = int(row["n_pairs"]) if paired else int(row["n_a"] - row["n_nan_a"])
        n_b = None if paired else int(row["n_b"] - row["n_nan_b"])
        return Value(text, d, float(row["p_fdr"]), detectable_effect(n_a, n_b))

    return Query(get)


def mean(sweep: str, condition_has: str, metric: str = LOGPROB, **where: object) -> Query:
    """A condition mean of `stats/conditions.parquet` with its 95% t interval."""

    def get(model: str) -> Value:
        df = table(sweep, "conditions")
        df = df[df["condition"].astype(str).str.contains(condition_has, regex=False)]
        row = pick(df, f"{sweep} conditions", model=model, metric=metric, **where)
        return Value(f"{row['mean']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]",
                     float(row["mean"]))

    return Query(get)


def eff(sweep: str, metric: str = LOGPROB, **where: object) -> Query:
    """Transfer efficiency (C-A)/(B-A) of `stats/transfer.parquet` with its bootstrap CI."""

    def get(model: str) -> Value:
        row = pick(table(sweep, "transfer"), f"{sweep} transfer", model=model,
                   metric=metric, **where)
        e = float(row["efficiency"])
        return Value(f"{100 * e:.0f}% [{100 * row['eff_ci_low']:.0f}, "
                     f"{100 * row['eff_ci_high']:.0f}]", e)

    return Query(get)


def rho(sweep: str, factor: str, metric: str = LOGPROB, **where: object) -> Query:
    """A Spearman dose-response of `stats/dose_response.parquet`."""

    def get(model: str) -> Value:
        row = pick(table(sweep, "dose_response"), f"{sweep} dose_response", model=model,
                   factor=factor, metric=metric, **where)
        r, n = float(row["rho"]), int(row["n"])
        # Fisher z: the smallest |rho| a two-sided test at q detects with 80% power
        small = math.tanh((sps.norm.ppf(1 - Q / 2) + sps.norm.ppf(0.8)) / math.sqrt(n - 3))
        return Value(f"{NAMES.get(metric, metric)} rho = {fmt_d(r)} (n = {n}), "
                     f"p_fdr = {fmt_p(row['p_fdr'])}", r, float(row["p_fdr"]), small)

    return Query(get)


def corr(sweep: str, y: str, scope: str = "natural", x: str = "rv") -> Query:
    """Pearson r of R_V and a score from `stats/correlations.parquet`."""

    def get(model: str) -> Value:
        row = pick(table(sweep, "correlations"), f"{sweep} correlations", model=model,
                   scope=scope, x=x, y=y)
        r = float(row["pearson_r"])
        return Value(f"r(R_V, {NAMES.get(y, y)}) = {fmt_d(r)} (n = {int(row['n'])}), "
                     f"p_fdr = {fmt_p(row['pearson_p_fdr'])}", r, float(row["pearson_p_fdr"]))

    return Query(get)


# --- the per-layer extras: tests over the per-cell values that `collect` keeps ----------


def _bh(p: Sequence[float]) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok])
    return out


@cache
def layer_tests(sweep: str, name: str, column: str, a: str, b: str, model: str,
                paired: bool) -> pd.DataFrame:
    """Per layer: a vs b on `column` of `stats/extra_<name>.parquet`, BH over the layers.

    Rows of the extra table are (cell, layer); `condition` is the stats label. Paired on
    `target_id` (the same prompt under two conditions) when `paired`, else Welch.
    """
    df = table(sweep, f"extra_{name}")
    df = df[df["model"] == model]
    out = []
    for layer, g in df.groupby("layer"):
        if g[column].std() < 1e-9:  # the reference layer: R_V(l) = 1 in every row
            continue
        xa = g[g["condition"] == a].set_index("target_id")[column].dropna()
        xb = g[g["condition"] == b].set_index("target_id")[column].dropna()
        if paired:
            common = xa.index.intersection(xb.index)
            diff = (xa[common] - xb[common]).to_numpy()
            n_a, n_b = len(common), None
            res = sps.ttest_rel(xa[common], xb[common]) if n_a >= 3 else None
            d = diff.mean() / diff.std(ddof=1) if n_a >= 3 and diff.std(ddof=1) > 0 else np.nan
        else:
            n_a, n_b = len(xa), len(xb)
            res = sps.ttest_ind(xa, xb, equal_var=False) if min(n_a, n_b) >= 2 else None
            sd = math.sqrt(((n_a - 1) * xa.var() + (n_b - 1) * xb.var()) / (n_a + n_b - 2))
            d = (xa.mean() - xb.mean()) / sd if sd > 0 else np.nan
        out.append({"layer": int(layer), "n_a": n_a, "n_b": n_b, "mean_a": xa.mean(),
                    "mean_b": xb.mean(), "d": d,
                    "p": float(res.pvalue) if res is not None else np.nan})
    res_df = pd.DataFrame(out)
    if res_df.empty:
        raise FindingsError(f"{sweep}: no rows for {model} in extra_{name}")
    res_df["p_fdr"] = _bh(res_df["p"])
    return res_df


def layer_summary(sweep: str, name: str, column: str, a: str, b: str,
                  paired: bool = False) -> Query:
    """How many layers differ (BH over layers), and the layer with the largest |d|."""

    def get(model: str) -> Value:
        t = layer_tests(sweep, name, column, a, b, model, paired)
        sig = t[t["p_fdr"] < Q]
        best = t.loc[t["d"].abs().idxmax()]
        n_b = None if paired else int(best["n_b"])
        layers = ", ".join(str(x) for x in sig["layer"]) or "none"
        text = (f"{len(sig)} of {len(t)} layers with p_fdr < {Q} ({layers}); "
                f"largest at L{int(best['layer'])}: {best['mean_a']:.3f} vs "
                f"{best['mean_b']:.3f}, d = {fmt_d(best['d'])}, p_fdr = "
                f"{fmt_p(best['p_fdr'])}")
        return Value(text, float(best["d"]), float(t["p_fdr"].min()),
                     detectable_effect(int(best["n_a"]), n_b))

    return Query(get)


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Test:
    """One test of a row: a query and what the claim expects of it."""

    label: str
    query: Query
    expect: str  # "+" / "-": an effect of that sign; "0": no effect; "?": a question


@dataclass(frozen=True)
class Finding:
    key: str
    question: str
    reported: str
    sweep: str
    tests: tuple[Test, ...]
    controls: tuple[tuple[str, Query], ...] = ()
    not_testable: dict[str, str] = field(default_factory=dict)
    caveat: str = ""  # a fact of the design (never a number), shown under the verdicts


def judge(test: Test, value: Value) -> str:
    """The verdict of one test by fixed rules (significance is p_fdr < q)."""
    if not math.isfinite(value.p_fdr):
        return "not testable (no test ran)"
    sig = value.p_fdr < Q
    sign = "+" if value.effect > 0 else "-"
    what = "rho" if "rho =" in value.text else "d"
    power = (f" (80% power for |{what}| >= {value.detectable:.2f})"
             if math.isfinite(value.detectable) else "")
    if test.expect == "?":
        return f"yes ({sign})" if sig else f"no detectable effect{power}"
    if test.expect == "0":
        return f"replicates: no effect{power}" if not sig else f"does not: effect {sign}"
    if sig and sign == test.expect:
        return "replicates"
    if sig:
        return "does not: opposite sign"
    return f"does not: no effect{power}"


def overall(verdicts: list[str], expects: list[str]) -> str:
    if any(v.startswith("not testable") for v in verdicts):
        return "not testable here"
    if all(e == "?" for e in expects):
        return "answered: " + "; ".join(verdicts)
    if all(v.startswith("replicates") for v in verdicts):
        return "replicates"
    if any(v.startswith("replicates") for v in verdicts):
        return "partly"
    return "does not replicate"


def finding_values(f: Finding, model: str) -> dict[str, str]:
    """`{{ <key>.<model>.<i> }}` test i, `.verdict`, `.ctl<i>` control i."""
    prefix = f"{f.key}.{model}"
    if model in f.not_testable:
        return {f"{prefix}.verdict": f"not testable here ({f.not_testable[model]})"}
    out: dict[str, str] = {}
    verdicts = []
    for i, t in enumerate(f.tests, 1):
        value = t.query(model)
        verdict = judge(t, value)
        verdicts.append(verdict)
        out[f"{prefix}.{i}"] = f"{t.label}: {value}"
        out[f"{prefix}.{i}.verdict"] = verdict
    out[f"{prefix}.verdict"] = overall(verdicts, [t.expect for t in f.tests])
    for i, (label, q) in enumerate(f.controls, 1):
        out[f"{prefix}.ctl{i}"] = f"{label}: {q(model)}"
    return out


def findings_table(findings: Sequence[Finding], values: dict[str, str]) -> str:
    head = ["#", "question", "reported (8B)", *MODELS.values(), "verdict", "what the controls say"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in findings:
        cells, verdicts, controls = [], [], []
        for model, name in MODELS.items():
            prefix = f"{f.key}.{model}"
            tests = [values[f"{prefix}.{i}"] + f" → *{values[f'{prefix}.{i}.verdict']}*"
                     for i in range(1, len(f.tests) + 1) if f"{prefix}.{i}" in values]
            cells.append("<br>".join(tests) or "—")
            verdicts.append(f"{name}: **{values[f'{prefix}.verdict']}**")
            ctl = [values[f"{prefix}.ctl{i}"] for i in range(1, len(f.controls) + 1)
                   if f"{prefix}.ctl{i}" in values]
            if ctl:
                controls.append(f"{name}: " + "; ".join(ctl))
        if f.caveat:
            verdicts.append(f"*{f.caveat}*")
        row = [f"[{f.key}](#{f.key.lower()})", f.question, f.reported, *cells,
               "<br>".join(verdicts), "<br>".join(controls) or "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


# --- the rows --------------------------------------------------------------------------

S = "smollm2_"  # every reduced sweep's results name starts with it (sweeps/smollm2/)
NAT_B, NAT_A, NAT_L = "B: natural recursive", "A: natural baseline", "natural long_control"


def at(layers: str, tokens: str = "all", **more: object) -> dict[str, object]:
    return {"layers": layers, "tokens": tokens, **more}


def suff(sweep: str, metric: str = LOGPROB, **point: object) -> Query:
    return cmp(sweep, "sufficiency", metric, **point)


def nec(sweep: str, metric: str = LOGPROB, **point: object) -> Query:
    return cmp(sweep, "necessity", metric, **point)


def ctl(sweep: str, control: str, target: str, metric: str = LOGPROB, vs_patch: bool = False,
        **point: object) -> Query:
    kind = f"control_vs_patch:{control}" if vs_patch else f"control:{control}"
    return cmp(sweep, kind, metric, a_has=f"->{target} @", **point)


KW = ("match:^ ?(you|your|Your|yours|yourself|Yourself)\\b|(?i:self|\\bown\\b|observ|^obs$|"
      "notic|aware|attend|attention|process|think|thought|loop|watch|reflect|introspect)")
NOT_KW = ("match:^(?!( ?(you|your|Your|yours|yourself|Yourself)\\b))(?!.*(?i:self|\\bown\\b|"
          "observ|^obs$|notic|aware|attend|attention|process|think|thought|loop|watch|"
          "reflect|introspect))")
GEN = {"during": "generation", "align": "start"}
P1, P2, P3, P4, P5 = (f"{S}p1_rv_layers", f"{S}p2_dose_response", f"{S}p3_vproj_patch",
                      f"{S}p4_resid_patch", f"{S}p5_kv_transfer")
P6, P7, P8, P9 = (f"{S}p6_layer_localization", f"{S}p7_token_localization",
                  f"{S}p8_alpha_mixing", f"{S}p9_trajectory")
N_KW, N_THIRDS, N_RV, N_ATT = (f"{S}next_keyword_positions", f"{S}next_position_thirds",
                               f"{S}next_rv_with_cache", f"{S}next_attention_kv_swap")
N_LEVEL, N_STEER, N_PROFILE = (f"{S}next_source_level", f"{S}next_vsteer_alpha2",
                               f"{S}next_rv_profile")
TRANSPLANT_ALL = {"mode": "transplant", "layers": "all", "tokens": "all", "align": "start"}
MIX_ALL = {"mode": "mix", "layers": "all", "tokens": "all", "align": "end"}


def group(sweep: str, metric: str, b: str = NAT_A) -> Query:
    return cmp(sweep, "group_effect", metric, a=NAT_B, b=b)


def findings() -> list[Finding]:
    return [
        Finding("P1", "R_V contracts for recursive prompts",
                "Llama L24/L4 0.91 vs 0.98, d = -1.07; Mistral L27 d = -5.09", P1,
                (Test("prompt-side, B vs A", group(P1, "rv_prompt"), "-"),
                 Test("generated, B vs A", group(P1, "rv"), "-")),
                (("long control (B vs L, prompt-side)", group(P1, "rv_prompt", NAT_L)),)),
        Finding("P2", "dose-response with the recursion level",
                "rho(level, R_V) = -0.64; rho(level, behaviour) = +0.31; n = 10 per level", P2,
                (Test("level vs prompt-side R_V", rho(P2, "target_level", "rv_prompt"), "-"),
                 Test("level vs keywords", rho(P2, "target_level", KEYWORDS), "+")),
                (("level vs logprob", rho(P2, "target_level", LOGPROB)),
                 ("R_V vs keywords", corr(P2, KEYWORDS)))),
        Finding("P3", "V-projection patch at one layer moves geometry, not behaviour",
                "behaviour +0.03 (ns); necessity -3.64", P3,
                (Test("C vs A, L75% last 16, behaviour",
                      suff(P3, **at("75%", "last:16")), "0"),
                 Test("C vs A, L75% last 16, geometry",
                      suff(P3, "rv_prompt", **at("75%", "last:16")), "+")),
                (("late half, geometry (R_V's late layer patched)",
                  suff(P3, "rv_prompt", **at("50%:100%", "last:16"))),
                 ("random vs patch (behaviour, late half)",
                  ctl(P3, "random", "baseline", vs_patch=True, **at("50%:100%", "last:16"))),
                 ("late half C vs A", suff(P3, **at("50%:100%", "last:16"))))),
        Finding("P4", "residual patching of every layer, during generation, does nothing",
                "0.00", P4,
                (Test("C vs A, all layers", suff(P4, **at("all", **GEN)), "0"),
                 Test("C vs A, single layer 75%", suff(P4, **at("75%", **GEN)), "0")),
                (("transfer, all layers", eff(P4, **at("all", **GEN))),
                 ("random vs patch (C, all)",
                  ctl(P4, "random", "baseline", vs_patch=True, **at("all", **GEN))),
                 ("random vs patch (D, all)",
                  ctl(P4, "random", "recursive", vs_patch=True, **at("all", **GEN)))),
                caveat="any layer set with the last layer, at alpha 1 during generation, "
                       "gives the target the source's logits: a positive control"),
        Finding("P5", "a whole-cache KV swap transfers the behaviour",
                "C 4.11 vs A 0.35 (0-10), d = +1.19; 63.6% transfer", P5,
                (Test("C vs A, transplant, logprob", suff(P5, **TRANSPLANT_ALL), "+"),
                 Test("C vs A, transplant, keywords", suff(P5, KEYWORDS, **TRANSPLANT_ALL), "+")),
                (("C vs B (source run itself)",
                  cmp(P5, "source_natural", LOGPROB, a_has="->baseline @", **TRANSPLANT_ALL)),
                 ("transfer", eff(P5, **TRANSPLANT_ALL)),
                 ("shuffle vs patch",
                  ctl(P5, "shuffle", "baseline", vs_patch=True, **TRANSPLANT_ALL)),
                 ("position-aligned mix C vs A", suff(P5, **MIX_ALL)),
                 ("shuffle (mix) vs A", ctl(P5, "shuffle", "baseline", **MIX_ALL))),
                caveat="an all-layer transplant is the source prompt continued: read C "
                       "against B"),
        Finding("P6", "only late layers carry it",
                "16-32: 79.8%, 0-16: 2.3%, 0-32: 89.7% (% transfer)", P6,
                (Test("C vs A, transplant 50%:100%",
                      suff(P6, **at("50%:100%", mode="transplant", align="start")), "+"),
                 Test("C vs A, transplant 0%:50%",
                      suff(P6, **at("0%:50%", mode="transplant", align="start")), "0")),
                tuple((f"transfer {r}", eff(P6, **at(r, mode="transplant", align="start")))
                      for r in ("0%:25%", "25%:50%", "50%:75%", "75%:100%", "0%:50%",
                                "50%:100%", "0%:100%"))
                + (("other vs patch, 50%:100%",
                    ctl(P6, "other", "baseline", vs_patch=True,
                        **at("50%:100%", mode="transplant", align="start"))),)),
        Finding("P7", "KV patching of single late layers / last 16-32 positions transfers nothing",
                "0 to +1 point", P7,
                (Test("C vs A, L84.375% last 16", suff(P7, **at("84.375%", "last:16")), "0"),
                 Test("C vs A, L78.125%+84.375% last 32",
                      suff(P7, **at("78.125%,84.375%", "last:32")), "0")),
                (("late half, last 16", suff(P7, **at("50%:100%", "last:16"))),
                 ("other vs patch, late half last 16",
                  ctl(P7, "other", "baseline", vs_patch=True, **at("50%:100%", "last:16"))))),
        Finding("P8", "alpha mixing has a dose-response",
                "alpha 0: 0.00, 0.5: 0.00, 1.0: 7.87 (score); L16-31 91.2%; L27 alone 0%", P8,
                (Test("alpha trend, late half",
                      rho(P8, "alpha", LOGPROB, layers="50%:100%", control="patch"), "+"),
                 Test("alpha trend, one layer 84.375%",
                      rho(P8, "alpha", LOGPROB, layers="84.375%", control="patch"), "0")),
                (("alpha vs R_V, late half",
                  rho(P8, "alpha", "rv", layers="50%:100%", control="patch")),
                 ("R_V vs keywords (all cells)", corr(P8, KEYWORDS, scope="all")))),
        Finding("P9", "the geometry is set at encoding",
                "step 0: 0.822 vs 0.977; both ~0.86 by step 40", P9,
                (Test("step 0 (prompt side), B vs A", group(P9, "rv_prompt"), "-"),
                 Test("steps 25-40 (generated), B vs A", group(P9, "rv"), "0")),
                (("long control, step 0 (B vs L)", group(P9, "rv_prompt", NAT_L)),)),
        Finding("N1", "patch only the self-referential keyword positions (D: recursive target)",
                "next step", N_KW,
                (Test("D vs B, keyword positions", nec(N_KW, **at("all", KW)), "?"),
                 Test("D vs B, all other positions", nec(N_KW, **at("all", NOT_KW)), "?")),
                (("other (recursive) vs B, keywords",
                  ctl(N_KW, "other", "recursive", **at("all", KW))),
                 ("other vs patch, keywords",
                  ctl(N_KW, "other", "recursive", vs_patch=True, **at("all", KW))),
                 ("random vs B, keywords", ctl(N_KW, "random", "recursive", **at("all", KW))))),
        Finding("N2", "first 25% / middle 50% / last 25% of the positions (all layers)",
                "next step", N_THIRDS,
                tuple(Test(f"C vs A, {t}", suff(N_THIRDS, **at("all", t)), "?")
                      for t in ("first:25%", "mid:50%", "last:25%"))
                + (Test("D vs B, last:25%", nec(N_THIRDS, **at("all", "last:25%")), "?"),),
                tuple((f"random vs patch, {t}",
                       ctl(N_THIRDS, "random", "baseline", vs_patch=True, **at("all", t)))
                      for t in ("first:25%", "mid:50%", "last:25%"))),
        Finding("N3", "does R_V transfer with the cache?", "next step", N_RV,
                (Test("C vs A, generated R_V, mix all layers", suff(N_RV, "rv", **MIX_ALL), "?"),
                 Test("C vs A, prompt-side R_V, mix all layers",
                      suff(N_RV, "rv_prompt", **MIX_ALL), "?")),
                (("transfer of prompt-side R_V (mix)", eff(N_RV, "rv_prompt", **MIX_ALL)),
                 ("transplant C vs B (generated R_V)",
                  cmp(N_RV, "source_natural", "rv", a_has="->baseline @", **TRANSPLANT_ALL)),
                 ("shuffle vs patch (prompt-side, mix)",
                  ctl(N_RV, "shuffle", "baseline", "rv_prompt", vs_patch=True, **MIX_ALL)))),
        Finding("N4", "attention entropy under KV swaps (generated tokens, per layer)",
                "next step", N_ATT,
                (Test("C (mix all) vs A, entropy",
                      layer_summary(N_ATT, "attention", "entropy",
                                    "C: patch recursive->baseline @ kv/mix L=all T=all "
                                    "align=end alpha=1", NAT_A, paired=True), "?"),
                 Test("C (transplant all) vs A, entropy",
                      layer_summary(N_ATT, "attention", "entropy",
                                    "C: patch recursive->baseline @ kv/transplant L=all "
                                    "T=all align=start alpha=1", NAT_A, paired=True), "?")),
                (("random (mix all) vs A, entropy",
                  layer_summary(N_ATT, "attention", "entropy",
                                "random recursive->baseline @ kv/mix L=all T=all align=end "
                                "alpha=1", NAT_A, paired=True)),)),
        Finding("N5", "transfer by source recursion level, L1..L5 into one constant target",
                "next step", N_LEVEL,
                (Test("source level vs logprob (mix late half)",
                      rho(N_LEVEL, "source_level", LOGPROB, control="patch"), "?"),
                 Test("source level vs generated R_V",
                      rho(N_LEVEL, "source_level", "rv", control="patch"), "?")),
                (("shuffled sources: level vs logprob",
                  rho(N_LEVEL, "source_level", LOGPROB, control="shuffle")),)),
        Finding("N6", "V-steering at alpha = 2 (v_proj, prompt and generation)", "next step",
                N_STEER,
                (Test("C vs A, L75%", suff(N_STEER, **at("75%", mode="steer")), "?"),
                 Test("C vs A, late half", suff(N_STEER, **at("50%:100%", mode="steer")), "?"),
                 Test("D vs B, late half", nec(N_STEER, **at("50%:100%", mode="steer")), "?")),
                (("random direction vs patch (C, late half)",
                  ctl(N_STEER, "random", "baseline", vs_patch=True,
                      **at("50%:100%", mode="steer"))),
                 ("keywords, C vs A, late half",
                  suff(N_STEER, KEYWORDS, **at("50%:100%", mode="steer"))),
                 ("keywords, D vs B, late half",
                  nec(N_STEER, KEYWORDS, **at("50%:100%", mode="steer"))))),
        Finding("N7", "single-layer R_V profile across depth, one pass", "next step (P1)",
                N_PROFILE,
                (Test("prompt-side R_V by depth, B vs A",
                      layer_summary(N_PROFILE, "profile", "rv_prompt_depth", NAT_B, NAT_A), "?"),
                 Test("generated R_V by depth, B vs A",
                      layer_summary(N_PROFILE, "profile", "rv_depth", NAT_B, NAT_A), "?")),
                (("prompt-side, B vs long control",
                  layer_summary(N_PROFILE, "profile", "rv_prompt_depth", NAT_B, NAT_L)),)),
    ]


def values() -> dict[str, str]:
    out: dict[str, str] = {f"power.{n}": f"{detectable_effect(n, None):.2f}" for n in (12, 15, 20)}
    for f in findings():
        for model in MODELS:
            out.update(finding_values(f, model))
    return out


def runs_table(findings: Sequence[Finding]) -> str:
    """Cells ok / planned per model for each sweep, from its `stats/summary.json`."""
    import json

    lines = ["| row | sweep | " + " | ".join(f"{m}: ok / planned (failed)" for m in MODELS.values())
             + " |", "|---|---|" + "---|" * len(MODELS)]
    for f in findings:
        path = FINDINGS_DIR / f.sweep / "stats" / "summary.json"
        if not path.exists():
            raise FindingsError(f"no {path.relative_to(REPO)}")
        by_model = {m["model"]: m for m in json.loads(path.read_text())["completeness"]["by_model"]}
        cells = [f"{by_model[m]['ok']} / {by_model[m]['planned']} ({by_model[m]['failed']})"
                 if m in by_model else "not run" for m in MODELS]
        report = "report.md" if (FINDINGS_DIR / f.sweep / "report.md").exists() else "stats/"
        link = f"[`{f.sweep}`](findings/{f.sweep}/{report})"
        lines.append(f"| {f.key} | {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- build


PLACEHOLDER = re.compile(r"\{\{\s*([\w.:%-]+)\s*\}\}")


def render() -> str:
    vals = values()
    vals["table"] = findings_table(findings(), vals)
    vals["runs"] = runs_table(findings())
    text = TEMPLATE.read_text()

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in vals:
            raise FindingsError(f"{TEMPLATE.relative_to(REPO)}: unknown key {m.group(1)!r}")
        return vals[m.group(1)]

    header = ("<!-- Generated by scripts/findings.py from docs/findings/template.md and the "
              "stats tables under docs/findings/: edit those, then run "
              "`python scripts/findings.py build`. -->\n")
    return header + PLACEHOLDER.sub(sub, text)


# --------------------------------------------------------------------------- collect


def _extras(sweep_dir: Path, out: Path) -> list[str]:
    """Per-cell, per-layer values the stats tables only average: attention, PR profile."""
    from rloop_ray.analysis import load_results  # the project itself, only for collect
    from rloop_ray.analysis.labels import normalise_cells

    cells = load_results(str(sweep_dir)).cells
    cells = cells[cells["status"] == "ok"]
    cells = normalise_cells(cells)
    written = []
    keep = ["model", "cell_id", "target_id", "source_id", "condition"]
    if "attn_entropy" in cells and cells["attn_entropy"].notna().any():
        rows = []
        for _, r in cells.iterrows():
            ent = r["attn_entropy"]
            if ent is None:
                continue
            for layer, e in enumerate(ent):
                rows.append({**{k: r[k] for k in keep}, "layer": layer, "entropy": e,
                             "mass_prompt": r["attn_mass_prompt"][layer]})
        pd.DataFrame(rows).to_parquet(out / "extra_attention.parquet", index=False)
        written.append("extra_attention.parquet")
    if "pr_by_layer" in cells and cells["pr_by_layer"].notna().any():
        rows = []
        for _, r in cells.iterrows():
            layers = list(r["profile_layers"])
            early = layers.index(int(r["layer_early"]))
            pr, prp = r["pr_by_layer"], r["pr_prompt_by_layer"]
            for i, layer in enumerate(layers):
                rv = pr[i] / pr[early] if pr is not None and pr[early] else np.nan
                rvp = prp[i] / prp[early] if prp is not None and prp[early] else np.nan
                rows.append({**{k: r[k] for k in keep}, "layer": layer, "rv_depth": rv,
                             "rv_prompt_depth": rvp})
        pd.DataFrame(rows).to_parquet(out / "extra_profile.parquet", index=False)
        written.append("extra_profile.parquet")
    return written


FIGURES = re.compile(r"^(transfer_heatmap_score_logprob_contrast|alpha_dose_score_logprob_contrast"
                     r"|rv_trajectory$|rv_by_depth|attention)")
"""The figures worth committing (PNG only), plus `rv_by_group` for natural-only sweeps;
the report's other figures stay in results/."""


def _local_links(report: str, dest: Path, name: str) -> str:
    """The report with links to figures that were not copied made plain text."""

    def image(m: re.Match[str]) -> str:
        return m.group(0) if (dest / m.group(1)).exists() else ""

    def link(m: re.Match[str]) -> str:
        if (dest / m.group(2)).exists():
            return m.group(0)
        return f"{m.group(1)} (in results/{name}/, not committed)"

    report = re.sub(r"!\[[^\]]*\]\((figures/[^)]+)\)", image, report)
    return re.sub(r"\[([^\]]*)\]\((figures/[^)]+)\)", link, report)


def collect(sweep_dir: Path) -> Path:
    stats_dir = sweep_dir / "stats"
    if not stats_dir.is_dir():
        raise FindingsError(f"{sweep_dir}: no stats/; run `rloop-ray stats {sweep_dir}` first")
    dest = FINDINGS_DIR / sweep_dir.name
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "stats").mkdir(parents=True)
    for f in sorted(stats_dir.glob("*.parquet")) + [stats_dir / "summary.json"]:
        shutil.copy2(f, dest / "stats" / f.name)
    if (sweep_dir / "figures").is_dir():
        (dest / "figures").mkdir()
        pngs = sorted((sweep_dir / "figures").glob("*.png"))
        patched = any(f.stem.startswith("transfer_heatmap") for f in pngs)
        for f in pngs:
            if FIGURES.match(f.stem) or (f.stem == "rv_by_group" and not patched):
                shutil.copy2(f, dest / "figures" / f.name)
    if (sweep_dir / "report.md").exists():
        (dest / "report.md").write_text(_local_links((sweep_dir / "report.md").read_text(),
                                                     dest, sweep_dir.name))
    for name in _extras(sweep_dir, dest / "stats"):
        print(f"  + stats/{name}")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="copy a sweep's stats tables into docs/findings/")
    c.add_argument("sweep_dirs", nargs="+", type=Path)
    b = sub.add_parser("build", help="render docs/findings.md")
    b.add_argument("--check", action="store_true", help="exit 1 if docs/findings.md is stale")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "collect":
            for d in args.sweep_dirs:
                print(f"{d} -> {collect(d).relative_to(REPO)}")
            return 0
        text = render()
        if args.check:
            if not OUTPUT.exists() or OUTPUT.read_text() != text:
                print(f"{OUTPUT.relative_to(REPO)} is stale: run python scripts/findings.py "
                      "build", file=sys.stderr)
                return 1
            return 0
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT.relative_to(REPO)}")
        return 0
    except FindingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
