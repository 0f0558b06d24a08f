"""The typer application object; command modules attach to it (heavy imports stay lazy)."""

import typer

app = typer.Typer(
    name="rloop-ray",
    help="Exact, resumable intervention sweeps on HF decoders, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
