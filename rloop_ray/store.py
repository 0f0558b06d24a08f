"""Result store of one sweep: the only reader and writer of `results/<name>/`.

The store is what makes a sweep resumable and its rows trustworthy: every shard is written
to a temporary name and renamed (a crash never leaves half a shard), the coordinate and
runner columns have an explicit Arrow schema, the plan (`plan.py`) records exactly which
cells the sweep is made of and every reader counts only those, readers dedupe by
`cell_id`, a lease (`lease.py`) keeps a second driver out, and a damaged file is named
(`DamagedFileError`) and quarantined by `repair`, never silently skipped.

Layout::

    results/<name>/manifest.json       spec, spec hash, plan digest, prompts, runs, status
    results/<name>/manifest.prev.json  the manifest before its last update (for repair)
    results/<name>/plan.parquet        cell_id, unit_id, model of every planned cell
    results/<name>/lock.json           the lease of the driver writing now (if any)
    results/<name>/cells/*.parquet     one row per cell attempt (readers keep one per cell_id)
    results/<name>/failures/*.parquet  error type + traceback per failed attempt
    results/<name>/quarantine/         files `repair` moved aside

All file access goes through `pyarrow.fs` (`FileSystem.from_uri`), so the store may live
on a shared or object-store URI (`s3://`, `gs://`, `file://`; other fsspec protocols such as
`memory://` through `FSSpecHandler`) where every driver, on any node or a later cluster,
sees the same rows. How a shard is made atomic depends on the filesystem
(`_atomic_write`): local paths get temp + fsync + rename, object stores a single PUT of
the fully serialised file (an object appears whole when its upload completes), other
filesystems (HDFS, a SubTreeFileSystem) temp + `move`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rloop_ray.lease import LOCK_FILE, SweepLease
from rloop_ray.plan import Plan, PlanChange, compare, describe_change
from rloop_ray.vocab import (
    COORDINATE_COLUMNS,
    DERIVED_FROM,
    NATURAL,
    NONE,
    PREFILL,
    STATUS_OK,
    SWEEP_CREATED,
    SWEEP_RUNNING,
)

RUNNER_COLUMNS = frozenset({
    "attempt", "worker", "node", "accelerator_ids", "seconds", "finished_at",
    "engine_seconds", "generate_seconds",
})
"""Where, when and how fast a cell ran: they differ between runs of the same cell, so
comparisons of a rerun or a resume with the original leave them out."""

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_PREVIOUS = "manifest.prev.json"
"""The manifest as it was before its latest update: what `repair` restores a torn one from."""
PLAN_FILE = "plan.parquet"
CELLS_DIR = "cells"
FAILURES_DIR = "failures"
QUARANTINE_DIR = "quarantine"
STORE_FORMAT = "rloop-ray/2"
"""Written into every manifest; `--overwrite` deletes only directories that carry it."""
LEGACY_FORMAT_KEYS = ("spec_hash", "runs")
"""Manifests written before `format` existed are recognised by these keys."""

# ---------------------------------------------------------------------------------------
# Schemas. Coordinate and runner columns are fixed here; engine columns are declared where
# the engine contract (docs/architecture.md) fixes their type, so a shard whose first rows
# are all failures (None everywhere) still gets `list<int64>` for `generated_ids` instead
# of an inferred `null` column. Columns not listed are inferred and unified at read time.
# ---------------------------------------------------------------------------------------

COORDINATE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("unit_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("target_id", pa.string()),
    pa.field("source_group", pa.string()),
    pa.field("target_group", pa.string()),
    pa.field("source_level", pa.int64()),
    pa.field("target_level", pa.int64()),
    pa.field("pair_index", pa.int64()),
    pa.field("site", pa.string()),
    pa.field("mode", pa.string()),
    pa.field("layers", pa.string()),
    pa.field("tokens", pa.string()),
    pa.field("align", pa.string()),
    pa.field("alpha", pa.float64()),
    pa.field("control", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("during", pa.string()),
)

assert tuple(f.name for f in COORDINATE_FIELDS) == COORDINATE_COLUMNS, "see vocab.py"

RUNNER_FIELDS: tuple[pa.Field, ...] = (
    pa.field("status", pa.string(), nullable=False),  # ok | failed
    pa.field("error_type", pa.string()),
    pa.field("error", pa.string()),
    pa.field("attempt", pa.int64()),
    pa.field("worker", pa.string()),
    pa.field("node", pa.string()),
    pa.field("accelerator_ids", pa.list_(pa.string())),
    pa.field("seconds", pa.float64()),  # the unit's wall time on the worker / its cells
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field(DERIVED_FROM, pa.string()),  # natural twin of a row copied, not decoded
)

ENGINE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("n_target_tokens", pa.int64()),
    pa.field("n_source_tokens", pa.int64()),
    pa.field("n_patched_positions", pa.int64()),
    pa.field("n_unpatched_positions", pa.int64()),
    pa.field("patched_layers", pa.list_(pa.int64())),
    pa.field("query_position", pa.int64()),
    pa.field("rope_consistent", pa.bool_()),
    pa.field("alpha_extrapolated", pa.bool_()),
    pa.field("generated_ids", pa.list_(pa.int64())),
    pa.field("generated_text", pa.string()),
    pa.field("n_generated", pa.int64()),
    pa.field("stop_reason", pa.string()),
    pa.field("layer_early", pa.int64()),
    pa.field("layer_late", pa.int64()),
    pa.field("rv", pa.float64()),
    pa.field("pr_early", pa.float64()),
    pa.field("pr_late", pa.float64()),
    pa.field("erank_early", pa.float64()),
    pa.field("erank_late", pa.float64()),
    pa.field("rv_status", pa.string()),
    pa.field("rv_prompt", pa.float64()),
    pa.field("rv_trajectory", pa.list_(pa.float64())),
    pa.field("score_keywords", pa.float64()),
    pa.field("score_self_ref", pa.float64()),
    pa.field("score_technical", pa.float64()),
    pa.field("score_logprob_contrast", pa.float64()),
    pa.field("engine_seconds", pa.float64()),
    pa.field("generate_seconds", pa.float64()),
    pa.field("rv_window", pa.int64()),
    pa.field("rv_centered", pa.bool_()),
    pa.field("rv_prompt_status", pa.string()),
    # content-selected positions (`match:<regex>`), generation-time patches, steering
    pa.field("n_matched_positions", pa.int64()),
    pa.field("n_generation_patched_steps", pa.int64()),
    pa.field("steer_id", pa.string()),
    pa.field("steer_norm", pa.float64()),
    # next-token distribution of the first generated step
    pa.field("kl_from_natural", pa.float64()),
    pa.field("top_ids", pa.list_(pa.int64())),
    pa.field("top_logprobs", pa.list_(pa.float64())),
    pa.field("token_logprobs", pa.list_(pa.float64())),
    # layer profiles (`measure.layers`) and attention (`measure.attention`)
    pa.field("profile_layers", pa.list_(pa.int64())),
    pa.field("pr_by_layer", pa.list_(pa.float64())),
    pa.field("pr_prompt_by_layer", pa.list_(pa.float64())),
    pa.field("attn_entropy", pa.list_(pa.float64())),
    pa.field("attn_mass_prompt", pa.list_(pa.float64())),
    pa.field("attn_mass_generated", pa.list_(pa.float64())),
    pa.field("attn_mass_patched", pa.list_(pa.float64())),
)

CELL_SCHEMA = pa.schema(COORDINATE_FIELDS + RUNNER_FIELDS + ENGINE_FIELDS)
"""The declared part of a cells/ shard; extra columns are appended, their type inferred."""

FAILURE_SCHEMA = pa.schema(
    [
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("unit_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error", pa.string()),  # message + traceback
        pa.field("attempt", pa.int64()),
        pa.field("worker", pa.string()),
        pa.field("node", pa.string()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)

PROVENANCE_PACKAGES = (
    "rloop-ray",
    "ray",
    "torch",
    "transformers",
    "accelerate",
    "pyarrow",
    "numpy",
    "pandas",
    "pydantic",
)


class StoreError(RuntimeError):
    """A result directory cannot be used as asked; the message says what to do instead."""


class SweepExistsError(StoreError):
    """The sweep directory already holds results and neither resume nor overwrite was asked."""


class SpecMismatchError(StoreError):
    """`--resume` with a spec whose hash differs from the one the sweep started with."""


class ShardSchemaError(StoreError):
    """A row value does not fit the declared Arrow type of its column."""


class NotASweepError(StoreError):
    """The directory holds no rloop-ray manifest (never a sweep, or a wrong path)."""


class DamagedFileError(StoreError):
    """A shard or the manifest cannot be read; `rloop-ray repair` quarantines it."""

    def __init__(self, path: str, reason: str, *, sweep: str) -> None:
        self.path = path
        super().__init__(
            f"{path}: {reason}. Run `rloop-ray repair {sweep}` to move damaged files to "
            f"{QUARANTINE_DIR}/ (nothing is deleted); `--resume` then runs their cells again."
        )


class PlanChangedError(SpecMismatchError):
    """`--resume` with a grid that no longer expands to the recorded plan."""


class StoreWriteError(StoreError):
    """Writing to the store failed (read-only folder, full disk); nothing was corrupted."""


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """First 16 hex chars of sha256 of the spec's canonical JSON (the resume guard)."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def package_versions(names: Iterable[str] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions, read from metadata (importing torch just to ask is too slow)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(repo_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the checkout the code runs from (None outside a git tree)."""
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return {"git_sha": None, "git_dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


OBJECT_STORE_TYPES = frozenset({"s3", "gcs", "abfs"})
"""pyarrow filesystem `type_name`s whose writes publish atomically and whose `move` is a copy."""

OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
"""The same, for fsspec filesystems wrapped in a `PyFileSystem`."""


def _resolve(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path in it, from a local path or a URI.

    Local paths are made absolute (`from_uri` needs that). A URI goes to pyarrow's
    `FileSystem.from_uri` (`file://`, `s3://`, `gs://`, `hdfs://`, with options as query
    parameters, e.g. `s3://bucket/dir?endpoint_override=host:9000&scheme=http`); a scheme
    pyarrow does not know is tried with fsspec (e.g. `memory://`, `az://`) when installed.
    """
    text = os.fspath(uri)
    if "://" not in text:
        text = str(Path(text).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise
        try:
            import fsspec.core
        except ImportError:
            raise StoreError(f"{text}: pyarrow does not know this scheme: {exc}") from exc
        try:
            fs, path = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as fexc:
            raise StoreError(f"{text}: neither pyarrow nor fsspec can open it: {fexc}") from exc
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _is_object_store(fs: pafs.FileSystem) -> bool:
    """True for filesystems where a finished upload is atomic and a rename is a copy."""
    if fs.type_name in OBJECT_STORE_TYPES:
        return True
    if isinstance(fs, pafs.PyFileSystem):
        inner = getattr(fs.handler, "fs", None)
        protocol = getattr(inner, "protocol", None)
        protocols = {protocol} if isinstance(protocol, str) else set(protocol or ())
        return bool(protocols & OBJECT_STORE_PROTOCOLS)
    return False


def _table_from_rows(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows to a table: declared columns get their declared type, the others are inferred."""
    names: list[str] = []
    seen: set[str] = set()
    for field in schema:
        names.append(field.name)
        seen.add(field.name)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                names.append(key)
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for name in names:
        values = [row.get(name) for row in rows]
        idx = schema.get_field_index(name)
        declared = schema.field(idx) if idx >= 0 else None
        try:
            arr = pa.array(values, type=declared.type if declared is not None else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            where = f"declared {declared.type}" if declared is not None else "inferred"
            example = next((v for v in values if v is not None), None)
            raise ShardSchemaError(
                f"column {name!r} ({where}) cannot hold value {example!r} "
                f"of type {type(example).__name__}: {exc}"
            ) from exc
        if declared is not None and not declared.nullable and arr.null_count:
            raise ShardSchemaError(f"column {name!r} must not be null")
        arrays.append(arr)
        fields.append(declared if declared is not None else pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _dedupe(table: pa.Table) -> pa.Table:
    """One row per cell_id: an `ok` row beats a failed one, then the latest attempt wins."""
    if table.num_rows == 0:
        return table
    keys: list[tuple[str, str]] = [("cell_id", "ascending"), ("_ok", "descending")]
    tmp = table.append_column("_ok", pc.equal(table["status"], "ok").cast(pa.int8()))
    for col in ("attempt", "finished_at"):
        if col in tmp.column_names:
            keys.append((col, "descending"))
    tmp = tmp.sort_by(keys)
    ids = tmp["cell_id"].combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([True]), first.fill_null(True)])
    return tmp.filter(mask).drop_columns(["_ok"])


def _backfill_during(table: pa.Table) -> pa.Table:
    """Rows written before the `during` coordinate existed read as what they were:
    prefill patches, and `none` for natural cells (like their other point coordinates).

    The cell ids of such cells did not change (`during` enters the id only when it is not
    the prefill), so old and new rows of one cell agree after this.
    """
    if "during" not in table.column_names or table.num_rows == 0:
        return table
    column = table["during"]
    if column.null_count == 0:
        return table
    if "control" in table.column_names:
        natural = pc.fill_null(pc.equal(table["control"], NATURAL), False)
        fill = pc.if_else(natural, pa.scalar(NONE, pa.string()),
                          pa.scalar(PREFILL, pa.string()))
    else:
        fill = pa.scalar(PREFILL, pa.string())
    filled = pc.coalesce(column.cast(pa.string()), fill)
    index = table.column_names.index("during")
    return table.set_column(index, pa.field("during", pa.string()), filled)


@dataclass(frozen=True)
class ModelCounts:
    """Progress of one model of a sweep (what `rloop-ray status` shows)."""

    model: str
    planned: int | None  # None when the manifest has no plan (a sweep that never started)
    done: int
    failed: int

    @property
    def remaining(self) -> int | None:
        return None if self.planned is None else max(self.planned - self.done - self.failed, 0)


class ResultStore:
    """Handle on `results/<name>/`; constructing it does no I/O.

    `uri` is a local path or a URI (`file:///...`, `s3://bucket/...`, `gs://...`; see
    `_resolve`). With `filesystem`, `uri` is a path inside that pyarrow filesystem (for
    options a URI cannot carry, or a `SubTreeFileSystem`).
    """

    def __init__(
        self, uri: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None
    ) -> None:
        self.uri = os.fspath(uri)
        if filesystem is not None:
            self.fs, self.root = filesystem, self.uri
        else:
            self.fs, self.root = _resolve(self.uri)
        self.name = self.root.rstrip("/").rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"ResultStore({self.uri!r})"

    # -- paths and low-level I/O --------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def cells_path(self) -> str:
        return self._path(CELLS_DIR)

    @property
    def failures_path(self) -> str:
        return self._path(FAILURES_DIR)

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _atomic_write(self, path: str, write: Callable[[Any], None]) -> None:
        """Write `path` so readers see either nothing or the whole file.

        Local: temp name in the same directory (dot-prefixed, so readers ignore it),
        flush + fsync, `os.replace`, fsync of the directory. Elsewhere the file is first
        serialised into memory, so an error while writing it never reaches the filesystem
        (a stream's `close` would publish what it got). Object stores (S3, GCS, Azure)
        publish an upload atomically when it completes, and their `move` is a copy, so the
        buffer is uploaded under its final name; other filesystems (HDFS, a
        SubTreeFileSystem) get the buffer under a dot-prefixed temp name, then `move`.
        """
        parent, _, base = path.rpartition("/")
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        else:
            sink = pa.BufferOutputStream()
            write(sink)
            data = sink.getvalue()
            self.fs.create_dir(parent, recursive=True)
            if _is_object_store(self.fs):
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
                return
            tmp = f"{parent}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with self.fs.open_output_stream(tmp) as out:
                    out.write(data)
                self.fs.move(tmp, path)
            except BaseException:
                if self._exists(tmp):
                    self.fs.delete_file(tmp)
                raise

    def _shard_name(self, prefix: str) -> str:
        stamp = now_utc().strftime("%Y%m%dT%H%M%S%f")
        return f"{prefix}-{stamp}-{uuid.uuid4().hex[:8]}.parquet"

    def _write_table(self, subdir: str, table: pa.Table) -> str:
        path = self._path(subdir, self._shard_name("part"))
        self._atomic_write(path, lambda fh: pq.write_table(table, fh, compression="zstd"))
        return path

    # -- small files (manifest, plan, lease) ---------------------------------------------

    def _guard_write(self, path: str, write: Callable[[], Any]) -> Any:
        """Run a write; an OS-level failure becomes a `StoreWriteError` naming the path."""
        try:
            return write()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreWriteError(
                f"cannot write {path}: {reason}. Nothing already written was changed; "
                f"free space or fix permissions, then continue with --resume."
            ) from exc

    def read_text(self, name: str) -> str | None:
        """A small file of the sweep directory as text, None when it does not exist."""
        path = self._path(name)
        try:
            with self.fs.open_input_stream(path) as fh:
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError:
            if not self._exists(path):
                return None
            raise

    def write_text(self, name: str, text: str) -> None:
        path = self._path(name)
        data = text.encode()
        self._guard_write(path, lambda: self._atomic_write(path, lambda fh: fh.write(data)))

    def create_text(self, name: str, text: str) -> bool:
        """Create `name` only if it does not exist; False when it already did.

        Exclusive on local disks (`O_EXCL`); on object stores a check then a write, which
        is why the lease reads its document back (lease.py).
        """
        path = self._path(name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            def create() -> bool:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as fh:
                    fh.write(text.encode())
                return True
            return bool(self._guard_write(path, create))
        if self._exists(path):
            return False
        self.write_text(name, text)
        return True

    def delete(self, name: str) -> None:
        path = self._path(name)
        if self._exists(path):
            self._guard_write(path, lambda: self.fs.delete_file(path))

    def lease(self, *, ttl_seconds: float | None = None, command: str = "") -> SweepLease:
        """The single-writer lease of this directory (use as a context manager)."""
        kwargs: dict[str, Any] = {"command": command}
        if ttl_seconds is not None:
            kwargs["ttl_seconds"] = ttl_seconds
        return SweepLease(self, self.uri, **kwargs)

    # -- manifest -----------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the directory holds a sweep (a manifest)."""
        return self._exists(self._path(MANIFEST))

    def read_manifest(self) -> dict[str, Any]:
        """The manifest; `NotASweepError` without one, `DamagedFileError` if unreadable."""
        path = self._path(MANIFEST)
        text = self.read_text(MANIFEST)
        if text is None:
            raise NotASweepError(
                f"{self.uri} is not a sweep directory (no {MANIFEST}); give the folder of "
                f"one sweep, e.g. results/<name>"
            )
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DamagedFileError(path, f"not valid JSON ({exc.msg} at char {exc.pos})",
                                   sweep=self.uri) from exc
        if not isinstance(manifest, dict) or not (
            manifest.get("format") == STORE_FORMAT
            or all(k in manifest for k in LEGACY_FORMAT_KEYS)
        ):
            raise NotASweepError(f"{path} is not an rloop-ray manifest")
        return manifest

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Atomic; the version it replaces is kept as `manifest.prev.json` for `repair`."""
        previous = self.read_text(MANIFEST) if self.exists() else None
        if previous is not None:
            with contextlib.suppress(json.JSONDecodeError):
                json.loads(previous)  # never back up a torn manifest over a good one
                self.write_text(MANIFEST_PREVIOUS, previous)
        self.write_text(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(fields)
        self.write_manifest(manifest)
        return manifest

    # -- the plan -----------------------------------------------------------------------

    def read_plan(self) -> Plan | None:
        """The recorded plan, None for a sweep that has none yet (or a legacy one)."""
        path = self._path(PLAN_FILE)
        if not self._exists(path):
            return None
        try:
            with self.fs.open_input_file(path) as fh:
                table = pq.read_table(fh)
            return Plan.from_table(table)
        except (pa.ArrowException, KeyError, OSError) as exc:
            raise DamagedFileError(path, f"unreadable plan ({exc})", sweep=self.uri) from exc

    def write_plan(self, plan: Plan) -> None:
        """Record `plan` (plan.parquet) and its digest and per-model counts (manifest)."""
        path = self._path(PLAN_FILE)
        table = plan.to_table()
        self._guard_write(path, lambda: self._atomic_write(
            path, lambda fh: pq.write_table(table, fh, compression="zstd")))
        self.update_manifest(plan_digest=plan.digest, planned_cells=plan.by_model(),
                             n_planned=len(plan))

    def prepare(
        self,
        spec: Mapping[str, Any],
        *,
        plan: Plan | None = None,
        prompts: Mapping[str, str] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        extend: bool = False,
        spec_file: str | None = None,
        digest: str | None = None,
    ) -> dict[str, Any]:
        """Make the directory ready for a sweep of `spec` and return its manifest.

        New directory: a fresh manifest (and `plan`, when given). Existing sweep: `resume`
        continues it only if the grid still expands to the recorded plan (`plan.compare`);
        a changed plan is refused with the difference in words, unless `extend` asks to add
        the new cells (allowed when no planned cell disappears). Adding a model that the
        sweep does not have yet (`--resume --model NEW`) needs neither. `overwrite`
        deletes the sweep first, and only a directory that holds an rloop-ray manifest.
        `prompts` (prompt id -> text hash) lets a refusal name the prompts that changed.
        """
        digest = digest or spec_hash(spec)
        if self._exists(self.root) and not self.exists():
            self._refuse_foreign_directory(overwrite)
        if self.exists():
            if overwrite:
                self._delete_sweep()
            elif not resume:
                raise SweepExistsError(
                    f"{self.uri} already holds a sweep. Use --resume to continue it, "
                    f"--name NEW to start a new sweep next to it, or --overwrite to replace it."
                )
            else:
                return self._resume(spec, plan, prompts, digest, extend)
        elif resume:
            log.info("nothing to resume at %s; starting a new sweep", self.uri)
        self._guard_write(self.root, lambda: self.fs.create_dir(self.root, recursive=True))
        manifest: dict[str, Any] = {
            "format": STORE_FORMAT,
            "name": self.name,
            "spec": dict(spec),
            "spec_hash": digest,
            "spec_file": spec_file,
            "prompts": dict(prompts or {}),
            "created_at": _iso(now_utc()),
            "status": SWEEP_CREATED,
            "runs": [],
        }
        self.write_manifest(manifest)
        if plan is not None:
            self.write_plan(plan)
            manifest = self.read_manifest()
        return manifest

    def _refuse_foreign_directory(self, overwrite: bool) -> None:
        """A directory with files but no manifest is no sweep: never adopt or delete it."""
        selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        entries = [i.base_name for i in self.fs.get_file_info(selector)
                   if i.base_name != LOCK_FILE]
        if entries:
            shown = ", ".join(sorted(entries)[:5])
            raise NotASweepError(
                f"{self.uri} exists and holds files ({shown}) but no {MANIFEST}: it is not "
                f"an rloop-ray sweep{' and --overwrite deletes only sweeps' if overwrite else ''}"
                f". Choose another --name or --results-dir."
            )

    def _delete_sweep(self) -> None:
        """Everything in this one sweep directory except the lease we hold."""
        self.read_manifest()  # raises unless it is an rloop-ray sweep
        log.warning("overwriting existing sweep %s", self.uri)
        selector = pafs.FileSelector(self.root, recursive=False)
        for info in self.fs.get_file_info(selector):
            if info.base_name == LOCK_FILE:
                continue
            if info.type == pafs.FileType.Directory:
                self._guard_write(info.path, lambda p=info.path: self.fs.delete_dir(p))
            else:
                self._guard_write(info.path, lambda p=info.path: self.fs.delete_file(p))

    def _resume(self, spec: Mapping[str, Any], plan: Plan | None,
                prompts: Mapping[str, str] | None, digest: str, extend: bool) -> dict[str, Any]:
        manifest = self.read_manifest()
        damaged = self.damaged_files()
        if damaged:  # refused before anything starts, not after the workers loaded
            path, reason = damaged[0]
            more = f" (and {len(damaged) - 1} more damaged files)" if len(damaged) > 1 else ""
            raise DamagedFileError(path, reason + more, sweep=self.uri)
        old = self.read_plan()
        if plan is None or old is None:
            # Library use without a plan, or a sweep that never started: the spec hash guards.
            if manifest.get("spec_hash") != digest:
                raise SpecMismatchError(self._mismatch_text(manifest, spec, prompts, None))
            if plan is not None:
                self.write_plan(plan)
                manifest = self.read_manifest()
            return manifest
        change = compare(old, plan)
        if change.is_empty:
            return manifest
        if change.only_new_models and manifest.get("spec_hash") == digest:
            log.info("adding models %s to %s (%d cells)", ", ".join(change.new_models),
                     self.uri, change.n_added)
            self.write_plan(old.union(plan))
            return self.read_manifest()
        if extend and not change.n_removed:
            log.warning("extending %s by %d cells", self.uri, change.n_added)
            history = [*manifest.get("spec_history", []),
                       {"spec": manifest.get("spec"), "spec_hash": manifest.get("spec_hash"),
                        "plan_digest": manifest.get("plan_digest")}]
            self.update_manifest(spec=dict(spec), spec_hash=digest, spec_history=history,
                                 prompts={**manifest.get("prompts", {}), **(prompts or {})})
            self.write_plan(old.union(plan))
            return self.read_manifest()
        raise PlanChangedError(self._mismatch_text(manifest, spec, prompts, change,
                                                   extend=extend))

    def _mismatch_text(self, manifest: Mapping[str, Any], spec: Mapping[str, Any],
                       prompts: Mapping[str, str] | None, change: PlanChange | None,
                       *, extend: bool = False) -> str:
        lines = describe_change(
            change or PlanChange({}, {}, ()),
            old_spec=manifest.get("spec"), new_spec=spec,
            old_prompts=manifest.get("prompts") if prompts is not None else None,
            new_prompts=prompts or {},
        )
        what = "\n  ".join(lines) if lines else "(the spec hash differs)"
        if change is not None and change.n_removed:
            how = ("--extend only adds cells, and here planned cells that the grid no longer "
                   "makes would be orphaned. ")
        else:
            how = ("--extend adds the new cells to this sweep when no planned cell is "
                   "removed; ")
        return (
            f"the grid no longer matches the sweep in {self.uri}:\n  {what}\n"
            f"Resuming would mix two plans in one table. {how}--name NEW starts a new sweep "
            f"next to it; --overwrite replaces it. To add a model to this sweep, resume with "
            f"the same grid and --model NEW."
        )

    def start_run(self, *, planned: Mapping[str, int] | None = None, **info: Any
                  ) -> dict[str, Any]:
        """Record the start of one `sweep` invocation with its provenance."""
        manifest = self.read_manifest()
        run = {
            "started_at": _iso(now_utc()),
            "finished_at": None,
            "status": SWEEP_RUNNING,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "host": socket.gethostname(),
            "driver_pid": os.getpid(),
            "argv": sys.argv,
            "versions": package_versions(),
            **git_state(),
            **info,
        }
        manifest["runs"] = [*manifest.get("runs", []), run]
        if planned is not None and not manifest.get("plan_digest"):
            manifest["planned_cells"] = {**(manifest.get("planned_cells") or {}), **planned}
        manifest["status"] = SWEEP_RUNNING
        manifest.setdefault("started_at", run["started_at"])
        manifest["finished_at"] = None
        # The latest run's provenance at the top level, where a reader looks first.
        for key in ("python", "host", "versions", "git_sha", "git_dirty"):
            manifest[key] = run[key]
        self.write_manifest(manifest)
        return manifest

    def finish_run(self, status: str, **info: Any) -> dict[str, Any]:
        """Close the latest run: complete, partial, incomplete, failed or interrupted."""
        manifest = self.read_manifest()
        finished = _iso(now_utc())
        if manifest.get("runs"):
            manifest["runs"][-1].update(status=status, finished_at=finished, **info)
        manifest["status"] = status
        manifest["finished_at"] = finished
        self.write_manifest(manifest)
        return manifest

    # -- writing rows -------------------------------------------------------------------

    def write_cells(self, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """One atomic shard of cell rows; returns its path (None for no rows)."""
        if not rows:
            return None
        table = _table_from_rows(rows, CELL_SCHEMA)
        return self._guard_write(self.cells_path, lambda: self._write_table(CELLS_DIR, table))

    def write_failures(self, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """One atomic shard of failure records (`FAILURE_SCHEMA`)."""
        if not rows:
            return None
        keep = [{f.name: r.get(f.name) for f in FAILURE_SCHEMA} for r in rows]
        table = _table_from_rows(keep, FAILURE_SCHEMA)
        return self._guard_write(self.failures_path,
                                 lambda: self._write_table(FAILURES_DIR, table))

    def writer(self, *, shard_rows: int = 5000, shard_seconds: float = 30.0) -> ShardWriter:
        """A buffer that writes rows in shards of `shard_rows` rows or `shard_seconds`."""
        return ShardWriter(self, shard_rows=shard_rows, shard_seconds=shard_seconds)

    # -- reading ------------------------------------------------------------------------

    def _shard_files(self, subdir: str) -> list[str]:
        path = self._path(subdir)
        if not self._exists(path):
            return []
        selector = pafs.FileSelector(path, recursive=False)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith((".", "_"))
        )

    def _shard_problem(self, path: str, required: Sequence[str]) -> str | None:
        """Why `path` is no readable shard of ours (None when it is one)."""
        try:
            with self.fs.open_input_file(path) as fh:
                schema = pq.read_schema(fh)
        except (pa.ArrowException, OSError) as exc:
            return f"unreadable Parquet file ({str(exc).splitlines()[0]})"
        missing = [c for c in required if c not in schema.names]
        if missing:
            return f"not an rloop-ray shard (no column {', '.join(missing)})"
        return None

    def damaged_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every shard that cannot be read as ours, and a torn manifest."""
        out = []
        for subdir, required in ((CELLS_DIR, ("cell_id", "status")),
                                 (FAILURES_DIR, ("cell_id",))):
            for path in self._shard_files(subdir):
                reason = self._shard_problem(path, required)
                if reason:
                    out.append((path, reason))
        try:
            self.read_plan()
        except DamagedFileError as exc:
            out.append((exc.path, "unreadable plan"))
        text = self.read_text(MANIFEST)
        if text is not None:
            try:
                json.loads(text)
            except json.JSONDecodeError:
                out.append((self._path(MANIFEST), "torn manifest"))
        return out

    def _dataset(self, subdir: str, base: pa.Schema) -> ds.Dataset | None:
        """All shards under `subdir` with one schema unified over every shard.

        A plain `ds.dataset(dir)` takes the first shard's schema; unifying (permissive:
        null -> any, int -> float) lets shards whose inferred columns differ read together.
        A shard that cannot be read, or is not ours, raises `DamagedFileError` naming it.
        """
        files = self._shard_files(subdir)
        if not files:
            return None
        required = ("cell_id", "status") if subdir == CELLS_DIR else ("cell_id",)
        schemas = [base]
        for path in files:
            reason = self._shard_problem(path, required)
            if reason:
                raise DamagedFileError(path, reason, sweep=self.uri)
            with self.fs.open_input_file(path) as fh:
                schemas.append(pq.read_schema(fh))
        try:
            unified = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DamagedFileError(self._path(subdir), f"shards with incompatible columns "
                                   f"({exc})", sweep=self.uri) from exc
        return ds.dataset(files, format="parquet", filesystem=self.fs, schema=unified)

    def _planned_filter(self, table: pa.Table, plan: Plan | None) -> tuple[pa.Table, int]:
        """Rows of planned cells only, and how many rows of other plans were dropped."""
        if plan is None or table.num_rows == 0:
            return table, 0
        keep = pc.is_in(table["cell_id"], value_set=pa.array(list(plan.ids), pa.string()))
        kept = table.filter(keep)
        return kept, table.num_rows - kept.num_rows

    def _read_rows(self, columns: Sequence[str] | None, dedupe: bool, planned_only: bool
                   ) -> tuple[pa.Table, int, int]:
        """(table, rows before dedupe, stale rows excluded)."""
        dataset = self._dataset(CELLS_DIR, CELL_SCHEMA)
        if dataset is None:
            empty = (
                CELL_SCHEMA
                if columns is None
                else pa.schema(
                    [CELL_SCHEMA.field(c) for c in columns if CELL_SCHEMA.get_field_index(c) >= 0]
                )
            )
            return empty.empty_table(), 0, 0
        cols = None
        if columns is not None:
            needed = ["cell_id", "status", "attempt", "finished_at"] if dedupe else ["cell_id"]
            if "during" in columns:
                needed.append("control")  # to backfill old rows (`_backfill_during`)
            cols = list(dict.fromkeys([*columns, *needed]))
        try:
            table = dataset.to_table(columns=cols)
        except (pa.ArrowException, OSError) as exc:
            raise DamagedFileError(self.cells_path, f"a shard failed to read ({exc})",
                                   sweep=self.uri) from exc
        table = _backfill_during(table)
        stale = 0
        if planned_only:
            table, stale = self._planned_filter(table, self.read_plan())
        n_rows = table.num_rows
        if dedupe:
            table = _dedupe(table)
        if columns is not None:
            table = table.select(list(columns))
        return table, n_rows, stale

    def read_cells(self, columns: Sequence[str] | None = None, *, dedupe: bool = True,
                   planned_only: bool = True) -> pa.Table:
        """The cells table: one row per planned cell_id (`dedupe=False`: every attempt).

        `planned_only=False` also returns rows of cells outside the recorded plan (rows of
        an earlier plan); every analysis reads the default.
        """
        return self._read_rows(columns, dedupe, planned_only)[0]

    def read_failures(self, *, planned_only: bool = True) -> pa.Table:
        """Every failed attempt, with its traceback (not deduped: attempts are history)."""
        dataset = self._dataset(FAILURES_DIR, FAILURE_SCHEMA)
        if dataset is None:
            return FAILURE_SCHEMA.empty_table()
        try:
            table = dataset.to_table()
        except (pa.ArrowException, OSError) as exc:
            raise DamagedFileError(self.failures_path, f"a shard failed to read ({exc})",
                                   sweep=self.uri) from exc
        if planned_only:
            table, _ = self._planned_filter(table, self.read_plan())
        return table

    def read_sweep(self) -> SweepTables:
        """Manifest, planned cells (deduped), their failures and what was left out."""
        manifest = self.read_manifest()
        plan = self.read_plan()
        cells, n_rows, stale = self._read_rows(None, True, True)
        planned = plan.by_model() if plan is not None else (
            {str(k): int(v) for k, v in (manifest.get("planned_cells") or {}).items()} or None)
        local = Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None
        return SweepTables(manifest=manifest, cells=cells, failures=self.read_failures(),
                           planned=planned, n_attempt_rows=n_rows, n_stale_rows=stale,
                           has_plan=plan is not None, local_dir=local)

    def stale_row_count(self) -> int:
        """Rows in cells/ of cells that the recorded plan does not have (excluded)."""
        return self._read_rows(["cell_id"], False, True)[2]

    def _status_by_cell(self) -> pa.Table:
        return self.read_cells(["cell_id", "status", "attempt"])

    def done_cell_ids(self) -> set[str]:
        """Planned cells with an `ok` row: never run again."""
        t = self._status_by_cell()
        return set(t.filter(pc.equal(t["status"], STATUS_OK))["cell_id"].to_pylist())

    def failed_cell_ids(self) -> set[str]:
        """Planned cells whose every recorded attempt failed (a resume retries them)."""
        t = self._status_by_cell()
        return set(t.filter(pc.not_equal(t["status"], STATUS_OK))["cell_id"].to_pylist())

    def attempts(self) -> dict[str, int]:
        """Highest attempt number recorded per cell, so a retry continues the count."""
        t = self.read_cells(["cell_id", "attempt"], dedupe=False)
        if t.num_rows == 0:
            return {}
        g = t.group_by("cell_id").aggregate([("attempt", "max")])
        return dict(zip(g["cell_id"].to_pylist(), g["attempt_max"].to_pylist(), strict=True))

    def counts(self) -> list[ModelCounts]:
        """Done / failed / remaining per model of the plan (rows of other plans left out)."""
        plan = self.read_plan()
        if plan is not None:
            planned: dict[str, int] = plan.by_model()
        else:
            planned = dict(self.read_manifest().get("planned_cells") or {})
        t = self.read_cells(["cell_id", "model", "status"])
        done: dict[str, int] = {}
        failed: dict[str, int] = {}
        for model, status in zip(t["model"].to_pylist(), t["status"].to_pylist(), strict=True):
            bucket = done if status == STATUS_OK else failed
            bucket[model] = bucket.get(model, 0) + 1
        models = list(dict.fromkeys([*planned, *done, *failed]))
        return [ModelCounts(m, planned.get(m), done.get(m, 0), failed.get(m, 0)) for m in models]

    # -- recovery -----------------------------------------------------------------------

    def repair(self) -> RepairReport:
        """Quarantine damaged or foreign shards, restore a torn manifest; delete nothing.

        The plan is the truth, so a cell whose only row was in a quarantined shard is
        simply not done any more: the next `--resume` runs it again, and every planned
        cell ends up exactly once. A torn manifest is restored from `manifest.prev.json`
        (the version before its last update); without one the repair says so.
        """
        moved: list[tuple[str, str]] = []
        restored = False
        problems: list[str] = []
        stamp = now_utc().strftime("%Y%m%dT%H%M%S")
        for path, reason in self.damaged_files():
            base = path.rsplit("/", 1)[-1]
            if base == MANIFEST:
                prev = self.read_text(MANIFEST_PREVIOUS)
                try:
                    json.loads(prev or "")
                except json.JSONDecodeError:
                    problems.append(f"{path}: torn and no readable {MANIFEST_PREVIOUS}; start "
                                    f"the sweep again with --overwrite")
                    continue
                self._quarantine(path, f"{stamp}-{base}")
                self.write_text(MANIFEST, prev or "")
                restored = True
                continue
            sub = path.rsplit("/", 2)[-2]
            self._quarantine(path, f"{stamp}-{sub}-{base}")
            moved.append((path, reason))
        return RepairReport(moved=moved, manifest_restored=restored, problems=problems)

    def _quarantine(self, path: str, new_name: str) -> None:
        target = self._path(QUARANTINE_DIR, new_name)
        self._guard_write(target, lambda: self.fs.create_dir(self._path(QUARANTINE_DIR),
                                                              recursive=True))
        self._guard_write(target, lambda: self.fs.move(path, target))


@dataclass(frozen=True)
class SweepTables:
    """A sweep read back through the store: what every reader (status, stats) starts from."""

    manifest: dict[str, Any]
    cells: pa.Table
    """One row per planned cell that has a row: `ok` beats failed, then the latest attempt."""
    failures: pa.Table
    """Failure records of planned cells, every attempt."""
    planned: dict[str, int] | None
    """Planned cells per model (None: a legacy manifest without a plan)."""
    n_attempt_rows: int
    """Rows of planned cells before dedupe (retries and resumes add rows)."""
    n_stale_rows: int
    """Rows of cells that are not in the plan (an earlier plan); excluded from `cells`."""
    has_plan: bool
    local_dir: Path | None
    """The sweep folder on local disk; None on object stores."""

    @property
    def n_planned(self) -> int | None:
        return None if self.planned is None else sum(self.planned.values())


@dataclass(frozen=True)
class RepairReport:
    moved: list[tuple[str, str]]
    """(original path, reason) of every file moved to quarantine/."""
    manifest_restored: bool
    problems: list[str]


class ShardWriter:
    """Rows buffered into shards: at `shard_rows` rows, or when the oldest is `shard_seconds` old.

    Cells are written before their failure records, so a crash between the two leaves a
    failed cell that resume retries, never a failure record without its row.
    """

    def __init__(self, store: ResultStore, *, shard_rows: int, shard_seconds: float) -> None:
        self.store = store
        self.shard_rows = shard_rows
        self.shard_seconds = shard_seconds
        self._cells: list[dict[str, Any]] = []
        self._failures: list[dict[str, Any]] = []
        self._oldest: float | None = None

    def __len__(self) -> int:
        return len(self._cells)

    def add(self, row: dict[str, Any]) -> None:
        self._cells.append(row)
        if row.get("status") != STATUS_OK:
            self._failures.append(row)
        if self._oldest is None:
            self._oldest = time.monotonic()
        if len(self._cells) >= self.shard_rows:
            self.flush()

    def maybe_flush(self) -> None:
        if self._oldest is not None and time.monotonic() - self._oldest >= self.shard_seconds:
            self.flush()

    def flush(self) -> None:
        if self._cells:
            self.store.write_cells(self._cells)
            self._cells = []
        if self._failures:
            self.store.write_failures(self._failures)
            self._failures = []
        self._oldest = None

    def discard(self) -> int:
        """Drop what is buffered (after a write error); those cells stay to be run."""
        n = len(self._cells)
        self._cells, self._failures, self._oldest = [], [], None
        return n
