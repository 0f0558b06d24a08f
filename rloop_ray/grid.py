"""Expansion of a `SweepSpec` into frozen `Cell`s with content-hash ids, grouped into `WorkUnit`s.

The cell id is what resume, dedupe and joins rely on, so it is a hash of everything
that can change a cell's result (model, prompt texts, every intervention coordinate,
generation and measurement settings) and of nothing else. A `WorkUnit` is the cells
that share (model, source, target): their caches have one shape, so a worker runs
them as one batch. Expansion is deterministic and needs no torch and no weights;
`check_models` adds the checks that need a model's config (depth, context length).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rloop_ray.engine.selectors import (
    SpecError,
    aligned_source_position,
    is_match_spec,
    resolve_layer,
    resolve_layers,
    resolve_tokens,
    token_texts_of,
)
from rloop_ray.engine.types import (
    CellRequest,
    GenerationConfig,
    Intervention,
    MeasureConfig,
    SteerSource,
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
    InterventionAxes,
    Issue,
    LayerExpander,
    ModelSpec,
    SpecValidationError,
    SweepSpec,
    combination_problem,
    format_loc,
    load_spec,
)
from rloop_ray.vocab import (
    BOTH,
    CONTROL_ORDER,
    COORDINATE_COLUMNS,
    GENERATION,
    NATURAL,
    NONE,
    PATCH,
    PREFILL,
    SELF,
    SHUFFLE,
    STEER,
    STEER_CONTROLS,
    TRANSPLANT,
    classic_condition,
    is_steer_source,
    steer_source_id,
)

__all__ = [
    "NONE",
    "Cell",
    "Grid",
    "ModelReport",
    "Point",
    "PromptLengths",
    "WorkUnit",
    "build_grid",
    "check_models",
    "classic_condition",
    "default_devices",
    "default_prompt_lengths",
    "estimate_prompt_lengths",
    "expand",
    "expand_layers",
    "grid_warnings",
    "group_units",
    "intervention_points",
    "load_bank",
    "load_grid",
    "memory_estimates",
    "resolve_models",
]

logger = logging.getLogger(__name__)

ROW_COORDINATES = tuple(c for c in COORDINATE_COLUMNS if c != "unit_id")
"""Grid coordinates of a result row (docs/architecture.md), minus `unit_id`."""

LATER_CELL_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "during": (PREFILL, NONE),
    "steer_source_prompts": (None,),
    "steer_target_prompts": (None,),
    "attention": (False,),
    "measure_layers": (None,),
    "kl_from_natural": (True,),
    "top_logprobs": (5,),
    "token_logprobs": (False,),
}
"""Cell fields added after results were first stored, and the values at which they are
left out of the cell id: a cell that does not use them keeps the id it had before they
existed (a changed id would orphan every stored row: resume would rerun everything)."""

PromptRef = tuple[str, str]
"""(prompt id, sha256 text hash) of one prompt of a steering group."""


def _short_hash(payload: str) -> str:
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


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
    # fields added later (LATER_CELL_DEFAULTS: left out of the id at their defaults)
    during: str = PREFILL  # NONE for natural cells
    steer_source_prompts: tuple[PromptRef, ...] | None = None  # mode steer: the source group
    steer_target_prompts: tuple[PromptRef, ...] | None = None  # ... and the target group
    attention: bool = False
    measure_layers: str | tuple[str, ...] | None = None  # measure.layers
    kl_from_natural: bool = True
    top_logprobs: int = 5
    token_logprobs: bool = False
    cell_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scorers", tuple(self.scorers))
        if self.control == NATURAL:
            object.__setattr__(self, "during", NONE)  # like the other point coordinates
        for name in ("steer_source_prompts", "steer_target_prompts"):
            refs = getattr(self, name)
            if refs is not None:  # JSON gives lists of lists
                object.__setattr__(self, name, tuple((str(i), str(h)) for i, h in refs))
        if isinstance(self.measure_layers, list):
            object.__setattr__(self, "measure_layers", tuple(self.measure_layers))
        expected = _short_hash(self.canonical_json())
        if self.cell_id and self.cell_id != expected:
            raise ValueError(f"cell_id {self.cell_id!r} does not match the cell's content "
                             f"(expected {expected!r}): the cell was edited or is corrupt")
        object.__setattr__(self, "cell_id", expected)

    def identity(self) -> dict[str, Any]:
        """What the id hashes: every field but `cell_id`, the later fields only where
        they differ from their defaults (`LATER_CELL_DEFAULTS`)."""
        out = self._plain()
        out.pop("cell_id")
        for name, defaults in LATER_CELL_DEFAULTS.items():
            value = out[name]
            if any(value == d and type(value) is type(d) for d in defaults):
                del out[name]
        return out

    def _plain(self) -> dict[str, Any]:
        """Every field as JSON-ready values (tuples as lists)."""
        out = asdict(self)
        out["scorers"] = list(self.scorers)
        for name in ("steer_source_prompts", "steer_target_prompts"):
            if out[name] is not None:
                out[name] = [list(ref) for ref in out[name]]
        if isinstance(out["measure_layers"], tuple):
            out["measure_layers"] = list(out["measure_layers"])
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.identity(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field, `cell_id` included; `from_dict` rebuilds the same cell."""
        return self._plain()

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
    def is_steer(self) -> bool:
        return self.mode == STEER

    def steer_prompt_ids(self) -> tuple[str, ...]:
        """Ids of the prompts a steer cell's vector is computed from (both groups)."""
        refs = (self.steer_source_prompts or ()) + (self.steer_target_prompts or ())
        return tuple(dict.fromkeys(pid for pid, _ in refs))

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
            control=self.control, control_seed=self.control_seed, during=self.during,
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
            attention=self.attention, layers=self.measure_layers,
            kl_from_natural=self.kl_from_natural, top_logprobs=self.top_logprobs,
            token_logprobs=self.token_logprobs,
        )

    def to_request(self, prompt_texts: Mapping[str, str]) -> CellRequest:
        """The engine request; `prompt_texts` maps prompt id -> text (e.g. `Grid.prompt_texts`).

        Raises KeyError for a missing prompt and ValueError when a text no longer matches
        the hash the cell was built with (the bank changed since expansion).
        """
        target = self._text(prompt_texts, self.target_id, self.target_text_hash)
        source = None
        steer = None
        if self.is_steer:
            steer = SteerSource(
                source_group=str(self.source_group), target_group=self.target_group,
                source_texts=tuple(self._text(prompt_texts, pid, h)
                                   for pid, h in self.steer_source_prompts or ()),
                target_texts=tuple(self._text(prompt_texts, pid, h)
                                   for pid, h in self.steer_target_prompts or ()))
        elif self.source_id is not None and self.source_text_hash is not None:
            source = self._text(prompt_texts, self.source_id, self.source_text_hash)
        return CellRequest(
            cell_id=self.cell_id, target_text=target, source_text=source,
            intervention=self.intervention(), generation=self.generation_config(),
            measure=self.measure_config(), steer=steer,
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
        """Every prompt the unit's cells encode: target, source, steering groups."""
        ids = [self.target_id]
        if self.source_id is not None and not is_steer_source(self.source_id):
            ids.append(self.source_id)
        for c in self.cells:
            ids += c.steer_prompt_ids()
        return tuple(dict.fromkeys(ids))

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
    """One point of the intervention axes (site x mode x layers x tokens x align x alpha x
    during); `layers` is always a concrete layer spec (expanders are expanded)."""

    site: str
    mode: str
    layers: str
    tokens: str
    align: str
    alpha: float
    during: str = PREFILL


def expand_layers(axes: InterventionAxes | None, n_layers: int | None = None
                  ) -> list[tuple[str, ...]]:
    """The concrete layer specs of every `layers` entry, in order (one per plain spec).

    `n_layers` is the model's depth; entries whose points depend on it (`{each: "50%:"}`)
    need it, the others expand without (SpecError otherwise, see `LayerExpander.expand`).
    """
    if axes is None:
        return []
    out: list[tuple[str, ...]] = []
    for entry in axes.layers:
        if isinstance(entry, LayerExpander):
            out.append(tuple(entry.expand(n_layers if entry.needs_depth() else None)))
        else:
            out.append((entry,))
    return out


def intervention_points(axes: InterventionAxes | None, n_layers: int | None = None
                        ) -> list[Point]:
    """The product of the axes, in axis order, deduplicated.

    Combinations that cannot run (`spec.combination_problem`: a transplant of a
    non-cache site, a steer at a site without a vector, a generation-time patch of a
    site or mode without one) are left out. `transplant` replaces the chosen layers'
    whole cache, so tokens, align and alpha do not apply: they are canonicalised to `all`,
    `start`, 1.0. A `mix` during `generation` only patches every generated position (step t
    with the source's step t), so tokens and align are `all`, `start` too. `steer` adds a
    vector at the selected target positions, so `align` does not apply (`none`); its
    tokens also select what each group prompt's mean is taken over, so they stay. Layer
    expanders give one point per concrete layer spec (`expand_layers`; `n_layers` for
    those that depend on depth).
    """
    if axes is None:
        return []
    layer_specs = list(dict.fromkeys(x for entry in expand_layers(axes, n_layers) for x in entry))
    out: list[Point] = []
    seen: set[Point] = set()
    for site in axes.site:
        for mode in axes.mode:
            for layers in layer_specs:
                for tokens in axes.tokens:
                    for align in axes.align:
                        for alpha in axes.alpha:
                            for during in axes.during:
                                if combination_problem(site, mode, during) is not None:
                                    continue
                                if mode == TRANSPLANT:
                                    p = Point(site, mode, layers, "all", "start", 1.0, during)
                                elif mode != STEER and during == GENERATION:
                                    # a generation-time mix patches every generated
                                    # position, step t with the source's step t: tokens
                                    # and align (prefill positions) do not apply
                                    p = Point(site, mode, layers, "all", "start", float(alpha),
                                              during)
                                elif mode == STEER:
                                    p = Point(site, mode, layers, tokens, NONE, float(alpha),
                                              during)
                                else:
                                    p = Point(site, mode, layers, tokens, align, float(alpha),
                                              during)
                                if p not in seen:
                                    seen.add(p)
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


@dataclass(frozen=True)
class _SteerGroups:
    """The two groups a steer cell's vector is the difference of means of."""

    source_group: str
    source: tuple[PromptRef, ...]
    target: tuple[PromptRef, ...]

    @property
    def source_hash(self) -> str:
        """Stands in for a source text hash: changes when any prompt of the group does."""
        return _short_hash(json.dumps([list(r) for r in self.source], separators=(",", ":")))


def _refs(prompts: Iterable[Prompt]) -> tuple[PromptRef, ...]:
    """(id, text hash) of prompts, sorted by id: the order the engine gets their texts."""
    return tuple(sorted((p.id, p.text_hash) for p in prompts))


def _cell(
    spec: SweepSpec, model: ModelSpec, target: Prompt, source: Prompt | None,
    pair_index: int | None, control: str, point: Point | None, seed: int,
    steer: _SteerGroups | None = None,
) -> Cell:
    g, m = spec.generation, spec.measure
    if steer is not None:
        source_id: str | None = steer_source_id(steer.source_group)
        source_group, source_level = steer.source_group, None
        source_hash: str | None = steer.source_hash
    else:
        source_id = source.id if source else None
        source_group = source.group if source else None
        source_level = source.level if source else None
        source_hash = source.text_hash if source else None
    return Cell(
        model=model.id, model_name_or_path=model.name_or_path, revision=model.revision,
        dtype=model.dtype, chat_template=model.chat_template,
        target_id=target.id, target_group=target.group, target_level=target.level,
        target_text_hash=target.text_hash,
        source_id=source_id, source_group=source_group, source_level=source_level,
        source_text_hash=source_hash,
        pair_index=pair_index, control=control,
        site=point.site if point else NONE, mode=point.mode if point else NONE,
        layers=point.layers if point else NONE, tokens=point.tokens if point else NONE,
        align=point.align if point else NONE, alpha=point.alpha if point else None,
        seed=seed, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
        stop_at_eos=g.stop_at_eos, early_layer=m.early_layer, late_layer=m.late_layer,
        window=m.window, centering=m.centering, trajectory=m.trajectory,
        scorers=tuple(m.scorers),
        during=point.during if point else NONE,
        steer_source_prompts=steer.source if steer else None,
        steer_target_prompts=steer.target if steer else None,
        attention=m.attention,
        measure_layers=tuple(m.layers) if isinstance(m.layers, list) else m.layers,
        kl_from_natural=m.kl_from_natural, top_logprobs=m.top_logprobs,
        token_logprobs=m.token_logprobs,
    )


def _model_cells(
    spec: SweepSpec, model: ModelSpec, sel: _Selection, points: Sequence[Point]
) -> list[Cell]:
    controls = set(spec.controls)
    conds = set(spec.prompts.conditions or ())
    natural = "natural" in controls or bool(conds & {"A", "B"})
    seeds = range(spec.generation.n_samples)
    regular = [pt for pt in points if pt.mode != STEER]
    steer = [pt for pt in points if pt.mode == STEER]
    # steer points have their own controls (STEER_CONTROLS): self and random; shuffle and
    # other are skipped for them (grid_warnings says so)
    steer_controls = [PATCH] + [c for c in STEER_CONTROLS
                                if c in controls and c not in (NATURAL, SELF)]
    out: list[Cell] = []
    for target in sel.targets:
        if natural:
            out += [_cell(spec, model, target, None, None, "natural", None, s) for s in seeds]
        my_pairs = [pr for pr in sel.pairs if pr.target.id == target.id]
        for pr in my_pairs if regular else []:
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
                        for pt in regular for s in seeds]
        own = _refs(sel.pools.get(target.group, ()))
        if my_pairs and steer:
            # one cell per (target, source group), never per source prompt: the vector is
            # the difference of the two groups' means (SteerSource)
            for group in spec.prompts.source_groups_for(target.group):
                groups = _SteerGroups(group, _refs(sel.pools.get(group, ())), own)
                out += [_cell(spec, model, target, None, None, control, pt, s, groups)
                        for control in steer_controls for pt in steer for s in seeds]
        if my_pairs and "self" in controls:
            out += [_cell(spec, model, target, target, None, "self", pt, s)
                    for pt in regular for s in seeds]
            if steer:  # the target group minus itself: the zero vector
                groups = _SteerGroups(target.group, own, own)
                out += [_cell(spec, model, target, None, None, SELF, pt, s, groups)
                        for pt in steer for s in seeds]
    return out


@dataclass(frozen=True)
class Grid:
    """An expanded sweep: its models, cells (expansion order), work units and prompts."""

    spec: SweepSpec
    models: tuple[ModelSpec, ...]
    cells: tuple[Cell, ...]
    units: tuple[WorkUnit, ...]
    prompts: Mapping[str, Prompt]  # every prompt a cell refers to (steer groups too), by id
    bank_root: str | None = None
    layer_points: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    """model id -> the concrete layer specs of each `interventions.layers` entry (a
    plain spec is itself; an expander its points on that model)."""

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


DepthFn = Callable[[ModelSpec], int]


def default_depth(model: ModelSpec) -> int:
    """A model's number of layers from its config (no weights): `default_model_info`."""
    return int(default_model_info(model).n_layers)


def _model_layer_points(spec: SweepSpec, model: ModelSpec, depth_fn: DepthFn,
                        depths: dict[str, int]) -> tuple[tuple[str, ...], ...]:
    """The concrete layer specs of each layers entry on `model` (its depth read only when
    an expander needs it); errors point at the entry."""
    axes = spec.interventions
    if axes is None:
        return ()
    n_layers: int | None = None
    needing = [(k, e) for k, e in axes.expanders if e.needs_depth()]
    if needing:
        k, entry = needing[0]
        if model.name_or_path not in depths:
            try:
                depths[model.name_or_path] = int(depth_fn(model))
            except Exception as exc:  # noqa: BLE001  (any config failure becomes a message)
                raise spec.error(("interventions", "layers", k), (
                    f"{entry.label()} resolves against the depth of model {model.id!r}, whose "
                    f"config cannot be read ({type(exc).__name__}: {exc}); absolute layers "
                    "(e.g. {each: '10:21'}) expand without a config")) from None
        n_layers = depths[model.name_or_path]
    out: list[tuple[str, ...]] = []
    for k, entry in enumerate(axes.layers):
        if not isinstance(entry, LayerExpander):
            out.append((entry,))
            continue
        try:
            out.append(tuple(entry.expand(n_layers if entry.needs_depth() else None)))
        except SpecError as exc:
            raise spec.error(("interventions", "layers", k), f"{exc}, on model {model.id!r}",
                             allowed=["fractions of depth like {each: '50%:100%'}",
                                      "ranges within every model"]) from None
    return tuple(out)


def build_grid(
    spec: SweepSpec,
    *,
    models_override: Sequence[str | ModelSpec] | None = None,
    bank: PromptBank | None = None,
    depth_fn: DepthFn | None = None,
) -> Grid:
    """Expand `spec` (prompt bank loaded from `prompts.bank` unless given) into a `Grid`.

    Layer expanders that depend on depth (`{each: "50%:100%"}`) expand per model, with
    the depth from `depth_fn(model)` (default: the model's config, `default_depth`); no
    config is read when no entry needs one.
    """
    models = resolve_models(spec, models_override)
    bank = bank if bank is not None else load_bank(spec)
    sel = _select(spec, bank)
    depth_fn = depth_fn or default_depth
    depths: dict[str, int] = {}
    cells: list[Cell] = []
    seen: set[str] = set()
    layer_points: dict[str, tuple[tuple[str, ...], ...]] = {}
    for model in models:
        entries = _model_layer_points(spec, model, depth_fn, depths)
        layer_points[model.id] = entries
        n_layers = depths.get(model.name_or_path)
        points = intervention_points(spec.interventions, n_layers)
        for c in _model_cells(spec, model, sel, points):
            if c.cell_id not in seen:
                seen.add(c.cell_id)
                cells.append(c)
    used = {c.target_id for c in cells} | {
        c.source_id for c in cells if c.source_id and not is_steer_source(c.source_id)}
    for c in cells:
        used.update(c.steer_prompt_ids())
    prompts = {pid: bank.get(pid) for pid in sorted(used)}
    units = group_units(cells)
    logger.debug("expanded %s: %d cells, %d units, %d models", spec.name, len(cells),
                 len(units), len(models))
    return Grid(spec, tuple(models), tuple(cells), tuple(units), prompts, bank.root,
                layer_points)


def expand(
    spec: SweepSpec,
    *,
    models_override: Sequence[str | ModelSpec] | None = None,
    bank: PromptBank | None = None,
    depth_fn: DepthFn | None = None,
) -> list[Cell]:
    """The cells of `spec`, in deterministic order (see `build_grid`)."""
    return list(build_grid(spec, models_override=models_override, bank=bank,
                           depth_fn=depth_fn).cells)


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
        if odd and set(axes.mode) - {STEER}:  # a steer's alpha scales a vector: any value
            out.append(f"interventions.alpha {odd} outside [0, 1]: extrapolation (rows are "
                       "flagged alpha_extrapolated)")
        skipped = axes.skipped_combinations()
        if skipped:
            by_why: dict[str, list[str]] = {}
            for site, mode, during, why in skipped:
                by_why.setdefault(why, []).append(f"{site}/{mode}/{during}")
            shown = "; ".join(f"{', '.join(c)} ({why})" for why, c in by_why.items())
            out.append(f"interventions: {len(skipped)} site/mode/during combination(s) of the "
                       f"product have no cells: {shown}")
        if STEER in axes.mode:
            dropped = [c for c in spec.steer_skipped_controls() if c != NATURAL]
            if dropped:
                out.append(f"controls {', '.join(dropped)} do not apply to steer points and are "
                           f"skipped for them (steer controls: natural; self = the zero vector; "
                           f"random = a random direction of the vector's norm per layer)")
            if len(axes.align) > 1:
                out.append("mode 'steer' adds its vector at the selected target positions: "
                           "its cells ignore the align axis (recorded as 'none')")
        if GENERATION in axes.during and set(axes.mode) - {STEER, TRANSPLANT} and (
                len(axes.tokens) > 1 or len(axes.align) > 1):
            out.append("during 'generation' patches every generated position: its mix cells "
                       "ignore the tokens and align axes (recorded as 'all', 'start'); 'both' "
                       "uses them for its prefill half")
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

SPECIAL_TOKEN_ALLOWANCE = 8
"""Tokens an estimate adds for BOS/EOS and a SentencePiece word-start marker."""
CHAT_TEMPLATE_ALLOWANCE = 128
"""Tokens an estimate adds when a chat template may apply (SmolLM2's, with its default
system prompt, adds 30; Llama-3.1's date header about 35)."""


@dataclass(frozen=True)
class PromptLengths:
    """Token counts of a model's prompts as the engine will encode them.

    `exact`: counted with the model's own tokenizer (chat template included when the
    model uses one), `low == high`. Otherwise bounds: `low` from the words (and the
    bank's recorded raw count), `high` from the UTF-8 bytes plus allowances, since a
    byte-level or byte-fallback tokenizer never needs more than one token per byte.
    """

    low: Mapping[str, int]
    high: Mapping[str, int]
    exact: bool
    how: str
    """`tokenizer of X, chat template` or `estimated (why)`, for messages."""
    token_texts: Mapping[str, tuple[str, ...]] | None = None
    """prompt id -> the decoded text of each prefill token (`n_tokens - 1` of them, as
    `selectors.token_texts_of` gives them), for `match:` token specs; None when the
    tokenizer was not at hand or no spec needs them."""


PromptLengthsFn = Callable[[ModelSpec, Mapping[str, Prompt]], PromptLengths]


def estimate_prompt_lengths(
    model: ModelSpec, prompts: Mapping[str, Prompt], why: str
) -> PromptLengths:
    """Conservative bounds when the tokenizer is not at hand (see `PromptLengths`)."""
    chat = CHAT_TEMPLATE_ALLOWANCE if model.chat_template is not False else 0
    low: dict[str, int] = {}
    high: dict[str, int] = {}
    for pid, p in prompts.items():
        recorded = p.tokens_for(model.id, model.name_or_path) or 0  # raw text, no specials
        low[pid] = max(1, len(p.text.split()), recorded)
        high[pid] = max(low[pid], len(p.text.encode("utf-8")) + SPECIAL_TOKEN_ALLOWANCE + chat)
    return PromptLengths(low, high, False, f"estimated: {why}")


def default_prompt_lengths(model: ModelSpec, prompts: Mapping[str, Prompt], *,
                           token_texts: bool = False) -> PromptLengths:
    """Exact counts with the model's tokenizer when it is cheap to load (builtins, local
    folders, the local HF cache; never a download), else `estimate_prompt_lengths`.
    `token_texts` also decodes every prefill token (for `match:` specs).

    Raises `engine.models.NoChatTemplateError` when the grid asks for a chat template
    the tokenizer lacks.
    """
    from rloop_ray.engine.models import (  # noqa: PLC0415  (keeps torch out of expansion)
        TokenizerUnavailableError,
        load_prompt_tokenizer,
    )

    try:
        tok = load_prompt_tokenizer(model.name_or_path, chat_template=model.chat_template,
                                    revision=model.revision,
                                    trust_remote_code=model.trust_remote_code)
    except TokenizerUnavailableError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return estimate_prompt_lengths(model, prompts, f"no tokenizer at hand ({why})")
    ids = {pid: tok.encode(p.text) for pid, p in prompts.items()}
    counts = {pid: len(v) for pid, v in ids.items()}
    texts = ({pid: tuple(token_texts_of(tok.tokenizer, v[:-1])) for pid, v in ids.items()}
             if token_texts else None)
    return PromptLengths(counts, counts, True, tok.source, texts)


@dataclass(frozen=True)
class ModelReport:
    """What `validate` shows for one model: depth, resolved layers, counts, warnings."""

    model: str
    name_or_path: str
    n_layers: int
    max_position_embeddings: int | None
    n_cells: int
    n_units: int
    layers: dict[str, list[int]]  # plain layer spec -> resolved indices
    early_layer: int
    late_layer: int
    tokens: dict[str, str]  # token spec -> what it selects on this model's prompts
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    """Where the facts came from when it matters (shipped config table, estimated lengths)."""
    lengths: PromptLengths | None = None
    info: Any = field(default=None, compare=False, repr=False)
    """The `model_info` object the checks used (the memory estimate reads it)."""
    layer_points: dict[str, list[tuple[str, list[int]]]] = field(default_factory=dict)
    """Layer expander (its label) -> its points on this model: (spec, resolved indices)."""
    profile_layers: list[int] | None = None
    """`measure.layers` resolved on this model (None when not asked)."""

    @property
    def longest_prompt(self) -> tuple[str, int] | None:
        """(prompt id, tokens) of the longest prompt (upper bound when estimated)."""
        if self.lengths is None or not self.lengths.high:
            return None
        high = self.lengths.high
        pid = max(sorted(high), key=high.__getitem__)
        return pid, high[pid]


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


def _model_prompts(grid: Grid, model: ModelSpec) -> dict[str, Prompt]:
    """Every prompt the model encodes: targets, sources and the steering groups."""
    cells = grid.cells_for(model.id)
    ids = {c.target_id for c in cells} | {
        c.source_id for c in cells if c.source_id and not is_steer_source(c.source_id)}
    for c in cells:
        ids.update(c.steer_prompt_ids())
    return {pid: grid.prompts[pid] for pid in sorted(ids)}


def _grid_has_match_specs(grid: Grid) -> bool:
    axes = grid.spec.interventions
    return axes is not None and any(is_match_spec(t) for t in axes.tokens)


def check_models(
    grid: Grid,
    info_fn: ModelInfoFn | None = None,
    *,
    lengths_fn: PromptLengthsFn | None = None,
) -> list[ModelReport]:
    """Every check that needs a model: the one pre-flight of `validate` and `sweep`.

    Against each model's config (`info_fn(model)`: an object with `n_layers` and
    optionally `max_position_embeddings`, `note`) and its prompt lengths
    (`lengths_fn(model, prompts)`, by default the model's own tokenizer when it loads
    cheaply, else an estimate): layer specs and R_V layers fit the depth; the longest
    prompt plus `generation.max_new_tokens` fits the context; every token spec selects
    at least one position to patch in every (target, source) pair. Exact findings are
    errors; findings from estimated lengths are warnings. Raises one SpecValidationError
    listing every problem (file, field, YAML line, allowed values).
    """
    spec = grid.spec
    info_fn = info_fn or default_model_info
    if lengths_fn is None:
        lengths_fn = (functools.partial(default_prompt_lengths, token_texts=True)
                      if _grid_has_match_specs(grid) else default_prompt_lengths)
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
            text = str(exc)
            # a typo'd name already lists close matches; anything else says the way out
            if "--skip-model-check" not in text and type(exc).__name__ != "UnknownModelError":
                text += " (--skip-model-check skips the model checks)"
            issue(loc, f"cannot read the config of model {model.id!r} "
                  f"({model.name_or_path}): {type(exc).__name__}: {text}")
            continue
        max_pos = getattr(info, "max_position_embeddings", None)
        warnings: list[str] = []
        notes: list[str] = [n for n in (getattr(info, "note", None),) if isinstance(n, str)]
        layer_map, layer_points = _check_layers(grid, model, n_layers, issue)
        profile = _check_profile_layers(spec, model, n_layers, issue)
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
        lengths: PromptLengths | None = None
        token_map: dict[str, str] = {}
        try:
            lengths = lengths_fn(model, _model_prompts(grid, model))
        except Exception as exc:  # noqa: BLE001  (the engine would fail the same way)
            chat_loc = (loc[:2] + ("chat_template",)) if loc else None
            issue(chat_loc, f"cannot encode the prompts of model {model.id!r}: "
                  f"{type(exc).__name__}: {exc}")
        if lengths is not None:
            if not lengths.exact:
                notes.append(f"prompt lengths {lengths.how}")
            _check_context(grid, model, max_pos, lengths, issue, warnings)
            token_map = _token_summary(grid, model, lengths, issue, warnings)
        cells = grid.cells_for(model.id)
        reports.append(ModelReport(
            model=model.id, name_or_path=model.name_or_path, n_layers=n_layers,
            max_position_embeddings=max_pos, n_cells=len(cells),
            n_units=len(grid.units_for(model.id)), layers=layer_map,
            early_layer=points.get("early_layer", -1), late_layer=points.get("late_layer", -1),
            tokens=token_map, warnings=tuple(warnings), notes=tuple(notes), lengths=lengths,
            info=info, layer_points=layer_points, profile_layers=profile,
        ))
    if issues:
        raise SpecValidationError(file=spec.source, issues=issues)
    return reports


IssueFn = Callable[..., None]


def _check_layers(grid: Grid, model: ModelSpec, n_layers: int, issue: IssueFn
                  ) -> tuple[dict[str, list[int]], dict[str, list[tuple[str, list[int]]]]]:
    """Every layer entry (and every point of an expander) against the model's depth:
    (plain spec -> indices, expander label -> [(point, indices)])."""
    axes = grid.spec.interventions
    layer_map: dict[str, list[int]] = {}
    layer_points: dict[str, list[tuple[str, list[int]]]] = {}
    if axes is None:
        return layer_map, layer_points
    allowed = [f"layers 0..{n_layers - 1}", "fractions of depth like '50%:100%'"]
    entries = grid.layer_points.get(model.id)
    for k, entry in enumerate(axes.layers):
        if not isinstance(entry, LayerExpander):
            try:
                layer_map[entry] = resolve_layers(entry, n_layers)
            except SpecError as exc:
                issue(("interventions", "layers", k), f"{exc}, on model {model.id!r}",
                      allowed=allowed)
            continue
        try:
            specs = entries[k] if entries else tuple(
                entry.expand(n_layers if entry.needs_depth() else None))
        except SpecError as exc:
            issue(("interventions", "layers", k), f"{exc}, on model {model.id!r}",
                  allowed=allowed)
            continue
        resolved: list[tuple[str, list[int]]] = []
        for point in specs:
            try:
                resolved.append((point, resolve_layers(point, n_layers)))
            except SpecError as exc:
                issue(("interventions", "layers", k), f"{entry.label()}: point {point!r}: "
                      f"{exc}, on model {model.id!r}", allowed=allowed)
                break
        layer_points[entry.label()] = resolved
    return layer_map, layer_points


def _check_profile_layers(spec: SweepSpec, model: ModelSpec, n_layers: int, issue: IssueFn
                          ) -> list[int] | None:
    """`measure.layers` on the model: "all", or each listed layer within its depth."""
    asked = spec.measure.layers
    if asked is None:
        return None
    if asked == "all":
        return list(range(n_layers))
    out: list[int] = []
    for i, point in enumerate(asked):
        try:
            out.append(resolve_layer(point, n_layers))
        except SpecError as exc:
            issue(("measure", "layers", i), f"{exc}, on model {model.id!r}",
                  allowed=[f"layers 0..{n_layers - 1}", "a fraction of depth like '84%'",
                           "all"])
    return sorted(set(out))


def _check_context(
    grid: Grid, model: ModelSpec, max_pos: int | None, lengths: PromptLengths,
    issue: IssueFn, warnings: list[str],
) -> None:
    """The longest prompt + max_new_tokens must fit max_position_embeddings.

    Every prompt counts, sources too: a transplant continues from the source's cache.
    """
    if not max_pos:
        return
    new = grid.spec.generation.max_new_tokens
    over = sorted(((n, pid) for pid, n in lengths.high.items() if n + new > max_pos),
                  key=lambda x: (-x[0], x[1]))
    if not over:
        return
    n, pid = over[0]
    more = f" ({len(over) - 1} more prompt(s) too)" if len(over) > 1 else ""
    if not lengths.exact:
        warnings.append(
            f"prompt {pid!r} may not fit the context: up to {n} tokens ({lengths.how}) + "
            f"max_new_tokens {new} > {max_pos} (max_position_embeddings){more}")
        return
    msg = (f"prompt {pid!r} has {n} tokens on model {model.id!r} ({lengths.how}); with "
           f"max_new_tokens {new} that is {n + new} positions, beyond the model's context "
           f"of {max_pos} (max_position_embeddings){more}")
    if n < max_pos:
        issue(("generation", "max_new_tokens"), msg,
              allowed=[f"max_new_tokens <= {max_pos - n}", "shorter prompts"])
    else:
        issue(("prompts", "bank"), msg, allowed=[f"prompts shorter than {max_pos} tokens"])


def _patchable(tspec: str, align: str, target_len: int, source_len: int | None,
               texts: Sequence[str] | None = None) -> tuple[int, int]:
    """(positions the spec selects on the target prefill, of those with a source position).

    `source_len` None (a steer cell: the vector is added, nothing is aligned) counts every
    selected position as patched.
    """
    selected = resolve_tokens(tspec, target_len, texts)
    if source_len is None:
        return len(selected), len(selected)
    matched = sum(1 for p in selected
                  if aligned_source_position(p, target_len, source_len, align) is not None)
    return len(selected), matched


_TokenCombo = tuple[str, str | None, str]
"""(target id, source prompt id or None for a steer cell, align) of a cell."""


def _token_combos(grid: Grid, model: ModelSpec) -> dict[str, set[_TokenCombo]]:
    """Token spec -> the (target, source, align) its cells patch on the target prefill.

    Transplants (whole layers) and generation-only patches (every generated position)
    select no prefill position, so they are left out; a steer's groups are checked apart
    (`_steer_banks`)."""
    combos: dict[str, set[_TokenCombo]] = {}
    for c in grid.cells_for(model.id):
        if c.control == NATURAL or c.mode == TRANSPLANT or c.during == GENERATION:
            continue
        source = None if c.is_steer else (c.source_id or c.target_id)
        combos.setdefault(c.tokens, set()).add((c.target_id, source, c.align))
    return combos


def _steer_banks(grid: Grid, model: ModelSpec) -> dict[str, dict[str, tuple[str, ...]]]:
    """Token spec -> steering group -> the prompt ids its mean is taken over."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for c in grid.cells_for(model.id):
        if not c.is_steer:
            continue
        groups = out.setdefault(c.tokens, {})
        groups.setdefault(str(c.source_group), tuple(p for p, _ in c.steer_source_prompts or ()))
        groups.setdefault(c.target_group, tuple(p for p, _ in c.steer_target_prompts or ()))
    return out


def _shown(items: Iterable[str], limit: int = 3) -> str:
    items = sorted(set(items))
    text = "; ".join(items[:limit])
    return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _token_summary(
    grid: Grid, model: ModelSpec, lengths: PromptLengths, issue: IssueFn,
    warnings: list[str],
) -> dict[str, str]:
    """Token specs against each (target, source) prefill (n_tokens - 1 positions).

    A spec that patches no position of a pair would run as a silent no-op "ok" cell:
    an error with exact lengths, a warning with estimated ones. A `match:` spec is
    expected to match nothing on some targets (a baseline prompt has no self-referential
    word): those cells fail as `EmptyTokenSelection`, which is a warning; matching no
    target at all is an error. Steer groups are checked too: the mean of a group is taken
    over each prompt's selection. Returns spec -> what it selects, for `validate`.
    """
    spec = grid.spec
    axes = spec.interventions
    out: dict[str, str] = {}
    if axes is None:
        return out
    combos = _token_combos(grid, model)
    banks = _steer_banks(grid, model)
    for k, tspec in enumerate(axes.tokens):
        pairs = combos.get(tspec)
        if not pairs:
            continue
        if is_match_spec(tspec):
            out[tspec] = _match_summary(tspec, k, model, pairs, banks.get(tspec, {}), lengths,
                                        issue, warnings)
            continue
        empty: list[str] = []
        variants = [lengths.low] if lengths.exact else [lengths.low, lengths.high]
        for target, source, align in sorted(pairs, key=str):
            for lens in variants:
                t_len = lens[target] - 1
                s_len = None if source is None else lens[source] - 1
                n_sel, n_match = _patchable(tspec, align, t_len, s_len)
                if n_match:
                    continue
                if n_sel == 0:
                    empty.append(f"target {target!r} (prefill {t_len} positions)")
                else:
                    empty.append(f"target {target!r} (prefill {t_len}) against source "
                                 f"{source!r} (prefill {s_len}, align {align}): no aligned "
                                 "source position")
                break
        counts = [len(resolve_tokens(tspec, lens[t] - 1)) for t, _, _ in pairs
                  for lens in (lengths.low, lengths.high)]
        lo, hi = min(counts), max(counts)
        span = f"{lo}" if lo == hi else f"{lo}..{hi}"
        n_targets = len({t for t, _, _ in pairs})
        how = lengths.how if lengths.exact else "estimated"
        out[tspec] = f"{span} positions on {n_targets} target(s) ({how})"
        _check_steer_banks(tspec, k, banks.get(tspec, {}), lengths, None, issue, warnings)
        if not empty:
            continue
        if lengths.exact:
            issue(("interventions", "tokens", k),
                  f"token spec {tspec!r} selects no position to patch on model {model.id!r} "
                  f"({lengths.how}): {_shown(empty)}. Those cells would run as no-op patches.",
                  allowed=["all", "first:N, last:N, mid:N (N a count or a percentage)",
                           "slices that lie within every prompt"])
        else:
            warnings.append(f"token spec {tspec!r} may select no position to patch "
                            f"({lengths.how}): {_shown(empty)}")
    return out


def _match_summary(
    tspec: str, k: int, model: ModelSpec, pairs: set[_TokenCombo],
    banks: Mapping[str, tuple[str, ...]], lengths: PromptLengths, issue: IssueFn,
    warnings: list[str],
) -> str:
    """What a `match:` spec selects on the model's targets (warning when some targets
    have nothing to patch, error when none has), and its steer groups."""
    texts = lengths.token_texts
    needed = {t for t, _, _ in pairs} | {s for _, s, _ in pairs if s is not None} | {
        pid for ids in banks.values() for pid in ids}
    if not lengths.exact or texts is None or not needed <= set(texts):
        warnings.append(f"token spec {tspec!r} is not checked: it selects by token text and "
                        f"the tokenizer is not at hand ({lengths.how})")
        return f"selects by token text; not checked ({lengths.how})"
    failing: set[str] = set()
    counts: dict[str, int] = {}
    for target, source, align in pairs:
        t_texts = texts[target]
        s_len = None if source is None else len(texts[source])
        n_sel, n_match = _patchable(tspec, align, len(t_texts), s_len, t_texts)
        counts[target] = n_sel
        if not n_match:
            failing.add(target)
    n_targets = len(counts)
    lo, hi = min(counts.values()), max(counts.values())
    span = f"{lo}" if lo == hi else f"{lo}..{hi}"
    summary = f"{span} matched positions on {n_targets} target(s) ({lengths.how})"
    if len(failing) == n_targets:
        issue(("interventions", "tokens", k),
              f"token spec {tspec!r} selects no token to patch on any of the {n_targets} "
              f"targets of model {model.id!r} ({lengths.how}): every cell would fail as "
              f"EmptyTokenSelection. Targets: {_shown(failing)}",
              allowed=["a regex that matches tokens of the targets, as the tokenizer splits "
                       "them (e.g. '(?i)self' rather than a whole phrase)"])
    elif failing:
        msg = (f"{tspec} selects no token on {len(failing)} of {n_targets} targets: those "
               f"cells will fail as EmptyTokenSelection ({_shown(failing)})")
        warnings.append(msg)
        summary += f"; none on {len(failing)} of them"
    _check_steer_banks(tspec, k, banks, lengths, texts, issue, warnings)
    return summary


def _check_steer_banks(
    tspec: str, k: int, banks: Mapping[str, tuple[str, ...]], lengths: PromptLengths,
    texts: Mapping[str, tuple[str, ...]] | None, issue: IssueFn, warnings: list[str],
) -> None:
    """A steer vector is a mean over each group prompt's selected positions: a prompt with
    none adds nothing (warning), a group with none at all has no mean (error)."""
    for group, ids in sorted(banks.items()):
        if not ids:
            continue
        empty = []
        for pid in ids:
            if texts is not None:
                n = len(resolve_tokens(tspec, len(texts[pid]), texts[pid]))
            else:
                n = min(len(resolve_tokens(tspec, lens[pid] - 1))
                        for lens in (lengths.low, lengths.high))
            if n == 0:
                empty.append(pid)
        if not empty:
            continue
        if len(empty) == len(ids) and lengths.exact:
            issue(("interventions", "tokens", k),
                  f"token spec {tspec!r} selects no position on any of the {len(ids)} prompts "
                  f"of steer group {group!r} ({lengths.how}): the group has no mean to steer by")
        else:
            warnings.append(f"steer group {group!r}: token spec {tspec!r} selects no position "
                            f"on {len(empty)} of its {len(ids)} prompts ({_shown(empty)}); they "
                            "add nothing to the group's mean")


def default_devices(spec: SweepSpec) -> list[Any]:
    """Devices the memory estimate is shown for: the reference 24 GB GPU (A10G) times
    `resources.gpus_per_replica`, this host's RAM when that is 0, both when it is null."""
    from rloop_ray import memory  # noqa: PLC0415

    gpus = spec.resources.gpus_per_replica
    out: list[Any] = []
    if gpus is None or gpus > 0:
        out.append(memory.parse_device("a10g", gpus=max(1, math.ceil(gpus or 1))))
    if not gpus:
        try:
            out.append(memory.parse_device("cpu"))
        except ValueError:
            logger.debug("host RAM unknown: no CPU memory estimate")
    return out


def memory_estimates(grid: Grid, report: ModelReport, devices: Sequence[Any]) -> list[Any]:
    """`memory.replica_estimate` of one model on each device, at the grid's batch size,
    its longest prompt (an upper bound when lengths are estimated) and max_new_tokens.
    Empty when the config lacks what the parameter count needs."""
    from rloop_ray import memory  # noqa: PLC0415

    longest = report.longest_prompt
    if report.info is None or longest is None:
        return []
    model = next(m for m in grid.models if m.id == report.model)
    spec = grid.spec
    cells = grid.cells_for(model.id)
    shuffled = {c.control_seed for c in cells if c.control == SHUFFLE}
    n_prompts = len(_model_prompts(grid, model)) + len(shuffled)
    sites = sorted({c.site for c in cells} & set(memory.CAPTURE_SITES))
    out = []
    for device in devices:
        est = memory.replica_estimate(
            report.info, dtype=model.dtype, prompt_tokens=longest[1],
            new_tokens=spec.generation.max_new_tokens, batch_size=spec.resources.batch_size,
            device=device, n_prompts=n_prompts, capture_sites=sites,
            companions=any(c.during in (GENERATION, BOTH) for c in cells))
        if est is not None:
            out.append(est)
    return out
