"""`rloop-ray validate`: check a grid file end to end before any GPU time is spent.

It loads the spec, the prompt bank and each model's config (never weights), expands the
grid, and prints counts, the layer indices every layer spec resolves to on each model,
what each token spec selects, and the memory of one replica with the largest batch that
fits. The checks are `grid.check_models`, the same pre-flight `sweep` runs. It starts
no Ray and writes nothing. Any problem is one message on stderr and exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rloop_ray.cli._app import app

if TYPE_CHECKING:
    from rloop_ray.grid import Grid, ModelReport

EXIT_INVALID = 2
"""Exit code of an invalid grid (typer's own usage errors also exit 2)."""


def split_models(values: Sequence[str] | None) -> list[str] | None:
    """`--model a --model b,c` -> `["a", "b", "c"]`; None when no option was given."""
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",")]
    if any(not n for n in names):
        raise typer.BadParameter(f"empty model name in {list(values)!r}",
                                 param_hint="--model")
    return names


def _indices(layers: list[int]) -> str:
    """[0, 1, 2, 7] -> "0-2,7 (4 layers)"."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    parts = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs]
    n = len(layers)
    return f"{','.join(parts)} ({n} layer{'s' if n != 1 else ''})"


def _points(points: list[tuple[str, list[int]]], limit: int = 8) -> str:
    """An expander's points: "11 points, 1 layer each: 10, 11, ..., 20"."""
    sizes = sorted({len(idx) for _, idx in points})
    size = (f"{sizes[0]} layer{'s' if sizes[0] != 1 else ''} each" if len(sizes) == 1
            else "layers " + "/".join(map(str, sizes)))
    names = [spec for spec, _ in points]
    if len(names) > limit:
        names = [*names[: limit - 2], "...", names[-1]]
    n = len(points)
    return f"{n} point{'s' if n != 1 else ''}, {size}: {', '.join(names)}"


def _layer_line(lspec: str, idx: list[int], width: int) -> str:
    """A plain layer spec and what it resolves to; a range is said to be ONE point."""
    line = f"  layers {lspec:<{width}} -> {_indices(idx)}"
    if len(idx) > 1:
        line += (f": ONE block of {len(idx)} layers patched together in each cell; "
                 f'{{each: "{lspec}"}} gives one point per layer')
    return line


def _intervention_lines(grid: Grid) -> list[str]:
    """What the newer intervention fields do in this grid: during, steer, match specs."""
    from rloop_ray.engine.selectors import is_match_spec
    from rloop_ray.vocab import GENERATION, PREFILL, STEER

    axes = grid.spec.interventions
    if axes is None:
        return []
    lines = []
    during = ", ".join(axes.during)
    if axes.during == [PREFILL]:
        lines.append(f"  during: {during} (interventions edit the prompt's prefill only)")
    else:
        lines.append(f"  during: {during}: 'prefill' edits the prompt; '{GENERATION}' also "
                     "every generated token (the source decodes alongside the target, step t "
                     "mixed with its step t; cache sites patch the generated tokens' entries); "
                     "'both' does both")
    steer = [c for c in grid.cells if c.mode == STEER]
    if steer:
        groups = sorted({(str(c.source_group), len(c.steer_source_prompts or ()),
                          c.target_group, len(c.steer_target_prompts or ())) for c in steer
                         if c.control != "self"})
        pairs = "; ".join(f"{s} ({ns} prompts) - {t} ({nt} prompts)" for s, ns, t, nt in groups)
        lines.append(f"  steer: {len(steer)} cells, one per (target, source group) and point, "
                     "source_id mean:<group>: adds alpha x (mean of the source group - mean "
                     "of the target group) of the site's activation, each prompt averaged "
                     f"over the token selection; {pairs or 'self only'}")
    for tspec in axes.tokens:
        if is_match_spec(tspec):
            lines.append(f"  tokens {tspec}: the prefill positions whose decoded token text "
                         "the regex finds (re.search), counted in n_matched_positions; a "
                         "target with no match fails its cells as EmptyTokenSelection")
    return lines


def _measure_line(grid: Grid) -> str:
    m = grid.spec.measure
    profile = ("off" if m.layers is None else "all layers" if m.layers == "all"
               else ", ".join(m.layers))
    on = {True: "on", False: "off"}
    top = f"top {m.top_logprobs}" if m.top_logprobs else "off"
    return (f"  measure: R_V over the last {m.window} tokens ({m.early_layer} vs "
            f"{m.late_layer}); layer profile pr_by_layer: {profile}; attention "
            f"(attn_*): {on[m.attention]}; kl_from_natural (first step): "
            f"{on[m.kl_from_natural]}; top_logprobs (first step): {top}; "
            f"token_logprobs: {on[m.token_logprobs]}")


def _params(n: int) -> str:
    """8030261248 -> "8.03 B", 134515008 -> "135 M"."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _memory_lines(grid: Grid, report: ModelReport, devices: list[Any]) -> list[str]:
    """Two lines: one replica's bytes at the grid's batch, and the batch each device holds."""
    from rloop_ray.grid import memory_estimates
    from rloop_ray.memory import format_bytes

    estimates = memory_estimates(grid, report, devices)
    if not estimates:
        return []
    e = estimates[0]
    exact = report.lengths is not None and report.lengths.exact
    tokens = f"prompts <= {e.prompt_tokens}{'' if exact else ' (estimated)'} + {e.new_tokens} new"
    first = (f"  memory per replica ({e.dtype}, {_params(e.n_params)} params): weights "
             f"{format_bytes(e.weights)} + {format_bytes(e.shared)} encoded prompts + batch "
             f"{e.batch_size} x {format_bytes(e.per_row)} ({tokens}) = {format_bytes(e.total)}")
    return [first, "  fits: " + "; ".join(x.fit_text() for x in estimates)]


def _describe(grid: Grid, reports: list[ModelReport] | None, warnings: list[str],
              devices: list[Any] | None = None) -> list[str]:
    spec = grid.spec
    p = spec.prompts
    lines = [f"grid {spec.source}: {spec.name} (version {spec.version})"]
    if spec.description:
        lines.append(f"  {spec.description.strip()}")
    lines.append(f"  re-tests: {', '.join(spec.retests) if spec.retests else '(none named)'}")
    lines.append(f"  spec hash: {spec.spec_hash()[:16]}")
    lines.append(f"  prompts: {grid.bank_root} ({len(grid.prompts)} used)")
    design = f"conditions {', '.join(p.conditions)}" if p.conditions else (
        f"targets {', '.join(p.effective_target_groups())} <- sources "
        f"{', '.join(p.effective_source_groups())}")
    levels = f", levels {p.levels}" if p.levels else ""
    lines.append(f"  pairing: {p.pairing}, {design}{levels}, seed {p.seed}")
    axes = spec.interventions
    if axes is None:
        lines.append("  interventions: none (natural runs only)")
    else:
        sizes = " x ".join(f"{k} {len(getattr(axes, k))}" for k in
                           ("site", "layers", "tokens", "align", "alpha", "mode", "during"))
        lines.append(f"  interventions: {sizes}")
        lines += _intervention_lines(grid)
    lines.append(f"  controls: {', '.join(spec.controls) or '(none)'}")
    g = spec.generation
    lines.append(f"  generation: {g.max_new_tokens} new tokens, temperature {g.temperature}, "
                 f"{g.n_samples} sample(s)")
    lines.append(_measure_line(grid))
    counts = grid.counts()
    for model in grid.models:
        c = counts[model.id]
        rep = next((r for r in reports or [] if r.model == model.id), None)
        head = f"model {model.id}"
        if model.name_or_path != model.id:
            head += f" ({model.name_or_path})"
        if rep is not None:
            head += f": {rep.n_layers} layers"
            if rep.max_position_embeddings:
                head += f", max positions {rep.max_position_embeddings}"
        lines.append(head)
        lines.append(f"  {c['cells']} cells in {c['units']} work units")
        if rep is None:
            continue
        width = max((len(s) for s in rep.layers), default=0)
        for lspec, idx in rep.layers.items():
            lines.append(_layer_line(lspec, idx, width))
        for label, points in rep.layer_points.items():
            lines.append(f"  layers {label} -> {_points(points)}")
        if rep.profile_layers is not None:
            lines.append(f"  layer profile (measure.layers) -> {_indices(rep.profile_layers)}")
        lines.append(f"  R_V layers: early {spec.measure.early_layer} -> {rep.early_layer}, "
                     f"late {spec.measure.late_layer} -> {rep.late_layer}")
        for tspec, summary in rep.tokens.items():
            lines.append(f"  tokens {tspec}: {summary}")
        if rep.longest_prompt is not None and rep.lengths is not None:
            pid, n = rep.longest_prompt
            bound = "" if rep.lengths.exact else "up to "
            lines.append(f"  longest prompt: {pid} ({bound}{n} tokens) + "
                         f"{spec.generation.max_new_tokens} new tokens")
        lines += _memory_lines(grid, rep, devices or [])
        lines += [f"  note: {n}" for n in rep.notes]
        lines += [f"  warning: {w}" for w in rep.warnings]
    lines += [f"warning: {w}" for w in warnings]
    lines.append(f"total: {len(grid.cells)} cells in {len(grid.units)} work units over "
                 f"{len(grid.models)} model(s)")
    if reports is None:
        lines.append("model configs not checked (--skip-model-check)")
    return lines


@app.command()
def validate(
    grid: Annotated[Path, typer.Argument(metavar="GRID.yaml", help="The grid file.",
                                         show_default=False)],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "--models", "-m",
                     help="Run the grid on these models instead of its own (repeat or "
                          "comma-separate): a model id of the grid, a builtin name "
                          "(smollm2-135m), a hub id or a local path."),
    ] = None,
    skip_model_check: Annotated[
        bool,
        typer.Option("--skip-model-check",
                     help="Do not read model configs (offline, unknown models)."),
    ] = False,
    device_memory: Annotated[
        str | None,
        typer.Option("--device-memory",
                     help="Memory of the device the estimate is shown for: cpu (this "
                          "host's RAM), a10g, or a per-GPU size such as 80GiB. Default: "
                          "a 24 GB A10G per resources.gpus_per_replica, and RAM when "
                          "that is 0 or null."),
    ] = None,
) -> None:
    """Expand GRID, count cells and units per model and check layer and token specs against
    each model's config (no weights, no Ray, nothing written). Exit code 2 if invalid.

    Example: rloop-ray validate sweeps/quickstart.yaml --model tiny-llama
    """
    from rloop_ray.grid import build_grid, check_models, default_devices, grid_warnings
    from rloop_ray.memory import parse_device
    from rloop_ray.spec import SpecValidationError, load_spec

    try:
        spec = load_spec(grid)
        built = build_grid(spec, models_override=split_models(model))
        reports = None if skip_model_check else check_models(built)
    except SpecValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        gpus = spec.resources.gpus_per_replica
        devices = (default_devices(spec) if device_memory is None else
                   [parse_device(device_memory, gpus=max(1, int(-(-(gpus or 1) // 1))))])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device-memory") from None
    for line in _describe(built, reports, grid_warnings(built), devices):
        typer.echo(line)
    typer.echo("OK")
