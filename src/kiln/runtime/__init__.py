"""Run built engines: Engine, ExecutionContext."""
from __future__ import annotations

from kiln.runtime.engine import Engine, ExecutionContext

__all__ = ["Engine", "ExecutionContext"]
