"""Prompt bank loading, lookup errors and seeded, hash-based pairing (rloop_ray/prompts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rloop_ray.prompts import (
    Prompt,
    PromptBank,
    PromptLookupError,
    pair_prompts,
    pick_other,
    seeded_order,
    text_hash,
)
from rloop_ray.spec import SpecValidationError

DATA = Path(__file__).parent / "data"
BANK = DATA / "bank"
REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _prompts(group: str, n: int, level: int | None = None) -> list[Prompt]:
    return [Prompt(id=f"{group}{i}", group=group, text=f"{group} text {i}", level=level)
            for i in range(n)]


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    return PromptBank.load(BANK)


def test_fixture_bank_loads(bank: PromptBank) -> None:
    assert len(bank) == 19
    assert bank.groups() == {"baseline": 6, "long_control": 3, "recursive": 10}
    assert bank.levels("recursive") == [1, 2, 3, 4, 5]
    p = bank.get("rec_l5_a")
    assert (p.group, p.level, p.category) == ("recursive", 5, "fixed_point")
    assert p.tokens_for("nope", "tiny-llama") == 12
    assert p.file.endswith("recursive.yaml") and p.line is not None
    assert p.text_hash == text_hash(p.text) and len(p.text_hash) == 16


def test_single_file_loads() -> None:
    assert PromptBank.load(BANK / "baseline.yaml").groups() == {"baseline": 6, "long_control": 3}


def test_level_filter_keeps_unleveled_prompts(bank: PromptBank) -> None:
    assert {p.level for p in bank.group("recursive", levels=[4, 5])} == {4, 5}
    assert len(bank.group("baseline", levels=[5])) == 6


def test_unknown_group_suggests_and_lists(bank: PromptBank) -> None:
    with pytest.raises(PromptLookupError) as err:
        bank.group("recursve")
    msg = str(err.value)
    assert "Unknown group 'recursve'" in msg and "Did you mean 'recursive'?" in msg
    assert "Available: baseline, long_control, recursive" in msg


def test_empty_selection_says_why(bank: PromptBank) -> None:
    with pytest.raises(PromptLookupError, match=r"no prompts at levels \[7\].*1, 2, 3, 4, 5"):
        bank.group("recursive", levels=[7])


def test_unknown_prompt_id(bank: PromptBank) -> None:
    with pytest.raises(PromptLookupError, match="Did you mean 'base_a'"):
        bank.get("base_aa")


def test_duplicate_id_across_files_names_both(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "provenance: {}\nprompts:\n- {id: x, group: baseline, text: hi}\n")
    _write(tmp_path / "b.yaml", "provenance: {}\nprompts:\n- {id: y, group: baseline, text: a}\n"
                                "- {id: x, group: baseline, text: b}\n")
    with pytest.raises(SpecValidationError) as err:
        PromptBank.load(tmp_path)
    msg = str(err.value)
    assert "a.yaml" in msg and "b.yaml" in msg and "duplicate prompt id 'x'" in msg
    assert err.value.field == "prompts[1].id" and err.value.line == 4


def test_duplicate_id_within_a_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.yaml", "provenance: {}\nprompts:\n- {id: x, group: g, text: a}\n"
                                    "- {id: x, group: g, text: b}\n")
    with pytest.raises(SpecValidationError, match=r"a.yaml:4: prompts\[1\].id: duplicate"):
        PromptBank.load(f)


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ("- {id: r, group: recursive, text: t}", "prompts[0]", "needs a `level`"),
        ("- {id: r, group: recursive, level: 6, text: t}", "prompts[0].level", "less than or"),
        ("- {id: r, group: baseline, text: t, levle: 1}", "prompts[0].levle",
         "Did you mean 'level'?"),
        ("- {id: r, group: baseline, text: ''}", "prompts[0].text", "at least 1 character"),
        ("- {id: r, group: baseline, text: t, n_tokens: {m: many}}", "prompts[0].n_tokens.m",
         "valid integer"),
    ],
)
def test_bad_prompt_records(tmp_path: Path, body: str, field: str, needle: str) -> None:
    f = _write(tmp_path / "p.yaml", f"provenance: {{}}\nprompts:\n{body}\n")
    with pytest.raises(SpecValidationError) as err:
        PromptBank.load(f)
    assert err.value.field == field and needle in str(err.value)
    assert "p.yaml:3:" in str(err.value)


def test_missing_provenance_and_malformed_yaml(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.yaml", "prompts:\n- {id: r, group: b, text: t}\n")
    with pytest.raises(SpecValidationError, match="provenance: required key is missing"):
        PromptBank.load(f)
    _write(f, "provenance: {}\nprompts: [\n")
    with pytest.raises(SpecValidationError, match="malformed YAML"):
        PromptBank.load(f)


def test_missing_and_empty_bank(tmp_path: Path) -> None:
    with pytest.raises(SpecValidationError, match="prompt bank not found"):
        PromptBank.load(tmp_path / "nope")
    with pytest.raises(SpecValidationError, match="no \\*.yaml files"):
        PromptBank.load(tmp_path)


def test_seeded_order_is_deterministic_seeded_and_stable_under_additions() -> None:
    ps = _prompts("g", 12)
    a = seeded_order(ps, 0, "x")
    assert a == seeded_order(list(reversed(ps)), 0, "x")
    assert [p.id for p in a] != [p.id for p in seeded_order(ps, 1, "x")]
    grown = seeded_order(ps + _prompts("h", 3), 0, "x")
    assert [p for p in grown if p.group == "g"] == a


def test_pair_prompts_round_robin_prefix_and_no_self_pairs() -> None:
    targets = seeded_order(_prompts("t", 4), 0, "target")
    sources = _prompts("s", 3) + targets  # sources may contain the targets themselves
    pairs = pair_prompts(targets, sources, n_pairs=10, seed=0)
    assert len(pairs) == 10 and len(set((t.id, s.id) for t, s, _ in pairs)) == 10
    assert all(t.id != s.id for t, s, _ in pairs)
    assert [t.id for t, _, _ in pairs[:4]] == [t.id for t in targets]  # each target once first
    assert pair_prompts(targets, sources, n_pairs=6, seed=0) == pairs[:6]
    assert len(pair_prompts(targets, sources, n_pairs=None, seed=0)) == 4
    assert len(pair_prompts(targets, sources, n_pairs=None, seed=0, all_by_default=True)) == 24
    with pytest.raises(PromptLookupError, match="n_pairs=25 but only 24"):
        pair_prompts(targets, sources, n_pairs=25, seed=0)


def test_pick_other_never_the_target() -> None:
    pool = _prompts("g", 5)
    for t in pool:
        picks = {pick_other(t, pool, seed=3, index=i).id for i in range(8)}
        assert t.id not in picks and len(picks) == 4
    with pytest.raises(PromptLookupError, match="needs another prompt"):
        pick_other(pool[0], pool[:1], seed=0)


@pytest.mark.skipif(not (REPO / "prompts").is_dir(), reason="prompts/ not written yet")
def test_the_real_bank_loads() -> None:
    real = PromptBank.load(REPO / "prompts")
    groups = real.groups()
    assert {"baseline", "recursive", "long_control"} <= set(groups)
    assert real.levels("recursive") == [1, 2, 3, 4, 5]
