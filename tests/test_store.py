"""The result store: manifest and resume guard, atomic shards, explicit schema, dedupe."""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pytest

from rloop_ray.store import (
    CELL_SCHEMA,
    ResultStore,
    ShardSchemaError,
    SpecMismatchError,
    StoreWriteError,
    SweepExistsError,
    spec_hash,
)

SPEC = {"name": "t", "models": ["m"], "alpha": [0.0, 1.0]}


def row(cell_id: str, status: str = "ok", attempt: int = 1, **extra: object) -> dict:
    out = {
        "cell_id": cell_id,
        "unit_id": "u",
        "model": "m",
        "alpha": 0.5,
        "status": status,
        "attempt": attempt,
        "worker": "w0",
        "finished_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        + dt.timedelta(seconds=attempt),
        "generated_ids": None if status != "ok" else [1, 2, 3],
        "rv": None if status != "ok" else 0.9,
    }
    if status != "ok":
        out.update(error_type="Boom", error="Traceback ...\nBoom: bad cell")
    out.update(extra)
    return out


@pytest.fixture
def store(tmp_path) -> ResultStore:
    s = ResultStore(tmp_path / "sweep")
    s.prepare(SPEC)
    return s


def test_prepare_writes_manifest_with_hash(store):
    m = store.read_manifest()
    assert m["spec"] == SPEC
    assert m["spec_hash"] == spec_hash(SPEC)
    assert m["name"] == "sweep"
    assert m["status"] == "created"


def test_existing_sweep_refused_without_resume(store):
    with pytest.raises(SweepExistsError, match="--resume") as info:
        ResultStore(store.uri).prepare(SPEC)
    assert "--name" in str(info.value) and "--overwrite" in str(info.value)


def test_resume_with_same_spec_keeps_rows(store):
    store.write_cells([row("a")])
    ResultStore(store.uri).prepare(dict(SPEC), resume=True)
    assert store.done_cell_ids() == {"a"}


def test_resume_with_changed_spec_is_refused_with_a_way_out(store):
    changed = {**SPEC, "alpha": [0.0, 0.5, 1.0]}
    with pytest.raises(SpecMismatchError) as info:
        ResultStore(store.uri).prepare(changed, resume=True)
    msg = str(info.value)
    assert "--name" in msg and "--overwrite" in msg
    assert "grid field alpha: [0.0, 1.0] -> [0.0, 0.5, 1.0]" in msg, msg  # what changed, in words


def test_overwrite_starts_fresh(store):
    store.write_cells([row("a")])
    changed = {**SPEC, "alpha": [2.0]}
    m = ResultStore(store.uri).prepare(changed, overwrite=True)
    assert m["spec_hash"] == spec_hash(changed)
    assert store.done_cell_ids() == set()


def test_explicit_digest_overrides_hash(tmp_path):
    s = ResultStore(tmp_path / "x")
    assert s.prepare(SPEC, digest="abc")["spec_hash"] == "abc"
    s.prepare(SPEC, resume=True, digest="abc")
    with pytest.raises(SpecMismatchError):
        s.prepare(SPEC, resume=True)


def test_runs_record_provenance(store):
    store.start_run(planned={"m": 3}, note="x")
    m = store.finish_run("complete", cells_ok=3)
    run = m["runs"][-1]
    assert run["status"] == "complete" and run["cells_ok"] == 3 and run["note"] == "x"
    assert run["finished_at"] and run["started_at"] and run["host"]
    assert run["versions"]["pyarrow"] == pa.__version__
    assert "git_sha" in m and "python" in m
    assert m["planned_cells"] == {"m": 3} and m["status"] == "complete"
    store.start_run(planned={"other": 2})
    assert store.read_manifest()["planned_cells"] == {"m": 3, "other": 2}


def test_shard_schema_is_explicit_even_when_all_values_are_null(store):
    path = store.write_cells([row("a", status="failed"), row("b", status="failed")])
    assert path.endswith(".parquet")
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    assert schema.field("generated_ids").type == pa.list_(pa.int64())
    assert schema.field("rv").type == pa.float64()
    assert schema.field("alpha").type == pa.float64()
    assert schema.field("source_level").type == pa.int64()
    assert schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert schema.names[: len(CELL_SCHEMA)] == CELL_SCHEMA.names


def test_extra_columns_are_inferred_and_unified_across_shards(store):
    store.write_cells([row("a", custom=None)])  # inferred null
    store.write_cells([row("b", custom=1.5)])  # inferred double
    t = store.read_cells()
    assert t.schema.field("custom").type == pa.float64()
    assert sorted(t["cell_id"].to_pylist()) == ["a", "b"]


def test_bad_value_names_the_column(store):
    with pytest.raises(ShardSchemaError, match="generated_ids"):
        store.write_cells([row("a", generated_ids="not a list")])
    with pytest.raises(ShardSchemaError, match="cell_id"):
        store.write_cells([row(None)])  # type: ignore[arg-type]


def test_write_is_atomic_and_leaves_no_temp_files(store, monkeypatch):
    store.write_cells([row("a")])
    import pyarrow.parquet as pq

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(StoreWriteError, match="disk full.*--resume"):
        store.write_cells([row("b")])
    monkeypatch.undo()
    names = os.listdir(store.cells_path)
    assert len(names) == 1 and not any(n.startswith(".") for n in names)
    assert store.done_cell_ids() == {"a"}


def test_readers_ignore_leftover_temp_files(store):
    store.write_cells([row("a")])
    with open(os.path.join(store.cells_path, ".part-x.parquet.1234.tmp"), "wb") as fh:
        fh.write(b"PAR1 half a shard")
    assert store.done_cell_ids() == {"a"}


def test_dedupe_prefers_ok_then_latest_attempt(store):
    store.write_cells([row("a", status="failed", attempt=1), row("b", status="failed")])
    store.write_cells([row("a", status="ok", attempt=2)])
    store.write_cells([row("c", status="failed", attempt=1)])
    store.write_cells([row("c", status="failed", attempt=2, error="second")])
    t = store.read_cells()
    assert t.num_rows == 3
    by_id = {r["cell_id"]: r for r in t.to_pylist()}
    assert by_id["a"]["status"] == "ok" and by_id["a"]["attempt"] == 2
    assert by_id["c"]["error"] == "second"
    assert store.read_cells(dedupe=False).num_rows == 5
    assert store.done_cell_ids() == {"a"}
    assert store.failed_cell_ids() == {"b", "c"}
    assert store.attempts() == {"a": 2, "b": 1, "c": 2}


def test_read_selected_columns(store):
    store.write_cells([row("a"), row("b", status="failed")])
    t = store.read_cells(["cell_id", "rv"])
    assert t.column_names == ["cell_id", "rv"] and t.num_rows == 2


def test_empty_store_reads_empty(store):
    assert store.read_cells().num_rows == 0
    assert store.read_failures().num_rows == 0
    assert store.done_cell_ids() == set() and store.failed_cell_ids() == set()


def test_failures_keep_every_attempt_with_traceback(store):
    store.write_failures([row("a", status="failed", attempt=1)])
    store.write_failures([row("a", status="failed", attempt=2)])
    f = store.read_failures()
    assert f.num_rows == 2
    assert set(f.column_names) >= {"cell_id", "error_type", "error", "attempt", "worker"}
    assert "Traceback" in f["error"][0].as_py()


def test_counts_per_model(store):
    store.start_run(planned={"m": 4, "n": 2})
    store.write_cells([row("a"), row("b", status="failed"), row("c", model="n")])
    counts = {c.model: c for c in store.counts()}
    assert (counts["m"].done, counts["m"].failed, counts["m"].remaining) == (1, 1, 2)
    assert (counts["n"].done, counts["n"].failed, counts["n"].remaining) == (1, 0, 1)


def test_manifest_is_plain_json(store):
    with open(os.path.join(store.root, "manifest.json")) as fh:
        assert json.load(fh)["spec_hash"] == spec_hash(SPEC)
