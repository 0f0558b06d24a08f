"""grid.yaml schema and error messages (rloop_ray/spec.py) and the `validate` command."""

from __future__ import annotations

import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from rloop_ray import grid as grid_mod
from rloop_ray.cli import app
from rloop_ray.engine import types as engine_types
from rloop_ray.spec import (
    InterventionAxes,
    SpecValidationError,
    SweepSpec,
    load_spec,
    load_spec_text,
)

DATA = Path(__file__).parent / "data"
BANK = (DATA / "bank").resolve()
FAKE_DEPTH = {"tiny-llama": 4, "big32": 32}
REAL_MODEL_INFO = grid_mod.default_model_info


def _grid(body: str, bank: Path | str = BANK) -> str:
    return f"name: t\nprompts: {{bank: '{bank}'}}\n{body}"


def _fake_info(model: Any) -> SimpleNamespace:
    if model.name_or_path not in FAKE_DEPTH:
        raise ValueError(f"Unknown model {model.name_or_path!r}")
    return SimpleNamespace(n_layers=FAKE_DEPTH[model.name_or_path], max_position_embeddings=512)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project dir with a non-empty results/ whose contents the CLI must not touch;
    builtins (whose tokenizers the pre-flight reads) live in the session's temp cache."""
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path_factory.getbasetemp() / "rloop-cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grid_mod, "default_model_info", _fake_info)
    (tmp_path / "results" / "old").mkdir(parents=True)
    (tmp_path / "results" / "old" / "manifest.json").write_text("{}")
    return tmp_path


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def _validate(workdir: Path, text: str, *args: str) -> Any:
    path = workdir / "grid.yaml"
    path.write_text(text, encoding="utf-8")
    before = _snapshot(workdir / "results")
    result = CliRunner().invoke(app, ["validate", str(path), *args])
    assert _snapshot(workdir / "results") == before, "validate changed results/"
    return result


# --------------------------------------------------------------------------- schema


def test_minimal_grid_defaults() -> None:
    spec = load_spec_text("name: m\nmodels: [tiny-llama]\n")
    assert spec.models[0].id == spec.models[0].name_or_path == "tiny-llama"
    assert spec.models[0].dtype == "float32" and spec.models[0].trust_remote_code is False
    assert spec.prompts.effective_target_groups() == ["baseline"]
    assert spec.prompts.source_groups_for("baseline") == ["recursive"]
    assert spec.interventions == InterventionAxes()
    assert spec.controls == ["natural"] and spec.version == 1 and spec.retests == []


def test_shorthands_and_canonical_layers() -> None:
    spec = load_spec_text(
        "name: m\nmodels: [a, {id: b, name_or_path: /x/b}]\n"
        "interventions: {site: v, layers: [24, [0, 4, 8], ' 50%:100% '], alpha: 0.5}\n"
        "measure: {early_layer: 4, window: 4}\ngeneration: {max_new_tokens: 8}\ncontrols: self\n"
    )
    assert [m.name_or_path for m in spec.models] == ["a", "/x/b"]
    assert spec.interventions is not None
    assert spec.interventions.layers == ["24", "0,4,8", "50%:100%"]
    assert spec.interventions.site == ["v"] and spec.interventions.alpha == [0.5]
    assert spec.measure.early_layer == "4" and spec.controls == ["self"]


def test_literals_match_engine_constants() -> None:
    fields = InterventionAxes.model_fields

    def args(name: str) -> tuple[str, ...]:
        ann = fields[name].annotation
        return typing.get_args(typing.get_args(ann)[0])

    assert args("site") == engine_types.SITES
    assert args("mode") == engine_types.MODES
    assert args("align") == engine_types.ALIGNS
    control = SweepSpec.model_fields["controls"].annotation  # list[Control]
    assert set(typing.get_args(typing.get_args(control)[0])) == set(
        engine_types.CONTROLS) - {"patch"}


def test_spec_hash_ignores_formatting() -> None:
    a = load_spec_text("name: m\nmodels: [a]\ninterventions: {alpha: 1}\n")
    b = load_spec_text("name: m\nmodels:\n  - id: a\n    dtype: float32\ninterventions:\n"
                       "  alpha: [1.0]\n")
    assert a.spec_hash() == b.spec_hash()
    c = load_spec_text("name: m\nmodels: [a]\ninterventions: {alpha: 0.5}\n")
    assert a.spec_hash() != c.spec_hash()


@pytest.mark.parametrize(
    ("text", "field", "needle", "line"),
    [
        ("name: m\nmodels: [a]\nmodles: [b]\n", "modles", "Did you mean 'models'?", 3),
        ("name: m\nmodels: [{id: a, dtype: fp8}]\n", "models[0].dtype",
         "Allowed: float32, float16, bfloat16", 2),
        ("name: m\nmodels: [a]\ngeneration:\n  max_new_tokens: many\n",
         "generation.max_new_tokens", "valid integer", 4),
        ("name: m\nmodels: [a]\ninterventions:\n  alpha: [0, one]\n", "interventions.alpha[1]",
         "valid number", 4),
        ("name: m\nmodels: [a]\ninterventions: {alpha: .inf}\n", "interventions.alpha",
         "finite", 3),
        ("name: m\nmodels: [a]\ninterventions: {layers: ['8:4']}\n", "interventions.layers[0]",
         "is empty", 3),
        ("name: m\nmodels: [a]\ninterventions: {tokens: [last]}\n", "interventions.tokens[0]",
         "unknown token spec", 3),
        ("name: m\nmodels: [a]\ninterventions: {site: [kv, kv]}\n", "interventions.site",
         "duplicate value 'kv'", 3),
        ("name: m\nmodels: [a]\ninterventions: {site: resid, mode: transplant}\n",
         "interventions.mode", "only to cache sites", 3),
        ("name: m\nmodels: [a, b, a]\n", "models[2].id", "duplicate model id 'a'", 2),
        ("name: m\nmodels: [a]\nmeasure: {window: 100}\n", "measure.window",
         "exceeds generation.max_new_tokens", 3),
        ("name: m\nmodels: [a]\nmeasure: {scorers: [keyword]}\n", "measure.scorers[0]",
         "Did you mean 'keywords'?", 3),
        ("name: m\nmodels: [a]\ninterventions: null\ncontrols: [natural, shuffle]\n",
         "controls", "only `natural` runs without interventions", 4),
        ("name: m\nmodels: [a]\nprompts: {conditions: [C], target_groups: [baseline]}\n",
         "prompts.conditions", "not both", 3),
        ("name: m\nmodels: [a]\nprompts: {source_groups: [baseline]}\n",
         "prompts.source_groups", "needs a source group other than", 3),
        ("name: m\nmodels: [a]\nretests: [P10]\n", "retests[0]", "Allowed: P1", 3),
        ("name: bad name\nmodels: [a]\n", "name", "should match pattern", 1),
        ("models: [a]\n", "name", "required key is missing", 1),
        ("name: m\nmodels: []\n", "models", "at least 1 item", 2),
        ("name: m\nmodels: [a]\nname: n\n", "name", "duplicate key", 3),
        ("name: m\nmodels: [a\n", "", "malformed YAML", 3),
        ("- just\n- a list\n", "", "must be a mapping", 1),
    ],
)
def test_spec_errors_name_field_line_and_allowed(
    text: str, field: str, needle: str, line: int | None
) -> None:
    with pytest.raises(SpecValidationError) as err:
        load_spec_text(text, source="g.yaml")
    exc = err.value
    assert exc.file == "g.yaml" and exc.field == field and exc.line == line
    assert needle in str(exc)
    assert str(exc).startswith("g.yaml")


def test_documented_examples_parse() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "grid.md").read_text()
    blocks = [b.split("```")[0] for b in doc.split("```yaml")[1:]]
    assert len(blocks) == 3
    docs = Path(__file__).resolve().parents[1] / "docs"
    specs = [load_spec_text(b, source="docs/grid.md", base_dir=docs) for b in blocks]
    assert specs[0].name == "demo" and specs[1].prompts.conditions == ["A", "B", "C", "D"]
    assert [m.id for m in specs[1].models] == ["llama3-8b", "mistral-7b"]
    assert specs[1].interventions is not None and len(specs[1].interventions.expanders) == 2
    steer = grid_mod.build_grid(specs[2], depth_fn=lambda m: 30)  # the project's prompts
    cells = [c for c in steer.cells if c.mode == "steer"]
    assert {c.source_id for c in cells} == {"mean:recursive", "mean:baseline"}
    assert {c.layers for c in cells} == {str(i) for i in range(12, 21)}  # 40%:70% of 30


def test_missing_grid_file(tmp_path: Path) -> None:
    with pytest.raises(SpecValidationError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_bank_is_found_next_to_the_sweeps_dir(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj" / "sweeps").mkdir(parents=True)
    (tmp_path / "proj" / "prompts").mkdir()
    f = tmp_path / "proj" / "sweeps" / "g.yaml"
    f.write_text("name: m\nmodels: [a]\n")
    monkeypatch.chdir(tmp_path)
    assert load_spec(f).resolve_bank() == (tmp_path / "proj" / "prompts").resolve()


# --------------------------------------------------------------------------- the validate CLI


def test_validate_ok_shows_counts_and_resolved_layers(workdir: Path) -> None:
    text = _grid("models: [big32]\ninterventions: {layers: ['50%:100%', 3, [0, 2, 3]]}\n"
                 "controls: [natural, self]\n")
    result = _validate(workdir, text)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "model big32: 32 layers" in out
    assert "layers 50%:100% -> 16-31 (16 layers)" in out
    assert "layers 3        -> 3 (1 layer)" in out
    assert "layers 0,2,3    -> 0,2-3 (3 layers)" in out
    assert "R_V layers: early 12.5% -> 4, late 84% -> 27" in out
    # 6 baseline targets (cross: one recursive source each) x 3 layer specs x (patch, self)
    # + 6 natural; units: 6 natural + 6 (target, source) + 6 (target, target)
    assert "42 cells in 18 work units" in out and out.rstrip().endswith("OK")


def test_validate_warns_about_extrapolated_alpha(workdir: Path) -> None:
    result = _validate(workdir, _grid("models: [big32]\ninterventions: {alpha: [1.5]}\n"))
    assert result.exit_code == 0 and "warning: interventions.alpha [1.5] outside" in result.stdout


def test_validate_model_override(workdir: Path) -> None:
    text = _grid("models: [big32]\n")
    result = _validate(workdir, text, "--model", "tiny-llama,big32", "--models", "tiny-llama")
    assert result.exit_code == 0, result.output
    assert "model tiny-llama: 4 layers" in result.stdout and "model big32" in result.stdout
    assert "over 2 model(s)" in result.stdout


_ERRORS = [
    # (grid body, field in the message, other text in the message)
    (_grid("models: [big32]\nmodles: [x]\n"), "modles", "Did you mean 'models'?"),
    (_grid("models: [big32]\ngeneration: {temperature: hot}\n"), "generation.temperature",
     "valid number"),
    (_grid("models: [big32]\ninterventions: {layers: ['40']}\n"), "interventions.layers[0]",
     "out of range for a 32-layer model"),
    (_grid("models: [big32]\nmeasure: {late_layer: 32}\n"), "measure.late_layer",
     "out of range"),
    (_grid("models: [big32]\n", bank="/nonexistent/prompts"), "prompts.bank", "not found"),
    (_grid("models: [big32]\n", bank="missing.yaml"), "prompts.bank", "not found"),
    (f"name: t\nprompts: {{bank: '{BANK}', target_groups: [baselin]}}\nmodels: [big32]\n",
     "prompts.target_groups[0]", "Did you mean 'baseline'?"),
    (_grid("models: [big32]\ninterventions: {alpha: [1, x]}\n"), "interventions.alpha[1]",
     "valid number"),
    (_grid("models: [big32, {id: big32}]\n"), "models[1].id", "duplicate model id"),
    (_grid("models: [big32\n"), "", "malformed YAML"),
    (_grid("models: [nosuchmodel]\n"), "models[0].name_or_path", "Unknown model"),
    (_grid("models: [big32]\nprompts2: {}\n"), "prompts2", "unknown key"),
]


@pytest.mark.parametrize(("text", "field", "needle"), _ERRORS)
def test_validate_errors_exit_2_with_file_and_field(
    workdir: Path, text: str, field: str, needle: str
) -> None:
    result = _validate(workdir, text)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    err = result.stderr
    assert "grid.yaml" in err and field in err and needle in err, err
    assert "Traceback" not in result.output
    assert err.startswith("error: ")


def test_validate_empty_group_after_level_filter(workdir: Path) -> None:
    bank = workdir / "bank"
    bank.mkdir()
    (bank / "p.yaml").write_text(
        "provenance: {}\nprompts:\n- {id: r1, group: recursive, level: 1, text: a}\n"
        "- {id: b1, group: baseline, text: b}\n"
    )
    text = f"name: t\nmodels: [big32]\nprompts: {{bank: '{bank}', levels: [5]}}\n"
    result = _validate(workdir, text)
    assert result.exit_code == 2, result.output
    assert "prompts.source_groups" in result.stderr and "no prompts at levels [5]" in result.stderr


def test_validate_bad_prompt_file_names_that_file(workdir: Path) -> None:
    bank = workdir / "bank"
    bank.mkdir()
    (bank / "bad.yaml").write_text("provenance: {}\nprompts:\n- {id: r1, group: recursive, "
                                   "text: a}\n")
    result = _validate(workdir, _grid("models: [big32]\n", bank=bank))
    assert result.exit_code == 2
    assert "bad.yaml:3: prompts[0]" in result.stderr and "needs a `level`" in result.stderr


def test_validate_unknown_override_model(workdir: Path) -> None:
    result = _validate(workdir, _grid("models: [big32]\n"), "--model", "nosuch")
    assert result.exit_code == 2
    assert "--model" in result.stderr and "Unknown model 'nosuch'" in result.stderr


def test_validate_skip_model_check(workdir: Path) -> None:
    result = _validate(workdir, _grid("models: [nosuchmodel]\n"), "--skip-model-check")
    assert result.exit_code == 0 and "not checked" in result.stdout


def test_validate_with_the_real_model_info_on_a_local_config(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fake: `engine.models.model_info` reads a config.json saved by transformers."""
    pytest.importorskip("rloop_ray.engine.models")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(grid_mod, "default_model_info", REAL_MODEL_INFO)
    cfg = transformers.LlamaConfig(num_hidden_layers=32, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=256)
    cfg.save_pretrained(workdir / "llama32")
    model = f"{{id: l32, name_or_path: '{workdir / 'llama32'}'}}"
    ok = _validate(workdir, _grid(f"models: [{model}]\ninterventions: {{layers: ['24:32']}}\n"))
    assert ok.exit_code == 0, ok.output
    assert "32 layers, max positions 256" in ok.stdout and "24-31 (8 layers)" in ok.stdout
    bad = _validate(workdir, _grid(f"models: [{model}]\ninterventions: {{layers: [40]}}\n"))
    assert bad.exit_code == 2 and "interventions.layers[0]" in bad.stderr
    assert "layer 40 is out of range for a 32-layer model" in bad.stderr


# --------------------------------------------------------------------------- YAML safety

BOMB = (
    "name: bomb\nmodels: [tiny-llama]\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n"
              for p, n in zip("abcdefgh", "bcdefghi"))
)
"""A "billion laughs": 9 levels of 9 aliases, 9^9 = 387 million strings, in ~400 bytes."""


def test_alias_bomb_is_refused_fast_with_a_short_message(workdir: Path) -> None:
    import tracemalloc

    assert len(BOMB) < 600
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(SpecValidationError) as err:
        load_spec_text(BOMB, source="bomb.yaml")
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 5 and peak < 64 * 2**20, (elapsed, peak)
    msg = str(err.value)
    assert len(msg) < 400 and msg.startswith("bomb.yaml:")
    assert "expands to more than" in msg and "alias" in msg
    assert err.value.line is not None and 4 <= err.value.line <= 11
    result = _validate(workdir, BOMB)  # the CLI: exit 2, one short line
    assert result.exit_code == 2 and len(result.stderr) < 400, result.stderr[:400]


def test_recursive_alias_and_deep_nesting_are_refused(workdir: Path) -> None:
    with pytest.raises(SpecValidationError, match="contains it"):
        load_spec_text("name: t\nmodels: &m [a, *m]\n", source="g.yaml")
    with pytest.raises(SpecValidationError, match="nested too deeply"):
        load_spec_text("name: t\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", source="g.yaml")


def test_ordinary_aliases_still_work() -> None:
    text = ("name: t\nmodels: [big32]\n"
            f"prompts: {{bank: '{BANK}'}}\n"
            "interventions: {layers: &l ['0:8', '8:16'], tokens: all}\n"
            "x-reused: *l\n")
    with pytest.raises(SpecValidationError, match="unknown key 'x-reused'"):
        load_spec_text(text, source="g.yaml")  # parsed fine; the key itself is unknown
    spec = load_spec_text(text.replace("x-reused: *l\n", ""), source="g.yaml")
    assert spec.interventions is not None and spec.interventions.layers == ["0:8", "8:16"]


def test_a_huge_echoed_value_is_truncated() -> None:
    huge = "x" * 100_000
    with pytest.raises(SpecValidationError) as err:
        load_spec_text(f"name: t\nmodels: [big32]\ngeneration: {{temperature: {huge}}}\n",
                       source="g.yaml")
    msg = str(err.value)
    assert "generation.temperature" in msg and "…" in msg and len(msg) < 600
    with pytest.raises(SpecValidationError) as err:
        load_spec_text(f"name: t\nmodels: [big32]\ninterventions: {{mode: {huge}}}\n",
                       source="g.yaml")
    assert "…" in str(err.value) and len(str(err.value)) < 800
