"""rloop-ray: exact, resumable sweeps of KV-cache and activation interventions on Ray."""

__version__ = "0.1.0"
