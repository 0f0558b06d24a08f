"""Forward hooks that live only inside a context manager (TransformerLens style).

Every hook registered through `hooks()` is removed in a `finally`, so an exception in
the middle of a forward pass never leaves a stale hook on a pinned model replica.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

HookFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Takes a module's output tensor (B, T, D); returns a replacement or None to keep it."""


def _wrap(fn: HookFn):
    def hook(_module: torch.nn.Module, _inputs, output):
        if isinstance(output, tuple):
            new = fn(output[0])
            return output if new is None else (new, *output[1:])
        return fn(output)

    return hook


@contextlib.contextmanager
def hooks(pairs: Sequence[tuple[torch.nn.Module, HookFn]]) -> Iterator[None]:
    """Register `fn` as a forward hook on each module for the duration of the block."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_hook(_wrap(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: torch.nn.Module) -> int:
    """Number of forward hooks currently registered anywhere in `model` (for tests)."""
    return sum(len(m._forward_hooks) for m in model.modules())
