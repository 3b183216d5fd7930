"""Serve engines over the KServe v2 (Open Inference) protocol: HTTP and gRPC, dynamic batching,
Prometheus metrics, a model repository; ``kiln.serve.ray`` runs the same engines on Ray Serve.

Server dependencies (aiohttp, grpcio) load only when a server starts: ``pip install 'kiln[serve]'``.
"""
from __future__ import annotations

from kiln.serve.model import ModelOptions
from kiln.serve.server import ServeConfig, serve

__all__ = ["ModelOptions", "ServeConfig", "serve"]
