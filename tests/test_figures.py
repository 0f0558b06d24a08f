"""Figures and the report: every figure is a real image (PNG at >= 150 dpi with an SVG beside
it), panels constant by construction are not drawn, cell labels stay readable; the report
says what the data says (notes, failures, skipped figures) and its HTML is
self-contained."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib import image as mpimg
from PIL import Image
from synthetic import Effects, Point, make_sweep
from typer.testing import CliRunner

from rloop_ray.analysis import report
from rloop_ray.analysis.figures import DPI, text_colour
from rloop_ray.cli import app

N_BOOT = 200


def assert_real_png(data: bytes | str) -> np.ndarray:
    """Decode a PNG and check it has pixels that are not all the same colour."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    pixels = mpimg.imread(source, format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgba = np.round(pixels[..., :3] * 255).astype(np.uint32)
    colours = (rgba[..., 0] << 16) | (rgba[..., 1] << 8) | rgba[..., 2]
    assert len(np.unique(colours)) > 10, "image is (almost) uniform"
    assert float(pixels[..., :3].std()) > 0.01
    return pixels


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("figures")
    sw = make_sweep(
        root, "full", models=("llama-tiny", "mistral-tiny"), n_prompts=8,
        points=(Point(layers="16:32", tokens="all"), Point(layers="16:32", tokens="last:8"),
                Point(layers="0:16", tokens="all", gain=0.0),
                Point(mode="transplant", layers="all")),
        alphas=(0.5, 1.0), controls=("shuffle", "random"), fail_every=29,
        effects=Effects(controls={"shuffle": 1.0}), long_control=True, seed=5,
    )
    out = report.write_report(sw.path, n_resamples=N_BOOT)
    return sw, out


def assert_figure_files(png, svg) -> None:
    """A PNG of real content at >= 150 dpi, and an SVG beside it that parses."""
    assert_real_png(str(png))
    with Image.open(png) as im:
        dpi = im.info.get("dpi")
    assert dpi is not None and min(dpi) >= 150 - 0.5, f"{png}: dpi {dpi}"
    assert svg is not None and svg.is_file() and svg.stem == png.stem
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and len(root) > 0


def test_every_figure_is_a_real_image(full):
    sw, out = full
    drawn = [f for f in out.figures if f.path is not None]
    kinds = {re.sub(r"_(rv|score).*$", "", f.name) for f in drawn}
    assert {"transfer_heatmap", "alpha_dose", "rv_by_group", "rv_trajectory", "rv_vs"} <= kinds
    pngs = sorted((sw.path / "figures").glob("*.png"))
    assert len(pngs) == len(drawn) == len(list((sw.path / "figures").glob("*.svg")))
    for fig in drawn:
        assert_figure_files(fig.path, fig.svg)
    assert not [f for f in out.figures if f.skipped]
    assert DPI >= 150


def test_heatmap_puts_the_controls_beside_the_patch_and_drops_constant_panels(full):
    _, out = full
    heat = next(f for f in out.figures if f.name == "transfer_heatmap_rv_kv_mix_end")
    pixels = assert_real_png(str(heat.path))
    # rows: 2 models x 2 alphas (0.5, 1); columns: patch, shuffle, random
    assert pixels.shape[1] > 1000 and pixels.shape[0] > 600
    assert "controls" in heat.title and "alpha = 0 panels are not drawn" in heat.caption


def test_alpha_zero_panels_are_not_drawn(tmp_path):
    sw = make_sweep(tmp_path, "zero", models=("llama-tiny",), n_prompts=6, alphas=(0.0, 1.0),
                    controls=("shuffle",), trajectory_steps=0)
    out = report.write_report(sw.path, n_resamples=N_BOOT)
    heat = next(f for f in out.figures if f.name.startswith("transfer_heatmap_rv"))
    svg = heat.svg.read_text()
    assert "llama-tiny, α = 1" in svg and "patch (C)" in svg
    assert "α = 0" not in svg


@pytest.mark.parametrize("value", np.linspace(0.0, 1.0, 21))
def test_cell_labels_contrast_with_every_cell_colour(value):
    rgba = colormaps["RdBu_r"](value)
    colour = text_colour(rgba)

    def luminance(c):
        def ch(x):
            return x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4
        return 0.2126 * ch(c[0]) + 0.7152 * ch(c[1]) + 0.0722 * ch(c[2])

    cell = luminance(rgba)
    text = 0.0 if colour == "black" else 1.0
    ratio = (max(cell, text) + 0.05) / (min(cell, text) + 0.05)
    assert ratio >= 4.5, (value, colour, ratio)  # WCAG AA for normal text


def test_report_markdown_has_run_tables_notes_and_figures(full):
    sw, out = full
    md = out.markdown.read_text()
    order = ["## Summary", "## Example generations", "## Figures", "## Appendix: full tables",
             "### Findings", "### Completeness and failures", "### Classic comparisons",
             "### Transfer efficiency", "### Controls", "### Dose-response",
             "### R_V and behaviour", "### Models side by side", "### Per condition",
             "## Provenance"]
    positions = [md.index(section) for section in order]
    assert positions == sorted(positions), "sections out of order"
    assert "spec_hash" in md and "versions:" in md
    assert "llama-tiny" in md and "mistral-tiny" in md
    n_failed = int((sw.written["status"] == "failed").sum())
    assert f"{n_failed} cells failed" in md
    assert "same computation as continuing the source prompt" in md
    assert "'shuffle' control moved the metric as much as the patch" in md
    assert "p_fdr" in md and "sig" in md
    for fig in out.figures:
        assert f"](figures/{fig.name}.png)" in md
        assert f"(figures/{fig.name}.svg)" in md
    assert (sw.path / "stats" / "comparisons.parquet").is_file()


def test_report_html_is_self_contained(full):
    _, out = full
    text = out.html.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert 'src="figures/' not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == len([f for f in out.figures if f.path is not None])
    for data in images:
        assert_real_png(base64.b64decode(data))
    assert "same computation as continuing the source prompt" in text


def test_figures_without_data_are_skipped_and_reported(tmp_path):
    sw = make_sweep(tmp_path, "sparse", models=("llama-tiny",), n_prompts=8, alphas=(1.0,),
                    controls=(), trajectory_steps=0)
    out = report.write_report(sw.path, n_resamples=N_BOOT)
    skipped = {f.name: f.skipped for f in out.figures if f.skipped}
    assert "rv_trajectory" in skipped and "trajectory" in skipped["rv_trajectory"]
    assert any(name.startswith("alpha_dose") for name in skipped)
    for f in out.figures:
        if f.path is not None:
            assert_real_png(str(f.path))
    md = out.markdown.read_text()
    assert "skipped: no cell recorded an R_V trajectory" in md
    assert "Figures skipped for lack of data" in md
    assert "skipped:" in out.html.read_text()


def test_partial_sweep_report(tmp_path):
    sw = make_sweep(tmp_path, "partial", models=("llama-tiny",), n_prompts=8,
                    keep_fraction=0.5, seed=1)
    out = report.write_report(sw.path, n_resamples=N_BOOT, figures=False)
    md = out.markdown.read_text()
    missing = sw.n_total - len(sw.written)
    assert f"Partial sweep: {len(sw.written)} of {sw.n_total} cells done" in md
    assert f"missing: {missing}" in md


def test_cli_stats_end_to_end(tmp_path):
    sw = make_sweep(tmp_path, "cli", models=("llama-tiny",), n_prompts=6, alphas=(0.5, 1.0),
                    controls=("shuffle",), keep_fraction=0.9)
    result = CliRunner().invoke(app, ["stats", str(sw.path), "--n-resamples", "200"])
    assert result.exit_code == 0, result.output
    assert "partial sweep" in result.output
    assert (sw.path / "report.md").is_file() and (sw.path / "report.html").is_file()
    assert (sw.path / "stats" / "conditions.parquet").is_file()
    for png in (sw.path / "figures").glob("*.png"):
        assert_real_png(str(png))

    only = CliRunner().invoke(app, ["stats", str(sw.path), "--metric", "rv", "--no-figures",
                                    "--n-resamples", "200"])
    assert only.exit_code == 0, only.output

    bad = CliRunner().invoke(app, ["stats", str(sw.path), "--metric", "nope"])
    assert bad.exit_code == 2 and "Available" in bad.output
    missing = CliRunner().invoke(app, ["stats", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2


@pytest.mark.parametrize("where", ["empty", "parent"])
def test_cli_stats_refuses_a_folder_that_is_not_a_sweep(tmp_path, where):
    sw = make_sweep(tmp_path / "results", "one", models=("llama-tiny",), n_prompts=4,
                    controls=())
    folder = tmp_path / "empty" if where == "empty" else sw.path.parent
    folder.mkdir(exist_ok=True)
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(app, ["stats", str(folder), "--no-figures"])
    assert result.exit_code == 2, result.output
    assert "not a sweep directory (no manifest.json)" in result.output
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written into it


def test_cli_stats_refuses_a_damaged_shard_and_names_it(tmp_path):
    sw = make_sweep(tmp_path, "damaged", models=("llama-tiny",), n_prompts=4, controls=())
    bad = sw.path / "cells" / "part-torn.parquet"
    bad.write_bytes(b"PAR1 not really a parquet file")
    result = CliRunner().invoke(app, ["stats", str(sw.path), "--no-figures"])
    assert result.exit_code == 2, result.output
    assert "part-torn.parquet" in result.output
    assert f"rloop-ray repair {sw.path}" in " ".join(result.output.split())
    assert not (sw.path / "report.md").exists()


def test_cli_stats_on_an_object_store_needs_out(tmp_path):
    pytest.importorskip("fsspec")
    sw = make_sweep("memory://stats-cli", "remote", models=("llama-tiny",), n_prompts=6,
                    controls=())
    refused = CliRunner().invoke(app, ["stats", sw.path, "--no-figures"])
    assert refused.exit_code == 2, refused.output
    assert "--out" in refused.output
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["stats", sw.path, "--out", str(out), "--no-figures",
                                    "--n-resamples", "200"])
    assert done.exit_code == 0, done.output
    assert (out / "report.md").is_file() and (out / "stats" / "comparisons.parquet").is_file()
    assert f"from `{sw.path}`" in (out / "report.md").read_text()


def test_trajectories_of_a_natural_only_sweep_are_drawn(tmp_path):
    """A grid of natural cells only (P9's): no patched cell to draw, the natural lines
    still are (an empty selection once indexed columns instead of rows: KeyError)."""
    sw = make_sweep(tmp_path, "natural_only", n_prompts=6, controls=(),
                    skip=lambda row: row["control"] != "natural")
    out = report.write_report(sw.path, n_resamples=N_BOOT)
    drawn = {f.name for f in out.figures if f.path is not None}
    assert "rv_trajectory" in drawn
