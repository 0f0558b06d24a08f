"""Blind human rating: export generated texts without their conditions, import the ratings.

Keyword and regex scores are what the earlier work relied on, and they are the weakest
behaviour measure; a human rating is the reference. For it to be unbiased the rater must
not know which condition produced a text, so the export writes a sheet with only a random
anonymous id, the text and an empty `rating` column, in a seeded random order, and keeps
the id -> cell mapping in a separate key file under `results/<name>/rating/`. The import
checks the filled sheet strictly (every problem names its line) and turns the ratings
into the scorer column `score_human`, which `load_results` joins like any metric.

Files under `results/<name>/rating/`:
    sheet_seed<seed>.csv        the sheet for raters (may be written elsewhere with --out)
    key_seed<seed>.json         private: anon_id -> cell_id (do not hand it to raters)
    imports/<sheet stem>.parquet the ratings of one filled sheet (re-importing replaces it)
    score_human.parquet         mean rating per cell over all imports (what stats reads)
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rloop_ray.analysis.load import HUMAN_SCORES_FILE, NotLocalError, ResultSet, load_results
from rloop_ray.vocab import STATUS_OK

logger = logging.getLogger(__name__)

RATING_DIR = "rating"
IMPORTS_DIR = "imports"
SHEET_COLUMNS = ("anon_id", "text", "rating")
REQUIRED_COLUMNS = ("anon_id", "rating")
MAX_REPORTED_ERRORS = 20


class RatingFileError(ValueError):
    """A ratings sheet that cannot be imported; the message names the file and line(s)."""

    def __init__(self, path: Path | str, problems: list[tuple[int | None, str]]) -> None:
        self.path = str(path)
        self.problems = problems
        self.line = problems[0][0] if problems else None
        shown = problems[:MAX_REPORTED_ERRORS]
        lines = [f"{self.path}:{ln}: {msg}" if ln else f"{self.path}: {msg}" for ln, msg in shown]
        if len(problems) > len(shown):
            lines.append(f"... and {len(problems) - len(shown)} more problems")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class RatingExport:
    sheet: Path
    key: Path
    n: int
    n_available: int
    seed: int


@dataclass(frozen=True)
class RatingImport:
    source: Path
    stored: Path
    scores: Path
    n_rows: int
    n_rated: int
    n_blank: int
    n_cells_scored: int
    """Cells with a human score after this import (all imports together)."""


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _local_sweep(source: str | os.PathLike[str]) -> tuple[ResultSet, Path]:
    """The sweep read through the store, and its folder: keys and ratings live beside it."""
    results = load_results(source)
    if results.local_dir is None:
        raise NotLocalError(
            f"{source} is not a local folder: rating keys and scores are written into the "
            f"sweep folder, so copy the sweep to local disk first"
        )
    return results, results.local_dir


def export_for_rating(
    source: str | os.PathLike[str], *, n: int = 200, seed: int = 0,
    out: str | os.PathLike[str] | None = None,
) -> RatingExport:
    """Write a blind rating sheet of `n` seeded-random generated texts and its private key.

    Only ok cells with a non-empty text are eligible; with fewer than `n`, all are taken
    (and the shortfall logged). Anonymous ids are salted hashes of the cell id with a salt
    drawn from the seed, so they reveal nothing about the condition or the row order.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    results, base = _local_sweep(source)
    cells = results.cells
    if cells.empty or "generated_text" not in cells:
        raise ValueError(f"{results.source} has no generated texts to rate")
    text = cells["generated_text"]
    eligible = cells[(cells["status"] == STATUS_OK) & text.notna()
                     & (text.astype(str).str.strip() != "")]
    eligible = eligible.sort_values("cell_id").reset_index(drop=True)
    if eligible.empty:
        raise ValueError(f"{results.source} has no ok cell with a generated text")
    k = min(n, len(eligible))
    if k < n:
        logger.warning("only %d texts available, exporting all of them (asked for %d)", k, n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(eligible))[:k]  # a seeded sample, already in random order
    salt = rng.bytes(16).hex()
    sample = eligible.iloc[order]
    anon = ["r" + hashlib.sha256(f"{salt}:{cid}".encode()).hexdigest()[:10]
            for cid in sample["cell_id"]]
    if len(set(anon)) != len(anon):  # 40-bit ids: a clash is astronomically unlikely
        raise RuntimeError("anonymous id collision; export again with another --seed")

    folder = base / RATING_DIR
    sheet = Path(out) if out else folder / f"sheet_seed{seed}.csv"
    key_path = folder / f"key_seed{seed}.json"
    sheet.parent.mkdir(parents=True, exist_ok=True)
    tmp = sheet.with_name(f".{sheet.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SHEET_COLUMNS)
        for anon_id, body in zip(anon, sample["generated_text"], strict=True):
            writer.writerow([anon_id, str(body), ""])
    tmp.replace(sheet)
    key = {
        "about": "PRIVATE: maps anonymous rating ids to cells. Do not give this to raters.",
        "seed": seed,
        "n": k,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec_hash": results.manifest.get("spec_hash"),
        "sheet": str(sheet),
        "key": dict(zip(anon, sample["cell_id"].astype(str), strict=True)),
    }
    _atomic_write_text(key_path, json.dumps(key, indent=2))
    return RatingExport(sheet=sheet, key=key_path, n=k, n_available=len(eligible), seed=seed)


def load_keys(sweep_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Every anon_id -> cell_id mapping written by `export_for_rating` for this sweep."""
    folder = Path(sweep_dir) / RATING_DIR
    mapping: dict[str, str] = {}
    for path in sorted(folder.glob("key_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for anon_id, cell_id in data.get("key", {}).items():
            if mapping.get(anon_id, cell_id) != cell_id:
                raise ValueError(f"{path}: anon_id {anon_id} maps to two cells across key files")
            mapping[anon_id] = cell_id
    return mapping


def _parse_rating(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_ratings(path: str | Path, key: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """Parse and check a filled sheet; returns (rows, number of blank ratings).

    Required columns `anon_id` and `rating` (any order, extra columns ignored, an optional
    `rater` column allows several raters per text). Every problem is collected with its
    line number (a quoted text may span lines; the number is where its record starts) and
    raised together as one `RatingFileError`.
    """
    src = Path(path)
    if not src.is_file():
        raise RatingFileError(src, [(None, "file not found")])
    problems: list[tuple[int | None, str]] = []
    rows: list[dict[str, object]] = []
    blank = 0
    with src.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise RatingFileError(src, [(1, "empty file: expected a header with columns "
                                            f"{', '.join(REQUIRED_COLUMNS)}")]) from None
        except csv.Error as exc:
            raise RatingFileError(src, [(1, f"not a CSV header: {exc}")]) from None
        names = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise RatingFileError(src, [(1, f"missing column(s) {', '.join(missing)} "
                                            f"(found: {', '.join(names) or 'none'})")])
        col = {name: names.index(name) for name in (*REQUIRED_COLUMNS, "rater") if name in names}
        seen: dict[tuple[str, str], int] = {}
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problems.append((start, f"unreadable CSV record: {exc}"))
                break
            line, start = start, reader.line_num + 1
            if not any(field.strip() for field in record):
                continue  # an empty line
            if len(record) != len(header):
                problems.append((line, f"{len(record)} fields, the header has {len(header)}"))
                continue
            anon_id = record[col["anon_id"]].strip()
            rater = record[col["rater"]].strip() if "rater" in col else ""
            raw = record[col["rating"]].strip()
            if not anon_id:
                problems.append((line, "empty anon_id"))
                continue
            if anon_id not in key:
                problems.append((line, f"unknown anon_id {anon_id!r} (not in any key file of "
                                       f"this sweep: was the sheet exported from it?)"))
                continue
            ident = (anon_id, rater)
            if ident in seen:
                who = f" by rater {rater!r}" if rater else ""
                problems.append((line, f"duplicate anon_id {anon_id!r}{who} (first on line "
                                       f"{seen[ident]})"))
                continue
            seen[ident] = line
            if raw == "":
                blank += 1
                continue
            value = _parse_rating(raw)
            if value is None:
                problems.append((line, f"rating {raw!r} for anon_id {anon_id!r} is not a "
                                       f"finite number"))
                continue
            rows.append({"anon_id": anon_id, "cell_id": key[anon_id], "rater": rater,
                         "rating": value, "line": line})
    if problems:
        raise RatingFileError(src, problems)
    frame = pd.DataFrame(rows, columns=["anon_id", "cell_id", "rater", "rating", "line"])
    return frame, blank


def import_ratings(
    source: str | os.PathLike[str], ratings_csv: str | os.PathLike[str]
) -> RatingImport:
    """Check a filled sheet, store it, and rebuild `score_human` from all imports.

    Ratings of one sheet are stored under `rating/imports/<sheet stem>.parquet`, so
    importing a corrected version of the same sheet replaces it instead of counting twice.
    `score_human` is the mean rating per cell over every stored import.
    """
    _, base = _local_sweep(source)
    key = load_keys(base)
    if not key:
        raise RatingFileError(ratings_csv, [(None, f"no key file under {base / RATING_DIR}: "
                                                   f"run `rloop-ray rate export` first")])
    frame, blank = read_ratings(ratings_csv, key)
    src = Path(ratings_csv)
    frame["source_file"] = src.name
    stored = base / RATING_DIR / IMPORTS_DIR / f"{src.stem}.parquet"
    _atomic_write_parquet(stored, frame)
    scores_path = base / HUMAN_SCORES_FILE
    all_imports = pd.concat(
        [pd.read_parquet(p) for p in sorted(stored.parent.glob("*.parquet"))],
        ignore_index=True,
    )
    scores = (all_imports.groupby("cell_id")["rating"].agg(["mean", "count"]).reset_index()
              .rename(columns={"mean": "score_human", "count": "n_ratings"}))
    _atomic_write_parquet(scores_path, scores)
    return RatingImport(source=src, stored=stored, scores=scores_path, n_rows=len(frame) + blank,
                        n_rated=len(frame), n_blank=blank, n_cells_scored=len(scores))
