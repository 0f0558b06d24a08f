"""CLI commands: stats (to be filled)."""

from rloop_ray.cli._app import app  # noqa: F401
