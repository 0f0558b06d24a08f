"""Grid expansion: counts, content-hash ids, controls, classic conditions, work units
(rloop_ray/grid.py), and every grid file under sweeps/."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from pathlib import Path

import pytest

from rloop_ray.engine.types import CellRequest
from rloop_ray.grid import (
    NONE,
    Cell,
    Grid,
    WorkUnit,
    build_grid,
    classic_condition,
    expand,
    group_units,
    intervention_points,
    load_grid,
    resolve_models,
)
from rloop_ray.prompts import Prompt, PromptBank
from rloop_ray.spec import SpecValidationError, load_spec, load_spec_text

DATA = Path(__file__).parent / "data"
BANK_DIR = (DATA / "bank").resolve()
REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    return PromptBank.load(BANK_DIR)


def _grid(body: str, bank: PromptBank, prompts: str = "") -> Grid:
    """A grid on the fixture bank; `prompts` adds keys to the `prompts:` mapping."""
    extra = f", {prompts}" if prompts else ""
    text = f"name: t\nprompts: {{bank: '{BANK_DIR}'{extra}}}\n{body}"
    return build_grid(load_spec_text(text, source="g.yaml"), bank=bank)


def _full(bank: PromptBank) -> Grid:
    return build_grid(load_spec(DATA / "grid_full.yaml"), bank=bank)


# --------------------------------------------------------------------------- counts


def test_minimal_grid_counts(bank: PromptBank) -> None:
    g = build_grid(load_spec(DATA / "grid_minimal.yaml"), bank=bank)
    # cross pairing, one recursive source per baseline target (6), natural per target (6)
    assert g.counts() == {"tiny-llama": {"cells": 12, "units": 12}}
    assert collections.Counter(c.condition for c in g.cells) == {"A": 6, "C": 6}


def test_full_grid_counts(bank: PromptBank) -> None:
    g = _full(bank)
    points = 2 * 2 * 2 * 1 * 2 * 1  # site x layers x tokens x align x alpha x mode
    pairs, targets = 6, 6  # n_pairs=3 per target group (baseline for C, recursive for D)
    per_model = targets + pairs * points * 4 + targets * points  # natural, 4 per pair, self
    assert len(intervention_points(g.spec.interventions)) == points
    assert g.counts() == {m: {"cells": per_model, "units": 24}
                          for m in ("tiny-llama", "tiny-mistral")}
    cond = collections.Counter((c.model, c.condition) for c in g.cells)
    for m in ("tiny-llama", "tiny-mistral"):
        assert (cond[(m, "A")], cond[(m, "B")]) == (3, 3)
        assert (cond[(m, "C")], cond[(m, "D")]) == (3 * points, 3 * points)


def test_natural_only_grid(bank: PromptBank) -> None:
    g = build_grid(load_spec_text(
        f"name: t\nmodels: [m]\ninterventions: null\nprompts: {{bank: '{BANK_DIR}', "
        "target_groups: [recursive, long_control], levels: [4, 5]}\n"), bank=bank)
    assert {c.control for c in g.cells} == {"natural"}
    assert len(g.cells) == 4 + 3  # recursive at levels 4-5, all long controls (no level)
    assert {c.target_level for c in g.cells if c.target_group == "recursive"} == {4, 5}


def test_product_pairing_and_n_pairs_errors(bank: PromptBank) -> None:
    g = build_grid(load_spec_text(
        f"name: t\nmodels: [m]\nprompts: {{bank: '{BANK_DIR}', pairing: product, "
        "levels: [5]}\ncontrols: []\n"), bank=bank)
    assert len(g.cells) == 6 * 2  # every baseline target x every level-5 source
    with pytest.raises(SpecValidationError) as err:
        build_grid(load_spec_text(
            f"name: t\nmodels: [m]\nprompts: {{bank: '{BANK_DIR}', n_pairs: 99, "
            "levels: [5]}\n", source="g.yaml"), bank=bank)
    assert err.value.field == "prompts.n_pairs" and "only 12 distinct" in str(err.value)


def test_transplant_ignores_tokens_align_alpha_and_skips_prefill_sites() -> None:
    spec = load_spec_text("name: t\nmodels: [m]\ninterventions: {site: [kv, resid], "
                          "mode: [mix, transplant], tokens: [all, 'last:4'], alpha: [0.5, 1]}")
    pts = intervention_points(spec.interventions)
    transplant = [p for p in pts if p.mode == "transplant"]
    assert [(p.site, p.tokens, p.align, p.alpha) for p in transplant] == [("kv", "all", "start",
                                                                           1.0)]
    assert len([p for p in pts if p.mode == "mix"]) == 2 * 2 * 2


# --------------------------------------------------------------------------- ids


GOLDEN = dict(
    model="tiny-llama", model_name_or_path="tiny-llama", revision=None, dtype="float32",
    chat_template=False, target_id="t", target_group="baseline", target_level=None,
    target_text_hash="0" * 16, source_id="s", source_group="recursive", source_level=5,
    source_text_hash="1" * 16, pair_index=0, control="patch", site="kv", mode="mix",
    layers="50%:100%", tokens="all", align="end", alpha=1.0, seed=0, max_new_tokens=16,
    temperature=0.0, top_p=1.0, stop_at_eos=True, early_layer="12.5%", late_layer="84%",
    window=8, centering=False, trajectory=False, scorers=("keywords", "regex"),
)


def test_cell_id_is_sha256_of_canonical_json_and_pinned() -> None:
    cell = Cell(**GOLDEN)
    expected = hashlib.sha256(cell.canonical_json().encode()).hexdigest()[:16]
    assert cell.cell_id == expected
    # pinned: a change here orphans every stored result (resume would rerun everything)
    assert cell.cell_id == "631534ad95dbdd87"
    assert Cell.from_dict({**cell.to_dict(), "status": "ok"}) == cell
    with pytest.raises(ValueError, match="does not match"):
        Cell(**{**GOLDEN, "cell_id": "0" * 16})


@pytest.mark.parametrize("name", [f for f in GOLDEN])
def test_every_field_changes_the_id(name: str) -> None:
    base = Cell(**GOLDEN)
    value = GOLDEN[name]
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value + 1
    elif isinstance(value, tuple):
        new = value + ("logprob_contrast",)
    elif value is None:
        new = "x" if name == "revision" else 1
    else:
        new = value + "x"
    assert Cell(**{**GOLDEN, name: new}).cell_id != base.cell_id


def test_ids_are_stable_and_expansion_is_deterministic(bank: PromptBank) -> None:
    a, b = _full(bank), _full(PromptBank.load(BANK_DIR))
    assert [c.cell_id for c in a.cells] == [c.cell_id for c in b.cells]
    assert [u.unit_id for u in a.units] == [u.unit_id for u in b.units]
    assert len({c.cell_id for c in a.cells}) == len(a.cells)


def test_editing_a_prompt_text_changes_only_its_cells(bank: PromptBank) -> None:
    g = _grid("models: [m]\n", bank)
    victim = g.cells[1].target_id
    edited = PromptBank([dataclasses.replace(p, text=p.text + " Please.") if p.id == victim
                         else p for p in bank])
    g2 = _grid("models: [m]\n", edited)
    for c1, c2 in zip(g.cells, g2.cells, strict=True):
        touched = victim in (c1.target_id, c1.source_id)
        assert (c1.cell_id != c2.cell_id) == touched


def test_settings_change_every_id_but_new_axis_values_keep_old_ids(bank: PromptBank) -> None:
    base = {c.cell_id for c in _grid("models: [m]\n", bank).cells}
    longer = {c.cell_id for c in _grid("models: [m]\ngeneration: {max_new_tokens: 65}\n",
                                       bank).cells}
    assert not base & longer
    more = {c.cell_id for c in _grid("models: [m]\ninterventions: {alpha: [1.0, 0.5]}\n",
                                     bank).cells}
    assert base < more
    three = {c.cell_id for c in _grid("models: [m]\n", bank, prompts="n_pairs: 3").cells}
    assert three < base  # fewer pairs: a prefix of the same pairs


def test_seed_changes_the_pairs(bank: PromptBank) -> None:
    def pairs(seed: int) -> set[tuple[str, str | None]]:
        g = _grid("models: [m]\n", bank, prompts=f"seed: {seed}")
        return {(c.target_id, c.source_id) for c in g.cells if c.control == "patch"}

    assert pairs(0) == pairs(0) and pairs(0) != pairs(1)


def test_generation_seed_comes_from_the_cell_id(bank: PromptBank) -> None:
    g = _grid("models: [m]\ngeneration: {temperature: 0.7, n_samples: 3}\n", bank)
    natural = [c for c in g.cells if c.control == "natural"]
    assert {c.seed for c in natural} == {0, 1, 2}
    seeds = [c.to_request(g.prompt_texts()).generation.seed for c in natural]
    assert seeds == [int(c.cell_id[:8], 16) for c in natural]
    assert len(set(seeds)) == len(seeds)


# --------------------------------------------------------------------------- controls


def test_natural_is_one_cell_per_target_with_null_intervention(bank: PromptBank) -> None:
    g = _full(bank)
    natural = [c for c in g.cells if c.control == "natural"]
    keys = collections.Counter((c.model, c.target_id, c.seed) for c in natural)
    assert set(keys.values()) == {1}
    assert len(natural) == 2 * 6
    for c in natural:
        assert (c.site, c.mode, c.layers, c.tokens, c.align) == (NONE,) * 5
        assert c.alpha is None and c.source_id is None and c.pair_index is None
        req = c.to_request(g.prompt_texts())
        assert req.source_text is None and req.intervention.control == "natural"


def test_classic_conditions_present_or_absent(bank: PromptBank) -> None:
    full = {c.condition for c in _full(bank).cells}
    assert {"A", "B", "C", "D"} <= full
    ac = build_grid(load_spec_text(
        f"name: t\nmodels: [m]\nprompts: {{bank: '{BANK_DIR}', conditions: [A, C]}}\n"), bank=bank)
    assert {c.condition for c in ac.cells} == {"A", "C"}
    bc = build_grid(load_spec_text(
        f"name: t\nmodels: [m]\nprompts: {{bank: '{BANK_DIR}', conditions: [B, C]}}\n"
        "controls: []\n"), bank=bank)
    assert {c.condition for c in bc.cells} == {"A", "B", "C"}  # natural runs for every target
    assert classic_condition("patch", "recursive", "baseline") == "D"
    assert classic_condition("other", "baseline", "baseline") is None


def test_self_shuffle_random_other_sources(bank: PromptBank) -> None:
    g = _full(bank)
    patch_src = {(c.model, c.pair_index): c.source_id for c in g.cells if c.control == "patch"}
    for c in g.cells:
        if c.control == "self":
            assert c.source_id == c.target_id and c.pair_index is None
        elif c.control in ("shuffle", "random"):
            assert c.source_id == patch_src[(c.model, c.pair_index)]
        elif c.control == "other":
            assert c.source_id != c.target_id
            assert c.source_group == c.target_group
    # one shuffled source per pair: the same control seed at every intervention point
    shuffle_seeds = collections.defaultdict(set)
    for c in g.cells:
        if c.control == "shuffle":
            shuffle_seeds[(c.model, c.pair_index)].add(c.to_request(g.prompt_texts())
                                                       .intervention.control_seed)
    assert all(len(s) == 1 for s in shuffle_seeds.values())


def test_other_never_picks_the_target_even_in_a_group_of_two() -> None:
    prompts = [Prompt("b1", "baseline", "one"), Prompt("b2", "baseline", "two"),
               Prompt("r1", "recursive", "rec one", level=1),
               Prompt("r2", "recursive", "rec two", level=2)]
    g = build_grid(load_spec_text("name: t\nmodels: [m]\nprompts: {conditions: [C, D], "
                                  "pairing: product}\ncontrols: [other]\n"),
                   bank=PromptBank(prompts))
    others = [(c.target_id, c.source_id) for c in g.cells if c.control == "other"]
    assert sorted(set(others)) == [("b1", "b2"), ("b2", "b1"), ("r1", "r2"), ("r2", "r1")]
    with pytest.raises(SpecValidationError) as err:
        build_grid(load_spec_text("name: t\nmodels: [m]\ncontrols: [natural, other]\n",
                                  source="g.yaml"), bank=PromptBank(prompts[:1] + prompts[2:]))
    assert err.value.field == "controls[1]" and "needs another prompt" in str(err.value)


def test_unknown_group_error_points_at_the_grid_field(bank: PromptBank) -> None:
    with pytest.raises(SpecValidationError) as err:
        build_grid(load_spec_text(f"name: t\nmodels: [m]\nprompts:\n  bank: '{BANK_DIR}'\n"
                                  "  source_groups: [recursive, recurse]\n", source="g.yaml"),
                   bank=bank)
    assert err.value.field == "prompts.source_groups[1]" and err.value.line == 5
    assert "Did you mean 'recursive'?" in str(err.value)


# --------------------------------------------------------------------------- units, requests


def test_units_group_cells_by_model_source_target(bank: PromptBank) -> None:
    g = _full(bank)
    assert sum(len(u) for u in g.units) == len(g.cells)
    for u in g.units:
        assert {(c.model, c.source_id, c.target_id) for c in u.cells} == {
            (u.model, u.source_id, u.target_id)}
        ids = sorted(u.cell_ids)
        assert u.unit_id == hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    assert [u.unit_id for u in group_units(reversed(g.cells))] != []
    assert {u.unit_id for u in group_units(reversed(g.cells))} == {u.unit_id for u in g.units}


def test_requests_carry_the_cell(bank: PromptBank) -> None:
    g = _full(bank)
    texts = g.prompt_texts()
    unit: WorkUnit = next(u for u in g.units if any(c.control == "patch" for c in u.cells))
    reqs = unit.requests(texts)
    assert all(isinstance(r, CellRequest) for r in reqs)
    for c, r in zip(unit.cells, reqs, strict=True):
        assert r.cell_id == c.cell_id
        assert r.target_text == texts[c.target_id] and r.source_text == texts[c.source_id]
        iv = r.intervention
        assert (iv.site, iv.layers, iv.tokens, iv.align, iv.alpha, iv.mode, iv.control) == (
            c.site, c.layers, c.tokens, c.align, c.alpha, c.mode, c.control)
        assert r.generation.max_new_tokens == 16 and r.measure.window == 8
        assert r.measure.late_layer == "75%" and r.measure.early_layer == "0"
    c = unit.cells[0]
    with pytest.raises(ValueError, match="changed since the grid was expanded"):
        c.to_request({**texts, c.target_id: "edited"})
    with pytest.raises(KeyError, match="no text for prompt"):
        c.to_request({})


# --------------------------------------------------------------------------- models override


def test_models_override(bank: PromptBank) -> None:
    spec = load_spec(DATA / "grid_full.yaml")
    assert [m.id for m in resolve_models(spec, ["tiny-mistral", "x", "x"])] == ["tiny-mistral",
                                                                              "x"]
    (mistral,) = resolve_models(spec, ["tiny-mistral"])
    assert mistral.dtype == "bfloat16" and mistral.chat_template is True  # the spec's settings
    (other,) = resolve_models(spec, ["smollm2-135m"])
    assert other.name_or_path == "smollm2-135m" and other.dtype == "float32"
    g = build_grid(spec, models_override=["smollm2-135m"], bank=bank)
    assert {c.model for c in g.cells} == {"smollm2-135m"} and len(g.cells) == 486
    with pytest.raises(SpecValidationError, match="--model"):
        resolve_models(spec, ["two words"])


def test_expand_and_load_grid_agree(bank: PromptBank) -> None:
    assert expand(load_spec(DATA / "grid_minimal.yaml"), bank=bank) == list(
        load_grid(DATA / "grid_minimal.yaml").cells)


# --------------------------------------------------------------------------- sweeps/


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.retests, f"{path.name}: name the prior claims it re-tests (retests: [P..])"
    g = build_grid(spec)
    assert g.cells and g.units
    assert len({c.cell_id for c in g.cells}) == len(g.cells)
    texts = g.prompt_texts()
    assert all(isinstance(r, CellRequest) for r in g.units[0].requests(texts))


def test_quickstart_is_small() -> None:
    g = load_grid(REPO / "sweeps" / "quickstart.yaml")
    assert [m.id for m in g.models] == ["smollm2-135m"]
    assert 30 <= len(g.cells) <= 60
    assert {"A", "B", "C"} <= {c.condition for c in g.cells}
    assert {"natural", "self", "shuffle", "random"} <= {c.control for c in g.cells}


@pytest.mark.slow
def test_quickstart_units_run_on_the_engine(tiny_llama_path: Path) -> None:
    """End to end without Ray: a grid's requests through the real engine (tiny-llama)."""
    from rloop_ray.engine import Engine

    g = load_grid(REPO / "sweeps" / "quickstart.yaml", models_override=["tiny-llama"])
    texts = g.prompt_texts()
    target = g.cells[0].target_id
    units = [u for u in g.units if u.target_id == target]
    engine = Engine(str(tiny_llama_path), dtype="float32", device="cpu", chat_template=False)
    cells = [c for u in units for c in u.cells]
    rows = engine.run([r for u in units for r in u.requests(texts)])
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    natural = next(r for c, r in zip(cells, rows, strict=True) if c.control == "natural")
    for c, r in zip(cells, rows, strict=True):
        if c.control == "self" or c.alpha == 0.0:
            assert r["generated_ids"] == natural["generated_ids"], c
