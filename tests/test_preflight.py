"""The model pre-flight (`grid.check_models`, run by `validate` and by `sweep` before Ray
starts): context length, token specs that patch nothing, offline config facts, and the
engine's refusal of an empty token selection.

Each test builds the bad case for real (a tokenizer count, a blocked network, a cell the
engine runs) and checks the message names what to change.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

from rloop_ray import grid as grid_mod
from rloop_ray.cli import app
from rloop_ray.engine import models
from rloop_ray.engine.known_configs import KNOWN_CONFIGS, known_config
from rloop_ray.grid import (
    PromptLengths,
    build_grid,
    check_models,
    estimate_prompt_lengths,
)
from rloop_ray.spec import SpecValidationError, load_spec, load_spec_text

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(REPO.joinpath("sweeps").rglob("*.yaml"))
HUB_SWEEPS = [p for p in SWEEPS
              if all("/" in m.name_or_path for m in load_spec(p).models)]

LONG = ("Explain, step by step and with examples, how a river carves a canyon through "
        "layers of rock over many thousands of years, what the water carries, how floods "
        "change the channel, and why some canyons are deep and narrow while others are wide.")
SHORT = "Name a river."
REC = "Notice the noticing itself as you read this sentence about your reading."


@pytest.fixture
def tiny_cache(tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Builtins resolve to the session's temporary cache (never ~/.cache/rloop-ray)."""
    monkeypatch.setenv(models.CACHE_ENV, str(tiny_llama_path.parent))
    return tiny_llama_path


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    folder = tmp_path / "bank"
    folder.mkdir()
    (folder / "p.yaml").write_text(
        "provenance: {}\nprompts:\n"
        f"- {{id: b-short, group: baseline, text: '{SHORT}'}}\n"
        f"- {{id: b-long, group: baseline, text: '{LONG}'}}\n"
        f"- {{id: r1, group: recursive, level: 1, text: '{REC}'}}\n",
        encoding="utf-8")
    return folder


def _grid(bank: Path, body: str, models_: str = "[tiny-llama]") -> grid_mod.Grid:
    text = f"name: t\nmodels: {models_}\nprompts: {{bank: '{bank}'}}\n{body}"
    return build_grid(load_spec_text(text, source="g.yaml"))


def _engine_count(text: str, chat_template: bool | None = None) -> int:
    return models.load_prompt_tokenizer("tiny-llama", chat_template=chat_template).count(text)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """No network: the hub probe fails, and any hub read that is not cache-only fails the
    test (it would be transformers' ~50 s retry storm). Returns the config reads seen."""
    monkeypatch.setattr(models, "_hub_probe_cache", {})
    monkeypatch.setattr(models, "_connect",
                        lambda host, port, timeout: "OSError: network blocked by the test")
    calls: list[dict] = []
    original = transformers.AutoConfig.from_pretrained

    def guarded(name, *args, **kwargs):
        calls.append({"name": str(name), **kwargs})
        if not Path(str(name)).exists() and not kwargs.get("local_files_only"):
            raise AssertionError(f"a network read of {name!r} was attempted offline")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", guarded)
    return calls


# --------------------------------------------------------------------------- context


def test_prompt_plus_new_tokens_beyond_context_is_an_error(tiny_cache: Path, bank: Path) -> None:
    g = _grid(bank, "generation: {max_new_tokens: 480}\nmeasure: {window: 16}\n")
    n = _engine_count(LONG)  # tiny-llama: chat template (auto), context 512
    assert n + 480 > 512 > n
    with pytest.raises(SpecValidationError) as err:
        check_models(g)
    msg = str(err.value)
    assert err.value.field == "generation.max_new_tokens" and err.value.line == 4
    assert f"prompt 'b-long' has {n} tokens on model 'tiny-llama'" in msg
    assert "chat template" in msg  # counted as the engine encodes it
    assert "max_new_tokens 480" in msg and "context of 512" in msg
    assert f"max_new_tokens <= {512 - n}" in msg


def test_prompt_within_context_passes_and_reports_the_longest(
    tiny_cache: Path, bank: Path
) -> None:
    (report,) = check_models(_grid(bank, "generation: {max_new_tokens: 64}\n"))
    assert report.lengths is not None and report.lengths.exact
    assert report.longest_prompt == ("b-long", _engine_count(LONG))
    assert not report.warnings


def test_estimated_lengths_warn_instead_of_failing(bank: Path) -> None:
    """Without a tokenizer the bound is the UTF-8 byte count: a warning, said to be one."""
    g = _grid(bank, "generation: {max_new_tokens: 480}\nmeasure: {window: 16}\n")

    def info(_m):
        return type("I", (), {"n_layers": 4, "max_position_embeddings": 512})()

    (report,) = check_models(g, info, lengths_fn=lambda m, p: estimate_prompt_lengths(
        m, p, "test: no tokenizer"))
    assert any("may not fit the context" in w and "'b-long'" in w and "estimated" in w
               for w in report.warnings), report.warnings
    assert any("estimated: test: no tokenizer" in n for n in report.notes)


def test_estimate_bounds_the_real_count(tiny_cache: Path, bank: Path) -> None:
    g = _grid(bank, "")
    model = g.models[0]
    est = estimate_prompt_lengths(model, grid_mod._model_prompts(g, model), "test")
    for pid, p in g.prompts.items():
        real = _engine_count(p.text)
        assert est.low[pid] <= real <= est.high[pid], (pid, est.low[pid], real, est.high[pid])


# --------------------------------------------------------------------------- token specs


def test_token_spec_selecting_nothing_is_an_error(tiny_cache: Path, bank: Path) -> None:
    g = _grid(bank, "interventions: {tokens: [all, '400:500']}\n")
    with pytest.raises(SpecValidationError) as err:
        check_models(g)
    msg = str(err.value)
    assert err.value.field == "interventions.tokens[1]" and err.value.line == 4
    assert "token spec '400:500' selects no position to patch on model 'tiny-llama'" in msg
    prefill = _engine_count(LONG) - 1
    assert f"target 'b-long' (prefill {prefill} positions)" in msg
    assert "no-op" in msg and "token spec 'all'" not in msg


def test_token_spec_without_aligned_source_positions_is_an_error(bank: Path) -> None:
    """Selected target positions that no source position feeds patch nothing either."""
    g = _grid(bank, "interventions: {tokens: '30:35', align: start}\n")
    exact = {"b-short": 40, "b-long": 40, "r1": 10}

    def info(_m):
        return type("I", (), {"n_layers": 4, "max_position_embeddings": 512})()

    with pytest.raises(SpecValidationError) as err:
        check_models(g, info, lengths_fn=lambda m, p: PromptLengths(
            {k: exact[k] for k in p}, {k: exact[k] for k in p}, True, "test counts"))
    msg = str(err.value)
    assert "against source 'r1' (prefill 9, align start): no aligned source position" in msg
    assert "target 'b-long' (prefill 39)" in msg


def test_token_specs_that_fit_pass(tiny_cache: Path, bank: Path) -> None:
    (report,) = check_models(_grid(bank, "interventions: {tokens: [all, 'last:4', '-2:']}\n"))
    assert set(report.tokens) == {"all", "last:4", "-2:"}
    assert report.tokens["last:4"].startswith("4 positions on 2 target(s)")


def test_match_specs_read_the_tokens_the_engine_decodes(tiny_cache: Path, bank: Path) -> None:
    """The pre-flight decodes each prefill token with the model's own tokenizer, as the
    engine does (`selectors.token_texts_of`), and applies the regex to those texts."""
    from rloop_ray.engine.selectors import resolve_tokens, token_texts_of

    g = _grid(bank, "interventions: {tokens: ['match:(?i)river'], align: start}\n")
    lengths = grid_mod.default_prompt_lengths(g.models[0], g.prompts, token_texts=True)
    tok = models.load_prompt_tokenizer("tiny-llama")
    for pid, prompt in g.prompts.items():
        ids = tok.encode(prompt.text)
        assert lengths.token_texts[pid] == tuple(token_texts_of(tok.tokenizer, ids[:-1]))
        assert lengths.low[pid] == len(ids)
    hits = {pid: resolve_tokens("match:(?i)river", len(t), t)
            for pid, t in lengths.token_texts.items()}
    assert hits["b-short"] and hits["b-long"] and not hits["r1"]
    (report,) = check_models(g)  # the default lengths decode because a match spec is used
    summary = report.tokens["match:(?i)river"]
    assert "matched positions on 2 target(s)" in summary, summary


def test_chat_template_the_tokenizer_lacks_is_an_error(
    tiny_cache: Path, bank: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "no-template"
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_cache))
    tok.chat_template = None
    tok.save_pretrained(str(folder))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    transformers.AutoConfig.from_pretrained(str(tiny_cache)).save_pretrained(str(folder))
    g = _grid(bank, "", models_=f"[{{id: m, name_or_path: '{folder}', chat_template: true}}]")
    with pytest.raises(SpecValidationError) as err:
        check_models(g)
    assert err.value.field == "models[0].chat_template"
    assert "has no chat template" in str(err.value)


def test_encode_prompt_is_what_the_engine_tokenizes(tiny_cache: Path) -> None:
    from rloop_ray.engine import Engine

    for chat in (False, True):
        engine = Engine(str(tiny_cache), chat_template=chat)
        tok = models.load_prompt_tokenizer("tiny-llama", chat_template=chat)
        assert tok.encode(LONG) == engine.tokenize(LONG)


# --------------------------------------------------------------------------- the engine


def test_engine_fails_a_cell_that_patches_no_position(tiny_llama_path: Path) -> None:
    from rloop_ray.engine import Engine
    from rloop_ray.engine.types import (
        CellRequest,
        GenerationConfig,
        Intervention,
        MeasureConfig,
    )

    engine = Engine(str(tiny_llama_path))
    gen = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    measure = MeasureConfig(early_layer="0", late_layer="3", window=2)

    def cell(cid: str, **iv) -> CellRequest:
        return CellRequest(cid, LONG, REC, Intervention(**iv), gen, measure)

    t_len, s_len = len(engine.tokenize(LONG)) - 1, len(engine.tokenize(REC)) - 1
    assert s_len < t_len - 2  # so "-2:" aligned at the start has no source position
    rows = engine.run([
        cell("nat", control="natural", site="none"),
        cell("kv-empty", site="kv", tokens="400:500"),
        cell("vproj-empty", site="v_proj", tokens="400:500"),
        cell("kv-unaligned", site="kv", tokens="-2:", align="start"),
        cell("kv-ok", site="kv", tokens="all"),
        cell("vproj-ok", site="v_proj", tokens="last:2"),
    ])
    ids = ["nat", "kv-empty", "vproj-empty", "kv-unaligned", "kv-ok", "vproj-ok"]
    status = {cid: (r["status"], r.get("error_type")) for cid, r in zip(ids, rows, strict=True)}
    assert status == {
        "nat": ("ok", None), "kv-ok": ("ok", None), "vproj-ok": ("ok", None),
        "kv-empty": ("failed", "EmptyTokenSelection"),
        "vproj-empty": ("failed", "EmptyTokenSelection"),
        "kv-unaligned": ("failed", "EmptyTokenSelection"),
    }, status
    by_id = dict(zip(ids, rows, strict=True))
    assert f"target prefill of {t_len} positions" in by_id["kv-empty"]["error"]
    assert "no aligned source position" in by_id["kv-unaligned"]["error"]


# --------------------------------------------------------------------------- offline


def test_every_hub_id_of_a_shipped_sweep_is_in_the_table() -> None:
    named = {m.name_or_path for p in SWEEPS for m in load_spec(p).models
             if "/" in m.name_or_path}
    assert named and named <= set(KNOWN_CONFIGS), named - set(KNOWN_CONFIGS)


def test_table_facts_from_public_configs() -> None:
    llama = known_config("meta-llama/Meta-Llama-3-8B-Instruct")
    assert llama is not None
    assert (llama.n_layers, llama.n_heads, llama.n_kv_heads, llama.head_dim) == (32, 32, 8, 128)
    assert (llama.hidden_size, llama.max_position_embeddings, llama.sliding_window) == (
        4096, 8192, None)
    v01 = known_config("mistralai/Mistral-7B-v0.1")
    assert v01 is not None and v01.sliding_window == 4096 and v01.max_position_embeddings == 32768
    assert v01.layer_windows == (4096,) * 32
    v02 = known_config("mistralai/Mistral-7B-Instruct-v0.2")
    assert v02 is not None and v02.sliding_window is None and v02.rope_theta == 1e6
    for c in KNOWN_CONFIGS.values():
        assert c.head_dim * c.n_heads == c.hidden_size and c.n_heads % c.n_kv_heads == 0
        assert c.model_type in models.ARCHITECTURES and c.provenance


def test_model_info_offline_reads_the_cache_then_the_table(offline: list[dict]) -> None:
    start = time.perf_counter()
    info = models.model_info("mistralai/Mistral-7B-v0.1")
    assert time.perf_counter() - start < 5
    assert (info.n_layers, info.n_kv_heads, info.sliding_window) == (32, 8, 4096)
    assert info.layer_windows == (4096,) * 32 and info.supported
    assert info.config_source == "known_table"
    assert info.note and info.note.startswith("config facts from the shipped table: hub "
                                              "unreachable")
    assert [c.get("local_files_only") for c in offline] == [True]  # cache first, no network


def test_hf_hub_offline_skips_the_probe(monkeypatch: pytest.MonkeyPatch,
                                        offline: list[dict]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_probe(*_a):
        raise AssertionError("probed the hub although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(models, "_connect", no_probe)
    info = models.model_info("meta-llama/Meta-Llama-3-8B-Instruct")
    assert info.max_position_embeddings == 8192 and "HF_HUB_OFFLINE is set" in (info.note or "")


def test_a_hanging_resolver_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_probe_cache", {})
    monkeypatch.setattr(models, "HUB_PROBE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: time.sleep(3) or socket.socket())
    start = time.perf_counter()
    reason = models.hub_unreachable_reason()
    assert time.perf_counter() - start < 2
    assert reason is not None and "no answer within 0.3 s" in reason


def test_unknown_hub_id_offline_says_how_to_proceed(offline: list[dict]) -> None:
    with pytest.raises(models.ModelConfigUnavailableError) as err:
        models.model_info("someorg/not-a-model")
    msg = str(err.value)
    assert "--skip-model-check" in msg and "local folder" in msg and "hub unreachable" in msg


@pytest.mark.parametrize("path", HUB_SWEEPS, ids=[p.name for p in HUB_SWEEPS])
def test_shipped_sweeps_validate_offline(path: Path, offline: list[dict]) -> None:
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(path)])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "model llama3-8b (meta-llama/Meta-Llama-3-8B-Instruct): 32 layers, max positions 8192" \
        in out
    assert "model mistral-7b (mistralai/Mistral-7B-v0.1): 32 layers, max positions 32768" in out
    assert out.count("note: config facts from the shipped table: hub unreachable") == 2
    assert "memory per replica (float16, 8.03 B params)" in out and "fits: batch <= " in out
    assert elapsed < 20, f"validate took {elapsed:.1f} s offline"


def test_unknown_hub_id_offline_exits_2_fast(offline: list[dict], bank: Path,
                                             tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: t\nmodels: [someorg/not-a-model]\nprompts: {{bank: '{bank}'}}\n")
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(grid)])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2, result.output
    assert "g.yaml:2: models[0].name_or_path" in result.stderr
    assert "--skip-model-check" in result.stderr
