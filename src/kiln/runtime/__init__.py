"""Run built engines: load, Engine, ExecutionContext.

``load`` reads and checks the file before torch is imported; Engine and ExecutionContext (torch)
are imported on first use.
"""
from __future__ import annotations

import importlib

from kiln.runtime.loader import load

__all__ = ["Engine", "ExecutionContext", "load"]


def __getattr__(name: str):
    if name in ("Engine", "ExecutionContext"):
        return getattr(importlib.import_module("kiln.runtime.engine"), name)
    raise AttributeError(f"module 'kiln.runtime' has no attribute {name!r}")
