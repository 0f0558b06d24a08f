"""CLI commands: `stats` (tables, figures, report) and `rate export|import` (blind rating).

Heavy imports (pandas, scipy, matplotlib) happen inside the commands so `--help` stays
instant. Exit codes: 0 done, 1 the analysis failed, 2 bad arguments or a malformed
ratings file (the message names the line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rloop_ray.cli._app import app

rate_app = typer.Typer(
    help="Blind human rating of generated texts: export a sheet, import the ratings.",
    no_args_is_help=True,
)
app.add_typer(rate_app, name="rate")

ResultsDir = Annotated[
    Path,
    typer.Argument(help="A results folder, e.g. results/kv_layer_localization.",
                   show_default=False),
]


def _check_results_dir(path: Path) -> None:
    if not path.is_dir():
        raise typer.BadParameter(f"results folder not found: {path}", param_hint="RESULTS_DIR")


@app.command("stats")
def stats_command(
    results_dir: ResultsDir,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m",
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
                                          help="Draw the PNG figures.")] = True,
) -> None:
    """Statistics of a sweep: stats/*.parquet, figures/*.png, report.md and report.html.

    Works on a partial sweep too (it says what is missing). Example:

        rloop-ray stats results/kv_layer_localization
    """
    _check_results_dir(results_dir)
    from rloop_ray.report import write_report

    try:
        out = write_report(results_dir, metrics=metric or None, seed=seed,
                           n_resamples=n_resamples, confidence=confidence, q=q,
                           figures=figures)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    comp = out.stats.completeness
    expected = "?" if comp.n_expected is None else str(comp.n_expected)
    typer.echo(f"{comp.n_done}/{expected} cells ({comp.n_ok} ok, {comp.n_failed} failed)")
    if comp.partial:
        typer.echo(f"partial sweep: {comp.n_missing} cells missing")
    cmp = out.stats.comparisons
    n_sig = int((cmp["p_fdr"] < q).sum()) if not cmp.empty else 0
    typer.echo(f"{len(cmp)} comparisons, {n_sig} with p_fdr < {q} "
               f"(BH family of {out.stats.fdr_family_size} tests)")
    for note in out.notes:
        if note.level == "warning":
            typer.echo(f"warning: {note.text[:300]}{'...' if len(note.text) > 300 else ''}")
    drawn = [f for f in out.figures if f.path is not None]
    typer.echo(f"tables: {out.tables[0].parent}/ ({len(out.tables)} files)")
    typer.echo(f"figures: {len(drawn)} drawn, {len(out.figures) - len(drawn)} skipped")
    typer.echo(f"report: {out.markdown}")
    typer.echo(f"report: {out.html}")


@rate_app.command("export")
def rate_export(
    results_dir: ResultsDir,
    n: Annotated[int, typer.Option("--n", min=1, help="Texts to sample.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the sample, order and ids.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Where to write the sheet (CSV). Default: "
                                                  "RESULTS_DIR/rating/sheet_seed<seed>.csv")
                   ] = None,
) -> None:
    """Write a blind rating sheet (anon_id, text, rating) and a private key file.

    Fill the `rating` column (a number per text; leave blank to skip), then run
    `rloop-ray rate import RESULTS_DIR SHEET.csv`.
    """
    _check_results_dir(results_dir)
    from rloop_ray.rating import export_for_rating

    try:
        exp = export_for_rating(results_dir, n=n, seed=seed, out=out)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if exp.n < n:
        typer.echo(f"only {exp.n_available} texts available; exported all of them")
    typer.echo(f"sheet ({exp.n} texts): {exp.sheet}")
    typer.echo(f"key (private, do not share with raters): {exp.key}")


@rate_app.command("import")
def rate_import(
    results_dir: ResultsDir,
    ratings: Annotated[Path, typer.Argument(help="The filled sheet (CSV).",
                                            show_default=False)],
) -> None:
    """Join human ratings back as the metric `score_human` (used by `rloop-ray stats`)."""
    _check_results_dir(results_dir)
    from rloop_ray.rating import RatingFileError, import_ratings

    try:
        res = import_ratings(results_dir, ratings)
    except RatingFileError as exc:
        typer.echo(f"error: malformed ratings file:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{res.n_rated} ratings imported ({res.n_blank} left blank) from {res.source}")
    typer.echo(f"score_human now covers {res.n_cells_scored} cells: {res.scores}")
