"""Typed model of `grid.yaml` and the one place where grid files are read and validated.

A grid file is the whole experiment: models, prompt selection, intervention axes,
controls, generation, measurement and resources. Loading it either returns a frozen,
fully validated `SweepSpec` or raises one `SpecValidationError` that names the file, the
field path, the YAML line and the allowed values, so a typo never reaches a GPU.
Validation here needs neither the prompt bank nor a model; `grid.py` checks those.
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from rloop_ray.engine.selectors import SpecError, resolve_layer, resolve_layers, validate_token_spec
from rloop_ray.lookup import did_you_mean
from rloop_ray.vocab import (
    ALIGNS,
    BASELINE_GROUP,
    CACHE_SITES,
    CLAIMS,
    CLASSIC_CONDITIONS,
    DTYPES,
    DURING,
    GENERATION_SITES,
    GRID_CONTROLS,
    LATER_SPEC_DEFAULTS,
    LAYER_EACH,
    LAYER_WINDOWS,
    MODES,
    PREFILL,
    RECURSIVE_GROUP,
    SCORERS,
    SITES,
    STEER,
    STEER_CONTROLS,
    STEER_SITES,
    TRANSPLANT,
)

__all__ = [
    "CLAIMS",
    "CLASSIC_CONDITIONS",
    "GenerationSpec",
    "InterventionAxes",
    "Issue",
    "LayerExpander",
    "MeasureSpec",
    "ModelSpec",
    "PromptsSpec",
    "ResourcesSpec",
    "SpecValidationError",
    "SweepSpec",
    "combination_problem",
    "did_you_mean",
    "format_loc",
    "issues_from_validation_error",
    "load_spec",
    "load_spec_text",
    "parse_spec",
    "read_yaml",
    "short_repr",
]

KNOWN_SCORERS = SCORERS
"""Scorer names accepted when `rloop_ray.scoring` offers no registry to ask."""

_SYNTAX_DEPTH = 100_000  # layer specs are syntax-checked against a deep "model"
Loc = tuple[str | int, ...]


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Issue:
    """One problem in one field; `SpecValidationError` carries one or more."""

    field: str
    message: str
    line: int | None = None
    allowed: tuple[str, ...] | None = None

    def render(self, file: str | None) -> str:
        where = f"{file}:{self.line}" if file and self.line else (file or "<grid>")
        head = f"{where}: {self.field}:" if self.field else f"{where}:"
        text = f"{head} {self.message}"
        if self.allowed:
            text += f" Allowed: {', '.join(self.allowed)}."
        return text


class SpecValidationError(ValueError):
    """A grid file (or prompt file) that cannot be used; `str()` is the user-facing message.

    Attributes name the `file`, the dotted `field` path (`models[0].dtype`), the 1-based
    YAML `line` where known and the `allowed` values, for the first problem; `issues`
    holds all of them.
    """

    def __init__(
        self,
        message: str = "",
        *,
        file: str | Path | None = None,
        field: str = "",
        line: int | None = None,
        allowed: Sequence[str] | None = None,
        issues: Sequence[Issue] | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        if issues is None:
            issues = [Issue(field, message, line, tuple(allowed) if allowed else None)]
        self.issues = list(issues)
        first = self.issues[0]
        self.field, self.line, self.allowed = first.field, first.line, first.allowed
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.issues) == 1:
            return self.issues[0].render(self.file)
        lines = [f"{self.file or '<grid>'}: {len(self.issues)} problems:"]
        lines += ["  " + i.render(self.file) for i in self.issues]
        return "\n".join(lines)


def format_loc(loc: Sequence[str | int]) -> str:
    """`("models", 0, "dtype")` -> `models[0].dtype`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# --------------------------------------------------------------------------- YAML with lines


class LineIndex:
    """Maps a field path (keys and list indices) to the 1-based line it starts on."""

    def __init__(self, lines: Mapping[Loc, int] | None = None,
                 duplicates: Sequence[tuple[Loc, int]] = ()) -> None:
        self._lines: dict[Loc, int] = dict(lines or {})
        self.duplicates = list(duplicates)
        """Keys that appear twice in one mapping (YAML keeps the last, silently)."""

    @classmethod
    def from_node(cls, node: yaml.Node | None) -> LineIndex:
        lines: dict[Loc, int] = {}
        duplicates: list[tuple[Loc, int]] = []

        def walk(n: yaml.Node, loc: Loc) -> None:
            lines.setdefault(loc, n.start_mark.line + 1)
            if isinstance(n, yaml.MappingNode):
                seen: set[str] = set()
                for key_node, value_node in n.value:
                    key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                    if key is None:
                        continue
                    if key in seen:
                        duplicates.append((loc + (key,), key_node.start_mark.line + 1))
                    seen.add(key)
                    lines[loc + (key,)] = key_node.start_mark.line + 1
                    walk(value_node, loc + (key,))
            elif isinstance(n, yaml.SequenceNode):
                for i, item in enumerate(n.value):
                    lines[loc + (i,)] = item.start_mark.line + 1
                    walk(item, loc + (i,))

        if node is not None:
            walk(node, ())
        return cls(lines, duplicates)

    def line(self, loc: Sequence[str | int]) -> int | None:
        """Line of `loc`, or of its nearest parent that appears in the file."""
        loc = tuple(loc)
        while loc and loc not in self._lines:
            loc = loc[:-1]
        return self._lines.get(loc)


MAX_YAML_NODES = 100_000
"""Nodes one YAML document may hold, each alias counted at the size it expands to. Grid
files have tens of nodes and the shipped prompt bank a few thousand; a "billion laughs"
file of a few hundred bytes (anchors of lists of aliases of lists ...) expands to 10^9
and would take minutes and gigabytes before any check ran."""

MAX_ECHO_CHARS = 200
"""Longest echo of a user value in an error message; longer ones end in "…"."""


def short_repr(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """`repr(value)` cut to `limit` characters ending in "…", without building the whole
    repr of a huge value: strings are cut first, containers go through a bounded
    `reprlib.Repr` (aliases can make a small file's value print as megabytes)."""
    if isinstance(value, str):
        text = repr(value[: limit + 1])
    else:
        r = reprlib.Repr()
        r.maxstring = r.maxother = limit
        r.maxlist = r.maxtuple = r.maxdict = r.maxset = 20
        r.maxlevel = 4
        text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _YamlTooLarge(Exception):
    """The document expands beyond MAX_YAML_NODES, or aliases itself."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that counts nodes while composing, an alias at its expanded size,
    and stops at `limit`: memory and time stay proportional to the limit, not to what
    nested aliases would expand to. Recursive aliases (`&a [*a]`) are refused too."""

    def __init__(self, stream: str, limit: int = MAX_YAML_NODES) -> None:
        super().__init__(stream)
        self._limit = limit
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def _size(self, node: yaml.Node) -> int:
        """Expanded node count of a finished node (memoised: shared subtrees cost once)."""
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(self._size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
        else:
            total = 1
        self._sizes[id(node)] = total
        return total

    def _add(self, n: int, mark: yaml.Mark | None) -> None:
        self._expanded += n
        if self._expanded > self._limit:
            raise _YamlTooLarge(
                f"the YAML expands to more than {self._limit} nodes (aliases *name count at "
                "the size of what they repeat); refused as an alias bomb or a runaway file",
                mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                if target.end_mark is None:  # still being composed: an alias of an ancestor
                    raise _YamlTooLarge(f"alias *{event.anchor} refers to a node that contains "
                                        "it (a recursive structure)", event.start_mark)
                self._add(self._size(target), event.start_mark)
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        self._add(1, node.start_mark)
        return node


def read_yaml(path: str | Path) -> tuple[Any, LineIndex]:
    """Parse a YAML file safely; any read or syntax problem becomes a SpecValidationError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecValidationError("file not found", file=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecValidationError(f"cannot read file: {exc}", file=path) from exc
    return _parse_yaml_text(text, path)


def _parse_yaml_text(text: str, source: str | Path) -> tuple[Any, LineIndex]:
    """Safe-load `text` once (bounded, see `_BoundedLoader`) and index its lines."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecValidationError(f"malformed YAML: {problem}", file=source, line=line) from exc
    except _YamlTooLarge as exc:
        raise SpecValidationError(str(exc), file=source, line=exc.line) from None
    except RecursionError:
        raise SpecValidationError("the YAML is nested too deeply", file=source) from None
    finally:
        loader.dispose()
    lines = LineIndex.from_node(node)
    if lines.duplicates:
        issues = [Issue(format_loc(loc), "duplicate key (YAML would silently keep the last one)",
                        line) for loc, line in lines.duplicates]
        raise SpecValidationError(file=source, issues=issues)
    return data, lines


# --------------------------------------------------------------------------- field types


def _listify(value: Any) -> Any:
    """Axis shorthand: a scalar stands for a one-element list."""
    return value if isinstance(value, list) else [value]


def _canon_layers(value: Any) -> Any:
    """A layer spec as one canonical string: 24 -> "24", [0, 4, 8] -> "0,4,8"."""
    if isinstance(value, bool):
        raise ValueError(f"layer spec must be a string, an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"a layer list must be a non-empty list of ints, got {value!r}")
        text = ",".join(str(v) for v in value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ValueError(f"layer spec must be a string, an int or a list of ints, got {value!r}")
    try:
        resolve_layers(text, _SYNTAX_DEPTH)
    except SpecError as exc:
        why = re.sub(rf" (on|for) an? {_SYNTAX_DEPTH}-layer model.*$", "", str(exc))
        raise ValueError(
            f"bad layer spec {text!r}: {why}. Use 'all', 'a:b', '50%:100%', an int or "
            "'0,4,8'"
        ) from exc
    return text


def _canon_layer_point(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a layer must be an int or a percentage like '84%', got {value!r}")
    text = str(value).strip()
    try:
        resolve_layer(text, _SYNTAX_DEPTH)
    except SpecError as exc:
        raise ValueError(f"bad layer {text!r}: {exc}") from exc
    return text


def _check_token_spec(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"a token spec must be a string, got {value!r}")
    text = value.strip()
    try:
        validate_token_spec(text)
    except SpecError as exc:
        raise ValueError(str(exc)) from exc
    return text


def _unique(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate value {v!r}")
        seen.append(v)
    return values


LayerSpec = Annotated[str, BeforeValidator(_canon_layers)]
LayerPoint = Annotated[str, BeforeValidator(_canon_layer_point)]
TokenSpec = Annotated[str, BeforeValidator(_check_token_spec)]


def _canon_profile_layers(value: Any) -> Any:
    """`measure.layers`: None, "all", or a list of single layers (ints or percentages),
    canonical strings in the given order; a scalar layer stands for a 1-list."""
    if value is None or value == "all":
        return value
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("measure.layers is an empty list; give layers, 'all' or null")
    out: list[str] = []
    for i, item in enumerate(items):
        try:
            text = _canon_layer_point(item)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}. Use 'all', null or a list of layers like "
                             "[4, '50%', -1]") from None
        if text in out:
            raise ValueError(f"duplicate layer {text!r}")
        out.append(text)
    return out


def _is_depth_independent(spec: str) -> bool:
    """True when a layer spec names the same layers on every model deep enough for it
    (absolute, non-negative indices with closed ranges): it can be expanded without a
    model's config. Fractions, `all`, negative indices and open ranges cannot."""
    return resolve_layers(spec, _SYNTAX_DEPTH) == resolve_layers(spec, _SYNTAX_DEPTH + 1)


def layer_text(indices: Sequence[int]) -> str:
    """The canonical layer spec of a set of layers: `12`, `10:14` (contiguous), `0,4,8`."""
    idx = sorted(indices)
    if len(idx) == 1:
        return str(idx[0])
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}:{idx[-1] + 1}"
    return ",".join(str(i) for i in idx)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""Sweep names (grid `name`, `--name`): one path component that cannot climb out of
`results/` (no `/`, no leading `.`), so a name never addresses another folder."""
NAME_MAX_LENGTH = 100
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)]
ModelId = Annotated[str, Field(pattern=r"^\S+$", max_length=200)]
GroupName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Level = Annotated[int, Field(ge=1, le=5)]

Site = Literal[SITES]
Mode = Literal[MODES]
During = Literal[DURING]
Align = Literal[ALIGNS]
Control = Literal[GRID_CONTROLS]
Dtype = Literal[DTYPES]
Claim = Literal[CLAIMS]
Condition = Literal[tuple(CLASSIC_CONDITIONS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class LayerExpander(_Strict):
    """A layer-axis entry that stands for several points, resolved per model.

    A plain layer spec (`"10:21"`) is ONE point: every cell patches those layers together.
    `{each: "10:21"}` is one point per layer of the spec (`"10"`, `"11"`, ..., `"20"`);
    `{windows: W, step: S, over: "a:b"}` is one point per window of W consecutive layers
    of `over` (default all layers), starting every S layers (default 1). Fractions of
    depth resolve on each model, so the points may differ between models; every point's
    `layers` coordinate is its concrete spec (`"12"`, `"10:14"`).
    """

    each: LayerSpec | None = None
    windows: Annotated[int, Field(ge=1)] | None = None
    step: Annotated[int, Field(ge=1)] | None = None
    over: LayerSpec | None = None

    @model_validator(mode="after")
    def one_kind(self) -> LayerExpander:
        if (self.each is None) == (self.windows is None):
            raise ValueError(
                f"a layer expander is either {{{LAYER_EACH}: 'a:b'}} (one point per layer) or "
                f"{{{LAYER_WINDOWS}: W, step: S, over: 'a:b'}} (sliding windows of W layers)")
        if self.each is not None and (self.step is not None or self.over is not None):
            raise ValueError(f"`step` and `over` belong to {{{LAYER_WINDOWS}: W}}; "
                             f"{{{LAYER_EACH}: ...}} takes only a layer spec")
        return self

    @property
    def range_spec(self) -> str:
        """The layer spec the points are drawn from (`each`, or `over` of the windows)."""
        return self.each if self.each is not None else (self.over or "all")

    def label(self) -> str:
        """How messages and `validate` name this entry, in the file's own syntax."""
        if self.each is not None:
            return f'{{{LAYER_EACH}: "{self.each}"}}'
        parts = [f"{LAYER_WINDOWS}: {self.windows}", f"step: {self.step or 1}"]
        if self.over is not None:
            parts.append(f'over: "{self.over}"')
        return "{" + ", ".join(parts) + "}"

    def needs_depth(self) -> bool:
        """True when the points depend on the model's depth (fractions, `all`, ...)."""
        return not _is_depth_independent(self.range_spec)

    def expand(self, n_layers: int | None = None) -> list[str]:
        """The concrete layer specs of the points on an `n_layers`-deep model.

        `n_layers=None` works for depth-independent entries only (the pre-flight then
        checks each point against every model). SpecError when the depth is needed but
        unknown, the range does not fit, or no window fits in it.
        """
        if n_layers is None and self.needs_depth():
            raise SpecError(f"{self.label()} depends on the model's depth; it is expanded "
                            "per model from the model's config")
        depth = _SYNTAX_DEPTH if n_layers is None else n_layers
        idx = resolve_layers(self.range_spec, depth)
        if self.each is not None:
            return [str(i) for i in idx]
        width, step = int(self.windows or 1), int(self.step or 1)
        if width > len(idx):
            where = "" if n_layers is None else f" on a {n_layers}-layer model"
            raise SpecError(f"{self.label()}: a window of {width} layers does not fit in the "
                            f"{len(idx)} layers of {self.range_spec!r}{where}")
        return [layer_text(idx[i:i + width]) for i in range(0, len(idx) - width + 1, step)]


_UNION_TAGS = frozenset({"layer-expander", "layer-spec"})
"""Tags pydantic puts in the location of an error inside a tagged union (not file keys)."""


def _layer_entry_kind(value: Any) -> str:
    return "layer-expander" if isinstance(value, (dict, LayerExpander)) else "layer-spec"


LayerEntry = Annotated[
    Annotated[LayerExpander, Tag("layer-expander")] | Annotated[LayerSpec, Tag("layer-spec")],
    Discriminator(_layer_entry_kind),
]
"""One entry of `interventions.layers`: a layer spec (one point) or an expander."""


# --------------------------------------------------------------------------- the schema


class ModelSpec(_Strict):
    """One model of the sweep. `name_or_path` defaults to `id` (a builtin name or hub id)."""

    id: ModelId
    name_or_path: str = ""
    dtype: Dtype = "float32"
    # None = auto: use the tokenizer's chat template when it has one (instruct models)
    chat_template: bool | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    device_map: str | None = None

    @model_validator(mode="before")
    @classmethod
    def default_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name_or_path") and isinstance(
            data.get("id"), str
        ):
            data = {**data, "name_or_path": data["id"]}
        return data


class PromptsSpec(_Strict):
    """Which prompts are targets, which are sources, and how they are paired.

    `conditions` is the classic-design shortcut (A/B/C/D on `baseline` and `recursive`);
    it replaces `target_groups` and `source_groups`, which are then left out.
    """

    bank: str = "prompts"
    target_groups: list[GroupName] | None = Field(default=None, min_length=1)
    source_groups: list[GroupName] | None = Field(default=None, min_length=1)
    levels: list[Level] | None = Field(default=None, min_length=1)
    pairing: Literal["cross", "product"] = "cross"
    n_pairs: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    conditions: list[Condition] | None = Field(default=None, min_length=1)

    @field_validator("target_groups", "source_groups", "levels", "conditions")
    @classmethod
    def check_unique(cls, value: list[Any] | None) -> list[Any] | None:
        return _unique(value) if value is not None else value

    def effective_target_groups(self) -> list[str]:
        if self.conditions:
            out = []
            if {"A", "C"} & set(self.conditions):
                out.append(BASELINE_GROUP)
            if {"B", "D"} & set(self.conditions):
                out.append(RECURSIVE_GROUP)
            return out
        return list(self.target_groups or [BASELINE_GROUP])

    def effective_source_groups(self) -> list[str]:
        if self.conditions:
            out = []
            if "D" in self.conditions:
                out.append(BASELINE_GROUP)
            if "C" in self.conditions:
                out.append(RECURSIVE_GROUP)
            return out
        return list(self.source_groups or [RECURSIVE_GROUP])

    def source_groups_for(self, target_group: str) -> list[str]:
        """Source groups a target of `target_group` is paired with (may be empty)."""
        if self.conditions:
            if target_group == BASELINE_GROUP and "C" in self.conditions:
                return [RECURSIVE_GROUP]
            if target_group == RECURSIVE_GROUP and "D" in self.conditions:
                return [BASELINE_GROUP]
            return []
        sources = self.effective_source_groups()
        if self.pairing == "cross":
            return [g for g in sources if g != target_group]
        return sources


class InterventionAxes(_Strict):
    """The intervention grid: the product of every axis (a scalar means a 1-list).

    Combinations that cannot run (`combination_problem`) are left out of the product;
    an axis value left with no combination at all is an error.
    """

    site: Annotated[list[Site], BeforeValidator(_listify), Field(min_length=1)] = ["kv"]
    layers: Annotated[list[LayerEntry], BeforeValidator(_listify), Field(min_length=1)] = ["all"]
    tokens: Annotated[list[TokenSpec], BeforeValidator(_listify), Field(min_length=1)] = ["all"]
    align: Annotated[list[Align], BeforeValidator(_listify), Field(min_length=1)] = ["end"]
    alpha: Annotated[list[FiniteFloat], BeforeValidator(_listify), Field(min_length=1)] = [1.0]
    mode: Annotated[list[Mode], BeforeValidator(_listify), Field(min_length=1)] = ["mix"]
    during: Annotated[list[During], BeforeValidator(_listify), Field(min_length=1)] = [PREFILL]

    @field_validator("site", "layers", "tokens", "align", "alpha", "mode", "during")
    @classmethod
    def check_unique(cls, value: list[Any]) -> list[Any]:
        return _unique(value)

    def combinations(self) -> list[tuple[str, str, str]]:
        """(site, mode, during) of the product that can run, in axis order."""
        return [(s, m, d) for s in self.site for m in self.mode for d in self.during
                if combination_problem(s, m, d) is None]

    def skipped_combinations(self) -> list[tuple[str, str, str, str]]:
        """(site, mode, during, why) of the product that is left out."""
        out = []
        for s in self.site:
            for m in self.mode:
                for d in self.during:
                    why = combination_problem(s, m, d)
                    if why is not None:
                        out.append((s, m, d, why))
        return out

    @property
    def expanders(self) -> list[tuple[int, LayerExpander]]:
        """(index in `layers`, entry) of the entries that stand for several points."""
        return [(k, e) for k, e in enumerate(self.layers) if isinstance(e, LayerExpander)]


def combination_problem(site: str, mode: str, during: str) -> str | None:
    """Why a (site, mode, during) combination cannot run, or None when it can.

    A transplant swaps a prompt's cache, so it needs a cache site and exists only on the
    prefill; a steering vector is added at the residual stream or the value projection;
    during generation only sites with a per-token form can be patched.
    """
    if mode == TRANSPLANT and site not in CACHE_SITES:
        return f"a transplant needs a cache site ({', '.join(CACHE_SITES)})"
    if mode == STEER and site not in STEER_SITES:
        return f"a steering vector is added at {', '.join(STEER_SITES)} only"
    if during != PREFILL:
        if mode == TRANSPLANT:
            return (f"during {during!r} is not allowed with mode 'transplant' (it replaces the "
                    "prompt's cache once, after the prefill)")
        if site not in GENERATION_SITES:
            return (f"site {site!r} cannot be patched during generation (allowed: "
                    f"{', '.join(GENERATION_SITES)})")
    return None


class GenerationSpec(_Strict):
    """Decoding. `temperature: 0` is greedy; sampled cells get a seed derived from the cell id."""

    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    temperature: Annotated[FiniteFloat, Field(ge=0.0)] = 0.0
    top_p: Annotated[FiniteFloat, Field(gt=0.0, le=1.0)] = 1.0
    n_samples: Annotated[int, Field(ge=1)] = 1
    stop_at_eos: bool = True


class MeasureSpec(_Strict):
    """Geometry (R_V = PR(late) / PR(early) over the last `window` generated tokens) and scorers."""

    early_layer: LayerPoint = "12.5%"
    late_layer: LayerPoint = "84%"
    window: Annotated[int, Field(ge=2)] = 16
    centering: bool = False
    trajectory: bool = False
    scorers: Annotated[list[str], BeforeValidator(_listify)] = list(KNOWN_SCORERS)
    attention: bool = False
    """Per layer, the entropy of the generated queries' attention and its mass on the
    prompt, the generated tokens and the patched positions (`attn_*` columns)."""
    layers: Annotated[Any, BeforeValidator(_canon_profile_layers)] = None
    """null, `all` or a list of layers: the participation ratio at each (`pr_by_layer`);
    checked against each model's depth by the pre-flight."""
    kl_from_natural: bool = True
    """KL(patched || natural) of the first generated token's distribution."""
    top_logprobs: Annotated[int, Field(ge=0, le=100)] = 5
    """Top-k ids and log-probs of the first generated step (0: none)."""
    token_logprobs: bool = False
    """The log-prob of every generated token, as a list column."""

    @field_validator("scorers")
    @classmethod
    def check_unique(cls, value: list[Any]) -> list[Any]:
        return _unique(value)


class ResourcesSpec(_Strict):
    """Ray resources; `gpus_per_replica: null` means 1 when the cluster has GPUs, else 0."""

    gpus_per_replica: Annotated[FiniteFloat, Field(ge=0.0)] | None = None
    replicas: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_units_in_flight_per_worker: Annotated[int, Field(ge=1)] = 2


def _model_shorthand(value: Any) -> Any:
    """`models: [smollm2-135m]` is short for `[{id: smollm2-135m}]`."""
    if isinstance(value, list):
        return [{"id": v} if isinstance(v, str) else v for v in value]
    return value


class SweepSpec(_Strict):
    """A validated grid file. Build it with `load_spec`; `grid.expand` turns it into cells."""

    name: Name
    version: Annotated[int, Field(ge=1)] = 1
    description: str = ""
    retests: Annotated[list[Claim], BeforeValidator(_listify)] = []
    models: Annotated[list[ModelSpec], BeforeValidator(_model_shorthand), Field(min_length=1)]
    prompts: PromptsSpec = PromptsSpec()
    interventions: InterventionAxes | None = InterventionAxes()
    controls: Annotated[list[Control], BeforeValidator(_listify)] = ["natural"]
    generation: GenerationSpec = GenerationSpec()
    measure: MeasureSpec = MeasureSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @field_validator("retests", "controls")
    @classmethod
    def check_unique(cls, value: list[Any]) -> list[Any]:
        return _unique(value)

    _source: str | None = PrivateAttr(default=None)
    _base_dir: Path | None = PrivateAttr(default=None)
    _lines: LineIndex = PrivateAttr(default_factory=LineIndex)

    # -- provenance and errors -------------------------------------------------

    @property
    def source(self) -> str | None:
        """The file this spec came from (as given), or None for an in-memory spec."""
        return self._source

    def line(self, loc: Sequence[str | int]) -> int | None:
        return self._lines.line(loc)

    def error(
        self, loc: Sequence[str | int], message: str, allowed: Sequence[str] | None = None
    ) -> SpecValidationError:
        """A SpecValidationError about field `loc` of this spec (file and line filled in)."""
        return SpecValidationError(
            message, file=self._source, field=format_loc(loc), line=self.line(loc),
            allowed=allowed,
        )

    def canonical_json(self) -> str:
        """Sorted-key JSON of every field (defaults included), for hashing and manifests."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        """sha256 of what determines the rows: the canonical spec minus `resources`.

        Equal specs written differently hash the same; replicas or batch size may change
        between a run and its `--resume` (they change speed, not results).
        """
        data = without_later_defaults(self.model_dump(mode="json"))
        data.pop("resources", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- derived views -----------------------------------------------------------

    def bank_candidates(self) -> list[Path]:
        """Where `prompts.bank` is looked for, in order.

        An absolute path is used as is. A relative one is tried against the current
        directory, then the grid file's directory, then that directory's parent (so
        `sweeps/x.yaml` finds the project's `prompts/` from anywhere).
        """
        bank = Path(self.prompts.bank).expanduser()
        if bank.is_absolute():
            return [bank]
        out = [Path.cwd() / bank]
        if self._base_dir is not None:
            out += [self._base_dir / bank, self._base_dir.parent / bank]
        unique: list[Path] = []
        for p in out:
            if p.resolve() not in [u.resolve() for u in unique]:
                unique.append(p)
        return unique

    def resolve_bank(self) -> Path:
        """The prompt bank directory (or file); SpecValidationError on `prompts.bank` if absent."""
        candidates = self.bank_candidates()
        for path in candidates:
            if path.exists():
                return path.resolve()
        tried = ", ".join(str(p) for p in candidates)
        raise self.error(("prompts", "bank"),
                         f"prompt bank {self.prompts.bank!r} not found (looked in: {tried})")

    def controls_needing_interventions(self) -> list[str]:
        return [c for c in self.controls if c != "natural"]

    def steer_skipped_controls(self) -> list[str]:
        """Listed controls that steer points do not have (they run for the other points)."""
        if self.interventions is None or STEER not in self.interventions.mode:
            return []
        return [c for c in self.controls if c not in STEER_CONTROLS]


def without_later_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """A spec dump without the fields of `vocab.LATER_SPEC_DEFAULTS` at their defaults:
    what the spec hash covers, so a grid that does not use them keeps the hash it had
    before they existed."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for dotted, default in LATER_SPEC_DEFAULTS.items():
        section, key = dotted.split(".", 1)
        sub = out.get(section)
        if isinstance(sub, dict) and key in sub and sub[key] == default:
            del sub[key]
    return out


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a grid file (schema and cross-field rules; not the prompt bank)."""
    data, lines = read_yaml(path)
    return parse_spec(data, source=str(path), lines=lines, base_dir=Path(path).resolve().parent)


def load_spec_text(text: str, *, source: str = "<memory>", base_dir: str | Path | None = None
                   ) -> SweepSpec:
    """Like `load_spec` for YAML text (tests, embedded examples)."""
    data, lines = _parse_yaml_text(text, source)
    return parse_spec(data, source=source, lines=lines,
                      base_dir=Path(base_dir) if base_dir is not None else None)


def parse_spec(
    data: Any,
    *,
    source: str | None = "<memory>",
    lines: LineIndex | None = None,
    base_dir: Path | None = None,
) -> SweepSpec:
    """Validate already-parsed YAML data; errors name `source`, the field and the line."""
    lines = lines or LineIndex()
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecValidationError(
            f"a grid file must be a mapping of keys (name, models, ...), got {kind}",
            file=source, line=lines.line(()) if data is not None else None,
        )
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        issues = issues_from_validation_error(exc, data, lines, SweepSpec)
        raise SpecValidationError(file=source, issues=issues) from None
    spec._source = source
    spec._base_dir = base_dir
    spec._lines = lines
    issues = _semantic_issues(spec)
    if issues:
        raise SpecValidationError(file=source, issues=issues)
    return spec


def _dedupe(issues: list[Issue]) -> list[Issue]:
    out: list[Issue] = []
    for i in issues:
        if not any(o.field == i.field and o.message == i.message for o in out):
            out.append(i)
    return out


# --------------------------------------------------------------------------- error messages


def _unwrap_model(annotation: Any) -> Any:
    """The BaseModel or list element type inside Annotated/Optional wrappers (a union of
    one model with plain values, like a layer-axis entry, counts as that model)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
            unwrapped = [_unwrap_model(a) for a in args]
            models = [a for a in unwrapped if isinstance(a, type) and issubclass(a, BaseModel)]
            return models[0] if len(models) == 1 else annotation
        else:
            return annotation


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that owns the keys at `loc` (for 'unknown key' messages)."""
    current: Any = root
    for part in loc:
        current = _unwrap_model(current)
        if isinstance(part, int):
            if typing.get_origin(current) is not list:
                return None
            current = typing.get_args(current)[0]
        else:
            if not (isinstance(current, type) and issubclass(current, BaseModel)):
                return None
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
    current = _unwrap_model(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _data_loc(loc: Sequence[str | int], data: Any, keep_last: bool) -> Loc:
    """Trim pydantic's union/validator tags: keep the prefix that exists in the data."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            if keep_last and i == len(loc) - 1 and isinstance(node, dict):
                out.append(part)
            break
        out.append(part)
    return tuple(out)


def issues_from_validation_error(
    exc: ValidationError, data: Any, lines: LineIndex, root: type[BaseModel]
) -> list[Issue]:
    """Pydantic's errors as `Issue`s: data paths, YAML lines, 'Did you mean' and allowed values."""
    return _dedupe([_issue_from_pydantic(err, data, lines, root) for err in exc.errors()])


def _issue_from_pydantic(
    err: Mapping[str, Any], data: Any, lines: LineIndex, root: type[BaseModel]
) -> Issue:
    kind = err["type"]
    raw = [part for part in err["loc"] if part not in _UNION_TAGS]  # not keys of the file
    loc = _data_loc(raw, data, keep_last=kind in ("missing", "extra_forbidden"))
    field = format_loc(loc)
    line = lines.line(loc)
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    allowed: tuple[str, ...] | None = None
    if kind == "extra_forbidden":
        key = str(loc[-1])[:MAX_ECHO_CHARS] if loc else "?"
        owner = _model_at(root, loc[:-1])
        names = sorted(owner.model_fields) if owner is not None else []
        msg = f"unknown key {key!r}.{did_you_mean(key, names)}"
        allowed = tuple(names) or None
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        got = err.get("input")
        hint = did_you_mean(str(got)[:MAX_ECHO_CHARS], expected)
        msg = f"{short_repr(got)} is not allowed.{hint}"
        allowed = tuple(expected) or None
    elif kind not in ("value_error",):
        msg = f"{msg} (got {short_repr(err.get('input'))})"
    return Issue(field, msg, line, allowed)


def _scorer_names() -> tuple[str, ...]:
    """Scorer names from `rloop_ray.scoring`'s registry when it has one, else the builtins."""
    try:
        from rloop_ray import scoring  # noqa: PLC0415  (optional, lazy)
    except ImportError:
        return KNOWN_SCORERS
    for attr in ("available_scorers", "scorer_names"):
        fn = getattr(scoring, attr, None)
        if callable(fn):
            return tuple(sorted(set(fn()) | {"logprob_contrast"}))
    for attr in ("SCORERS", "REGISTRY", "registry"):
        reg = getattr(scoring, attr, None)
        if isinstance(reg, Mapping):
            return tuple(sorted(set(reg) | {"logprob_contrast"}))
    return KNOWN_SCORERS


_AXIS_POSITION = {"site": 0, "mode": 1, "during": 2}


def _blamed_axis(site: str, mode: str, during: str) -> str:
    """Which axis a combination's problem is reported on (the value to change)."""
    if mode in (TRANSPLANT, STEER) and combination_problem(site, mode, PREFILL) is not None:
        return "mode"
    return "during"


def _dead_axis_values(axes: InterventionAxes, add: Callable[..., None],
                      explained: set[tuple[str, str]]) -> None:
    """An error for every site, mode or `during` value that no runnable combination has.

    One mistake, one message: a value is reported on the axis its problem is blamed on
    (`_blamed_axis`), and a value that is dead only because of a value reported already
    is not reported again.
    """
    combos = [(s, m, d) for s in axes.site for m in axes.mode for d in axes.during]
    dead: list[tuple[str, str]] = []
    for axis in ("during", "mode", "site"):
        for value in getattr(axes, axis):
            mine = [c for c in combos if c[_AXIS_POSITION[axis]] == value]
            if not any(combination_problem(*c) is None for c in mine):
                dead.append((axis, value))
    for axis, value in dead:
        if (axis, value) in explained:
            continue
        mine = [c for c in combos if c[_AXIS_POSITION[axis]] == value]
        blamed = {(b, c[_AXIS_POSITION[b]]) for c in mine for b in (_blamed_axis(*c),)}
        own = any(b == axis for b, _ in blamed)
        if not own and any(bv in dead or bv in explained for bv in blamed):
            continue
        reasons = sorted({str(combination_problem(*c)) for c in mine})
        add(("interventions", axis, getattr(axes, axis).index(value)),
            f"{axis} {value!r} gets no cells: {'; '.join(reasons)}. Change the other axes "
            "or drop it")


def _semantic_issues(spec: SweepSpec) -> list[Issue]:
    """Rules that span fields; each issue points at the field to change."""
    issues: list[Issue] = []

    def add(loc: Loc, message: str, allowed: Sequence[str] | None = None) -> None:
        issues.append(Issue(format_loc(loc), message, spec.line(loc),
                            tuple(allowed) if allowed else None))

    seen: dict[str, int] = {}
    for i, model in enumerate(spec.models):
        if model.id in seen:
            add(("models", i, "id"), f"duplicate model id {model.id!r} (also "
                f"models[{seen[model.id]}]); give each model a distinct id")
        seen.setdefault(model.id, i)

    p = spec.prompts
    if p.conditions and (p.target_groups is not None or p.source_groups is not None):
        add(("prompts", "conditions"),
            "give either `conditions` (A/B/C/D on baseline and recursive) or "
            "`target_groups`/`source_groups`, not both")
    axes = spec.interventions
    needs_source = axes is not None
    if axes is None:
        extra = spec.controls_needing_interventions()
        if extra:
            add(("controls",), f"controls {extra} patch a source, but `interventions` is null; "
                "only `natural` runs without interventions", allowed=["natural"])
        if p.conditions and {"C", "D"} & set(p.conditions):
            add(("prompts", "conditions"), "conditions C and D are patches, but `interventions` "
                "is null", allowed=["A", "B"])
        if "natural" not in spec.controls and not (p.conditions and {"A", "B"} & set(p.conditions)):
            add(("interventions",), "the grid has no cells: `interventions` is null and "
                "`controls` has no `natural`")
    else:
        cache_sites = [s for s in axes.site if s in CACHE_SITES]
        explained: set[tuple[str, str]] = set()
        if axes.mode == ["transplant"] and len(cache_sites) < len(axes.site):
            other = [s for s in axes.site if s not in CACHE_SITES]
            add(("interventions", "mode"), f"mode 'transplant' applies only to cache sites, so "
                f"sites {other} would get no cells; add 'mix' or drop those sites",
                allowed=list(CACHE_SITES))
            explained |= {("mode", TRANSPLANT)} | {("site", s) for s in other}
        _dead_axis_values(axes, add, explained)
    if needs_source and not p.conditions:
        for k, group in enumerate(p.effective_target_groups()):
            if not p.source_groups_for(group):
                loc: Loc = ("prompts", "source_groups") if p.source_groups is not None else (
                    "prompts", "target_groups", k)
                add(loc, f"pairing 'cross' needs a source group other than the target group "
                    f"{group!r} (source groups: {p.effective_source_groups()}); add one or use "
                    "pairing 'product'")

    g, m = spec.generation, spec.measure
    if m.window > g.max_new_tokens:
        add(("measure", "window"), f"window {m.window} exceeds generation.max_new_tokens "
            f"{g.max_new_tokens}: R_V would be null for every cell; use window <= max_new_tokens")
    known = _scorer_names()
    for i, name in enumerate(m.scorers):
        if name not in known:
            add(("measure", "scorers", i), f"unknown scorer {name!r}.{did_you_mean(name, known)}",
                allowed=known)
    return issues
