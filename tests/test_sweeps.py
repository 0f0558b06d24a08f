"""The sweeps that re-test the prior claims (sweeps/README.md).

tests/test_grid.py loads and expands every `sweeps/*.yaml`; this file adds the grids in
subdirectories (`sweeps/smollm2/`), checks every grid's layer specs against stand-in
configs of the depths they are meant for (no download: only `n_layers` matters), and
pins the layers each claim's reported design names, so a wrong fraction cannot slip in.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest

from rloop_ray.engine.types import CellRequest
from rloop_ray.grid import Grid, build_grid, check_models, load_grid
from rloop_ray.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SWEEPS_DIR = REPO / "sweeps"
ALL = sorted(SWEEPS_DIR.rglob("*.yaml"))
NESTED = [p for p in ALL if p.parent != SWEEPS_DIR]
CLAIM_SWEEPS = sorted(SWEEPS_DIR.glob("p[1-9]_*.yaml"))
NEXT_SWEEPS = sorted(SWEEPS_DIR.glob("next_*.yaml"))
"""The earlier work's own next steps (docs/findings.md), one grid per question."""
SMOLLM2 = sorted((SWEEPS_DIR / "smollm2").glob("*.yaml"))
ONE_TARGET_BANK = REPO / "banks" / "one_target"


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(SWEEPS_DIR)) for p in paths]


@cache
def _grid(path: Path) -> Grid:
    """Grids are immutable; build each once per session (the large ones take a second)."""
    return load_grid(path)


def _reports(grid: Grid, n_layers: int) -> dict:
    info = SimpleNamespace(n_layers=n_layers, max_position_embeddings=8192)
    return {r.model: r for r in check_models(grid, info_fn=lambda _m: info)}


def test_the_claim_sweeps_and_smollm2_variants_exist() -> None:
    claims = {c for p in CLAIM_SWEEPS for c in load_spec(p).retests}
    assert claims == {f"P{i}" for i in range(1, 10)}
    assert {c for p in SMOLLM2 for c in load_spec(p).retests} >= {"P1", "P2", "P5", "P8"}


@pytest.mark.parametrize("path", NESTED, ids=_ids(NESTED))
def test_nested_sweep_validates_from_any_directory(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the prompt bank is found relative to the grid file
    spec = load_spec(path)
    assert spec.retests
    g = build_grid(spec)
    assert g.cells and g.units
    assert len({c.cell_id for c in g.cells}) == len(g.cells)
    assert all(isinstance(r, CellRequest) for r in g.units[0].requests(g.prompt_texts()))


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("n_layers", [32, 30, 4])
def test_layer_specs_fit_models_of_any_depth(path: Path, n_layers: int) -> None:
    """Fractional specs: one grid fits Llama/Mistral (32), SmolLM2 (30), tiny models (4)."""
    for rep in _reports(_grid(path), n_layers).values():
        assert all(rep.layers.values()), rep.layers
        assert rep.early_layer < rep.late_layer


@pytest.mark.parametrize("path", CLAIM_SWEEPS + NEXT_SWEEPS, ids=_ids(CLAIM_SWEEPS + NEXT_SWEEPS))
def test_claim_sweeps_run_both_8b_models_and_take_one_model_flag(path: Path) -> None:
    spec = load_spec(path)
    assert {m.name_or_path for m in spec.models} == {
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "mistralai/Mistral-7B-v0.1",
    }
    if path in CLAIM_SWEEPS:
        assert f"P{path.name[1]}" in spec.retests
    else:
        assert spec.retests, path.name
    g = build_grid(spec, models_override=["smollm2-135m"])
    assert [m.id for m in g.models] == ["smollm2-135m"]
    assert len(g.cells) * 2 == len(_grid(path).cells)


def _layers_on_32(name: str) -> tuple[dict[str, list[int]], int, int]:
    rep = next(iter(_reports(_grid(SWEEPS_DIR / name), 32).values()))
    return rep.layers, rep.early_layer, rep.late_layer


@pytest.mark.parametrize(
    ("name", "late"),
    [("p1_rv_layers.yaml", 24), ("p1_rv_layers_78.yaml", 25), ("p1_rv_layers_84.yaml", 27)],
)
def test_p1_measures_the_reported_layers(name: str, late: int) -> None:
    assert _layers_on_32(name)[1:] == (4, late)


def test_reported_layer_sets_on_a_32_layer_model() -> None:
    span = lambda a, b: list(range(a, b))  # noqa: E731
    p6 = _layers_on_32("p6_layer_localization.yaml")[0]
    assert list(p6.values()) == [
        span(0, 8),
        span(8, 16),
        span(16, 24),
        span(24, 32),
        span(0, 16),
        span(16, 32),
        span(0, 32),
    ]
    p7 = _layers_on_32("p7_token_localization.yaml")[0]
    assert list(p7.values()) == [[18], [25], [27], [25, 27], span(16, 32)]
    p8 = _layers_on_32("p8_alpha_mixing.yaml")[0]
    assert list(p8.values()) == [span(16, 32), span(25, 30), [27]]
    assert _layers_on_32("p3_vproj_patch.yaml")[0]["75%"] == [24]


def test_p5_runs_the_transplant_beside_the_mix_with_every_control() -> None:
    g = _grid(SWEEPS_DIR / "p5_kv_transfer.yaml")
    cells = g.cells_for("llama3-8b")
    assert {c.condition for c in cells} >= {"A", "B", "C", "D"}
    assert {c.control for c in cells} == {"natural", "self", "shuffle", "random", "other", "patch"}
    patch = {(c.mode, c.layers) for c in cells if c.control == "patch"}
    assert patch == {("transplant", "all"), ("mix", "all")}


@pytest.mark.parametrize("path", SMOLLM2, ids=_ids(SMOLLM2))
def test_smollm2_variants_are_small(path: Path) -> None:
    """Sized for 2 CPU cores in under ~10 minutes (sweeps/README.md has the measurement)."""
    g = _grid(path)
    assert [m.name_or_path for m in g.models] == ["smollm2-135m"]
    assert len(g.cells) <= 400
    assert g.spec.resources.gpus_per_replica == 0


def test_every_full_sweep_has_its_reduced_twin() -> None:
    """Each 8B grid of a claim or next step has a builtin-model copy under smollm2/."""
    reduced = {p.name for p in SMOLLM2}
    full = {p.name for p in CLAIM_SWEEPS + NEXT_SWEEPS} - {"p1_rv_layers_78.yaml",
                                                           "p1_rv_layers_84.yaml"}
    assert full <= reduced, sorted(full - reduced)
    for name in sorted(full):
        assert load_spec(SWEEPS_DIR / "smollm2" / name).retests == load_spec(
            SWEEPS_DIR / name).retests, name


def test_p4_patches_during_generation() -> None:
    for path in (SWEEPS_DIR / "p4_resid_patch.yaml", SWEEPS_DIR / "smollm2/p4_resid_patch.yaml"):
        during = {c.during for c in _grid(path).cells if c.control == "patch"}
        assert "generation" in during, path


def test_next_steps_use_the_new_capabilities() -> None:
    def cells(name: str) -> list:
        return [c for c in _grid(SWEEPS_DIR / name).cells if c.control == "patch"]

    for prefix in ("", "smollm2/"):
        kw = cells(f"{prefix}next_keyword_positions.yaml")
        assert kw and all(c.tokens.startswith("match:") for c in kw)
        assert {c.target_group for c in kw} == {"recursive"}  # baseline prompts have none
        steer = cells(f"{prefix}next_vsteer_alpha2.yaml")
        assert {(c.site, c.mode, c.alpha) for c in steer} == {("v_proj", "steer", 2.0)}
        assert {c.during for c in steer} == {"both"}  # the steered run: prompt and generation
        thirds = {c.tokens for c in cells(f"{prefix}next_position_thirds.yaml")}
        assert {"first:25%", "mid:50%", "last:25%"} <= thirds
        level = cells(f"{prefix}next_source_level.yaml")
        assert len({c.target_id for c in level}) == 1
        assert sorted({c.source_level for c in level}) == [1, 2, 3, 4, 5]
        assert load_spec(SWEEPS_DIR / f"{prefix}next_attention_kv_swap.yaml").measure.attention
        assert load_spec(SWEEPS_DIR / f"{prefix}next_rv_profile.yaml").measure.layers == "all"
        assert load_spec(SWEEPS_DIR / f"{prefix}next_rv_with_cache.yaml").measure.trajectory


def test_the_one_target_bank_copies_the_main_bank() -> None:
    """banks/one_target/ = base-001 verbatim + a link to prompts/recursive.yaml."""
    from rloop_ray.prompts import PromptBank

    one, main = PromptBank.load(ONE_TARGET_BANK), PromptBank.load(REPO / "prompts")
    assert one.groups() == {"baseline": 1, "recursive": 100}
    for p in one:
        assert p.text_hash == main.get(p.id).text_hash, p.id
