"""Blind rating: the sheet hides the conditions, the key maps back, ratings become
`score_human`, and malformed sheets are refused with the line named (exit code 2)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import make_sweep
from typer.testing import CliRunner

from rloop_ray.analysis import HUMAN_SCORES_FILE, rating, run_stats
from rloop_ray.cli import app


@pytest.fixture()
def sweep(tmp_path: Path):
    return make_sweep(tmp_path, "rate", models=("llama-tiny",), n_prompts=8,
                      controls=("shuffle",), fail_every=13)


def _read_sheet(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_sheet(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_export_is_blind_seeded_and_keyed(sweep):
    exp = rating.export_for_rating(sweep.path, n=20, seed=1)
    header = _read_sheet(exp.sheet)[0].keys()
    assert list(header) == ["anon_id", "text", "rating"]
    rows = _read_sheet(exp.sheet)
    assert len(rows) == exp.n == 20
    ids = [r["anon_id"] for r in rows]
    assert len(set(ids)) == 20
    assert all(r["rating"] == "" for r in rows)
    sheet_text = exp.sheet.read_text()
    for cell_id in sweep.written["cell_id"]:
        assert cell_id not in sheet_text
    for word in ("baseline", "recursive", "natural", "patch", "shuffle", "llama"):
        assert word not in sheet_text
    key = json.loads(exp.key.read_text())["key"]
    assert set(key) == set(ids)
    ok = sweep.written[sweep.written["status"] == "ok"].set_index("cell_id")
    for r in rows:
        assert ok.loc[key[r["anon_id"]], "generated_text"] == r["text"]
    assert exp.key.parent == sweep.path / "rating"

    again = rating.export_for_rating(sweep.path, n=20, seed=1, out=sweep.path / "again.csv")
    assert again.sheet.read_text() == sheet_text
    other = rating.export_for_rating(sweep.path, n=20, seed=2)
    assert set(r["anon_id"] for r in _read_sheet(other.sheet)).isdisjoint(ids)


def test_export_takes_all_when_fewer_texts(sweep):
    n_ok = int((sweep.written["status"] == "ok").sum())
    exp = rating.export_for_rating(sweep.path, n=10_000, seed=0)
    assert exp.n == exp.n_available == n_ok


def test_round_trip_becomes_a_metric(sweep):
    exp = rating.export_for_rating(sweep.path, n=30, seed=3)
    key = json.loads(exp.key.read_text())["key"]
    cells = sweep.written.set_index("cell_id")
    rows = []
    for i, r in enumerate(_read_sheet(exp.sheet)):
        cell = cells.loc[key[r["anon_id"]]]
        if i == 0:
            rows.append([r["anon_id"], r["text"], ""])  # a blank rating: skipped, counted
            continue
        value = 5 if cell["target_group"] == "recursive" else 1
        rows.append([r["anon_id"], r["text"], str(value)])
    sheet = _write_sheet(sweep.path / "filled.csv", ["anon_id", "text", "rating"], rows)
    res = rating.import_ratings(sweep.path, sheet)
    assert (res.n_rated, res.n_blank, res.n_cells_scored) == (29, 1, 29)

    result = run_stats(sweep.path, n_resamples=200)
    assert "score_human" in result.metrics
    human = result.conditions[result.conditions["metric"] == "score_human"]
    assert human["n_valid"].sum() == 29
    a = human[human["letter"] == "A"].iloc[0]
    if a["n_valid"]:
        assert a["mean"] == pytest.approx(1.0)
        assert "not rated" in a["nan_reasons"] or a["n_nan"] == 0
    b = human[human["letter"] == "B"].iloc[0]
    if b["n_valid"]:
        assert b["mean"] == pytest.approx(5.0)
    assert "score_human" in set(result.comparisons["metric"])

    # re-importing a corrected sheet of the same name replaces it (no double counting)
    rows[1][2] = "3"
    rating.import_ratings(sweep.path, _write_sheet(sheet, ["anon_id", "text", "rating"], rows))
    scores = pd.read_parquet(sweep.path / HUMAN_SCORES_FILE)
    assert len(scores) == 29 and (scores["n_ratings"] == 1).all()
    assert scores.set_index("cell_id").loc[key[rows[1][0]], "score_human"] == 3.0


def test_several_raters_are_averaged(sweep):
    exp = rating.export_for_rating(sweep.path, n=5, seed=4)
    ids = [r["anon_id"] for r in _read_sheet(exp.sheet)]
    rows = [[i, rater, str(v)] for i in ids for rater, v in (("ann", 2), ("bob", 4))]
    sheet = _write_sheet(sweep.path / "two.csv", ["anon_id", "rater", "rating"], rows)
    res = rating.import_ratings(sweep.path, sheet)
    assert res.n_rated == 10
    scores = pd.read_parquet(sweep.path / HUMAN_SCORES_FILE)
    assert np.allclose(scores["score_human"], 3.0) and (scores["n_ratings"] == 2).all()


def _run_import(results: Path, sheet: Path) -> tuple[int, str]:
    out = CliRunner().invoke(app, ["rate", "import", str(results), str(sheet)])
    return out.exit_code, out.output


@pytest.mark.parametrize(
    ("name", "header", "make_rows", "expected"),
    [
        ("missing_column", ["anon_id", "text"], lambda ids: [[ids[0], "t"]],
         r"two\.csv:1: missing column\(s\) rating"),
        ("non_numeric", ["anon_id", "text", "rating"],
         lambda ids: [[ids[0], "t", "4"], [ids[1], "t", "high"]],
         r":3: rating 'high' for anon_id '" ),
        ("unknown_id", ["anon_id", "text", "rating"],
         lambda ids: [[ids[0], "t", "1"], ["rzzzzzzzzzz", "t", "1"]],
         r":3: unknown anon_id 'rzzzzzzzzzz'"),
        ("duplicate_id", ["anon_id", "text", "rating"],
         lambda ids: [[ids[0], "t", "1"], [ids[1], "t", "1"], [ids[0], "t", "2"]],
         r":4: duplicate anon_id '.*' \(first on line 2\)"),
        ("infinite", ["anon_id", "text", "rating"], lambda ids: [[ids[0], "t", "inf"]],
         r":2: rating 'inf' .* not a finite number"),
        ("short_row", ["anon_id", "text", "rating"], lambda ids: [[ids[0], "t"]],
         r":2: 2 fields, the header has 3"),
    ],
)
def test_malformed_sheets_name_the_line(sweep, name, header, make_rows, expected):
    exp = rating.export_for_rating(sweep.path, n=5, seed=0)
    ids = [r["anon_id"] for r in _read_sheet(exp.sheet)]
    sheet = _write_sheet(sweep.path.parent / "two.csv", header, make_rows(ids))
    code, output = _run_import(sweep.path, sheet)
    assert code == 2, output
    assert "malformed ratings file" in output
    assert re.search(expected, output), output
    assert not (sweep.path / HUMAN_SCORES_FILE).exists()


def test_line_numbers_count_multiline_texts(sweep):
    exp = rating.export_for_rating(sweep.path, n=3, seed=0)
    ids = [r["anon_id"] for r in _read_sheet(exp.sheet)]
    rows = [[ids[0], "first line\nsecond line\nthird", "1"], [ids[1], "t", "bad"]]
    sheet = _write_sheet(sweep.path / "multi.csv", ["anon_id", "text", "rating"], rows)
    with pytest.raises(rating.RatingFileError) as info:
        rating.import_ratings(sweep.path, sheet)
    assert info.value.line == 5  # header 1, record 1 spans lines 2-4
    assert "multi.csv:5:" in str(info.value)


def test_import_without_export_and_missing_file(sweep, tmp_path):
    sheet = _write_sheet(tmp_path / "x.csv", ["anon_id", "rating"], [["r1", "1"]])
    code, output = _run_import(sweep.path, sheet)
    assert code == 2 and "rate export" in output
    rating.export_for_rating(sweep.path, n=2, seed=0)
    code, output = _run_import(sweep.path, tmp_path / "nope.csv")
    assert code == 2 and "file not found" in output


def test_cli_export(sweep):
    out = CliRunner().invoke(app, ["rate", "export", str(sweep.path), "--n", "7",
                                   "--seed", "9"])
    assert out.exit_code == 0, out.output
    sheet = sweep.path / "rating" / "sheet_seed9.csv"
    assert len(_read_sheet(sheet)) == 7
    assert (sweep.path / "rating" / "key_seed9.json").is_file()
    assert "private" in out.output


def test_rating_needs_a_local_sweep(tmp_path):
    pytest.importorskip("fsspec")
    remote = make_sweep("memory://rating-cli", "remote", models=("llama-tiny",), n_prompts=4,
                        controls=())
    out = CliRunner().invoke(app, ["rate", "export", remote.path, "--n", "3"])
    assert out.exit_code == 2 and "not a local folder" in out.output
    (tmp_path / "plain").mkdir()
    sheet = _write_sheet(tmp_path / "s.csv", ["anon_id", "rating"], [["r1", "1"]])
    for args in (["rate", "export", str(tmp_path / "plain")],
                 ["rate", "import", str(tmp_path / "plain"), str(sheet)]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2 and "no manifest.json" in out.output, out.output
    assert list((tmp_path / "plain").iterdir()) == []
