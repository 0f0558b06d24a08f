"""rloop-ray: exact, resumable sweeps of KV-cache and activation interventions on Ray.

`rloop_ray.run(grid)` runs a sweep, `rloop_ray.load(path)` reads one back and
`rloop_ray.replicas(model, n)` serves encode / patch / generate from Ray actors (see
docs/python.md). They are imported on first use, so `import rloop_ray` stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["ReplicaPool", "Results", "load", "replicas", "run"]


def __getattr__(name: str) -> Any:
    if name in ("ReplicaPool", "replicas"):
        from rloop_ray import pool as _pool

        return getattr(_pool, name)
    if name in __all__:
        from rloop_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'rloop_ray' has no attribute {name!r}")
