"""The result store on URIs: `file://`, object stores (`s3://`, `gs://`, fsspec `memory://`).

There is no S3 here, so the object-store code path is exercised through fsspec's in-memory
filesystem (`memory://`, a `PyFileSystem` that the store treats as an object store: one
upload per file, no rename) and through `file://` URIs, which go through the same
`pyarrow.fs.FileSystem.from_uri` as `s3://` and `gs://`; constructing S3 and GCS stores
(no I/O) checks that they resolve to the object-store branch.
"""

from __future__ import annotations

import os
import textwrap
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from rloop_ray.store import ResultStore, StoreError, _is_object_store

REPO = Path(__file__).resolve().parents[1]
SPEC = {"name": "uri", "models": ["m"]}


def rows(*ids: str) -> list[dict]:
    return [{"cell_id": i, "model": "m", "status": "ok", "attempt": 1} for i in ids]


def memory_uri(name: str = "sweep") -> str:
    """A fresh bucket in fsspec's process-wide in-memory filesystem."""
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/results/{name}"


def leftovers(fs: pafs.FileSystem, root: str) -> list[str]:
    """Temporary files (dot-prefixed) anywhere under root."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [i.path for i in infos if i.base_name.startswith(".")]


# -- resolution ----------------------------------------------------------------------------


def test_file_uri_and_plain_path_are_the_same_store(tmp_path):
    path = tmp_path / "res" / "sweep"
    by_uri = ResultStore(path.as_uri())  # file:///.../res/sweep
    by_path = ResultStore(path)
    assert by_uri.uri.startswith("file://")
    assert type(by_uri.fs) is type(by_path.fs) is pafs.LocalFileSystem
    assert by_uri.root == by_path.root == str(path) and by_uri.name == by_path.name == "sweep"

    by_uri.prepare(SPEC)
    by_uri.write_cells(rows("a", "b"))
    by_path.write_cells(rows("c"))
    assert by_path.done_cell_ids() == by_uri.done_cell_ids() == {"a", "b", "c"}
    assert by_path.read_manifest()["spec_hash"] == by_uri.read_manifest()["spec_hash"]
    assert ResultStore(path).prepare(SPEC, resume=True)["name"] == "sweep"


@pytest.mark.parametrize(
    ("uri", "type_name", "root"),
    [
        ("s3://bucket/results/sweep?region=us-east-1", "s3", "bucket/results/sweep"),
        (
            "s3://bucket/results/sweep?region=us-east-1&endpoint_override=127.0.0.1:9000"
            "&scheme=http",
            "s3",
            "bucket/results/sweep",
        ),
        ("gs://bucket/results/sweep", "gcs", "bucket/results/sweep"),
    ],
)
def test_cloud_uris_resolve_through_from_uri_to_the_object_store_branch(uri, type_name, root):
    store = ResultStore(uri)  # constructing does no I/O: no bucket or network needed
    assert store.fs.type_name == type_name and store.root == root and store.name == "sweep"
    assert _is_object_store(store.fs)
    assert not _is_object_store(ResultStore("/tmp/x").fs)
    assert not _is_object_store(pafs.SubTreeFileSystem("/tmp", pafs.LocalFileSystem()))


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StoreError, match="nosuchscheme"):
        ResultStore("nosuchscheme://bucket/x")


def test_results_dir_join_keeps_the_uri_query():
    from rloop_ray.api import join_uri as _join

    assert _join("results/", "kv") == "results/kv"
    assert _join("file:///shared/results", "kv") == "file:///shared/results/kv"
    assert _join("s3://b/res/?region=eu-west-1", "kv") == "s3://b/res/kv?region=eu-west-1"


# -- the object-store branch (fsspec memory://) ---------------------------------------------


def test_object_store_uri_holds_a_whole_sweep_and_a_second_handle_resumes_it():
    uri = memory_uri()
    store = ResultStore(uri)
    assert _is_object_store(store.fs)
    store.prepare(SPEC)
    store.write_cells(rows("a", "b"))
    store.write_cells([{**rows("c")[0], "status": "failed", "error_type": "Boom"}])
    store.write_failures([{"cell_id": "c", "error_type": "Boom", "error": "bad"}])
    store.start_run(planned={"m": 4})

    again = ResultStore(uri)  # another driver (a new process would see the same bucket)
    assert again.prepare(SPEC, resume=True)["status"] == "running"
    assert again.done_cell_ids() == {"a", "b"} and again.failed_cell_ids() == {"c"}
    (counts,) = again.counts()
    assert (counts.planned, counts.done, counts.failed, counts.remaining) == (4, 2, 1, 1)
    assert again.read_failures()["error"].to_pylist() == ["bad"]
    assert leftovers(again.fs, again.root) == []  # uploads only, no temp names

    again.prepare(SPEC, overwrite=True)
    assert again.done_cell_ids() == set()


def _broken_write(fh) -> None:
    fh.write(b"PAR1 half a shard")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("kind", ["local", "subtree", "memory"])
def test_a_write_that_fails_midway_leaves_nothing(tmp_path, kind):
    if kind == "local":
        store = ResultStore(tmp_path / "sweep")
    elif kind == "subtree":  # neither local nor an object store: temp name, then move
        base = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
        store = ResultStore("sweep", filesystem=base)
    else:
        store = ResultStore(memory_uri())
    store.prepare(SPEC)
    store.write_cells(rows("a"))
    target = store._path("cells", "part-broken.parquet")
    with pytest.raises(OSError, match="disk full"):
        store._atomic_write(target, _broken_write)
    assert not store._exists(target)
    assert leftovers(store.fs, store.root) == []
    assert store.done_cell_ids() == {"a"}  # readers still see only whole shards


def test_subtree_filesystem_store_is_readable_by_plain_path(tmp_path):
    base = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = ResultStore("nested/sweep", filesystem=base)
    store.prepare(SPEC)
    store.write_cells(rows("a", "b"))
    plain = ResultStore(tmp_path / "nested" / "sweep")
    assert plain.done_cell_ids() == {"a", "b"} and plain.read_manifest()["spec"] == SPEC
    assert leftovers(base, "nested") == []


# -- sweeps on a URI store, on real local Ray ----------------------------------------------


@pytest.mark.ray
def test_interrupted_sweep_on_an_object_store_resumes_exactly_once(ray_local):
    import signal

    from rloop_ray.driver import EXIT_INTERRUPTED, EXIT_OK, DriverConfig, run_sweep
    from rloop_ray.null_engine import NullEngineFactory, synthetic_requests, synthetic_units

    uri = memory_uri()
    units = synthetic_units(120, 10)
    first = ResultStore(uri)
    first.prepare(SPEC)
    trigger = units[4].cells[0].cell_id
    factory = NullEngineFactory(
        {"sleep_per_cell": 0.01, "signal_on": (trigger, os.getpid(), signal.SIGINT)}
    )
    cfg = DriverConfig(workers=2, shard_rows=1000, shard_seconds=60, progress=False)
    result = run_sweep(units, first, factory, synthetic_requests, cfg)
    assert result.exit_code == EXIT_INTERRUPTED
    done = first.done_cell_ids()
    assert 0 < len(done) < 120

    resumed = ResultStore(uri)  # a new handle, as a restarted driver would open it
    resumed.prepare(SPEC, resume=True)
    rest = run_sweep(units, resumed, NullEngineFactory(), synthetic_requests, cfg)
    assert rest.exit_code == EXIT_OK and rest.skipped == len(done)
    ids = resumed.read_cells(dedupe=False)["cell_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 120
    assert resumed.read_manifest()["status"] == "complete"
    assert leftovers(resumed.fs, resumed.root) == []


@pytest.mark.ray
def test_cli_resume_and_status_from_a_file_uri(ray_local, tmp_path, monkeypatch):
    """`--results-dir file:///...` for the sweep, a plain path for `--resume`, a URI for status."""
    from typer.testing import CliRunner

    import rloop_ray.worker
    from rloop_ray.cli import app
    from rloop_ray.grid import load_grid
    from rloop_ray.null_engine import NullEngineFactory

    failing: list[str] = []

    class FakeSpecFactory(NullEngineFactory):
        def __init__(self, models: dict) -> None:
            super().__init__({"fail_cells": list(failing)})

    monkeypatch.setattr(rloop_ray.worker, "SpecEngineFactory", FakeSpecFactory)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        textwrap.dedent(
            f"""\
            name: tiny
            models: [m1, m2]
            prompts: {{bank: {REPO / "prompts"}, conditions: [A, C], n_pairs: 2}}
            interventions: {{layers: ["all", "0:1"], alpha: [0.5, 1.0]}}
            generation: {{max_new_tokens: 4}}
            measure: {{window: 4}}
            """
        )
    )
    failing_ids = [c.cell_id for c in load_grid(grid).cells[::4]]  # 5 of 20
    failing.extend(failing_ids)
    res = tmp_path / "shared results"  # a space: the URI is percent-encoded
    uri = res.as_uri()
    runner = CliRunner()
    base = ["sweep", str(grid), "--workers", "1", "--skip-model-check"]  # m1, m2: no real models
    first = runner.invoke(app, [*base, "--results-dir", uri])
    assert first.exit_code == 1, first.output
    assert f"-> {uri}/tiny" in first.output and "15 cells ok, 5 failed" in first.output
    assert (res / "tiny" / "manifest.json").exists()  # a file URI is that directory

    failing.clear()
    resumed = runner.invoke(app, [*base, "--results-dir", str(res), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "complete: 5 cells ok" in resumed.output and "15 already done" in resumed.output

    status = runner.invoke(app, ["status", f"{uri}/tiny"])
    assert status.exit_code == 0, status.output
    lines = {ln.split()[0]: ln.split()[1:] for ln in status.output.splitlines() if ln.strip()}
    assert lines["total"] == ["20", "20", "0", "0"]
    attempts = ResultStore(f"{uri}/tiny").read_cells(dedupe=False).to_pylist()
    ok = [r["cell_id"] for r in attempts if r["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 20  # every cell once; the 5 failed attempts are history
    assert sorted(r["cell_id"] for r in attempts if r["status"] != "ok") == sorted(failing_ids)
