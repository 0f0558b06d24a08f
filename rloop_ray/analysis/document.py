"""A tiny document model rendered twice: Markdown and a self-contained HTML page.

The report is laid out once, as a list of blocks, and rendered by both writers, so the
Markdown and the HTML can never disagree. The HTML embeds its images (base64) so it can
be mailed or archived as one file; the Markdown links them relative to its folder.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rloop_ray.analysis.figures import FigureInfo

MAX_ROWS = 60
"""Rows shown per table; the full tables are the Parquet files under stats/."""


@dataclass
class Block:
    """One piece of the report; which fields matter depends on `kind`."""

    kind: str  # heading | para | bullets | table | figure | code
    text: str = ""
    level: int = 2
    items: list[tuple[str, str]] = field(default_factory=list)  # (level, text) for bullets
    table: pd.DataFrame | None = None
    more: int = 0
    source: str = ""
    figure: FigureInfo | None = None


class Document:
    """Blocks in order; `markdown()` and `html()` render the same content."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text=text, level=level))

    def para(self, text: str) -> None:
        self.blocks.append(Block("para", text=text))

    def bullets(self, items: Sequence[str | tuple[str, str]]) -> None:
        pairs = [(i if isinstance(i, tuple) else ("info", i)) for i in items]
        pairs = [(level, " ".join(text.split())) for level, text in pairs]  # one line each
        self.blocks.append(Block("bullets", items=list(pairs)))

    def table(self, frame: pd.DataFrame, source: str = "", max_rows: int = MAX_ROWS) -> None:
        shown = frame.head(max_rows)
        self.blocks.append(Block("table", table=shown, more=len(frame) - len(shown),
                                 source=source))

    def figure(self, info: FigureInfo) -> None:
        self.blocks.append(Block("figure", figure=info))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text=text))

    # -- Markdown ---------------------------------------------------------------------------

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                out += ["#" * b.level + " " + b.text, ""]
            elif b.kind == "para":
                out += [b.text, ""]
            elif b.kind == "bullets":
                out += [f"- {'**Warning:** ' if lvl == 'warning' else ''}{t}" for lvl, t in b.items]
                out.append("")
            elif b.kind == "table" and b.table is not None:
                out += _md_table(b.table)
                if b.more:
                    out.append(f"\n*{b.more} more rows in `{b.source}`.*")
                out.append("")
            elif b.kind == "figure" and b.figure is not None:
                f = b.figure
                if f.path is not None:
                    rel = Path(f.path).resolve().relative_to(base.resolve()) if _inside(
                        f.path, base) else Path(f.path)
                    out += [f"**{f.title}**", "", f"![{f.title}]({rel.as_posix()})", "",
                            f.caption, ""]
                else:
                    out += [f"**{f.title}**: skipped: {f.skipped}", ""]
            elif b.kind == "code":
                out += ["```", b.text, "```", ""]
        return "\n".join(out).rstrip() + "\n"

    # -- HTML -------------------------------------------------------------------------------

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
            f"<title>{html.escape(self.title)}</title>", f"<style>{_CSS}</style>",
            "</head><body>", f"<h1>{html.escape(self.title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind == "heading":
                lvl = min(max(b.level, 2), 6)
                parts.append(f"<h{lvl}>{html.escape(b.text)}</h{lvl}>")
            elif b.kind == "para":
                parts.append(f"<p>{_inline(b.text)}</p>")
            elif b.kind == "bullets":
                items = "".join(
                    f"<li class=\"{lvl}\">{'<b>Warning:</b> ' if lvl == 'warning' else ''}"
                    f"{_inline(t)}</li>" for lvl, t in b.items
                )
                parts.append(f"<ul>{items}</ul>")
            elif b.kind == "table" and b.table is not None:
                parts.append(_html_table(b.table))
                if b.more:
                    parts.append(f"<p class=\"more\">{b.more} more rows in "
                                 f"<code>{html.escape(b.source)}</code>.</p>")
            elif b.kind == "figure" and b.figure is not None:
                f = b.figure
                if f.path is not None and Path(f.path).is_file():
                    data = base64.b64encode(Path(f.path).read_bytes()).decode("ascii")
                    parts.append(
                        f"<figure><img alt=\"{html.escape(f.title)}\" "
                        f"src=\"data:image/png;base64,{data}\"><figcaption><b>"
                        f"{html.escape(f.title)}</b>. {html.escape(f.caption)}</figcaption>"
                        f"</figure>"
                    )
                else:
                    parts.append(f"<p class=\"skipped\"><b>{html.escape(f.title)}</b>: skipped: "
                                 f"{html.escape(f.skipped or 'file missing')}</p>")
            elif b.kind == "code":
                parts.append(f"<details><summary>show</summary><pre>{html.escape(b.text)}</pre>"
                             f"</details>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "line-height:1.4}table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "th{background:#f3f3f3}td.t{text-align:left}li.warning{color:#8a4b00}"
    "img{max-width:100%}figure{margin:1em 0}.skipped,.more{color:#666;font-style:italic}"
    "pre{background:#f6f6f6;padding:0.5em;overflow-x:auto}"
)


def _inside(path: Path, base: Path) -> bool:
    try:
        Path(path).resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline markup the report uses)."""
    escaped = html.escape(text)
    pieces = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
    return str(value)


def _md_table(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return ["*(no rows)*"]
    cols = [str(c) for c in frame.columns]

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(esc(_cell(v)) for v in row) + " |")
    return lines


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class=\"more\">(no rows)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            text = _cell(v)
            cls = " class=\"t\"" if isinstance(v, str) else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
