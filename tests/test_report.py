"""The report leads with the answer: per model, a verdict derived from the numbers, the
identity cells as checks, the generations side by side, then figures, tables, provenance.

The quickstart runs for real on `tiny-llama` (in this process, `backend="local"`); the
verdict rules are checked on synthetic sweeps whose effects are known."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss
from synthetic import Effects, make_sweep

import rloop_ray
from rloop_ray.analysis import run_stats
from rloop_ray.analysis.document import html_table, inline_html, md_table
from rloop_ray.analysis.examples import clip_text
from rloop_ray.analysis.identity import identity_checks
from rloop_ray.analysis.labels import normalise_cells
from rloop_ray.analysis.power import detectable_effect, t_test_power
from rloop_ray.analysis.summary import (
    CONTROL_ONLY,
    EFFECT,
    NONSPECIFIC,
    NULL,
    SUFFICIENCY,
    UNRESOLVED,
    UNTESTABLE,
    build_summary,
)

N_BOOT = 200
VERDICT = re.compile(r"^(transfers|moves it|no detectable effect|not testable)")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quickstart")
    results = rloop_ray.run("sweeps/quickstart.yaml", model="tiny-llama", results=root,
                            backend="local", overwrite=True)
    assert results.sweep is not None and results.sweep.ok == 54
    return results, results.report(n_resamples=N_BOOT)


def _section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    nxt = md.find("\n## ", start + 3)
    return md[start: nxt if nxt >= 0 else len(md)]


def test_quickstart_report_leads_with_the_summary(quickstart):
    _, out = quickstart
    md = out.markdown.read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[0] == "Summary"
    assert headings == ["Summary", "Example generations", "Figures",
                        "Appendix: full tables", "Provenance"]
    # provenance and the grid come last, not first
    assert md.index("spec_hash") > md.index("## Provenance")
    html = out.html.read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html)[0] == "Summary"
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Figures</h2>") < html.index(
        "<details")
    assert html.index('<section id="provenance">') > html.index('<section id="tables">')


def test_quickstart_summary_carries_verdicts_and_numbers(quickstart):
    _, out = quickstart
    summary = _section(out.markdown.read_text(), "Summary")
    assert "### tiny-llama" in summary
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and "---" not in ln]
    header, body = rows[0], rows[1:]
    for col in ("intervention", "measure", "patch vs natural", "transfer (C−A)/(B−A)",
                "shuffle control", "random control", "verdict"):
        assert col in header
    assert body, "no summary rows"
    for row in body:
        verdict = re.split(r"(?<!\\)\|", row.strip().strip("|"))[-1].strip()
        assert VERDICT.match(verdict), verdict
        assert "p_fdr" in row
    # the intervention points with an effect, not the identities: alpha = 0 is a check
    assert "α = 1" in summary and "α = 0" not in summary
    assert "80% power for \\|d\\| ≥" in summary or "transfers" in summary
    # identities are checks: every decoded one exact, the rest copied from natural
    for label, total in (("'self' control", 12), ("alpha = 0 mix", 18)):
        hit = re.search(re.escape(label) + r" (\d+)/(\d+) (?:decoded )?cells exact"
                        r"(?:, (\d+) copied from natural)?", summary)
        assert hit, summary[:2000]
        exact, decoded, copied = int(hit[1]), int(hit[2]), int(hit[3] or 0)
        assert exact == decoded >= 1 and decoded + copied == total


def test_quickstart_examples_put_the_texts_side_by_side(quickstart):
    results, out = quickstart
    md = out.markdown.read_text()
    examples = _section(md, "Example generations")
    rows = [ln for ln in examples.splitlines() if ln.startswith("| target ")]
    assert len(rows) == 3
    cells = results.cells
    natural = cells[cells["is_natural"]].set_index("target_id")["generated_text"]
    target = re.match(r"\| target (\S+?):", rows[0]).group(1)
    first_words = clip_text(natural[target])[:10]
    assert first_words.replace("|", "\\|") in rows[0]
    assert "patched, layers 0%:50%" in examples and "patched, layers 50%:100%" in examples


def test_quickstart_figures_are_listed_and_constant_panels_left_out(quickstart):
    _, out = quickstart
    drawn = [f for f in out.figures if f.path is not None]
    assert drawn and all(f.svg is not None and f.svg.is_file() for f in drawn)
    heat = [f for f in drawn if f.name.startswith("transfer_heatmap")]
    assert heat and all("α = 0" not in f.svg.read_text() for f in heat)


# --- verdict rules on synthetic sweeps --------------------------------------------------------


def _c_rows(tmp_path, name: str, **kwargs):
    sw = make_sweep(tmp_path, name, models=("llama-tiny",), n_prompts=12, trajectory_steps=0,
                    **kwargs)
    res = run_stats(sw.path, n_resamples=N_BOOT)
    summary = build_summary(res)
    (ms,) = summary.models
    return ms, [r for r in ms.rows if r.comparison == SUFFICIENCY]


def test_a_specific_transfer_exceeds_every_control(tmp_path):
    ms, rows = _c_rows(tmp_path, "specific", controls=("shuffle", "random"),
                       effects=Effects(controls={"shuffle": 0.0, "random": 0.0}), seed=2)
    logprob = next(r for r in rows if r.metric == "score_logprob_contrast")
    assert logprob.kind == EFFECT and logprob.verdict == "transfers, and exceeds every control"
    assert {c.control for c in logprob.controls} == {"shuffle", "random"}
    assert 0.5 < logprob.transfer < 1.5 and logprob.transfer_low < logprob.transfer
    assert "exceed every control" in ms.headline[0]


def test_a_control_that_moves_as_much_makes_the_transfer_nonspecific(tmp_path):
    _, rows = _c_rows(tmp_path, "nonspecific", controls=("shuffle", "random"),
                      effects=Effects(controls={"shuffle": 1.0, "random": 0.0}), seed=2)
    logprob = next(r for r in rows if r.metric == "score_logprob_contrast")
    assert logprob.kind == NONSPECIFIC, logprob.verdict
    assert logprob.verdict == "transfers, but so does the shuffle control"
    assert logprob.matched_by == ["shuffle"]


def test_no_effect_states_the_detectable_effect_size(tmp_path):
    ms, rows = _c_rows(tmp_path, "null", controls=("shuffle",), effects=Effects.null())
    tested = [r for r in rows if r.kind != UNTESTABLE]
    assert tested and all(r.kind in (NULL, CONTROL_ONLY, UNRESOLVED) for r in tested)
    null = next(r for r in tested if r.kind == NULL)
    assert null.test == "paired_t"
    want = detectable_effect(null.n_pairs)
    assert null.detectable == pytest.approx(want)
    assert null.verdict == f"no detectable effect at this n: 80% power for |d| ≥ {want:.2g}"
    assert "0 of" in ms.headline[0] and "power" in ms.headline[0]


def test_detectable_effect_inverts_the_noncentral_t_power():
    # G*Power: paired t, two-sided alpha 0.05, power 0.8, n = 12 pairs -> d_z = 0.8877
    assert detectable_effect(12) == pytest.approx(0.8877, abs=1e-3)
    # two groups of 10: d = 1.3249
    assert detectable_effect(10, 10) == pytest.approx(1.3249, abs=1e-3)
    for n in (3, 8, 40):
        d = detectable_effect(n)
        assert t_test_power(d, n) == pytest.approx(0.8, abs=1e-6)
        crit = ss.t.ppf(0.975, n - 1)
        direct = ss.nct.sf(crit, n - 1, d * math.sqrt(n)) + ss.nct.cdf(-crit, n - 1,
                                                                       d * math.sqrt(n))
        assert direct == pytest.approx(0.8, abs=1e-6)
    assert math.isnan(detectable_effect(1))


# --- identity checks ------------------------------------------------------------------------


def _cells(rows: list[dict]) -> pd.DataFrame:
    base = {"model": "m", "status": "ok", "source_group": "recursive",
            "target_group": "baseline", "site": "kv", "mode": "mix", "layers": "all",
            "tokens": "all", "align": "end", "source_id": "s"}
    return normalise_cells(pd.DataFrame([{**base, "cell_id": f"c{i}", "derived_from": None,
                                          **r} for i, r in enumerate(rows)]))


def test_identity_cells_are_counted_as_exact_matches_not_tested():
    natural = {"control": "natural", "site": "none", "alpha": None}
    rows = [
        {**natural, "target_id": "t1", "rv": 0.673033, "generated_ids": [1, 2, 3]},
        {**natural, "target_id": "t2", "rv": 0.947593, "generated_ids": [4, 5]},
        # float noise of a batch with other padding: still exact
        {"control": "patch", "alpha": 0.0, "target_id": "t1", "rv": 0.6730334,
         "generated_ids": [1, 2, 3]},
        {"control": "self", "alpha": 1.0, "target_id": "t2", "rv": 0.947593,
         "generated_ids": [4, 5]},
        # a token that differs: not exact
        {"control": "shuffle", "alpha": 0.0, "target_id": "t2", "rv": 0.947593,
         "generated_ids": [4, 6]},
        # a real patch is no identity
        {"control": "patch", "alpha": 1.0, "target_id": "t1", "rv": 0.5,
         "generated_ids": [9]},
    ]
    checks = {c.kind: c for c in identity_checks(_cells(rows), ["rv"])}
    zero, self_ = checks["alpha0"], checks["self"]
    assert (zero.n, zero.n_matched, zero.n_same_tokens, zero.n_exact) == (2, 2, 1, 1)
    assert not zero.exact and zero.max_abs_diff["rv"] == pytest.approx(4e-7, abs=1e-9)
    assert (self_.n, self_.n_exact) == (1, 1) and self_.exact
    assert "1 of 1 decoded cells reproduce their natural run exactly" in self_.sentence(0.05)
    assert "1 of 2 decoded cells reproduce their natural run exactly" in zero.sentence(0.05)


def test_copied_identity_cells_are_counted_apart_from_decoded_ones():
    natural = {"control": "natural", "site": "none", "alpha": None}
    rows = [
        {**natural, "cell_id": "nat1", "target_id": "t1", "rv": 0.5, "generated_ids": [1]},
        {"control": "patch", "alpha": 0.0, "target_id": "t1", "rv": 0.5,
         "generated_ids": [1], "derived_from": "nat1"},
        {"control": "shuffle", "alpha": 0.0, "target_id": "t1", "rv": 0.5,
         "generated_ids": [1], "derived_from": "nat1"},
        {"control": "random", "alpha": 0.0, "target_id": "t1", "rv": 0.5000001,
         "generated_ids": [1], "derived_from": None},  # a sentinel: decoded
    ]
    (check,) = identity_checks(_cells(rows), ["rv"])
    assert (check.n_matched, check.n_derived, check.n_decoded, check.n_decoded_exact) == (
        3, 2, 1, 1)
    assert check.short() == "alpha = 0 mix 1/1 decoded cells exact, 2 copied from natural"
    assert "2 more were not decoded but copied" in check.sentence(0.05)


# --- safe rendering -------------------------------------------------------------------------


def test_html_rendering_escapes_everything_it_did_not_write():
    frame = pd.DataFrame({"<b>col</b>": ["<script>alert(1)</script>\nsecond line", 1.5]})
    html = str(html_table(frame))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;col&lt;/b&gt;" in html and "<br>second line" in html
    assert str(inline_html("a `<x>` & b")) == "a <code>&lt;x&gt;</code> &amp; b"
    md = md_table(pd.DataFrame({"a|b": ["x|y\nz"], "n": [np.float64(0.5)]}))
    assert "x\\|y · z" in md and "a\\|b" in md and "0.5" in md


def test_report_html_escapes_generated_text(tmp_path):
    sw = make_sweep(tmp_path, "escape", models=("llama-tiny",), n_prompts=4, controls=(),
                    trajectory_steps=0)
    from rloop_ray.store import ResultStore

    store = ResultStore(sw.path)
    hostile = [{**r, "generated_text": "<script>alert(1)</script>", "attempt": 2}
               for r in sw.rows]
    store.write_cells(hostile)  # same cell ids, later shard: the loader keeps one row each
    out = rloop_ray.load(sw.path).report(n_resamples=N_BOOT, figures=False)
    html = out.html.read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


def test_the_templates_ship_with_the_package():
    """A wheel (not an editable install) must carry what `PackageLoader` reads."""
    import fnmatch
    from pathlib import Path

    from rloop_ray.analysis import document

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"][document.TEMPLATE_PACKAGE]
    folder = Path(document.__file__).parent / document.TEMPLATE_DIR
    files = [p for p in folder.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"report.html.j2", "report.md.j2", "report.css"}
    for path in files:
        assert any(fnmatch.fnmatch(f"{document.TEMPLATE_DIR}/{path.name}", g) for g in globs)
    deps = " ".join(project["project"]["dependencies"])
    assert "jinja2" in deps and "tabulate" in deps
