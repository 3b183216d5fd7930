"""Implementations ("tactics") of every layer kind; torch on CPU and CUDA, Triton where it wins."""
from __future__ import annotations

from kiln.kernels.registry import TACTICS, KernelContext, Tactic, get_tactic, plain_first, tactic, tactics_for

__all__ = ["TACTICS", "KernelContext", "Tactic", "get_tactic", "plain_first", "tactic", "tactics_for"]
