"""Everything that touches torch. A plain Python object (`Engine`), usable without Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rloop_ray.engine.runner import Engine

__all__ = ["Engine"]


def __getattr__(name: str):  # lazy: importing the package must not import torch
    if name == "Engine":
        from rloop_ray.engine.runner import Engine

        return Engine
    raise AttributeError(name)
