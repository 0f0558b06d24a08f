"""The newer grid axes and fields: `during`, `mode: steer`, `match:` token specs, layer
expanders (`each`, `windows`) and the measure fields, from the YAML to the engine request,
the pre-flight and `validate`; and the promise that grids which use none of them keep
their cell ids, unit ids and spec hashes (stored sweeps stay resumable).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rloop_ray import grid as grid_mod
from rloop_ray.cli import app
from rloop_ray.engine.interventions import PositionMap, position_map
from rloop_ray.engine.selectors import SpecError, resolve_tokens, validate_token_spec
from rloop_ray.grid import (
    Cell,
    Grid,
    PromptLengths,
    build_grid,
    check_models,
    grid_warnings,
    intervention_points,
    load_grid,
)
from rloop_ray.plan import Plan, compare, describe_change, spec_field_changes
from rloop_ray.prompts import Prompt, PromptBank
from rloop_ray.spec import SpecValidationError, load_spec, load_spec_text
from rloop_ray.store import ResultStore
from rloop_ray.vocab import (
    LATER_SPEC_DEFAULTS,
    NONE,
    PREFILL,
    STEER_CONTROLS,
    steer_source_id,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
BANK_DIR = (Path(__file__).parent / "data" / "bank").resolve()


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    return PromptBank.load(BANK_DIR)


def _spec(body: str, prompts: str = "") -> Any:
    extra = f", {prompts}" if prompts else ""
    return load_spec_text(f"name: t\nmodels: [m]\nprompts: {{bank: '{BANK_DIR}'{extra}}}\n"
                          f"{body}", source="g.yaml")


def _grid(body: str, bank: PromptBank, prompts: str = "", **kw: Any) -> Grid:
    return build_grid(_spec(body, prompts), bank=bank, **kw)


def _info(depth: int) -> Any:
    return lambda model: SimpleNamespace(n_layers=depth, max_position_embeddings=512)


def _word_lengths(model: Any, prompts: Mapping[str, Prompt]) -> PromptLengths:
    """Exact lengths from a whitespace "tokenizer": one token per word plus a final one
    (the first query), so the prefill is the words."""
    texts = {pid: tuple(p.text.split()) for pid, p in prompts.items()}
    counts = {pid: len(t) + 1 for pid, t in texts.items()}
    return PromptLengths(counts, counts, True, "words", texts)


# --------------------------------------------------------------------------- old ids stay

QUICKSTART_IDS = {  # computed before `during`, steer and the measure fields existed
    ("natural", "base-030", None, "none", None): "ea9fc6b92a11cdb0",
    ("self", "base-030", "base-030", "0%:50%", 0.0): "3ba5ea3a79ed85f6",
    ("shuffle", "base-030", "rec-L1-017", "0%:50%", 0.0): "4b50fae3c391caca",
    ("patch", "base-030", "rec-L1-017", "0%:50%", 0.0): "c679c4e4b56cd349",
}
QUICKSTART_SPEC_HASH = "a1a1b4d059b9f9186d133c7aa8d553d5e06624e671322c2620891040eb66f86b"


def test_quickstart_ids_and_spec_hash_are_unchanged() -> None:
    g = load_grid(QUICKSTART)
    ids = {(c.control, c.target_id, c.source_id, c.layers, c.alpha): c.cell_id
           for c in g.cells}
    assert {k: ids[k] for k in QUICKSTART_IDS} == QUICKSTART_IDS
    assert g.units[0].unit_id == "d8e24030bd41ba1d" and len(g.cells) == 54
    assert g.spec.spec_hash() == QUICKSTART_SPEC_HASH
    during = collections.Counter((c.control == "natural", c.during) for c in g.cells)
    assert during == {(True, NONE): 6, (False, PREFILL): 48}


def test_later_fields_enter_the_id_only_when_set(bank: PromptBank) -> None:
    base = {c.cell_id for c in _grid("", bank).cells}
    for body in ("measure: {attention: true}\n", "measure: {layers: all}\n",
                 "measure: {kl_from_natural: false}\n", "measure: {top_logprobs: 0}\n",
                 "measure: {token_logprobs: true}\n"):
        assert not base & {c.cell_id for c in _grid(body, bank).cells}, body
    same = _grid("measure: {attention: false, top_logprobs: 5, layers: null}\n"
                 "interventions: {during: prefill}\n", bank)
    assert {c.cell_id for c in same.cells} == base
    assert same.spec.spec_hash() == _spec("").spec_hash()
    assert _spec("measure: {attention: true}\n").spec_hash() != _spec("").spec_hash()


def test_new_fields_reach_the_engine_request(bank: PromptBank) -> None:
    g = _grid("measure: {attention: true, layers: [1, '50%'], kl_from_natural: false, "
              "top_logprobs: 0, token_logprobs: true}\n", bank)
    cell = next(c for c in g.cells if c.control == "patch")
    m = cell.to_request(g.prompt_texts()).measure
    assert (m.attention, m.layers, m.kl_from_natural, m.top_logprobs, m.token_logprobs) == (
        True, ("1", "50%"), False, 0, True)
    assert Cell.from_dict(cell.to_dict()) == cell


# --------------------------------------------------------------------------- during


def test_during_is_a_coordinate_and_reaches_the_intervention(bank: PromptBank) -> None:
    prefill = _grid("", bank)
    both = _grid("interventions: {during: [prefill, generation, both]}\n", bank)
    old = {c.cell_id for c in prefill.cells}
    assert old < {c.cell_id for c in both.cells}  # prefill cells keep their ids
    texts = both.prompt_texts()
    for c in both.cells:
        row = c.coordinates()
        assert row["during"] == c.during
        if c.control == "natural":
            assert c.during == NONE
            continue
        assert c.to_request(texts).intervention.during == c.during
        assert (c.cell_id in old) == (c.during == PREFILL)
    counts = collections.Counter(c.during for c in both.cells if c.control != "natural")
    assert counts["generation"] == counts["both"] == counts[PREFILL] > 0


def test_generation_only_mixes_ignore_tokens_and_align(bank: PromptBank) -> None:
    g = _grid("interventions: {site: resid, mode: [mix, steer], tokens: [all, 'last:2'], "
              "align: [start, end], during: [prefill, generation, both]}\n", bank)
    points = collections.Counter((c.mode, c.during, c.tokens, c.align) for c in g.cells
                                 if c.control == "patch")
    n = len({c.target_id for c in g.cells if c.control == "patch"})
    assert points[("mix", "generation", "all", "start")] == n
    assert not [k for k in points if k[:2] == ("mix", "generation") and k[2:] != ("all",
                                                                                  "start")]
    assert {k[2:] for k in points if k[:2] == ("mix", "both")} == {
        (t, a) for t in ("all", "last:2") for a in ("start", "end")}
    # a steer's tokens also choose what its group means average over: they stay
    assert {k[2] for k in points if k[:2] == ("steer", "generation")} == {"all", "last:2"}
    assert any("ignore the tokens and align axes" in w for w in grid_warnings(g))


@pytest.mark.parametrize(("body", "field", "needle"), [
    ("interventions: {site: k, during: generation}\n", "interventions.during[0]",
     "site 'k' cannot be patched during generation"),
    ("interventions: {mode: transplant, during: [both]}\n", "interventions.during[0]",
     "not allowed with mode 'transplant'"),
    ("interventions: {site: [kv, k], during: generation}\n", "interventions.site[1]",
     "site 'k' gets no cells"),
    ("interventions: {during: [during]}\n", "interventions.during[0]",
     "Allowed: prefill, generation, both"),
    ("interventions: {mode: steer}\n", "interventions.mode[0]",
     "a steering vector is added at resid, v_proj only"),
])
def test_combinations_that_cannot_run_are_errors(body: str, field: str, needle: str) -> None:
    with pytest.raises(SpecValidationError) as err:
        _spec(body)
    assert err.value.field == field and needle in str(err.value)
    assert err.value.line == 4 and str(err.value).startswith("g.yaml:4")


def test_mixed_axes_skip_what_cannot_run_and_say_so(bank: PromptBank) -> None:
    g = _grid("interventions: {site: [kv, k], mode: [mix, transplant], "
              "during: [prefill, generation]}\n", bank)
    combos = {(c.site, c.mode, c.during) for c in g.cells if c.control != "natural"}
    assert combos == {("kv", "mix", "prefill"), ("kv", "mix", "generation"),
                      ("k", "mix", "prefill"), ("kv", "transplant", "prefill"),
                      ("k", "transplant", "prefill")}
    (line,) = [w for w in grid_warnings(g) if "combination" in w]
    assert "k/mix/generation" in line and "kv/transplant/generation" in line


# --------------------------------------------------------------------------- steer

STEER = "interventions: {site: resid, mode: steer, alpha: [0.0, 4.0], tokens: 'last:2'}\n"


def test_steer_is_one_cell_per_target_and_source_group(bank: PromptBank) -> None:
    g = _grid(STEER + "controls: [natural, self, shuffle, random, other]\n", bank,
              prompts="conditions: [C, D], levels: [4, 5]")
    steer = [c for c in g.cells if c.mode == "steer"]
    assert {c.control for c in steer} == set(STEER_CONTROLS) - {"natural"} | {"patch"}
    per = collections.Counter((c.target_id, c.control) for c in steer)
    assert set(per.values()) == {2}  # two alphas: not one per source prompt
    targets = {c.target_id for c in steer}
    assert len(targets) == 6 + 4  # every paired target: 6 baseline, 4 recursive (levels 4-5)
    texts = g.prompt_texts()
    for c in steer:
        assert c.pair_index is None and c.align == NONE
        assert c.source_level is None
        req = c.to_request(texts)
        assert req.source_text is None and req.target_text == texts[c.target_id]
        s = req.steer
        assert s is not None and (s.source_group, s.target_group) == (c.source_group,
                                                                      c.target_group)
        if c.control == "self":
            assert c.source_group == c.target_group and s.source_texts == s.target_texts
        else:
            assert c.source_group != c.target_group
        assert c.source_id == steer_source_id(c.source_group) == f"mean:{c.source_group}"
        for group, given in ((s.source_group, s.source_texts), (s.target_group, s.target_texts)):
            pool = sorted((p for p in bank if p.group == group
                           and (p.level is None or p.level in (4, 5))), key=lambda p: p.id)
            assert given == tuple(p.text for p in pool)  # level-filtered, sorted by id
            assert {p.id for p in pool} <= set(g.prompts)
    skipped = [w for w in grid_warnings(g) if "do not apply to steer points" in w]
    assert skipped and "shuffle, other" in skipped[0]
    non_steer_alpha = [w for w in grid_warnings(g) if "extrapolation" in w]
    assert not non_steer_alpha  # alpha 4 scales a vector; it is no extrapolated mix


def test_steer_units_and_prompt_ids(bank: PromptBank) -> None:
    g = _grid(STEER + "controls: [natural, self, random]\n", bank)
    for unit in g.units:
        if unit.source_id and unit.source_id.startswith("mean:"):
            ids = set(unit.prompt_ids)
            assert unit.target_id in ids and unit.source_id not in ids
            assert {p for c in unit.cells for p in c.steer_prompt_ids()} <= ids
    assert all(not p.startswith("mean:") for p in g.prompts)


def test_editing_a_group_prompt_changes_its_steer_cells_and_resume_notices(
        bank: PromptBank) -> None:
    body = "interventions: {site: resid, mode: [mix, steer]}\ncontrols: [natural]\n"
    before = _grid(body, bank, prompts="n_pairs: 2")
    used = {c.source_id for c in before.cells if c.mode == "mix"}
    victim = next(p.id for p in bank if p.group == "recursive" and p.id not in used)
    edited = PromptBank([dataclasses.replace(p, text=p.text + " Now.") if p.id == victim
                         else p for p in bank])
    after = _grid(body, edited, prompts="n_pairs: 2")
    for c1, c2 in zip(before.cells, after.cells, strict=True):
        # only steer cells whose vector uses the recursive group change
        assert (c1.cell_id != c2.cell_id) == (c1.mode == "steer")
    change = compare(Plan.from_units(before.units), Plan.from_units(after.units))
    n_steer = sum(c.mode == "steer" for c in before.cells)
    assert change.added == change.removed == {"m": n_steer}
    lines = describe_change(
        change, old_spec=None, new_spec={},
        old_prompts={pid: p.text_hash for pid, p in before.prompts.items()},
        new_prompts={pid: p.text_hash for pid, p in after.prompts.items()})
    assert f"prompts text edited: {victim}" in lines


def test_steer_request_refuses_an_edited_group_text(bank: PromptBank) -> None:
    g = _grid(STEER, bank)
    cell = next(c for c in g.cells if c.mode == "steer")
    pid = cell.steer_source_prompts[0][0]
    with pytest.raises(ValueError, match="changed since the grid was expanded"):
        cell.to_request({**g.prompt_texts(), pid: "edited"})


# --------------------------------------------------------------------------- match:


def test_match_spec_selects_by_token_text() -> None:
    texts = ["<s>", " Notice", " the", " notic", "ing", " self"]
    assert resolve_tokens("match:(?i)notic", 6, texts) == [1, 3]
    assert resolve_tokens("match:^ self$", 6, texts) == [5]
    assert resolve_tokens("match:xyz", 6, texts) == []
    with pytest.raises(ValueError, match="no token texts were given"):
        resolve_tokens("match:self", 6)
    with pytest.raises(ValueError, match="5 token texts for 6 positions"):
        resolve_tokens("match:self", 6, texts[:5])
    for bad in ("match:(", "match:"):
        with pytest.raises(SpecError):
            validate_token_spec(bad)
    pmap = position_map("match:(?i)notic|self", "end", 6, 3, token_texts=texts)
    assert pmap.n_selected == 3 and pmap.target == [3, 5] and pmap.n_unmatched == 1
    assert position_map("last:2", "start", 6, 6).n_selected == 2
    assert PositionMap([1], [1], 2).n_selected == 3


def test_bad_regex_is_a_spec_error_with_file_and_line() -> None:
    with pytest.raises(SpecValidationError) as err:
        _spec("interventions:\n  tokens: [all, 'match:[a-']\n")
    assert err.value.field == "interventions.tokens[1]" and err.value.line == 5
    assert "bad regex" in str(err.value)


def test_match_preflight_warns_on_some_targets_and_fails_on_all(bank: PromptBank) -> None:
    g = _grid("interventions: {tokens: ['match:(?i)^(notice|observe|self)']}\n", bank,
              prompts="conditions: [C, D]")
    (report,) = check_models(g, _info(4), lengths_fn=_word_lengths)
    (warning,) = [w for w in report.warnings if "EmptyTokenSelection" in w]
    pairs = {(c.target_id, c.source_id) for c in g.cells if c.control == "patch"}
    words = {pid: p.text.split() for pid, p in g.prompts.items()}

    def patchable(target: str, source: str) -> bool:  # a match with an aligned source
        t, s = words[target], words[source]
        hit = [i for i, w in enumerate(t) if w.lower().startswith(("notice", "observe",
                                                                   "self"))]
        return any(0 <= i - len(t) + len(s) < len(s) for i in hit)  # align: end

    failing = {t for t, s in pairs if not patchable(t, s)}
    assert 0 < len(failing) < len(pairs)
    assert warning.startswith(f"match:(?i)^(notice|observe|self) selects no token on "
                              f"{len(failing)} of {len(pairs)} targets: those cells will fail "
                              "as EmptyTokenSelection")
    none = _grid("interventions: {tokens: ['match:zzz']}\n", bank)
    with pytest.raises(SpecValidationError) as err:
        check_models(none, _info(4), lengths_fn=_word_lengths)
    assert err.value.field == "interventions.tokens[0]" and "on any of the" in str(err.value)


def test_match_without_a_tokenizer_is_not_checked_but_said(bank: PromptBank) -> None:
    g = _grid("interventions: {tokens: ['match:zzz']}\n", bank)
    (report,) = check_models(g, _info(4), lengths_fn=lambda m, p: grid_mod
                             .estimate_prompt_lengths(m, p, "no tokenizer"))
    assert any("is not checked" in w for w in report.warnings)


# --------------------------------------------------------------------------- layers


def test_each_and_windows_expand_without_a_config_when_absolute(bank: PromptBank) -> None:
    def no_config(model: Any) -> int:
        raise AssertionError("absolute expanders need no config")

    g = _grid("interventions: {layers: ['1:4', {each: '1:4'}, {windows: 2, step: 2, "
              "over: '0:6'}]}\n", bank, depth_fn=no_config)
    layers = list(dict.fromkeys(c.layers for c in g.cells if c.control != "natural"))
    assert layers == ["1:4", "1", "2", "3", "0:2", "2:4", "4:6"]
    assert g.layer_points["m"] == (("1:4",), ("1", "2", "3"), ("0:2", "2:4", "4:6"))


def test_fractions_expand_per_model(bank: PromptBank) -> None:
    spec = load_spec_text(f"name: t\nmodels: [a, b]\nprompts: {{bank: '{BANK_DIR}'}}\n"
                          "interventions: {layers: [{each: '50%:100%'}, {windows: 3}]}\n")
    depth = {"a": 4, "b": 6}
    g = build_grid(spec, bank=bank, depth_fn=lambda m: depth[m.id])
    by_model = {m: sorted({c.layers for c in g.cells_for(m) if c.control != "natural"})
                for m in depth}
    assert by_model == {"a": sorted(["2", "3", "0:3", "1:4"]),
                        "b": sorted(["3", "4", "5", "0:3", "1:4", "2:5", "3:6"])}
    assert len(intervention_points(spec.interventions, 6)) == 7


@pytest.mark.parametrize(("layers", "needle"), [
    ("[{each: '1:3', windows: 2}]", "either {each: 'a:b'}"),
    ("[{each: '1:3', step: 2}]", "`step` and `over` belong to {windows: W}"),
    ("[{windows: 0}]", "greater than or equal to 1"),
    ("[{each: '3:1'}]", "is empty"),
    ("[{eahc: '1:3'}]", "Did you mean 'each'?"),
])
def test_bad_expanders_are_spec_errors(layers: str, needle: str) -> None:
    with pytest.raises(SpecValidationError) as err:
        _spec(f"interventions:\n  layers: {layers}\n")
    assert err.value.field.startswith("interventions.layers[0]") and err.value.line == 5
    assert needle in str(err.value)


def test_expanders_that_do_not_fit_a_model(bank: PromptBank) -> None:
    with pytest.raises(SpecValidationError) as err:
        _grid("interventions:\n  layers: ['0', {windows: 9, over: '50%:100%'}]\n", bank,
              depth_fn=lambda m: 8)
    assert err.value.field == "interventions.layers[1]" and err.value.line == 5
    assert "a window of 9 layers does not fit in the 4 layers" in str(err.value)
    with pytest.raises(SpecValidationError) as err:
        _grid("interventions: {layers: [{each: '50%:'}]}\n", bank,
              depth_fn=lambda m: (_ for _ in ()).throw(OSError("no config here")))
    assert "cannot be read (OSError: no config here)" in str(err.value)
    deep = _grid("interventions: {layers: [{each: '2:6'}]}\n", bank)
    with pytest.raises(SpecValidationError) as err:
        check_models(deep, _info(4), lengths_fn=_word_lengths)
    assert err.value.field == "interventions.layers[0]"
    assert "point '4': layer 4 is out of range for a 4-layer model" in str(err.value)


def test_measure_layers_are_checked_against_depth(bank: PromptBank) -> None:
    ok = _grid("measure: {layers: [0, '50%', -1]}\n", bank)
    (report,) = check_models(ok, _info(8), lengths_fn=_word_lengths)
    assert report.profile_layers == [0, 4, 7]
    bad = _grid("measure: {layers: [0, 12]}\n", bank)
    with pytest.raises(SpecValidationError) as err:
        check_models(bad, _info(8), lengths_fn=_word_lengths)
    assert err.value.field == "measure.layers[1]" and "out of range" in str(err.value)
    with pytest.raises(SpecValidationError, match="measure.top_logprobs"):
        _spec("measure: {top_logprobs: 101}\n")


def test_validate_explains_the_new_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr(grid_mod, "default_model_info", _info(8))
    monkeypatch.setattr(grid_mod, "default_prompt_lengths",
                        lambda m, p, token_texts=False: _word_lengths(m, p))
    path = tmp_path / "g.yaml"
    path.write_text(
        f"name: t\nmodels: [m]\nprompts: {{bank: '{BANK_DIR}', conditions: [C, D]}}\n"
        "interventions:\n  site: resid\n  layers: ['2:5', {each: '50%:100%'}, {windows: 4, "
        "step: 2}]\n  tokens: [all, 'match:(?i)^(notice|how|the)']\n  mode: [mix, steer]\n"
        "  during: [prefill, both]\ncontrols: [natural, self, shuffle]\n"
        "measure: {layers: all, attention: true}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert ("layers 2:5 -> 2-4 (3 layers): ONE block of 3 layers patched together in each "
            'cell; {each: "2:5"} gives one point per layer') in out
    assert 'layers {each: "50%:100%"} -> 4 points, 1 layer each: 4, 5, 6, 7' in out
    assert "layers {windows: 4, step: 2} -> 3 points, 4 layers each: 0:4, 2:6, 4:8" in out
    assert "layer profile (measure.layers) -> 0-7 (8 layers)" in out
    assert "during: prefill, both:" in out and "steer:" in out and "mean:<group>" in out
    assert "tokens match:(?i)^(notice|how|the): the prefill positions whose decoded" in out
    assert "attention (attn_*): on" in out and "kl_from_natural (first step): on" in out
    assert "controls shuffle do not apply to steer points" in out
    assert "selects no token on" in out  # baseline targets have no 'notice'


# --------------------------------------------------------------------------- old rows


def test_rows_without_a_during_column_read_as_prefill(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s")
    store.prepare({"name": "s"})
    old = pa.table({"cell_id": ["n1", "p1"], "status": ["ok", "ok"],
                    "control": ["natural", "patch"], "site": ["none", "kv"]})
    Path(store.cells_path).mkdir(parents=True, exist_ok=True)
    pq.write_table(old, Path(store.cells_path) / "part-old.parquet")
    store.write_cells([{"cell_id": "g1", "status": "ok", "control": "patch",
                        "during": "generation"}])
    cells = store.read_cells().to_pylist()
    assert {r["cell_id"]: r["during"] for r in cells} == {"n1": NONE, "p1": PREFILL,
                                                          "g1": "generation"}
    only = store.read_cells(["cell_id", "during"])
    assert only.column_names == ["cell_id", "during"]
    assert dict(zip(*only.to_pydict().values(), strict=True))["n1"] == NONE
    assert store.read_sweep().cells.column("during").null_count == 0


def test_a_recorded_spec_without_the_later_fields_is_no_change() -> None:
    new = load_spec(QUICKSTART).model_dump(mode="json")
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}
    for dotted in LATER_SPEC_DEFAULTS:
        section, key = dotted.split(".")
        old[section].pop(key)
    assert spec_field_changes(old, new) == []
    new["measure"]["attention"] = True
    assert spec_field_changes(old, new) == ["measure.attention: false -> true"]
