"""Distribution over several nodes and several GPUs per replica, on this machine.

`ray.cluster_utils.Cluster` runs a head and more nodes on localhost, each with logical GPUs
(`num_gpus` are counters: no CUDA is needed). The NullEngine's outputs are a function of the
cell id, so "every cell exactly once, as an uninterrupted run would write it" is checked row
by row after a node is killed, a node joins, or a whole cluster goes away mid-sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rloop_ray.driver import (
    EXIT_OK,
    DriverConfig,
    DriverError,
    SweepResult,
    _default_workers,
    _node_resources,
    _replica_slots,
    _worker_cpus,
    run_sweep,
)
from rloop_ray.null_engine import NullEngineFactory, synthetic_requests, synthetic_units
from rloop_ray.store import RUNNER_COLUMNS, ResultStore

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
# Node deaths are noticed by the GCS health check: every 1 s, dead after 5 misses (the
# default is minutes; much tighter risks declaring a busy but live node dead on a loaded CI).
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 5,
}


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A localhost Ray cluster: head with 1 CPU and 1 logical GPU; tests add nodes."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 1,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH,
        },
    )
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def fresh_store(path: Path | str, spec: dict | None = None) -> ResultStore:
    store = ResultStore(path)
    store.prepare(spec or {"test": "multinode"})
    return store


def comparable(store: ResultStore) -> list[dict]:
    t = store.read_cells().sort_by("cell_id")
    return t.select([c for c in t.column_names if c not in RUNNER_COLUMNS]).to_pylist()


def assert_each_cell_once(store: ResultStore, n: int) -> None:
    ids = store.read_cells(dedupe=False)["cell_id"].to_pylist()
    assert len(ids) == n, f"{len(ids)} rows for {n} cells"
    assert len(set(ids)) == n, "a cell was written twice"


def sweep_in_thread(*args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """`run_sweep` in a thread (no SIGINT handling there), so the test can act mid-sweep."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(run_sweep(*args, **kwargs))
        except BaseException as exc:  # re-raised by the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def nodes_with_rows(store: ResultStore) -> set[str]:
    if not store.exists():
        return set()
    return {n for n in store.read_cells(["node"])["node"].to_pylist() if n}


def joined(thread: threading.Thread, out: list[Any], timeout: float = 60) -> SweepResult:
    thread.join(timeout)
    assert not thread.is_alive(), "the sweep did not finish"
    (result,) = out
    if isinstance(result, BaseException):
        raise result
    return result


# -- replica counting, without Ray ----------------------------------------------------------


def test_replicas_are_counted_per_node():
    two_single = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert _replica_slots(two_single, "GPU", 1) == 2
    assert _replica_slots(two_single, "GPU", 2) == 0  # 2 GPUs in total, but on two nodes
    assert _replica_slots([{"GPU": 4}, {"GPU": 1}, {"CPU": 8}], "GPU", 2) == 2
    assert _replica_slots([{"GPU": 1}], "GPU", 0.5) == 2  # fractional replicas share a GPU
    assert _replica_slots([{"CPU": 3}, {"CPU": 2}], "CPU", 0) == 5
    gpu = DriverConfig(gpus_per_worker=2)
    assert _default_workers(gpu, True, [{"GPU": 4}, {"GPU": 1}]) == 2
    assert _default_workers(DriverConfig(workers=7), True, two_single) == 7
    assert _default_workers(DriverConfig(cpus_per_worker=2), False, two_single) == 4
    # CPU replicas by default: one per node, each with the node's cores (torch threads)
    assert _default_workers(DriverConfig(), False, two_single) == 2
    assert _worker_cpus(DriverConfig(), False, two_single, 2) == 4.0
    assert _worker_cpus(DriverConfig(), False, [{"CPU": 2}], 2) == 1.0
    assert _worker_cpus(DriverConfig(), False, [{"CPU": 2}], 4) == 0.5  # still schedulable
    assert _worker_cpus(DriverConfig(), True, two_single, 2) == 1.0
    assert _worker_cpus(DriverConfig(cpus_per_worker=3), False, two_single, 2) == 3


# -- two nodes ------------------------------------------------------------------------------


def test_sweep_spreads_over_two_nodes_and_survives_losing_one(cluster, tmp_path):
    import ray

    node2 = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    head_id, node2_id = cluster.head_node.node_id, node2.node_id

    nodes = _node_resources()
    assert sorted(n.get("GPU", 0) for n in nodes) == [1, 1]
    assert _default_workers(DriverConfig(), True, nodes) == 2  # one 1-GPU replica per node
    refused = fresh_store(tmp_path / "two-gpu")
    with pytest.raises(DriverError, match=r"need 2 GPUs each, on one node.*per node \[1.0, 1.0\]"):
        run_sweep(
            synthetic_units(10, 10),
            refused,
            NullEngineFactory(),
            synthetic_requests,
            DriverConfig(gpus_per_worker=2, progress=False),
        )

    n_cells = 600
    store = fresh_store(tmp_path / "sweep")
    units = synthetic_units(n_cells, 10)
    barrier = tmp_path / "barrier"
    barrier.mkdir()  # no unit runs until both workers exist: both nodes get work
    factory = NullEngineFactory({"sleep_per_cell": 0.01, "start_barrier": (str(barrier), 2)})
    cfg = DriverConfig(shard_rows=10_000, shard_seconds=0.2, progress=False)  # one per GPU
    thread, out = sweep_in_thread(units, store, factory, synthetic_requests, cfg)
    wait_for(lambda: node2_id in nodes_with_rows(store), 60, "rows from the second node")
    cluster.remove_node(node2, allow_graceful=False)  # like a reclaimed spot instance
    lost_at = len(store.done_cell_ids())
    result = joined(thread, out)

    assert lost_at < n_cells, "the node was removed after the sweep ended"
    assert result.exit_code == EXIT_OK, result.message
    assert_each_cell_once(store, n_cells)
    rows = store.read_cells(["cell_id", "node", "attempt"]).to_pylist()
    by_node = {n: sum(r["node"] == n for r in rows) for n in {r["node"] for r in rows}}
    assert set(by_node) == {head_id, node2_id}, by_node
    assert by_node[head_id] > by_node[node2_id]  # the survivor did the rest
    assert any(r["attempt"] == 2 for r in rows)  # units in flight on the lost node, rerun
    workers = store.read_manifest()["runs"][-1]["workers"]
    assert {w["node"] for w in workers} == {head_id, node2_id}

    reference = fresh_store(tmp_path / "reference")
    cfg1 = DriverConfig(workers=1, use_gpus=False, shard_rows=10_000, progress=False)
    run_sweep(units, reference, NullEngineFactory(), synthetic_requests, cfg1)
    assert comparable(store) == comparable(reference)


def test_a_node_that_joins_mid_sweep_is_used_by_a_waiting_replica(cluster, tmp_path):
    """Autoscaling: a replica asked for up front waits (pending actor) until a node joins."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    n_cells = 400
    store = fresh_store(tmp_path / "sweep")
    units = synthetic_units(n_cells, 10)
    barrier = tmp_path / "barrier"
    barrier.mkdir()  # the head's replica holds its first unit until the second one exists
    factory = NullEngineFactory({"sleep_per_cell": 0.005, "start_barrier": (str(barrier), 2)})
    cfg = DriverConfig(workers=2, shard_rows=10_000, shard_seconds=0.2, progress=False)
    thread, out = sweep_in_thread(units, store, factory, synthetic_requests, cfg)
    wait_for(lambda: len(list(barrier.iterdir())) == 1, 60, "the head's replica")
    time.sleep(0.5)
    assert len(list(barrier.iterdir())) == 1  # the other one waits: no node can hold it
    late = cluster.add_node(num_cpus=1, num_gpus=1)
    result = joined(thread, out)

    assert result.exit_code == EXIT_OK, result.message
    assert_each_cell_once(store, n_cells)
    assert nodes_with_rows(store) == {cluster.head_node.node_id, late.node_id}


# -- a whole cluster preempted, resumed on a new one from the shared store ------------------


def _driver(store_uri: str, address: str, n_cells: int, log: Any) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "rloop_ray.null_engine", store_uri,
        "--cells", str(n_cells), "--unit-size", "10", "--workers", "2",
        "--address", address, "--sleep-per-cell", "0.01",
        "--shard-rows", "10000", "--shard-seconds", "0.2", "--resume",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)


@pytest.mark.slow
def test_whole_cluster_lost_mid_sweep_resumes_on_a_new_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    n_cells = 600
    shared = tmp_path / "shared"
    uri = (shared / "sweep").as_uri()  # the store both clusters' drivers use
    store = ResultStore(uri)
    head_args = {"num_cpus": 2, "num_gpus": 2, "include_dashboard": False}
    log = open(tmp_path / "driver.log", "ab")  # noqa: SIM115 - closed below
    try:
        first = Cluster(initialize_head=True, head_node_args=head_args)
        try:
            proc = _driver(uri, first.address, n_cells, log)
            wait_for(
                lambda: store.exists() and len(store.done_cell_ids()) >= 50 or proc.poll() == 0,
                150,
                "the first cluster's rows",
            )
            proc.send_signal(signal.SIGKILL)  # the head goes away: driver and all
            proc.wait(timeout=30)
        finally:
            first.shutdown()
        before = len(store.done_cell_ids())
        assert 0 < before < n_cells, before
        assert store.read_manifest()["status"] == "running"  # nobody closed that run

        second = Cluster(initialize_head=True, head_node_args=head_args)
        try:
            proc = _driver(uri, second.address, n_cells, log)
            assert proc.wait(timeout=240) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            second.shutdown()
    finally:
        log.close()

    plain = ResultStore(shared / "sweep")  # the same store by its plain path
    assert_each_cell_once(plain, n_cells)
    manifest = plain.read_manifest()
    assert manifest["status"] == "complete" and len(manifest["runs"]) == 2
    assert manifest["runs"][-1]["cells_already_done"] == before
    assert len({r["ray_address"] for r in manifest["runs"]}) == 2  # two clusters

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reference = fresh_store(tmp_path / "reference")
        cfg = DriverConfig(workers=2, use_gpus=False, shard_rows=10_000, progress=False)
        units = synthetic_units(n_cells, 10)
        run_sweep(units, reference, NullEngineFactory(), synthetic_requests, cfg)
    finally:
        ray.shutdown()
    assert comparable(plain) == comparable(reference)


# -- replicas of several GPUs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def four_gpus() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_gpu_replicas_each_hold_two_distinct_gpus(four_gpus, tmp_path):
    store = fresh_store(tmp_path / "sweep")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    factory = NullEngineFactory({"start_barrier": (str(barrier), 2)})
    cfg = DriverConfig(gpus_per_worker=2, shard_rows=1000, progress=False)  # workers: per node
    result = run_sweep(synthetic_units(100, 10), store, factory, synthetic_requests, cfg)
    assert result.exit_code == EXIT_OK
    rows = store.read_cells(["worker", "accelerator_ids"]).to_pylist()
    pinned = {r["worker"]: tuple(sorted(r["accelerator_ids"])) for r in rows}
    assert len(pinned) == 2, pinned  # 4 GPUs / 2 per replica
    assert all(len(set(ids)) == 2 for ids in pinned.values())
    assert sorted(i for ids in pinned.values() for i in ids) == ["0", "1", "2", "3"]


def test_a_two_gpu_worker_builds_a_device_map_over_its_own_gpus(four_gpus):
    import ray

    from rloop_ray.worker import GPU_MEMORY_FRACTION, SpecEngineFactory

    models = {"m": {"name_or_path": "tiny-llama", "dtype": "bfloat16", "device_map": None}}

    @ray.remote(num_gpus=2, num_cpus=0)
    def build() -> tuple[list[str], str, tuple[str, dict]]:
        class EightGiB(SpecEngineFactory):  # what torch.cuda.mem_get_info reports on a GPU
            def gpu_free_bytes(self, index: int) -> int | None:
                return 8 * 2**30

        ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return ids, visible, EightGiB(models).engine_kwargs("m")

    ids, visible, (path, kwargs) = ray.get(build.remote())
    assert len(set(ids)) == 2 and visible.split(",") == ids  # Ray narrowed CUDA to them
    assert path == "tiny-llama" and kwargs["device_map"] == "auto"
    budget = int(GPU_MEMORY_FRACTION * 8 * 2**30)
    assert kwargs["max_memory"] == {0: budget, 1: budget}  # local ordinals of those two, no cpu
    assert "device" not in kwargs and kwargs["dtype"] == "bfloat16"


def test_engine_kwargs_per_replica_shape():
    from rloop_ray.worker import SpecEngineFactory

    class NoCuda(SpecEngineFactory):
        def gpu_free_bytes(self, index: int) -> int | None:
            return None

    f = NoCuda(
        {
            "m": {"name_or_path": "org/model", "dtype": "float32", "device_map": None},
            "mapped": {"device_map": {"": 1}},
        }
    )
    assert f.engine_kwargs("m", [])[1] == {"dtype": "float32", "device": "cpu"}
    import rloop_ray.worker as worker_module

    with pytest.MonkeyPatch.context() as mp:  # one real GPU: cuda; a logical one: cpu
        mp.setattr(worker_module, "_cuda_available", lambda: True)
        assert f.engine_kwargs("m", ["3"])[1] == {"dtype": "float32", "device": "cuda"}
        mp.setattr(worker_module, "_cuda_available", lambda: False)
        assert f.engine_kwargs("m", ["3"])[1] == {"dtype": "float32", "device": "cpu"}
    two = f.engine_kwargs("m", ["2", "3"])[1]  # no CUDA to size: accelerate decides
    assert two == {"dtype": "float32", "device_map": "auto"}
    assert f.engine_kwargs("mapped", ["2", "3"]) == ("mapped", {"device_map": {"": 1}})
    with pytest.raises(KeyError, match="unknown model"):
        f.engine_kwargs("nope", [])


# -- loading through a device_map (accelerate), on CPU --------------------------------------


def test_gpu_device_map_spreads_layers_over_the_given_gpus_only(tiny_llama_path):
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    from rloop_ray.worker import gpu_device_map

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_path))
    size = compute_module_sizes(empty)[""]
    roomy = {0: size, 1: size}  # either GPU could hold it all: "auto" still balances
    device_map = gpu_device_map(str(tiny_llama_path), roomy)
    assert set(device_map.values()) == {0, 1}
    layers = {k: v for k, v in device_map.items() if ".layers." in k}
    assert layers and set(layers.values()) == {0, 1}  # whole decoder layers, never split
    assert device_map.get("model.embed_tokens", device_map.get("model")) == 0

    first_fill = gpu_device_map(str(tiny_llama_path), roomy, strategy="sequential")
    assert set(first_fill.values()) == {0}
    with pytest.raises(ValueError, match="does not fit on GPUs \\[0, 1\\].*gpus_per_replica"):
        gpu_device_map(str(tiny_llama_path), {0: size // 8, 1: size // 8})


def test_engine_loaded_through_a_device_map_runs_like_a_plain_one(tiny_llama_path):
    from rloop_ray.engine import Engine
    from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention

    requests = [
        CellRequest(
            f"c{alpha}",
            "Observe the observer observing",
            "The capital of France is",
            Intervention(alpha=alpha),
            GenerationConfig(max_new_tokens=6),
        )
        for alpha in (0.0, 1.0)
    ]
    mapped = Engine(str(tiny_llama_path), device_map={"": "cpu"})
    plain = Engine(str(tiny_llama_path), device="cpu")
    assert mapped.info()["device"] == "cpu"
    got, want = mapped.run(requests), plain.run(requests)
    assert [r["status"] for r in got] == ["ok", "ok"], got[0].get("error")
    assert [r["generated_ids"] for r in got] == [r["generated_ids"] for r in want]
    assert [r["rv"] for r in got] == [r["rv"] for r in want]
