"""Command-line interface `rloop-ray`: the only part of the package that prints."""

from rloop_ray.cli import measure, stats, sweep, validate  # noqa: F401  (register commands)
from rloop_ray.cli._app import app

__all__ = ["app"]
