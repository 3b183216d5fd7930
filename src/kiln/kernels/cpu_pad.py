"""Reflect, edge and wrap padding on the CPU as one gather on an index worked out once per input shape.

Tactic ``gather`` runs a Padding layer whose mode is reflect, edge or wrap as ``torch.take(x, index)``. The
index is the ``torch`` tactic's own result on the positions ``0 .. x.numel()-1`` (so the padding rules,
negative pads and axes included, are that tactic's), made at the first run of an input shape with those
``pads``/``axes`` tensors and kept (a few shapes per layer). The pads of a plan are constants, the same
tensor at every run; pads computed at run time are new tensors each run and make a new index each time,
which the builder's timing then does not pick. Constant-mode padding keeps the ``torch`` tactic.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

from kiln.kernels.conv import make_padding
from kiln.kernels.registry import KernelContext, tactic

MAX_INDEXES = 4                 # input shapes (with their pads) whose index a layer keeps
MAX_INDEX_ELEMENTS = 1 << 22    # larger outputs keep the torch tactic's path


def _gather_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return ctx.device == "cpu" and attrs.get("mode", "constant") in ("reflect", "edge", "wrap")


@tactic("Padding", "gather", devices=("cpu",), supports=_gather_ok, priority=1)
def make_padding_gather(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    general = make_padding(attrs, ctx)
    indexes: OrderedDict[tuple, tuple] = OrderedDict()

    def index(x: torch.Tensor, pads, axes) -> torch.Tensor | None:
        key = (x.shape, id(pads), id(axes))
        hit = indexes.get(key)
        if hit is not None and hit[0] is pads and hit[1] is axes:
            return hit[2]
        positions = torch.arange(x.numel(), dtype=torch.float64).view(x.shape)      # exact below 2**53
        where = general(positions, pads, None, axes)[0]
        idx = where.to(torch.int64) if where.numel() <= MAX_INDEX_ELEMENTS else None
        indexes[key] = (pads, axes, idx)        # the tensors are kept, so their ids stay theirs
        if len(indexes) > MAX_INDEXES:
            indexes.popitem(last=False)
        return idx

    def run(x, pads=None, value=None, axes=None):
        if x.is_meta:
            return general(x, pads, value, axes)
        idx = index(x, pads, axes)
        return (torch.take(x, idx),) if idx is not None else general(x, pads, value, axes)
    return run
