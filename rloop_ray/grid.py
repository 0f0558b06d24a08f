"""Expansion of a `SweepSpec` into frozen `Cell`s with content-hash ids, grouped into `WorkUnit`s.

The cell id is what resume, dedupe and joins rely on, so it is a hash of everything
that can change a cell's result (model, prompt texts, every intervention coordinate,
generation and measurement settings) and of nothing else. A `WorkUnit` is the cells
that share (model, source, target): their caches have one shape, so a worker runs
them as one batch. Expansion is deterministic and needs no torch and no weights;
`check_models` adds the checks that need a model's config (depth, context length).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rloop_ray.engine.selectors import SpecError, resolve_layer, resolve_layers, resolve_tokens
from rloop_ray.engine.types import (
    CACHE_SITES,
    CellRequest,
    GenerationConfig,
    Intervention,
    MeasureConfig,
)
from rloop_ray.prompts import (
    Prompt,
    PromptBank,
    PromptLookupError,
    pair_prompts,
    pick_other,
    seeded_order,
    text_hash,
)
from rloop_ray.spec import (
    BASELINE_GROUP,
    RECURSIVE_GROUP,
    InterventionAxes,
    Issue,
    ModelSpec,
    SpecValidationError,
    SweepSpec,
    format_loc,
    load_spec,
)

__all__ = [
    "NONE",
    "Cell",
    "Grid",
    "ModelReport",
    "Point",
    "WorkUnit",
    "build_grid",
    "check_models",
    "classic_condition",
    "expand",
    "grid_warnings",
    "group_units",
    "intervention_points",
    "load_bank",
    "load_grid",
    "resolve_models",
]

logger = logging.getLogger(__name__)

NONE = "none"
"""Canonical value of intervention fields that do not apply (natural cells), so the one
natural cell of a target does not multiply with the site/layers/tokens/alpha axes."""

CONTROL_ORDER = ("patch", "shuffle", "random", "other", "self")
"""Order of the per-pair conditions in the expansion (natural comes first, per target)."""

ROW_COORDINATES = (
    "cell_id", "model", "source_id", "target_id", "source_group", "target_group",
    "source_level", "target_level", "pair_index", "site", "mode", "layers", "tokens",
    "align", "alpha", "control", "seed",
)
"""Grid coordinates of a result row (docs/architecture.md), minus `unit_id`."""


def _short_hash(payload: str) -> str:
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def classic_condition(control: str, target_group: str, source_group: str | None) -> str | None:
    """A/B/C/D of the classic design, or None for any other cell."""
    if control == "natural":
        return {BASELINE_GROUP: "A", RECURSIVE_GROUP: "B"}.get(target_group)
    if control == "patch":
        if target_group == BASELINE_GROUP and source_group == RECURSIVE_GROUP:
            return "C"
        if target_group == RECURSIVE_GROUP and source_group == BASELINE_GROUP:
            return "D"
    return None


# --------------------------------------------------------------------------- Cell


@dataclass(frozen=True)
class Cell:
    """One run: a target prompt, maybe a source, one intervention point, one sample seed.

    `cell_id` is computed from every other field (first 16 hex of sha256 of their
    sorted-key JSON); the prompt texts enter through `target_text_hash` and
    `source_text_hash`. Passing a `cell_id` that does not match raises, so a cell
    rebuilt from a stored row is checked for integrity.
    """

    # model
    model: str
    model_name_or_path: str
    revision: str | None
    dtype: str
    chat_template: bool | None  # None: auto (the tokenizer's template if it has one)
    # prompts
    target_id: str
    target_group: str
    target_level: int | None
    target_text_hash: str
    source_id: str | None
    source_group: str | None
    source_level: int | None
    source_text_hash: str | None
    pair_index: int | None  # None for natural and self (they depend on the target only)
    # intervention (NONE / None for natural)
    control: str
    site: str
    mode: str
    layers: str
    tokens: str
    align: str
    alpha: float | None
    seed: int  # sample index 0..n_samples-1; the generation seed is derived from the id
    # generation
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_at_eos: bool
    # measurement
    early_layer: str
    late_layer: str
    window: int
    centering: bool
    trajectory: bool
    scorers: tuple[str, ...]
    cell_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scorers", tuple(self.scorers))
        expected = _short_hash(self.canonical_json())
        if self.cell_id and self.cell_id != expected:
            raise ValueError(f"cell_id {self.cell_id!r} does not match the cell's content "
                             f"(expected {expected!r}): the cell was edited or is corrupt")
        object.__setattr__(self, "cell_id", expected)

    def identity(self) -> dict[str, Any]:
        """Every field but `cell_id`: what the id hashes."""
        out = asdict(self)
        out.pop("cell_id")
        out["scorers"] = list(self.scorers)
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.identity(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        out = self.identity()
        out["cell_id"] = self.cell_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        """Rebuild a cell from `to_dict()` (extra keys, e.g. result columns, are ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "scorers" in kwargs:
            kwargs["scorers"] = tuple(kwargs["scorers"])
        return cls(**kwargs)

    def coordinates(self) -> dict[str, Any]:
        """The grid coordinates a result row carries (architecture.md), minus `unit_id`."""
        return {k: getattr(self, k) for k in ROW_COORDINATES}

    # -- derived --------------------------------------------------------------------

    @property
    def condition(self) -> str | None:
        """A/B/C/D of the classic design, or None."""
        return classic_condition(self.control, self.target_group, self.source_group)

    @property
    def generation_seed(self) -> int:
        """Seed of this cell's sampling: from the id, so a retry draws the same tokens."""
        return int(self.cell_id[:8], 16)

    @property
    def control_seed(self) -> int:
        """Seed of the `shuffle` permutation / `random` noise.

        Derived from (model, target, source, control, sample) only, so one shuffled or
        random source is shared by every layer/token/alpha point of a pair, like a real
        source is.
        """
        payload = json.dumps([self.model, self.target_text_hash, self.source_text_hash,
                              self.control, self.seed], separators=(",", ":"))
        return int(_short_hash(payload)[:8], 16)

    def intervention(self) -> Intervention:
        if self.control == "natural":
            return Intervention(control="natural", alpha=0.0)
        return Intervention(
            site=self.site, layers=self.layers, tokens=self.tokens, align=self.align,
            alpha=float(self.alpha if self.alpha is not None else 1.0), mode=self.mode,
            control=self.control, control_seed=self.control_seed,
        )

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, seed=self.generation_seed, stop_at_eos=self.stop_at_eos,
        )

    def measure_config(self) -> MeasureConfig:
        return MeasureConfig(
            early_layer=self.early_layer, late_layer=self.late_layer, window=self.window,
            centering=self.centering, trajectory=self.trajectory, scorers=self.scorers,
        )

    def to_request(self, prompt_texts: Mapping[str, str]) -> CellRequest:
        """The engine request; `prompt_texts` maps prompt id -> text (e.g. `Grid.prompt_texts`).

        Raises KeyError for a missing prompt and ValueError when a text no longer matches
        the hash the cell was built with (the bank changed since expansion).
        """
        target = self._text(prompt_texts, self.target_id, self.target_text_hash)
        source = None
        if self.source_id is not None and self.source_text_hash is not None:
            source = self._text(prompt_texts, self.source_id, self.source_text_hash)
        return CellRequest(
            cell_id=self.cell_id, target_text=target, source_text=source,
            intervention=self.intervention(), generation=self.generation_config(),
            measure=self.measure_config(),
        )

    def _text(self, texts: Mapping[str, str], prompt_id: str, expected: str) -> str:
        try:
            text = texts[prompt_id]
        except KeyError:
            raise KeyError(f"cell {self.cell_id}: no text for prompt {prompt_id!r}") from None
        if text_hash(text) != expected:
            raise ValueError(f"cell {self.cell_id}: the text of prompt {prompt_id!r} changed "
                             "since the grid was expanded; expand the grid again")
        return text


# --------------------------------------------------------------------------- WorkUnit


@dataclass(frozen=True)
class WorkUnit:
    """All cells of one model sharing (source, target): one batch for one worker."""

    unit_id: str
    model: str
    source_id: str | None
    target_id: str
    cells: tuple[Cell, ...]

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def cell_ids(self) -> tuple[str, ...]:
        return tuple(c.cell_id for c in self.cells)

    @property
    def prompt_ids(self) -> tuple[str, ...]:
        return (self.target_id,) if self.source_id in (None, self.target_id) else (
            self.target_id, self.source_id)

    def requests(self, prompt_texts: Mapping[str, str]) -> list[CellRequest]:
        """Engine requests of every cell, in cell order."""
        return [c.to_request(prompt_texts) for c in self.cells]


def unit_id_for(cell_ids: Iterable[str]) -> str:
    """First 16 hex of sha256 of the sorted cell ids, newline-joined."""
    return _short_hash("\n".join(sorted(cell_ids)))


def group_units(cells: Iterable[Cell]) -> list[WorkUnit]:
    """Group cells by (model, source_id, target_id), in order of first appearance."""
    groups: dict[tuple[str, str | None, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.model, c.source_id, c.target_id), []).append(c)
    return [
        WorkUnit(unit_id=unit_id_for(c.cell_id for c in cs), model=m, source_id=s,
                 target_id=t, cells=tuple(cs))
        for (m, s, t), cs in groups.items()
    ]


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Point:
    """One point of the intervention axes (site x mode x layers x tokens x align x alpha)."""

    site: str
    mode: str
    layers: str
    tokens: str
    align: str
    alpha: float


def intervention_points(axes: InterventionAxes | None) -> list[Point]:
    """The product of the axes, in axis order, deduplicated.

    `transplant` replaces the chosen layers' whole cache, so tokens, align and alpha do
    not apply: they are canonicalised to `all`, `start`, 1.0. It exists for cache sites
    only; other sites get `mix` points alone.
    """
    if axes is None:
        return []
    out: list[Point] = []
    for site in axes.site:
        for mode in axes.mode:
            if mode == "transplant" and site not in CACHE_SITES:
                continue
            for layers in axes.layers:
                for tokens in axes.tokens:
                    for align in axes.align:
                        for alpha in axes.alpha:
                            if mode == "transplant":
                                p = Point(site, mode, layers, "all", "start", 1.0)
                            else:
                                p = Point(site, mode, layers, tokens, align, float(alpha))
                            if p not in out:
                                out.append(p)
    return out


@dataclass(frozen=True)
class _Pair:
    index: int
    target: Prompt
    source: Prompt
    rank: int  # which source of this target (0 = its first): picks the `other` source too


@dataclass(frozen=True)
class _Selection:
    targets: tuple[Prompt, ...]
    pairs: tuple[_Pair, ...]
    pools: Mapping[str, tuple[Prompt, ...]]  # group -> prompts (after the level filter)


def load_bank(spec: SweepSpec) -> PromptBank:
    """The spec's prompt bank; problems point at `prompts.bank` or at the prompt file."""
    path = spec.resolve_bank()
    return PromptBank.load(path)


def resolve_models(
    spec: SweepSpec, models_override: Sequence[str | ModelSpec] | None = None
) -> list[ModelSpec]:
    """The spec's models, or the override: a spec model id picks that model's settings,
    any other name becomes a model with default settings (`name_or_path` = the name)."""
    if not models_override:
        return list(spec.models)
    by_id = {m.id: m for m in spec.models}
    out: list[ModelSpec] = []
    for item in models_override:
        if isinstance(item, ModelSpec):
            model = item
        else:
            name = str(item).strip()
            if not name or any(ch.isspace() for ch in name):
                raise SpecValidationError(
                    f"bad model name {item!r}; give a model id of the grid "
                    f"({', '.join(by_id)}), a builtin name, a hub id or a path",
                    file=spec.source, field="--model",
                )
            model = by_id.get(name) or ModelSpec(id=name, name_or_path=name)
        if model.id not in [m.id for m in out]:
            out.append(model)
    return out


def _lookup(spec: SweepSpec, loc: tuple[str | int, ...], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except PromptLookupError as exc:
        raise spec.error(loc, str(exc)) from None


def _select(spec: SweepSpec, bank: PromptBank) -> _Selection:
    p = spec.prompts

    def group_loc(kind: str, name: str) -> tuple[str | int, ...]:
        explicit = p.target_groups if kind == "target_groups" else p.source_groups
        if p.conditions:
            return ("prompts", "conditions")
        if explicit is not None and name in explicit:
            return ("prompts", kind, explicit.index(name))
        return ("prompts", kind)

    pools: dict[str, tuple[Prompt, ...]] = {}

    def pool(kind: str, name: str) -> tuple[Prompt, ...]:
        if name not in pools:
            pools[name] = tuple(_lookup(spec, group_loc(kind, name),
                                        lambda: bank.group(name, p.levels)))
        return pools[name]

    for g in p.effective_source_groups():
        pool("source_groups", g)  # unknown source groups are errors even when unused
    targets: list[Prompt] = []
    pairs: list[_Pair] = []
    for g in p.effective_target_groups():
        ordered = seeded_order(pool("target_groups", g), p.seed, "target", g)
        source_groups = p.source_groups_for(g) if spec.interventions is not None else []
        if not source_groups:
            targets.extend(ordered[: p.n_pairs] if p.n_pairs else ordered)
            continue
        sources = [s for sg in source_groups for s in pool("source_groups", sg)]
        found = _lookup(spec, ("prompts", "n_pairs") if p.n_pairs else ("prompts",),
                        lambda o=ordered, s=sources: pair_prompts(
                            o, s, n_pairs=p.n_pairs, seed=p.seed,
                            all_by_default=p.pairing == "product"))
        for t, s, rank in found:
            pairs.append(_Pair(len(pairs), t, s, rank))
            if t not in targets:
                targets.append(t)
    return _Selection(tuple(targets), tuple(pairs), pools)


def _cell(
    spec: SweepSpec, model: ModelSpec, target: Prompt, source: Prompt | None,
    pair_index: int | None, control: str, point: Point | None, seed: int,
) -> Cell:
    g, m = spec.generation, spec.measure
    return Cell(
        model=model.id, model_name_or_path=model.name_or_path, revision=model.revision,
        dtype=model.dtype, chat_template=model.chat_template,
        target_id=target.id, target_group=target.group, target_level=target.level,
        target_text_hash=target.text_hash,
        source_id=source.id if source else None, source_group=source.group if source else None,
        source_level=source.level if source else None,
        source_text_hash=source.text_hash if source else None,
        pair_index=pair_index, control=control,
        site=point.site if point else NONE, mode=point.mode if point else NONE,
        layers=point.layers if point else NONE, tokens=point.tokens if point else NONE,
        align=point.align if point else NONE, alpha=point.alpha if point else None,
        seed=seed, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
        stop_at_eos=g.stop_at_eos, early_layer=m.early_layer, late_layer=m.late_layer,
        window=m.window, centering=m.centering, trajectory=m.trajectory,
        scorers=tuple(m.scorers),
    )


def _model_cells(
    spec: SweepSpec, model: ModelSpec, sel: _Selection, points: Sequence[Point]
) -> list[Cell]:
    controls = set(spec.controls)
    conds = set(spec.prompts.conditions or ())
    natural = "natural" in controls or bool(conds & {"A", "B"})
    seeds = range(spec.generation.n_samples)
    out: list[Cell] = []
    for target in sel.targets:
        if natural:
            out += [_cell(spec, model, target, None, None, "natural", None, s) for s in seeds]
        my_pairs = [pr for pr in sel.pairs if pr.target.id == target.id]
        for pr in my_pairs:
            for control in CONTROL_ORDER[:-1]:
                if control != "patch" and control not in controls:
                    continue
                source = pr.source
                if control == "other":
                    pool = sel.pools.get(target.group, ())
                    source = _lookup(spec, ("controls", spec.controls.index("other")),
                                     lambda t=target, pl=pool, r=pr.rank: pick_other(
                                         t, pl, seed=spec.prompts.seed, index=r))
                out += [_cell(spec, model, target, source, pr.index, control, pt, s)
                        for pt in points for s in seeds]
        if my_pairs and "self" in controls:
            out += [_cell(spec, model, target, target, None, "self", pt, s)
                    for pt in points for s in seeds]
    return out


@dataclass(frozen=True)
class Grid:
    """An expanded sweep: its models, cells (expansion order), work units and prompts."""

    spec: SweepSpec
    models: tuple[ModelSpec, ...]
    cells: tuple[Cell, ...]
    units: tuple[WorkUnit, ...]
    prompts: Mapping[str, Prompt]  # every prompt a cell refers to, by id
    bank_root: str | None = None

    def prompt_texts(self) -> dict[str, str]:
        """Prompt id -> text, for `Cell.to_request` / `WorkUnit.requests`."""
        return {pid: p.text for pid, p in self.prompts.items()}

    def cells_for(self, model: str) -> list[Cell]:
        return [c for c in self.cells if c.model == model]

    def units_for(self, model: str) -> list[WorkUnit]:
        return [u for u in self.units if u.model == model]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per model id: number of cells and units."""
        return {m.id: {"cells": len(self.cells_for(m.id)), "units": len(self.units_for(m.id))}
                for m in self.models}


def build_grid(
    spec: SweepSpec,
    *,
    models_override: Sequence[str | ModelSpec] | None = None,
    bank: PromptBank | None = None,
) -> Grid:
    """Expand `spec` (prompt bank loaded from `prompts.bank` unless given) into a `Grid`."""
    models = resolve_models(spec, models_override)
    bank = bank if bank is not None else load_bank(spec)
    sel = _select(spec, bank)
    points = intervention_points(spec.interventions)
    cells: list[Cell] = []
    seen: set[str] = set()
    for model in models:
        for c in _model_cells(spec, model, sel, points):
            if c.cell_id not in seen:
                seen.add(c.cell_id)
                cells.append(c)
    used = {c.target_id for c in cells} | {c.source_id for c in cells if c.source_id}
    prompts = {pid: bank.get(pid) for pid in sorted(used)}
    units = group_units(cells)
    logger.debug("expanded %s: %d cells, %d units, %d models", spec.name, len(cells),
                 len(units), len(models))
    return Grid(spec, tuple(models), tuple(cells), tuple(units), prompts, bank.root)


def expand(
    spec: SweepSpec,
    *,
    models_override: Sequence[str | ModelSpec] | None = None,
    bank: PromptBank | None = None,
) -> list[Cell]:
    """The cells of `spec`, in deterministic order (see `build_grid`)."""
    return list(build_grid(spec, models_override=models_override, bank=bank).cells)


def load_grid(
    path: str | Path, *, models_override: Sequence[str | ModelSpec] | None = None
) -> Grid:
    """`load_spec` + `build_grid`: everything but the model-config checks."""
    return build_grid(load_spec(path), models_override=models_override)


def grid_warnings(grid: Grid) -> list[str]:
    """Legal but suspicious settings, worth a line in `validate` output."""
    spec, out = grid.spec, []
    axes = spec.interventions
    if axes is not None:
        odd = [a for a in axes.alpha if not 0.0 <= a <= 1.0]
        if odd:
            out.append(f"interventions.alpha {odd} outside [0, 1]: extrapolation (rows are "
                       "flagged alpha_extrapolated)")
        if "transplant" in axes.mode and (len(axes.tokens) > 1 or len(axes.alpha) > 1
                                          or len(axes.align) > 1):
            out.append("mode 'transplant' replaces the whole cache of the chosen layers: its "
                       "cells ignore the tokens, align and alpha axes (one cell per layer spec)")
        if "transplant" in axes.mode and "all" in axes.layers:
            out.append("an all-layer transplant is the same computation as continuing the "
                       "source prompt with the target's last token: compare it with that")
    g = spec.generation
    if g.temperature == 0 and g.n_samples > 1:
        out.append(f"generation.n_samples={g.n_samples} with temperature 0 (greedy): the "
                   "samples of a cell will be identical")
    return out


# --------------------------------------------------------------------------- model checks


@dataclass(frozen=True)
class ModelReport:
    """What `validate` shows for one model: depth, resolved layers, counts, warnings."""

    model: str
    name_or_path: str
    n_layers: int
    max_position_embeddings: int | None
    n_cells: int
    n_units: int
    layers: dict[str, list[int]]  # layer spec -> resolved indices
    early_layer: int
    late_layer: int
    tokens: dict[str, str]  # token spec -> what it selects on prompts of known length
    warnings: tuple[str, ...] = ()


ModelInfoFn = Callable[[ModelSpec], Any]


def default_model_info(model: ModelSpec) -> Any:
    """`rloop_ray.engine.models.model_info` (config only, no weights), imported lazily."""
    from rloop_ray.engine.models import model_info  # noqa: PLC0415  (keeps torch out)

    params = inspect.signature(model_info).parameters
    kwargs = {k: v for k, v in (("revision", model.revision),
                                ("trust_remote_code", model.trust_remote_code))
              if k in params and v not in (None, False)}
    return model_info(model.name_or_path, **kwargs)


def _model_loc(spec: SweepSpec, model: ModelSpec) -> tuple[str | int, ...] | None:
    for i, m in enumerate(spec.models):
        if m is model or m == model:
            return ("models", i, "name_or_path")
    return None


def check_models(grid: Grid, info_fn: ModelInfoFn | None = None) -> list[ModelReport]:
    """Check layer specs, R_V layers and token specs against each model's config.

    Needs only the config (`info_fn(model)` returns an object with `n_layers` and
    optionally `max_position_embeddings`); raises one SpecValidationError listing every
    layer spec that does not fit a model.
    """
    spec = grid.spec
    info_fn = info_fn or default_model_info
    issues: list[Issue] = []
    reports: list[ModelReport] = []

    def issue(loc: tuple[str | int, ...] | None, msg: str, allowed: Sequence[str] = ()) -> None:
        field_ = format_loc(loc) if loc else "--model"
        issues.append(Issue(field_, msg, spec.line(loc) if loc else None,
                            tuple(allowed) or None))

    for model in grid.models:
        loc = _model_loc(spec, model)
        try:
            info = info_fn(model)
            n_layers = int(info.n_layers)
        except Exception as exc:  # noqa: BLE001  (any loader failure becomes a clear message)
            issue(loc, f"cannot read the config of model {model.id!r} "
                  f"({model.name_or_path}): {type(exc).__name__}: {exc}")
            continue
        max_pos = getattr(info, "max_position_embeddings", None)
        warnings: list[str] = []
        layer_map: dict[str, list[int]] = {}
        axes = spec.interventions
        for k, lspec in enumerate(axes.layers if axes is not None else []):
            try:
                layer_map[lspec] = resolve_layers(lspec, n_layers)
            except SpecError as exc:
                issue(("interventions", "layers", k), f"{exc}, on model {model.id!r}",
                      allowed=[f"layers 0..{n_layers - 1}", "fractions of depth like '50%:100%'"])
        points: dict[str, int] = {}
        for name in ("early_layer", "late_layer"):
            value = getattr(spec.measure, name)
            try:
                points[name] = resolve_layer(value, n_layers)
            except SpecError as exc:
                issue(("measure", name), f"{exc}, on model {model.id!r}",
                      allowed=[f"layers 0..{n_layers - 1}", "a fraction of depth like '84%'"])
        if len(points) == 2 and points["early_layer"] >= points["late_layer"]:
            warnings.append(f"R_V early layer {points['early_layer']} is not before the late "
                            f"layer {points['late_layer']}")
        token_map = _token_summary(grid, model, max_pos, warnings)
        cells = grid.cells_for(model.id)
        reports.append(ModelReport(
            model=model.id, name_or_path=model.name_or_path, n_layers=n_layers,
            max_position_embeddings=max_pos, n_cells=len(cells),
            n_units=len(grid.units_for(model.id)), layers=layer_map,
            early_layer=points.get("early_layer", -1), late_layer=points.get("late_layer", -1),
            tokens=token_map, warnings=tuple(warnings),
        ))
    if issues:
        raise SpecValidationError(file=spec.source, issues=issues)
    return reports


def _token_summary(
    grid: Grid, model: ModelSpec, max_pos: int | None, warnings: list[str]
) -> dict[str, str]:
    """Token specs against the prefill length (n_tokens - 1) of prompts with a known length."""
    spec = grid.spec
    used = {c.target_id for c in grid.cells_for(model.id) if c.control != "natural"}
    lengths = {pid: n for pid in sorted(used)
               if (n := grid.prompts[pid].tokens_for(model.id, model.name_or_path))}
    all_ids = {c.target_id for c in grid.cells_for(model.id)} | {
        c.source_id for c in grid.cells_for(model.id) if c.source_id}
    if max_pos:
        for pid in sorted(all_ids):
            n = grid.prompts[pid].tokens_for(model.id, model.name_or_path)
            if n and n + spec.generation.max_new_tokens > max_pos:
                warnings.append(f"prompt {pid!r} ({n} tokens) + {spec.generation.max_new_tokens}"
                                f" new tokens exceeds max_position_embeddings {max_pos}")
    out: dict[str, str] = {}
    if spec.interventions is None:
        return out
    for tspec in spec.interventions.tokens:
        if not lengths:
            out[tspec] = "prompt lengths unknown for this model (no n_tokens in the bank)"
            continue
        counts = {pid: len(resolve_tokens(tspec, n - 1)) for pid, n in lengths.items()}
        empty = sorted(pid for pid, k in counts.items() if k == 0)
        if empty:
            warnings.append(f"token spec {tspec!r} selects no prefill position of "
                            f"{len(empty)} target(s): {', '.join(empty[:5])}")
        lo, hi = min(counts.values()), max(counts.values())
        span = f"{lo}" if lo == hi else f"{lo}..{hi}"
        out[tspec] = f"{span} positions on {len(counts)} target(s) of known length"
    return out
