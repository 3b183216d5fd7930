"""CPU convolutions that add their residual into the residual's own memory.

A Convolution with a fused residual (y = act(conv(x) + r), or act(conv(x)) + r) reads r and writes a fresh y of
the same shape. Where r dies at that layer, its tactic may instead write y over r (oneDNN's sum post-op reads
the destination and accumulates into it), as ONNX Runtime's fused Conv + Sum does: one map less read from and
written to memory per residual block.

Decided when a CPU program is made, from the plan alone (no change to the file format): a Convolution step
whose tactic's function says it can (``sums_into_residual``) is called with ``into=True`` where its residual
input is produced by a step of this program of a kind that always makes a fresh tensor (``FRESH``), is read only
by such steps before, is read once by this step and never again, and is not a program output. The tactic checks
the rest at run time (the residual's dtype, shape and layout, and that no other tensor, such as a view, shares
its memory) and takes its ordinary path otherwise.
"""
from __future__ import annotations

from functools import partial
from typing import Any

# kinds whose CPU tactics always return a tensor of their own (never an input, never a view of one)
FRESH = frozenset(("Convolution", "ElementWise", "Activation", "Pointwise", "Concatenation"))
# kinds that may read the residual before the layer that consumes it: FRESH, and those that read only its shape
READERS = FRESH | {"Shape", "Size"}


def sum_into_residuals(program: Any) -> int:
    """Call qualifying Convolution steps of ``program`` (a CPU Program after its liveness plan) with
    ``into=True``; returns how many."""
    if program.device != "cpu":
        return 0
    producer: dict[str, str] = {}
    readers: dict[str, set[str]] = {}
    for step in program.steps:
        for n in step.outs:
            producer[n] = step.kind
        for n in step.ins:
            if n is not None:
                readers.setdefault(n, set()).add(step.kind)
    outputs = set(program.outputs)
    done = 0
    for step in program.steps:
        if step.kind != "Convolution" or len(step.ins) < 4 or not getattr(step.fn, "sums_into_residual", False):
            continue
        r = step.ins[3]
        if (r is None or r in outputs or r in program.constants or r not in step.frees or step.ins.count(r) != 1
                or producer.get(r) not in FRESH or not readers[r] <= READERS or r in step.outs):
            continue
        step.fn = partial(step.fn, into=True)
        done += 1
    return done
