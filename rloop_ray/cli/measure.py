"""`rloop-ray measure`: Experiment A of the earlier work (R_V of prompts, no generation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rloop_ray.cli._app import app


def _bad(message: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint="--prompts")


def _check_rows(rows: list[dict], path: Path) -> list[dict]:
    """Refuse what would silently corrupt the table: duplicate ids (their rows would be
    averaged into one by the R_V pivot) and empty texts (no tokens to measure)."""
    if not rows:
        raise _bad(f"{path}: no prompts")
    first: dict[str, int | None] = {}
    for row in rows:
        where = f"{path}:{row['line']}" if row["line"] else str(path)
        if not row["text"].strip():
            raise _bad(f"{where}: prompt {row['id']!r} has an empty text")
        if row["id"] in first:
            also = f" (first at line {first[row['id']]})" if first[row["id"]] else ""
            raise _bad(f"{where}: duplicate prompt id {row['id']!r}{also}; ids must be unique "
                       "(rows of one id would be averaged into one)")
        first[row["id"]] = row["line"]
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        missing = [k for k in ("id", "text") if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise _bad(f"{path}:{lineno}: missing field(s) {', '.join(missing)} "
                       "(each line needs id, text and optionally group)")
        if not isinstance(obj["text"], str):
            raise _bad(f"{path}:{lineno}: text must be a string, got "
                       f"{type(obj['text']).__name__}")
        rows.append({"id": str(obj["id"]), "text": obj["text"],
                     "group": str(obj.get("group", "all")), "line": lineno})
    return rows


def _read_bank(path: Path) -> list[dict]:
    """A YAML prompt file or bank directory (`prompts/`), read by `PromptBank.load`, which
    already refuses duplicate ids and empty texts with the file and line."""
    from rloop_ray.prompts import PromptBank
    from rloop_ray.spec import SpecValidationError

    try:
        bank = PromptBank.load(path)
    except SpecValidationError as exc:
        raise _bad(str(exc)) from exc
    return [{"id": p.id, "text": p.text, "group": p.group, "line": p.line} for p in bank]


def read_prompts(path: Path) -> list[dict]:
    """Prompts to measure: JSONL (`{id, text, group}` per line), or YAML prompt files
    (a `.yaml`/`.yml` file or a directory of them, the `prompts/` bank format)."""
    if path.is_dir() or (path.is_file() and path.suffix in (".yaml", ".yml")):
        return _check_rows(_read_bank(path), path)
    if not path.is_file():
        raise _bad(f"{path}: no such file")
    return _check_rows(_read_jsonl(path), path)


@app.command()
def measure(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="Builtin name, hub id or local path.")],
    prompts: Annotated[Path, typer.Option(
        help="JSONL (one {id, text, group} per line), a YAML prompt file, or a directory "
             "of them (e.g. prompts/).")],
    out: Annotated[Path, typer.Option(help="Output Parquet file.")],
    window: Annotated[int, typer.Option(min=2, help="V of the last W prompt tokens.")] = 16,
    early: Annotated[str, typer.Option(help="Early layer for R_V (index or % of depth).")]
    = "12.5%",
    late: Annotated[str, typer.Option(help="Late layer for R_V (index or % of depth).")]
    = "84%",
    chat_template: Annotated[bool, typer.Option(help="Wrap prompts in the chat template.")]
    = False,
    center: Annotated[bool, typer.Option(help="Center V before the SVD.")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """R_V of each prompt: PR and effective rank of V at every layer (one row per layer)."""
    import pandas as pd
    from tqdm import tqdm

    from rloop_ray.engine import Engine
    from rloop_ray.engine.selectors import SpecError, resolve_layer

    items = read_prompts(prompts)
    engine = Engine(model, dtype=dtype, device=device, chat_template=chat_template)
    try:
        layer_e = resolve_layer(early, engine.n_layers)
        layer_l = resolve_layer(late, engine.n_layers)
    except SpecError as exc:
        raise typer.BadParameter(str(exc), param_hint="--early/--late") from exc
    rows = []
    for item in tqdm(items, desc="prompts", disable=None):
        for r in engine.prompt_geometry(item["text"], window=window, center=center):
            rows.append({"prompt_id": item["id"], "group": item["group"], **r})
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)

    wide = table.pivot_table(index=["prompt_id", "group"], columns="layer", values="pr")
    wide = wide.reset_index()
    rv = pd.DataFrame({"group": wide["group"], "rv": wide[layer_l] / wide[layer_e]})
    summary = rv.groupby("group")["rv"].agg(["count", "mean", "std"])
    n_missing = int(table["pr"].isna().sum())
    typer.echo(f"R_V = PR(L{layer_l}) / PR(L{layer_e}), window {window}, model {model}")
    typer.echo(summary.to_string(float_format=lambda x: f"{x:.4f}"))
    if n_missing:
        typer.echo(f"{n_missing} (prompt, layer) rows have no PR: see the 'status' column")
    typer.echo(f"wrote {len(table)} rows to {out}")
