"""The plan of a sweep: exactly which cells it is made of, and what changed when it differs.

A result folder is trustworthy only if every reader agrees on which rows belong to it.
The plan (cell id, unit id, model of every planned cell) is recorded once when a sweep
starts, in `plan.parquet` beside the manifest, and every reader counts only its cells:
rows of an earlier plan (a prompt edited, an axis removed) are excluded and reported,
never silently mixed in. A resume whose grid no longer expands to the recorded plan is
refused with a description of the difference in words (`describe_change`), so a user
learns *what* changed, not that two hashes differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from rloop_ray.vocab import LATER_SPEC_DEFAULTS

PLAN_SCHEMA = pa.schema([
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("unit_id", pa.string()),
    pa.field("model", pa.string()),
])

MAX_LISTED = 5
"""How many changed fields / prompt ids a refusal names before it says "and N more"."""
MAX_VALUE_CHARS = 60


class _CellLike(Protocol):
    cell_id: str


class _UnitLike(Protocol):
    unit_id: str
    model: str
    cells: Sequence[_CellLike]


@dataclass(frozen=True)
class Plan:
    """The planned cells of a sweep: parallel tuples, one entry per cell, in grid order."""

    cell_ids: tuple[str, ...]
    unit_ids: tuple[str, ...]
    models: tuple[str, ...]

    @classmethod
    def from_units(cls, units: Iterable[_UnitLike]) -> Plan:
        cell_ids: list[str] = []
        unit_ids: list[str] = []
        models: list[str] = []
        seen: set[str] = set()
        for unit in units:
            for cell in unit.cells:
                if cell.cell_id in seen:
                    raise ValueError(f"cell {cell.cell_id} appears twice in the plan")
                seen.add(cell.cell_id)
                cell_ids.append(cell.cell_id)
                unit_ids.append(unit.unit_id)
                models.append(unit.model)
        return cls(tuple(cell_ids), tuple(unit_ids), tuple(models))

    @classmethod
    def from_table(cls, table: pa.Table) -> Plan:
        return cls(
            tuple(table["cell_id"].to_pylist()),
            tuple(table["unit_id"].to_pylist()),
            tuple(table["model"].to_pylist()),
        )

    def to_table(self) -> pa.Table:
        return pa.table(
            {"cell_id": list(self.cell_ids), "unit_id": list(self.unit_ids),
             "model": list(self.models)},
            schema=PLAN_SCHEMA,
        )

    def __len__(self) -> int:
        return len(self.cell_ids)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self.cell_ids)

    def ids_of(self, model: str) -> frozenset[str]:
        return frozenset(c for c, m in zip(self.cell_ids, self.models, strict=True) if m == model)

    def by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.models:
            out[m] = out.get(m, 0) + 1
        return out

    @property
    def digest(self) -> str:
        """sha256 of the sorted cell ids: equal plans have equal digests, whatever the order."""
        return hashlib.sha256("\n".join(sorted(self.cell_ids)).encode()).hexdigest()[:16]

    def union(self, other: Plan) -> Plan:
        """This plan followed by the cells of `other` it does not have yet."""
        have = self.ids
        extra = [i for i, c in enumerate(other.cell_ids) if c not in have]
        return Plan(
            self.cell_ids + tuple(other.cell_ids[i] for i in extra),
            self.unit_ids + tuple(other.unit_ids[i] for i in extra),
            self.models + tuple(other.models[i] for i in extra),
        )


@dataclass(frozen=True)
class PlanChange:
    """How a new plan differs from the recorded one, for the models the new run covers."""

    added: dict[str, int]
    removed: dict[str, int]
    new_models: tuple[str, ...]

    @property
    def n_added(self) -> int:
        return sum(self.added.values())

    @property
    def n_removed(self) -> int:
        return sum(self.removed.values())

    @property
    def is_empty(self) -> bool:
        return not self.n_added and not self.n_removed

    @property
    def only_new_models(self) -> bool:
        """The change only adds models the recorded plan does not have (`--model NEW`)."""
        return not self.n_removed and set(self.added) <= set(self.new_models)


def compare(old: Plan, new: Plan) -> PlanChange:
    """Cells added and removed per model of `new`; models only in `old` are not compared.

    A run restricted to some models (`--model a`) leaves the other models' plans alone, so
    only the models the new run plans are compared.
    """
    old_models = set(old.models)
    added: dict[str, int] = {}
    removed: dict[str, int] = {}
    for model in dict.fromkeys(new.models):
        o, n = old.ids_of(model), new.ids_of(model)
        if n - o:
            added[model] = len(n - o)
        if o - n:
            removed[model] = len(o - n)
    new_models = tuple(m for m in dict.fromkeys(new.models) if m not in old_models)
    return PlanChange(added, removed, new_models)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def _with_later_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened spec with the fields added later (`vocab.LATER_SPEC_DEFAULTS`) filled
    in where its section exists: a spec recorded before a field existed meant its
    default, so it is not reported as a change."""
    out = dict(flat)
    for key, default in LATER_SPEC_DEFAULTS.items():
        section = key.split(".")[0] + "."
        if any(k.startswith(section) for k in flat):
            out.setdefault(key, default)
    return out


def spec_field_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Sequence[str] = ("resources",)) -> list[str]:
    """`field: old -> new` for every leaf of the two spec dicts that differs."""
    a = {k: v for k, v in _with_later_defaults(_flatten(old)).items()
         if k.split(".")[0] not in ignore}
    b = {k: v for k, v in _with_later_defaults(_flatten(new)).items()
         if k.split(".")[0] not in ignore}
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            before = _short(a[key]) if key in a else "(unset)"
            after = _short(b[key]) if key in b else "(unset)"
            lines.append(f"{key}: {before} -> {after}")
    return lines


def prompt_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Prompt ids whose text changed, and ids used by only one of the two plans.

    The prompts of a plan include every prompt of a steering group (the grid records
    them), so an edit to a group prompt that no cell uses as target or source is named
    too: it changes every steer vector of that group, hence those cells' ids.
    """
    edited = sorted(p for p in set(old) & set(new) if old[p] != new[p])
    only_new = sorted(set(new) - set(old))
    only_old = sorted(set(old) - set(new))
    out = []
    for label, ids in (("text edited", edited), ("now used", only_new),
                       ("no longer used", only_old)):
        if ids:
            shown = ", ".join(ids[:MAX_LISTED])
            more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
            out.append(f"prompts {label}: {shown}{more}")
    return out


def describe_change(
    change: PlanChange,
    *,
    old_spec: Mapping[str, Any] | None,
    new_spec: Mapping[str, Any],
    old_prompts: Mapping[str, str] | None,
    new_prompts: Mapping[str, str],
) -> list[str]:
    """The difference between the recorded plan and the grid as it is now, in words."""
    lines = []
    if old_spec is not None:
        fields = spec_field_changes(old_spec, new_spec)
        shown = fields[:MAX_LISTED]
        lines += [f"grid field {f}" for f in shown]
        if len(fields) > MAX_LISTED:
            lines.append(f"and {len(fields) - MAX_LISTED} more grid fields")
    if old_prompts is not None:
        lines += prompt_changes(old_prompts, new_prompts)
    models = list(dict.fromkeys([*change.added, *change.removed]))
    for model in models:
        lines.append(f"model {model}: {change.added.get(model, 0)} cells added, "
                     f"{change.removed.get(model, 0)} planned cells no longer in the grid")
    return lines
