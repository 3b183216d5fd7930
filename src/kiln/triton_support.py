"""Optional, deferred Triton, and the integer helpers its launches need; shared by kernels and plugins.

Modules that define Triton kernels take ``triton``/``tl`` from here and decorate with ``@triton.jit``.
Triton itself is imported only when a kernel is first used (launched, or any attribute read): a CPU
build or run that never launches one does not import it. Until then ``@triton.jit`` keeps the function
in a ``DeferredKernel``; the first use imports Triton, turns every deferred function into Triton's own
(``triton.jit``, which decides interpreted versus compiled from TRITON_INTERPRET at that moment) and
rebinds, in each defining module, ``triton``/``tl`` to the real modules and each deferred kernel to its
Triton function, as if Triton had been imported with the module; a module that imported a deferred kernel
by name (a ``@triton.jit`` helper another module's kernel calls) gets Triton's function too. With Triton missing, ``jit`` leaves
the function alone, so the module still imports and only its Triton tactic fails, with a sentence.
NOTE: this module must not import torch (``kiln --help`` and the viewer import it indirectly), nor
Triton at import time.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from typing import Any, Callable

__all__ = ["HAS_TRITON", "DeferredKernel", "cdiv", "interpreting", "load_triton", "next_pow2", "tl", "triton"]


def _installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):      # a broken or blocked (sys.modules["triton"] = None) package
        return False


HAS_TRITON = _installed()      # Triton is optional: without it only the torch tactics exist

_lock = threading.RLock()
_deferred: list[DeferredKernel] = []
_loaded = False


class _Module:
    """Stands in for ``triton`` or ``triton.language`` until Triton is loaded; reading an attribute
    loads it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        load_triton()
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


class _Triton(_Module):
    @staticmethod
    def jit(fn: Callable | None = None, **options: Any) -> Any:
        """``@triton.jit`` or ``@triton.jit(**options)``: a ``DeferredKernel`` until Triton is loaded."""
        def deco(f: Callable) -> Any:
            if not HAS_TRITON:
                return f
            with _lock:
                if not _loaded:
                    kernel = DeferredKernel(f, options)
                    _deferred.append(kernel)
                    return kernel
            import triton as real
            _rebind(f.__globals__)
            return real.jit(f, **options)
        return deco(fn) if fn is not None else deco


triton: Any = _Triton("triton")
tl: Any = _Module("triton.language")


class DeferredKernel:
    """A ``@triton.jit`` function before Triton is loaded. Launching it (``kernel[grid](...)``), calling
    it or reading any other attribute loads Triton and forwards to Triton's function."""

    def __init__(self, fn: Callable, options: dict[str, Any]) -> None:
        self.fn, self.options = fn, options
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        self.__module__, self.__globals__ = fn.__module__, fn.__globals__
        self.kernel: Any = None

    def _real(self) -> Any:
        if self.kernel is None:
            load_triton()
        return self.kernel

    def __getitem__(self, grid: Any) -> Any:
        return self._real()[grid]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "kernel":
            raise AttributeError(attr)
        return getattr(self._real(), attr)

    def __repr__(self) -> str:
        return f"<deferred Triton kernel {self.__module__}.{self.__qualname__}>"


def load_triton() -> None:
    """Import Triton and turn every deferred kernel into Triton's function (once; no-op afterwards).
    Raises ImportError where Triton is not installed."""
    global _loaded
    with _lock:
        if _loaded:
            return
        import triton as real
        scopes = {}
        for k in _deferred:
            k.kernel = real.jit(k.fn, **k.options)
            scopes[id(k.__globals__)] = k.__globals__
        for module in list(sys.modules.values()):     # modules that imported a deferred kernel by name
            scope = getattr(module, "__dict__", None)
            if isinstance(scope, dict) and id(scope) not in scopes and any(
                    type(v) is DeferredKernel for v in list(scope.values())):
                scopes[id(scope)] = scope
        for scope in scopes.values():
            _rebind(scope)
        _deferred.clear()
        _loaded = True


def _rebind(scope: dict[str, Any]) -> None:
    """In a module's globals, the stand-ins become the real modules and deferred kernels Triton's functions
    (Triton reads a kernel's globals when it compiles or interprets it)."""
    import triton as real
    import triton.language as real_tl
    for name, value in list(scope.items()):
        if value is triton:
            scope[name] = real
        elif value is tl:
            scope[name] = real_tl
        elif isinstance(value, DeferredKernel) and value.kernel is not None:
            scope[name] = value.kernel


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
