"""CLI commands: `stats` (tables, figures, report) and `rate export|import` (blind rating).

Heavy imports (pandas, scipy, matplotlib) happen inside the commands so `--help` stays
instant. A sweep is given as a folder or a URI (`file://`, `s3://`, ...) and read through
the store, which refuses what is not a sweep and names a damaged file. Exit codes: 0 done,
1 the analysis failed, 2 bad arguments: not a sweep, a damaged file, outputs with nowhere
to go, an unknown metric, or a malformed ratings file (the message names the line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from rloop_ray.cli._app import SWEEP_METAVAR, app

rate_app = typer.Typer(
    help="Blind human rating of generated texts: export a sheet, import the ratings.",
    no_args_is_help=True,
)
app.add_typer(rate_app, name="rate")

SweepSource = Annotated[
    str,
    typer.Argument(metavar=SWEEP_METAVAR, show_default=False,
                   help="A sweep folder or its URI, e.g. `results/quickstart` or "
                        "`s3://bucket/results/quickstart`."),
]

T = TypeVar("T")


def _refusing_bad_input(action: Callable[[], T]) -> T:
    """Run `action`; a sweep the store refuses, or a bad argument, exits 2 with its reason."""
    from rloop_ray.store import StoreError

    try:
        return action()
    except (StoreError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command("stats")
def stats_command(
    source: SweepSource,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write stats/, figures/ and the report here. Default: the "
                                   "sweep folder; required when the sweep is not on local "
                                   "disk (s3://, gs://, memory://)."),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric",
                     help="Analyse only these metrics (repeatable). Default: every metric "
                          "present."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    n_resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 2000,
    q: Annotated[float, typer.Option(min=0.0, max=1.0,
                                     help="FDR level (Benjamini-Hochberg).")] = 0.05,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999,
                                              help="Confidence level of intervals.")] = 0.95,
    figures: Annotated[bool, typer.Option("--figures/--no-figures",
                                          help="Draw the figures (PNG and SVG).")] = True,
) -> None:
    """Statistics and the report of a sweep: `report.html`, `report.md`, `stats/`, `figures/`.

    The report leads with the answer per model (each intervention against natural and its
    controls, with a verdict), then example generations, figures and the full tables. Works
    on a partial sweep too (it says what is missing). Example:

        rloop-ray stats results/quickstart
    """
    from rloop_ray.analysis.report import write_report

    result = _refusing_bad_input(lambda: write_report(
        source, out_dir=out, metrics=metric or None, seed=seed, n_resamples=n_resamples,
        confidence=confidence, q=q, figures=figures))
    comp = result.stats.completeness
    expected = "?" if comp.n_expected is None else str(comp.n_expected)
    typer.echo(f"{comp.n_done}/{expected} cells ({comp.n_ok} ok, {comp.n_failed} failed)")
    if comp.partial:
        typer.echo(f"partial sweep: {comp.n_missing} cells missing")
    cmp = result.stats.comparisons
    n_sig = int((cmp["p_fdr"] < q).sum()) if not cmp.empty else 0
    typer.echo(f"{len(cmp)} comparisons, {n_sig} with p_fdr < {q} "
               f"(BH family of {result.stats.fdr_family_size} tests)")
    for note in result.notes:
        if note.level == "warning":
            typer.echo(f"warning: {note.text[:300]}{'...' if len(note.text) > 300 else ''}")
    drawn = [f for f in result.figures if f.path is not None]
    typer.echo(f"tables: {result.tables[0].parent}/ ({len(result.tables)} files)")
    typer.echo(f"figures: {len(drawn)} drawn, {len(result.figures) - len(drawn)} skipped")
    typer.echo(f"report: {result.markdown}")
    typer.echo(f"report: {result.html}  (open it in a browser)")


@rate_app.command("export")
def rate_export(
    source: SweepSource,
    n: Annotated[int, typer.Option("--n", min=1, help="Texts to sample.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the sample, order and ids.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Where to write the sheet (CSV). Default: "
                                                  "`SWEEP_DIR/rating/sheet_seed<seed>.csv`.")
                   ] = None,
) -> None:
    """Write a blind rating sheet (anon_id, text, rating) and a private key file.

    Fill the `rating` column (a number per text; leave blank to skip), then run
    `rloop-ray rate import SWEEP_DIR SHEET.csv`. The sweep must be a local folder.
    """
    from rloop_ray.analysis.rating import export_for_rating

    exp = _refusing_bad_input(lambda: export_for_rating(source, n=n, seed=seed, out=out))
    if exp.n < n:
        typer.echo(f"only {exp.n_available} texts available; exported all of them")
    typer.echo(f"sheet ({exp.n} texts): {exp.sheet}")
    typer.echo(f"key (private, do not share with raters): {exp.key}")


@rate_app.command("import")
def rate_import(
    source: SweepSource,
    ratings: Annotated[Path, typer.Argument(metavar="SHEET.csv", help="The filled sheet.",
                                            show_default=False)],
) -> None:
    """Join human ratings back as the metric `score_human` (used by `rloop-ray stats`)."""
    from rloop_ray.analysis.rating import RatingFileError, import_ratings
    from rloop_ray.store import StoreError

    try:
        res = import_ratings(source, ratings)
    except RatingFileError as exc:  # before ValueError, which it is too
        typer.echo(f"error: malformed ratings file:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    except (StoreError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{res.n_rated} ratings imported ({res.n_blank} left blank) from {res.source}")
    typer.echo(f"score_human now covers {res.n_cells_scored} cells: {res.scores}")
