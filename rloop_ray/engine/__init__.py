"""Everything that touches torch. A plain Python object (`Engine`), usable without Ray.

The engine's steps compose: `Engine.encode` -> `PromptState`, `Engine.patch` ->
`PatchedState`, `Engine.generate` -> `Generation`; `Engine.run` runs whole cells.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rloop_ray.engine.runner import CellError, Engine
    from rloop_ray.engine.states import PatchedState, PromptState
    from rloop_ray.engine.types import Generation

__all__ = ["CellError", "Engine", "Generation", "PatchedState", "PromptState"]

_LAZY = {"Engine": "rloop_ray.engine.runner", "CellError": "rloop_ray.engine.runner",
         "PatchedState": "rloop_ray.engine.states", "PromptState": "rloop_ray.engine.states",
         "Generation": "rloop_ray.engine.types"}


def __getattr__(name: str):  # lazy: importing the package must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
