"""Meta-tensor evaluation without importing ``torch._dynamo``.

torch's Python meta kernels (the ``torch._refs`` references behind most ops on the ``meta`` device)
are wrapped in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (seconds of
CPU) only to make the wrapper a no-op outside compiled code. Within :func:`dynamo_deferred`, a
wrapper whose dynamo-disabled form is not yet built runs its kernel directly while ``torch._dynamo``
is not imported (no compiled frame can exist then, so disabling dynamo changes nothing) and builds
the real disabled form, as torch does, once it is. On leaving, the wrappers are as torch left them.
If torch's wrapper does not have the expected form, nothing is changed (dynamo is then imported as
before).
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Callable, Iterator

import torch

_CACHE = "__dynamo_disable"       # the attribute torch's wrapper caches its disabled function in
_wrapped: list[tuple[Callable, bool]] | None = None


class _Deferred:
    """Stands in the wrapper's cache: the plain kernel until ``torch._dynamo`` is imported, then the
    dynamo-disabled kernel (stored in the cache from then on)."""

    __slots__ = ("fn", "recursive")

    def __init__(self, fn: Callable, recursive: bool) -> None:
        self.fn, self.recursive = fn, recursive

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return self.fn(*args, **kwargs)
        import torch._dynamo
        disabled = torch._dynamo.disable(self.fn, self.recursive, wrapping=False)
        setattr(self.fn, _CACHE, disabled)
        return disabled(*args, **kwargs)


def _disable_wrapped() -> list[tuple[Callable, bool]]:
    """(kernel, recursive) of every ``torch._disable_dynamo`` wrapper reachable from torch's loaded modules
    and decomposition tables, through ``__wrapped__`` and closures; empty if the wrapper's form is not
    the expected one."""
    global _wrapped
    if _wrapped is not None:
        return _wrapped
    _wrapped = []
    maker = getattr(getattr(torch, "_compile", None), "_disable_dynamo", None)
    if maker is None:
        return _wrapped
    code = maker(lambda: None).__code__
    if set(code.co_freevars) != {"fn", "recursive"} or _CACHE not in code.co_consts:
        return _wrapped
    stack: list[Any] = [v for name, m in list(sys.modules.items())
                        if m is not None and (name == "torch" or name.startswith("torch."))
                        for v in list(vars(m).values()) if type(v) is types.FunctionType]
    decomp = sys.modules.get("torch._decomp")
    for table in getattr(decomp, "global_decomposition_table", {}).values():
        stack.extend(table.values())
    seen: set[int] = set()
    while stack:
        f = stack.pop()
        if type(f) is not types.FunctionType or id(f) in seen:
            continue
        seen.add(id(f))
        cells = [c.cell_contents for c in f.__closure__ or () if _filled(c)]
        if f.__code__ is code and len(cells) == 2:
            free = dict(zip(code.co_freevars, cells))
            _wrapped.append((free["fn"], bool(free["recursive"])))
        stack.extend(cells)
        stack.append(f.__dict__.get("__wrapped__"))
    return _wrapped


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def dynamo_deferred() -> Iterator[None]:
    """Within the block, torch's meta kernels do not import ``torch._dynamo``."""
    if "torch._dynamo" in sys.modules:
        yield
        return
    placed = []
    for fn, recursive in _disable_wrapped():
        if getattr(fn, _CACHE, None) is None:
            stand_in = _Deferred(fn, recursive)
            setattr(fn, _CACHE, stand_in)
            placed.append((fn, stand_in))
    try:
        yield
    finally:
        for fn, stand_in in placed:
            if getattr(fn, _CACHE, None) is stand_in:
                delattr(fn, _CACHE)
