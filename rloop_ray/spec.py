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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
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
    GRID_CONTROLS,
    MODES,
    RECURSIVE_GROUP,
    SCORERS,
    SITES,
)

__all__ = [
    "CLAIMS",
    "CLASSIC_CONDITIONS",
    "GenerationSpec",
    "InterventionAxes",
    "Issue",
    "MeasureSpec",
    "ModelSpec",
    "PromptsSpec",
    "ResourcesSpec",
    "SpecValidationError",
    "SweepSpec",
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
Align = Literal[ALIGNS]
Control = Literal[GRID_CONTROLS]
Dtype = Literal[DTYPES]
Claim = Literal[CLAIMS]
Condition = Literal[tuple(CLASSIC_CONDITIONS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
    """The intervention grid: the product of every axis (a scalar means a 1-list)."""

    site: Annotated[list[Site], BeforeValidator(_listify), Field(min_length=1)] = ["kv"]
    layers: Annotated[list[LayerSpec], BeforeValidator(_listify), Field(min_length=1)] = ["all"]
    tokens: Annotated[list[TokenSpec], BeforeValidator(_listify), Field(min_length=1)] = ["all"]
    align: Annotated[list[Align], BeforeValidator(_listify), Field(min_length=1)] = ["end"]
    alpha: Annotated[list[FiniteFloat], BeforeValidator(_listify), Field(min_length=1)] = [1.0]
    mode: Annotated[list[Mode], BeforeValidator(_listify), Field(min_length=1)] = ["mix"]

    @field_validator("site", "layers", "tokens", "align", "alpha", "mode")
    @classmethod
    def check_unique(cls, value: list[Any]) -> list[Any]:
        return _unique(value)


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
        data = self.model_dump(mode="json")
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
    """The BaseModel or list element type inside Annotated/Optional wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else annotation
            if len(args) != 1:
                return annotation
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
    loc = _data_loc(err["loc"], data, keep_last=kind in ("missing", "extra_forbidden"))
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
        if axes.mode == ["transplant"] and len(cache_sites) < len(axes.site):
            other = [s for s in axes.site if s not in CACHE_SITES]
            add(("interventions", "mode"), f"mode 'transplant' applies only to cache sites, so "
                f"sites {other} would get no cells; add 'mix' or drop those sites",
                allowed=list(CACHE_SITES))
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
