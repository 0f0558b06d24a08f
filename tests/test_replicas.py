"""`rloop_ray.replicas`: Ray actors serving encode / patch / generate, driven interactively.

Two CPU replicas of tiny-llama on local Ray. What crosses the wire are handles, and the
result of an encode -> patch -> generate round trip must equal the same cells through
`Engine.run` in this process, token for token, wherever the pool placed each state.
"""

from __future__ import annotations

import os

import pytest

import rloop_ray
from rloop_ray.engine import Engine
from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig
from rloop_ray.pool import StateHandle

pytestmark = pytest.mark.ray

TARGETS = ["Describe the water cycle in two sentences.",
           "Explain how a bicycle stays upright when it moves.",
           "List three uses of copper in everyday life."]
SOURCE = "Observe your own process of observing as you read this sentence."
GEN = GenerationConfig(max_new_tokens=8)
MEASURE = MeasureConfig(window=4)


@pytest.fixture(scope="module")
def pool():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with rloop_ray.replicas("tiny-llama", n=2) as p:
            yield p
    finally:
        ray.shutdown()


def test_two_replicas_each_with_one_core(pool):
    infos = pool.info()
    assert len(infos) == 2 and [i["threads"] for i in infos] == [1, 1]
    assert {i["model"] for i in infos} == {"tiny-llama"}


def test_encode_patch_generate_round_trip_equals_engine_run(pool):
    targets = pool.encode(TARGETS)
    assert all(isinstance(h, StateHandle) for h in targets)
    assert {h.replica for h in targets} == {0, 1}  # spread over both replicas
    [source] = pool.encode([SOURCE])
    iv = Intervention(site="kv", layers="50%:100%", alpha=1.0)
    patched = pool.patch(targets, [source] * len(targets), [iv] * len(targets))
    assert [p.replica for p in patched] == [t.replica for t in targets]
    gens = pool.generate(patched, GEN, MEASURE)
    natural = pool.generate(targets, GEN, MEASURE)

    engine = Engine("tiny-llama")
    rows = engine.run(
        [CellRequest(f"p{i}", t, SOURCE, iv, GEN, MEASURE) for i, t in enumerate(TARGETS)]
        + [CellRequest(f"n{i}", t, None, Intervention(control="natural"), GEN, MEASURE)
           for i, t in enumerate(TARGETS)])
    assert [g.ids for g in gens + natural] == [r["generated_ids"] for r in rows]
    assert [g.text for g in gens] == [r["generated_text"] for r in rows[:3]]
    assert pool.release(patched) == len(patched)


def test_run_balances_whole_cells_and_keeps_order(pool):
    requests = [CellRequest(f"c{i}", TARGETS[i % 3], SOURCE,
                            Intervention(site="kv", alpha=a), GEN, MEASURE)
                for i, a in enumerate([0.0, 0.5, 1.0, 0.25, 0.75])]
    rows = pool.run(requests)
    assert [r["cell_id"] for r in rows] == [q.cell_id for q in requests]
    assert {r["status"] for r in rows} == {"ok"}


def test_a_released_state_is_an_error_naming_it(pool):
    [h] = pool.encode([TARGETS[0]])
    pool.release([h])
    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="not on this replica"):
        pool.generate([h], GEN, MEASURE)
