"""Shared pytest fixtures.

The tiny builtin models are built once per test session into a private temporary
cache, so tests exercise the build + `from_pretrained` path from scratch and never
depend on (or write to) the user's `~/.cache/rloop-ray`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _build_tiny(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    from rloop_ray.engine import models

    root = tmp_path_factory.getbasetemp() / "rloop-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(models.CACHE_ENV, str(root))
        return models.builtin_path(name)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the builtin `tiny-llama`, built in a session temp cache."""
    return _build_tiny(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_mistral_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the builtin `tiny-mistral` (sliding window 8), built in a session temp cache."""
    return _build_tiny(tmp_path_factory, "tiny-mistral")


@pytest.fixture(scope="session")
def tiny_gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the builtin `tiny-gemma3` (sliding/full layers), built in a session temp cache."""
    return _build_tiny(tmp_path_factory, "tiny-gemma3")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with 2 logical CPUs for one test module, shut down after it."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engines():
    """`engines(name)`: one `Engine` per builtin model name, loaded once per test module."""
    from rloop_ray.engine import Engine

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = Engine(name)
        return cache[name]

    return get
