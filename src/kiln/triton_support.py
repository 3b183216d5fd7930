"""Optional Triton, and the integer helpers its launches need; shared by kernels and plugins.

Modules that define Triton kernels at import time take ``triton``/``tl`` from here: with Triton
missing they get stand-ins whose ``jit`` leaves the function alone, so the module still imports
and only its Triton tactic fails, with a sentence. Triton decides interpreted (TRITON_INTERPRET)
versus compiled when a kernel is defined, i.e. when the module that defines it is imported.
NOTE: this module must not import torch (``kiln --help`` and the viewer import it indirectly).
"""
from __future__ import annotations

import os
from typing import Any

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # Triton is optional: without it only the torch tactics exist.
    HAS_TRITON = False

    class _Stub:
        constexpr = None

        @staticmethod
        def jit(fn: Any = None, **kwargs: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "cdiv", "interpreting", "next_pow2", "tl", "triton"]


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter, read at call time with Triton's own rule
    (TRITON_INTERPRET is 1, true, on or yes, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cdiv(a: int, b: int) -> int:
    """a / b rounded up (a launch grid's size)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
