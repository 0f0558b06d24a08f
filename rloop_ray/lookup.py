"""The message for a name missing from a registry: "Unknown X 'y'. Did you mean ...?"."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean", "unknown_message"]


def did_you_mean(name: object, choices: Iterable[object], *, n: int = 1,
                 cutoff: float = 0.6) -> str:
    """`" Did you mean 'x'?"` (up to `n` close matches) when one exists, else `""`."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def unknown_message(kind: str, name: object, available: Iterable[object], extra: str = "", *,
                    n: int = 1, cutoff: float = 0.6) -> str:
    """`"Unknown {kind} 'name'.{did you mean} Available: a, b{extra}"`."""
    avail = [str(a) for a in available]
    hint = did_you_mean(name, avail, n=n, cutoff=cutoff)
    return f"Unknown {kind} {name!r}.{hint} Available: {', '.join(avail)}{extra}"
