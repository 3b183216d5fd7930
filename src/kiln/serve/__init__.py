"""Serve engines over the KServe v2 (Open Inference) protocol: HTTP and gRPC, dynamic batching,
Prometheus metrics, a model repository; ``kiln.serve.ray`` runs the same engines on Ray Serve.

Server dependencies (aiohttp, grpcio) load only when a server starts: ``pip install 'kiln[serve]'``.
Importing this package loads nothing heavy (``kiln serve --help`` stays instant).
"""
from __future__ import annotations

from typing import Any

__all__ = ["ModelOptions", "ServeConfig", "serve"]


def __getattr__(name: str) -> Any:
    if name == "ModelOptions":
        from kiln.serve.model import ModelOptions
        return ModelOptions
    if name in ("ServeConfig", "serve"):
        from kiln.serve import server
        return getattr(server, name)
    raise AttributeError(f"module 'kiln.serve' has no attribute {name!r}")
