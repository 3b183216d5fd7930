"""Shape-derived constants at run time: a ShapeConstant step's outputs, kept per input shape.

A ShapeConstant layer (passes/shape_constants.py) computes tensors from its inputs' shapes alone: a
detector's grids built with Range over a feature map's size, positions ``0..S``, reshape targets. Its
step runs the layer's body at the first run of an input shape and, at later runs of that shape, returns
the outputs it kept: a lookup keyed by the inputs' shapes (host ints; no device sync, no kernel). An
output that every reader reads on the device is kept there (moved once, when it is computed), so no run
copies it.

The cache follows the CUDA-graph cache's policy (runtime/graphs.py): each step keeps as many input shapes
as the context keeps graphs (its ``graph_cache`` option, else $KILN_GRAPH_CACHE, else 16), the least
recently run shape dropped first. A CUDA graph recorded at a shape reads the kept tensors where they are:
while a graph is recorded (``Program.move_mode == "replay"``) the step adds the outputs it returns to the
program's move cache, which the graph's cache entry keeps alive, so they stay valid for as long as that
graph is cached, even once this cache has dropped them. Readers must not write into them (no kernel
writes into its inputs).

A CPU program keeps Shape and Size steps the same way (their outputs are their input's shape or element
count) where every reader of their outputs is a step that always makes a fresh tensor (``FRESH_READERS``) and
none is a program output: nothing downstream can then hand the kept tensor to a caller, who may write into it.
"""
from __future__ import annotations

from typing import Any, Callable

from kiln.runtime.graphs import graph_cache_size

KIND = "ShapeConstant"
SHAPE_ONLY = frozenset(("Shape", "Size"))     # kinds a CPU program keeps per input shape too ...
FRESH_READERS = frozenset(("Gather", "ElementWise", "Concatenation", "Unary", "Shape", "Size"))   # ... read by these
PINNED = "shape constants"      # the move-cache key under which a recorded graph keeps what it reads


class ShapeCache:
    """A step function that computes ``fn`` once per input-shape key and returns the kept outputs after.
    ``computed`` counts the computations (cache misses); ``moves`` maps output positions to the device
    they are kept on."""

    __slots__ = ("fn", "program", "size", "entries", "computed", "moves")

    def __init__(self, fn: Callable[..., tuple], program: Any, size: int | None = None) -> None:
        self.fn, self.program = fn, program
        self.size = graph_cache_size(size)
        self.entries: dict[tuple, tuple] = {}       # least recently run first
        self.computed = 0
        self.moves: dict[int, str] = {}

    def __call__(self, *xs: Any) -> tuple:
        key = tuple(x.shape for x in xs)
        entries = self.entries
        outs = entries.pop(key, None)
        if outs is None:
            outs = tuple(self.fn(*xs))
            if self.moves:
                outs = tuple(o.to(self.moves[k]) if k in self.moves else o for k, o in enumerate(outs))
            self.computed += 1
            while len(entries) >= self.size:
                del entries[next(iter(entries))]
        entries[key] = outs
        if self.program.move_mode == "replay":
            self.program.move_cache.setdefault(PINNED, []).append(outs)
        return outs


def set_up_shape_caches(program: Any, size: int) -> None:
    """Each ShapeConstant step of ``program`` keeps at most ``size`` input shapes, and keeps on the program's
    device each output that every step reading it reads there."""
    wants: dict[str, set] = {}
    for step in program.steps:
        for name, target in zip(step.ins, step.targets):
            if name is not None:
                wants.setdefault(name, set()).add(target)
    for step in program.steps:
        if isinstance(step.fn, ShapeCache):
            step.fn.size = size
            step.fn.moves = {k: program.device for k, name in enumerate(step.outs)
                             if program.device != "cpu" and wants.get(name) == {program.device}}


def cached_per_shape(kind: str, fn: Callable[..., tuple], program: Any) -> Callable[..., tuple]:
    """``fn`` wrapped in a ShapeCache for a ShapeConstant step; any other step's ``fn`` as it is."""
    return ShapeCache(fn, program) if kind == KIND else fn


def keep_shape_steps(program: Any) -> None:
    """A CPU program's Shape and Size steps in ShapeCaches where the module docstring allows it."""
    if program.device != "cpu":
        return
    readers: dict[str, set] = {}
    for step in program.steps:
        for name in step.ins:
            if name is not None:
                readers.setdefault(name, set()).add(step.kind)
    returned = set(program.outputs)
    for step in program.steps:
        if step.kind in SHAPE_ONLY and not isinstance(step.fn, ShapeCache) and all(
                n not in returned and readers.get(n, set()) <= FRESH_READERS for n in step.outs):
            step.fn = ShapeCache(step.fn, program)
