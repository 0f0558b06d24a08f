"""Example generations side by side: what a patch does to the text, for a seeded handful.

A transfer efficiency of 0.9 says little until one reads what the patched model wrote
next to what the same prompt produced naturally and what the source prompt produced
naturally. For a few (target, source) pairs drawn with the report's seed, this puts those
texts in one row: target natural, the target patched at each of the summary's leading
intervention points, and the source natural (when the sweep ran the source as a target).
The prompt texts come from the prompt bank when it can be found and still holds the text
the sweep ran (its hash is in the manifest); otherwise the rows show prompt ids only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rloop_ray.analysis.figures import spec_sort_key
from rloop_ray.analysis.identity import identity_mask
from rloop_ray.analysis.load import ResultSet
from rloop_ray.vocab import PATCH, POINT_COLUMNS, STATUS_OK, STEER

logger = logging.getLogger(__name__)

N_EXAMPLES = 3
MAX_POINTS = 3
"""Patched columns per example: the summary's leading intervention points."""
MAX_CHARS = 400
"""A generation longer than this is cut (the full text is in the cells)."""


@dataclass
class Example:
    """One (target, source) pair and its generations, column label -> text."""

    model: str
    target_id: str
    source_id: str
    target_prompt: str | None
    source_prompt: str | None
    texts: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Examples:
    """The examples of one model, and the columns they share."""

    model: str
    columns: list[str]
    rows: list[Example]
    note: str = ""


def clip_text(text: object) -> str | None:
    """One line of printable text, cut at `MAX_CHARS` (what the examples table shows)."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    text = " ".join(str(text).split())
    text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1].rstrip() + "\u2026"


def prompt_texts(results: ResultSet) -> dict[str, str]:
    """Prompt id -> text from the bank the sweep used, only where the text is unchanged."""
    from rloop_ray.prompts import PromptBank, text_hash
    from rloop_ray.spec import SpecValidationError

    manifest = results.manifest
    hashes = manifest.get("prompts") or {}
    bank = ((manifest.get("spec") or {}).get("prompts") or {}).get("bank")
    if not hashes or not isinstance(bank, str):
        return {}
    path = Path(bank).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    spec_file = manifest.get("spec_file")
    if isinstance(spec_file, str) and not path.is_absolute():
        base = Path(spec_file).expanduser().parent
        candidates += [base / path, base.parent / path]
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            loaded = PromptBank.load(candidate)
        except (SpecValidationError, OSError, ValueError) as exc:
            logger.debug("prompt bank %s not usable for examples: %s", candidate, exc)
            continue
        return {p.id: p.text for p in loaded
                if p.id in hashes and hashes[p.id] == text_hash(p.text)}
    return {}


def _point_order(point: tuple) -> tuple:
    at = dict(zip(POINT_COLUMNS, point, strict=True))
    return (at["site"], at["mode"], spec_sort_key(at["layers"]), spec_sort_key(at["tokens"]),
            at["align"], at["alpha"], at["during"])


def _label(point: tuple, varying: Sequence[int]) -> str:
    parts = {"site": "site", "mode": "mode", "layers": "layers", "tokens": "tokens",
             "align": "align", "alpha": "\u03b1", "during": "during"}
    at = dict(zip(POINT_COLUMNS, point, strict=True))
    bits = []
    for i in varying:
        name, value = POINT_COLUMNS[i], point[i]
        if name == "alpha":
            bits.append(f"{'scale' if at['mode'] == STEER else parts[name]} {value:g}")
        else:
            bits.append(f"{parts[name]} {value}")
    return "patched" + (", " + ", ".join(bits) if bits else "")


def pick_examples(
    results: ResultSet, points_by_model: dict[str, list[tuple]], *, seed: int = 0,
    n: int = N_EXAMPLES,
) -> list[Examples]:
    """Up to `n` seeded pairs per model at its leading points (patch cells, not identities).

    `points_by_model` lists each model's intervention points in order of interest (the
    summary's); a model without one falls back to every patched point it has.
    """
    cells = results.cells
    if cells.empty or "generated_text" not in cells:
        return []
    texts = prompt_texts(results)
    ok = cells[cells["status"] == STATUS_OK]
    patched = ok[(ok["control"] == PATCH) & ~ok["is_natural"]]
    patched = patched[~identity_mask(patched)]
    out: list[Examples] = []
    for model, mine in patched.groupby("model", sort=True):
        natural = ok[(ok["model"] == model) & ok["is_natural"]].drop_duplicates("target_id")
        natural = natural.set_index("target_id")["generated_text"]
        present = {tuple(r) for r in mine[list(POINT_COLUMNS)].itertuples(index=False)}
        wanted = [p for p in points_by_model.get(str(model), []) if p in present]
        points = list(dict.fromkeys(wanted))[:MAX_POINTS] or sorted(present, key=str)[:MAX_POINTS]
        points.sort(key=_point_order)  # columns read left to right: early layers first
        key = mine[list(POINT_COLUMNS)].apply(tuple, axis=1)
        mine = mine[key.isin(points)]
        classic = mine[mine["letter"] == "C"]
        pool = classic if len(classic) else mine
        pairs = sorted({(t, s) for t, s in zip(pool["target_id"], pool["source_id"],
                                               strict=True)})
        rng = np.random.default_rng(seed)
        chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), size=min(n, len(pairs)),
                                                      replace=False))] if pairs else []
        varying = [i for i in range(len(POINT_COLUMNS)) if len({p[i] for p in points}) > 1]
        columns = ["target natural"] + [_label(p, varying) for p in points]
        has_source = any(s in natural.index for _, s in chosen)
        if has_source:
            columns.append("source natural")
        rows = []
        for target, source in chosen:
            ex = Example(str(model), str(target), str(source), texts.get(str(target)),
                         texts.get(str(source)))
            ex.texts["target natural"] = clip_text(natural.get(target))
            for p, col in zip(points, columns[1:1 + len(points)], strict=True):
                hit = pool[(pool["target_id"] == target) & (pool["source_id"] == source)
                           & (pool[list(POINT_COLUMNS)].apply(tuple, axis=1) == p)]
                ex.texts[col] = clip_text(hit["generated_text"].iloc[0]) if len(hit) else None
            if has_source:
                ex.texts["source natural"] = clip_text(natural.get(source))
            rows.append(ex)
        note = "" if has_source else (
            "The sources were not run as natural targets in this sweep, so there is no "
            "source-natural text to compare with.")
        out.append(Examples(str(model), columns, rows, note))
    return out


def examples_frame(ex: Examples) -> pd.DataFrame:
    """One row per pair: the prompts, then one column per generation."""
    records = []
    for row in ex.rows:
        target = f"target {row.target_id}" + (f": {clip_text(row.target_prompt)}"
                                              if row.target_prompt else "")
        source = f"source {row.source_id}" + (f": {clip_text(row.source_prompt)}"
                                              if row.source_prompt else "")
        records.append({"prompts": f"{target}\n{source}",
                        **{c: (row.texts.get(c) or "\u2014") for c in ex.columns}})
    return pd.DataFrame(records, columns=["prompts", *ex.columns])

