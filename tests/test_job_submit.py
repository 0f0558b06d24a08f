"""`rloop-ray sweep --address auto` as a Ray Job, on a local `ray start --head` cluster.

The head runs as `ray start --head --block` in a process this test owns (token auth, the
dashboard and job API on 127.0.0.1, its own temp dir and free ports), so it is stopped by
signalling that process: `ray stop` would stop every Ray cluster on the machine. The job
runs the real builtin `tiny-llama` (Engine) and writes to a `file://` results URI; `ray job
stop` (SIGTERM to the entrypoint) flushes and marks the sweep interrupted.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rloop_ray.store import ResultStore

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, rloop-ray, python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, the job API
    env: dict[str, str]  # what a client shell needs (token, PATH)
    temp_dir: Path


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, timeout: float) -> None:
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer in {timeout}s")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path: Path) -> Iterator[Head]:
    import ray

    if ray.is_initialized():  # this process is a client of the job API only
        ray.shutdown()
    temp_dir = Path(tmp_path_factory.mktemp("ray"))  # short: Ray's socket paths live here
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # the builtin tiny-llama as conftest built it, so the job's workers load, not build
        "RLOOP_CACHE": str(tiny_llama_path.parent),
    }
    dash = free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    log = open(temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(url, env["RAY_AUTH_TOKEN"], proc, timeout=120)
        yield Head(url, env, temp_dir)
    finally:
        proc.send_signal(signal.SIGTERM)  # `--block`: the head stops its own processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
            proc.wait(timeout=30)
        log.close()


def ray_job(head: Head, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", *args],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(head: Head, working_dir: Path, *entrypoint: str, wait: bool = True) -> str:
    """`ray job submit ... -- ENTRYPOINT`; returns the job's output (its logs when waited)."""
    args = ["submit", "--address", head.dashboard, "--working-dir", str(working_dir)]
    if not wait:
        args.append("--no-wait")
    done = ray_job(head, *args, "--", *entrypoint)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


GRID = """\
name: jobtiny
models: [tiny-llama]
prompts: {{bank: {bank}, conditions: [A, C], n_pairs: 1}}
interventions: {{layers: ["all"], alpha: [0.5, 1.0]}}
generation: {{max_new_tokens: 4}}
measure: {{window: 4}}
"""


@pytest.mark.slow
def test_sweep_as_a_ray_job_writes_to_the_store_uri_and_resumes(head, tmp_path):
    from typer.testing import CliRunner

    from rloop_ray.cli import app

    job_dir = tmp_path / "job"  # what --working-dir ships: the grid (the bank is absolute)
    job_dir.mkdir()
    (job_dir / "grid.yaml").write_text(GRID.format(bank=REPO / "prompts"))
    results = (tmp_path / "shared results").as_uri()
    sweep = ["rloop-ray", "sweep", "grid.yaml", "--address", "auto", "--results-dir", results]

    out = submit(head, job_dir, *sweep, "--workers", "1")
    assert "complete: 3 cells ok, 0 failed, 0 remaining" in out
    assert "succeeded" in out

    store = ResultStore(f"{results}/jobtiny")
    rows = store.read_cells().to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert all(r["n_generated"] and r["generated_text"] is not None for r in rows)
    assert len({r["node"] for r in rows}) == 1  # the head node, the job's cluster
    run = store.read_manifest()["runs"][-1]
    assert run["argv"][1:5] == ["sweep", "grid.yaml", "--address", "auto"]
    assert run["cluster_resources"]["CPU"] == 2.0
    assert run["engines"]["tiny-llama"]["n_layers"] == 4

    status = CliRunner().invoke(app, ["status", f"{results}/jobtiny"])
    assert status.exit_code == 0, status.output
    lines = {ln.split()[0]: ln.split()[1:] for ln in status.output.splitlines() if ln.strip()}
    assert lines["tiny-llama"] == ["3", "3", "0", "0"]

    again = submit(head, job_dir, *sweep, "--resume")  # a new driver, the same store
    assert "complete: 0 cells ok, 0 failed, 0 remaining, 3 already done" in again
    assert len(store.read_cells(dedupe=False)) == 3
    assert len(store.read_manifest()["runs"]) == 2


@pytest.mark.slow
def test_ray_job_stop_flushes_and_marks_the_sweep_interrupted(head, tmp_path):
    """`ray job stop` sends SIGTERM: the driver stops dispatching, writes what finished."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    store_uri = (tmp_path / "stopped").as_uri()
    driver = [
        "python", "-m", "rloop_ray.null_engine", store_uri, "--address", "auto",
        "--cells", "2000", "--unit-size", "10", "--workers", "2", "--sleep-per-cell", "0.02",
        "--shard-rows", "100000", "--shard-seconds", "600", "--resume",
    ]  # fmt: skip
    out = submit(head, job_dir, *driver, wait=False)
    job_id = next(w for w in out.split() if w.startswith("'raysubmit_")).strip("'")
    store = ResultStore(store_uri)

    def job_status() -> str:
        done = ray_job(head, "status", "--address", head.dashboard, job_id, timeout=60)
        return done.stdout + done.stderr

    def job_logs() -> str:
        done = ray_job(head, "logs", "--address", head.dashboard, job_id, timeout=60)
        return done.stdout + done.stderr

    deadline = time.monotonic() + 180
    while "ready on node" not in job_logs():  # a worker is up and takes units
        assert time.monotonic() < deadline, job_status()
        time.sleep(1)
    time.sleep(2)  # ~10 units' worth of cells finish; no shard is due before 600 s
    assert store.read_manifest()["status"] == "running" and store.done_cell_ids() == set()
    stop = ray_job(head, "stop", "--address", head.dashboard, job_id, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr

    manifest = store.read_manifest()
    assert manifest["status"] == "interrupted", json.dumps(manifest["runs"][-1])[:2000]
    done = store.done_cell_ids()
    assert 0 < len(done) < 2000  # flushed on the signal, not lost
    assert "was stopped" in job_status()


def test_sigterm_to_the_driver_is_a_clean_stop(tmp_path):
    """The same without a cluster: SIGTERM mid-sweep -> flush, `interrupted`, exit 130."""
    import ray

    from rloop_ray.driver import EXIT_INTERRUPTED, EXIT_OK, DriverConfig, run_sweep
    from rloop_ray.null_engine import NullEngineFactory, synthetic_requests, synthetic_units

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        store = ResultStore(tmp_path / "sweep")
        store.prepare({"test": "sigterm"})
        units = synthetic_units(200, 10)
        trigger = units[5].cells[0].cell_id
        factory = NullEngineFactory(
            {"sleep_per_cell": 0.01, "signal_on": (trigger, os.getpid(), signal.SIGTERM)}
        )
        cfg = DriverConfig(workers=2, shard_rows=1000, shard_seconds=60, progress=False)
        before = signal.getsignal(signal.SIGTERM)
        result = run_sweep(units, store, factory, synthetic_requests, cfg)
        assert result.exit_code == EXIT_INTERRUPTED
        assert signal.getsignal(signal.SIGTERM) is before  # restored
        assert store.read_manifest()["status"] == "interrupted"
        done = store.done_cell_ids()
        assert 20 <= len(done) < 200
        rest = run_sweep(units, store, NullEngineFactory(), synthetic_requests, cfg)
        assert rest.exit_code == EXIT_OK and rest.skipped == len(done)
        ids = store.read_cells(dedupe=False)["cell_id"].to_pylist()
        assert len(ids) == len(set(ids)) == 200
    finally:
        ray.shutdown()


def test_relative_results_dir_with_an_address_is_warned_about(tmp_path, monkeypatch):
    """Under `ray job submit` a relative --results-dir lands in the job's temporary copy."""
    from typer.testing import CliRunner

    from rloop_ray.cli import app

    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(bank=REPO / "prompts"))
    monkeypatch.chdir(tmp_path)
    ResultStore("results/jobtiny").prepare({"another": "sweep"})  # refused before Ray starts
    out = CliRunner().invoke(
        app, ["sweep", str(grid), "--address", "auto", "--results-dir", "results"]
    )
    assert out.exit_code == 2 and "already holds a sweep" in out.output
    assert "warning: --results-dir results is relative" in out.output
    assert "s3://" in out.output
