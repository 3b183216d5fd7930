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
count), except where such an output is one of the program's outputs, which a caller may write into.
"""
from __future__ import annotations

from typing import Any, Callable

from kiln.runtime.graphs import graph_cache_size

KIND = "ShapeConstant"
SHAPE_ONLY = frozenset(("Shape", "Size"))     # kinds a CPU program keeps per input shape too
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


def cached_per_shape(kind: str, fn: Callable[..., tuple], program: Any, returned: bool = False) -> Callable[..., tuple]:
    """``fn`` wrapped in a ShapeCache for a ShapeConstant step, and for a Shape or Size step of a CPU program
    unless one of its outputs is ``returned`` as a program output; any other step's ``fn`` as it is."""
    if kind == KIND or (kind in SHAPE_ONLY and program.device == "cpu" and not returned):
        return ShapeCache(fn, program)
    return fn
