"""The typer application object; command modules attach to it (heavy imports stay lazy).

Help texts are Markdown (`rich_markup_mode="markdown"`): a docstring's paragraphs are
re-wrapped to the terminal instead of keeping the source's line breaks, and an indented
block stays a literal example.
"""

from typing import Annotated

import typer

from rloop_ray import __version__

app = typer.Typer(
    name="rloop-ray",
    help="Exact, resumable intervention sweeps on HF decoders, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

GRID_METAVAR = "GRID.yaml"
SWEEP_METAVAR = "SWEEP_DIR"
"""Argument names every command uses alike: a grid file, and one sweep's folder
(`results/<name>`, or its URI). `--results-dir` is the folder sweep folders live in."""


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rloop-ray {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:
    """Exact, resumable intervention sweeps on HF decoders, on Ray."""
