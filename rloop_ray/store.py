"""Result store of one sweep: `results/<name>/` with a manifest, Parquet shards and failures.

The store is what makes a sweep resumable and its rows trustworthy: every shard is written
to a temporary name and renamed (a crash never leaves half a shard), the coordinate and
runner columns have an explicit Arrow schema, readers dedupe by `cell_id`, and the manifest
pins the spec (by hash) so a resume can never mix two different grids in one table.

Layout (DESIGN §4)::

    results/<name>/manifest.json      spec, spec hash, versions, git sha, runs, status
    results/<name>/cells/*.parquet    one row per cell attempt (readers keep one per cell_id)
    results/<name>/failures/*.parquet error type + traceback per failed attempt

All file access goes through `pyarrow.fs` (`FileSystem.from_uri`), so the store may live
on a shared or object-store URI (`s3://`, `gs://`, `file://`; other fsspec protocols such as
`memory://` through `FSSpecHandler`) where every driver, on any node or a later cluster,
sees the same rows. How a shard is made atomic depends on the filesystem
(`_atomic_write`): local paths get temp + fsync + rename, object stores a single PUT of
the fully serialised file (an object appears whole when its upload completes), other
filesystems (HDFS, a SubTreeFileSystem) temp + `move`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
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

RUNNER_COLUMNS = frozenset({
    "attempt", "worker", "node", "accelerator_ids", "seconds", "finished_at",
    "engine_seconds", "generate_seconds",
})
"""Where, when and how fast a cell ran: they differ between runs of the same cell, so
comparisons of a rerun or a resume with the original leave them out."""

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CELLS_DIR = "cells"
FAILURES_DIR = "failures"

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
)

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

    # -- manifest -----------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the directory holds a sweep (a manifest)."""
        return self._exists(self._path(MANIFEST))

    def read_manifest(self) -> dict[str, Any]:
        path = self._path(MANIFEST)
        if not self._exists(path):
            raise StoreError(f"{self.uri} is not a sweep directory (no {MANIFEST})")
        with self.fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode())

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        self._atomic_write(self._path(MANIFEST), lambda fh: fh.write(data))

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(fields)
        self.write_manifest(manifest)
        return manifest

    def prepare(
        self,
        spec: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        spec_file: str | None = None,
        digest: str | None = None,
    ) -> dict[str, Any]:
        """Make the directory ready for a sweep of `spec` and return its manifest.

        New directory: write a fresh manifest. Existing one: `resume` continues it (the spec
        hash must match), `overwrite` deletes it first, neither is refused. The refusals say
        how to start a new sweep instead, because silently mixing two grids in one table is
        the failure this guard exists for. `digest` overrides the hash (`SweepSpec.spec_hash`).
        """
        digest = digest or spec_hash(spec)
        if self.exists():
            if overwrite:
                log.warning("overwriting existing sweep %s", self.uri)
                self.fs.delete_dir(self.root)
            elif not resume:
                raise SweepExistsError(
                    f"{self.uri} already holds a sweep. Use --resume to continue it, "
                    f"--name NEW to start a new sweep next to it, or --overwrite to replace it."
                )
            else:
                manifest = self.read_manifest()
                if manifest.get("spec_hash") != digest:
                    raise SpecMismatchError(
                        f"the spec has changed since {self.uri} was started "
                        f"(manifest spec_hash {manifest.get('spec_hash')}, now {digest}); "
                        f"resuming would mix two grids in one table. Start a new sweep "
                        f"with --name NEW, or replace this one with --overwrite."
                    )
                return manifest
        elif resume:
            log.info("nothing to resume at %s; starting a new sweep", self.uri)
        self.fs.create_dir(self.root, recursive=True)
        manifest: dict[str, Any] = {
            "name": self.name,
            "spec": dict(spec),
            "spec_hash": digest,
            "spec_file": spec_file,
            "created_at": _iso(now_utc()),
            "status": "created",
            "runs": [],
        }
        self.write_manifest(manifest)
        return manifest

    def start_run(self, *, planned: Mapping[str, int], **info: Any) -> dict[str, Any]:
        """Record the start of one `sweep` invocation with its provenance (habit 6)."""
        manifest = self.read_manifest()
        run = {
            "started_at": _iso(now_utc()),
            "finished_at": None,
            "status": "running",
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
        # Merged, not replaced: a run restricted to some models keeps the others' plan.
        manifest["planned_cells"] = {**(manifest.get("planned_cells") or {}), **planned}
        manifest["status"] = "running"
        manifest.setdefault("started_at", run["started_at"])
        manifest["finished_at"] = None
        # The latest run's provenance at the top level, where a reader looks first.
        for key in ("python", "host", "versions", "git_sha", "git_dirty"):
            manifest[key] = run[key]
        self.write_manifest(manifest)
        return manifest

    def finish_run(self, status: str, **info: Any) -> dict[str, Any]:
        """Close the latest run: `complete`, `failed` (cells failed) or `interrupted`."""
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
        return self._write_table(CELLS_DIR, _table_from_rows(rows, CELL_SCHEMA))

    def write_failures(self, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """One atomic shard of failure records (`FAILURE_SCHEMA`)."""
        if not rows:
            return None
        keep = [{f.name: r.get(f.name) for f in FAILURE_SCHEMA} for r in rows]
        return self._write_table(FAILURES_DIR, _table_from_rows(keep, FAILURE_SCHEMA))

    # -- reading ------------------------------------------------------------------------

    def _dataset(self, subdir: str, base: pa.Schema) -> ds.Dataset | None:
        """All shards under `subdir` with one schema unified over every shard.

        A plain `ds.dataset(dir)` takes the first shard's schema; unifying (permissive:
        null -> any, int -> float) lets shards whose inferred columns differ read together.
        """
        path = self._path(subdir)
        if not self._exists(path):
            return None
        selector = pafs.FileSelector(path, recursive=False)
        files = sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith((".", "_"))
        )
        if not files:
            return None
        dataset = ds.dataset(files, format="parquet", filesystem=self.fs)
        schemas = [base] + [frag.physical_schema for frag in dataset.get_fragments()]
        unified = pa.unify_schemas(schemas, promote_options="permissive")
        return ds.dataset(files, format="parquet", filesystem=self.fs, schema=unified)

    def read_cells(self, columns: Sequence[str] | None = None, *, dedupe: bool = True) -> pa.Table:
        """The cells table, one row per cell_id unless `dedupe=False` (every attempt)."""
        dataset = self._dataset(CELLS_DIR, CELL_SCHEMA)
        if dataset is None:
            empty = (
                CELL_SCHEMA
                if columns is None
                else pa.schema(
                    [CELL_SCHEMA.field(c) for c in columns if CELL_SCHEMA.get_field_index(c) >= 0]
                )
            )
            return empty.empty_table()
        cols = None
        if columns is not None:
            needed = ["cell_id", "status", "attempt", "finished_at"] if dedupe else []
            cols = list(dict.fromkeys([*columns, *needed]))
        table = dataset.to_table(columns=cols)
        if dedupe:
            table = _dedupe(table)
        if columns is not None:
            table = table.select(list(columns))
        return table

    def read_failures(self) -> pa.Table:
        """Every failed attempt, with its traceback (not deduped: attempts are history)."""
        dataset = self._dataset(FAILURES_DIR, FAILURE_SCHEMA)
        if dataset is None:
            return FAILURE_SCHEMA.empty_table()
        return dataset.to_table()

    def _status_by_cell(self) -> pa.Table:
        return self.read_cells(["cell_id", "status", "attempt"])

    def done_cell_ids(self) -> set[str]:
        """Cells with an `ok` row: never run again."""
        t = self._status_by_cell()
        return set(t.filter(pc.equal(t["status"], "ok"))["cell_id"].to_pylist())

    def failed_cell_ids(self) -> set[str]:
        """Cells whose every recorded attempt failed (a resume retries them by default)."""
        t = self._status_by_cell()
        return set(t.filter(pc.not_equal(t["status"], "ok"))["cell_id"].to_pylist())

    def attempts(self) -> dict[str, int]:
        """Highest attempt number recorded per cell, so a retry continues the count."""
        t = self.read_cells(["cell_id", "attempt"], dedupe=False)
        if t.num_rows == 0:
            return {}
        g = t.group_by("cell_id").aggregate([("attempt", "max")])
        return dict(zip(g["cell_id"].to_pylist(), g["attempt_max"].to_pylist(), strict=True))

    def counts(self) -> list[ModelCounts]:
        """Done / failed / remaining per model (planned counts come from the manifest)."""
        planned: dict[str, int] = {}
        if self.exists():
            planned = dict(self.read_manifest().get("planned_cells") or {})
        t = self.read_cells(["cell_id", "model", "status"])
        done: dict[str, int] = {}
        failed: dict[str, int] = {}
        for model, status in zip(t["model"].to_pylist(), t["status"].to_pylist(), strict=True):
            bucket = done if status == "ok" else failed
            bucket[model] = bucket.get(model, 0) + 1
        models = list(dict.fromkeys([*planned, *done, *failed]))
        return [ModelCounts(m, planned.get(m), done.get(m, 0), failed.get(m, 0)) for m in models]
