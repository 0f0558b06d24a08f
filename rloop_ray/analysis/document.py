"""Rendering the report: one context, two Jinja2 templates, tables rendered by pandas.

The report is laid out once, as a context of plain values and DataFrames (report.py), and
rendered by `templates/report.md.j2` and `templates/report.html.j2`, so the Markdown and
the HTML can never disagree. Tables go through pandas' own renderers (`DataFrame.to_html`,
`DataFrame.to_markdown`) after every value is formatted here once, so both files show
the same digits. The HTML template autoescapes everything; the only markup that passes
unescaped is table cells escaped in `html_table` and the `code` spans of `inline`. The HTML
embeds its images (base64) so it can be mailed or archived as one file; the Markdown
links them relative to its folder.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup, escape

TEMPLATE_PACKAGE = "rloop_ray.analysis"
TEMPLATE_DIR = "templates"
MAX_ROWS = 60
"""Rows shown per appendix table; the full tables are the Parquet files under stats/."""


def cell_text(value: Any) -> str:
    """One value as the report prints it (3-4 significant digits, blanks for missing)."""
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
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(cell_text(v) for v in value)
    return str(value)


def format_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every value as text, column labels as text: what both renderers print."""
    out = pd.DataFrame({str(c): [cell_text(v) for v in frame[c]] for c in frame.columns},
                       index=range(len(frame)))
    return out


def html_table(frame: pd.DataFrame | None, css: str = "") -> Markup:
    """A table through `DataFrame.to_html`; every value escaped here, line breaks kept.

    pandas would print a newline inside a cell as a literal `\\n`, so values are escaped
    with markupsafe first and their newlines become `<br>`; pandas then renders the table
    with `escape=False` (nothing unescaped is left to pass through).
    """
    if frame is None or frame.empty:
        return Markup('<p class="more">(no rows)</p>')

    def safe(text: str) -> str:
        return str(escape(text)).replace("\n", "<br>")

    flat = format_frame(frame).map(safe)
    flat.columns = [safe(c) for c in flat.columns]
    text = flat.to_html(index=False, escape=False, border=0, classes=["tbl", *css.split()],
                        na_rep="")
    return Markup(text)


def md_table(frame: pd.DataFrame | None) -> str:
    """A pipe table through `DataFrame.to_markdown` (tabulate); one line per row."""
    if frame is None or frame.empty:
        return "*(no rows)*"
    flat = format_frame(frame)

    def one_line(text: str) -> str:
        return " ".join(text.replace("|", "\\|").replace("\n", " \u00b7 ").split())

    flat = flat.map(one_line)
    flat.columns = [one_line(c) for c in flat.columns]
    return flat.to_markdown(index=False, disable_numparse=True)


def inline_html(text: str) -> Markup:
    """Escape, then render `code` spans (the only inline markup the report's text uses)."""
    pieces = str(escape(text)).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces)))


def data_uri(path: Path | None, mime: str = "image/png") -> str:
    """A file as a `data:` URI, so the HTML holds its images; empty when the file is gone."""
    if path is None or not Path(path).is_file():
        return ""
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


CSS_DPI = 96
"""A CSS pixel is 1/96 inch: a figure drawn at `figures.DPI` is shown at its drawn size."""


def css_width(path: Path | None, dpi: float) -> int | None:
    """The width a PNG is shown at in the HTML: its size in inches, not its pixel count.

    Figures are drawn at a high dpi to stay sharp; shown one image pixel per screen pixel
    they would be 1.7 times their intended size, text included. Read from the PNG header
    (the IHDR chunk), so no image library is needed.
    """
    if path is None or not Path(path).is_file():
        return None
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width = struct.unpack(">I", head[16:20])[0]
    return round(width * CSS_DPI / dpi)


def relative(path: Path | None, base: Path) -> str:
    """`path` relative to the report's folder when inside it (Markdown links), else as is."""
    if path is None:
        return ""
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _environment(autoescape: bool, filters: dict[str, Callable[..., Any]]) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, TEMPLATE_DIR),
        autoescape=autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(filters)
    return env


def render_markdown(context: dict[str, Any], base: Path) -> str:
    """The Markdown report; figure links relative to `base`, the report's folder."""
    env = _environment(False, {"table": md_table, "inline": str,
                               "rel": lambda p: relative(p, base)})
    text = env.get_template("report.md.j2").render(**context)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def render_html(context: dict[str, Any], dpi: float) -> str:
    """The self-contained HTML report (styles inline, images embedded at their size)."""
    env = _environment(True, {"table": html_table, "inline": inline_html,
                              "data_uri": data_uri,
                              "css_width": lambda p: css_width(p, dpi)})
    return env.get_template("report.html.j2").render(**context)
