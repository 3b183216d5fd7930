"""Shape inference's closed-form answers for the common device layer kinds, as meta tensors.

Shape inference (``kiln.builder.shapes``) runs each layer's first CPU tactic on meta tensors. torch's meta
kernels for most ops check their arguments with ``torch._check`` and friends, whose first call imports
``torch.fx.experimental.symbolic_shapes`` and sympy (most of a second). For the kinds with a rule in
``kiln.ir.shape_rules``, whose output shape follows from a short formula, the rule gives the outputs
directly: empty contiguous meta tensors of the shape and dtype the tactic returns. A rule answers only
where it is sure: all inputs are contiguous meta tensors (a few kinds also take views, see ``_LAYOUTS``)
and the rule itself answers for their shapes, dtypes and the layer's attributes. Anything else (a shape
the tactic would refuse, other or mixed dtypes, fused extras) returns None and the layer is evaluated on
meta as before, so results and errors stay the tactic's own.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kiln.ir import shape_rules as rules
from kiln.ir.dtypes import dtype_name, torch_dtype

# kinds whose torch kernels return a fresh contiguous tensor for inputs that are not contiguous: how many
# leading inputs (None: all) may be so, and of which layout: "any" (matrix products copy or fold a
# transposed view), "sliced" (strides in the dims' order: a slice or broadcast of a contiguous tensor) or
# "cat" (sliced, or any layout below rank 4, where torch.cat has no channels-last output)
_LAYOUTS: dict[str, tuple[int | None, str]] = {
    "MatMul": (2, "any"), "FullyConnected": (2, "any"), "Gemm": (2, "any"), "Convolution": (1, "sliced"),
    "Concatenation": (None, "cat"), "ElementWise": (None, "sliced"), "Activation": (None, "sliced"),
    "Pointwise": (None, "sliced")}
enabled = True          # tests switch the rules off to compare with evaluation on meta tensors


def outputs(kind: str, attrs: dict[str, Any], args: Sequence[Any]) -> list[torch.Tensor] | None:
    """The layer's outputs as empty meta tensors, or None where no rule answers for these inputs."""
    if not enabled or not rules.ruled(kind):
        return None
    tensors = [a for a in args if a is not None]
    if not tensors or any(not isinstance(a, torch.Tensor) or not a.is_meta for a in tensors):
        return None
    if not all(_layout_ok(kind, i, a) for i, a in enumerate(args)):
        return None
    if _may_return_input(kind, attrs, args) and not args[0].is_contiguous():     # then its layout is the input's
        return None
    got = rules.answer(kind, attrs, [None if a is None else tuple(a.shape) for a in args],
                       [None if a is None else dtype_name(a.dtype) for a in args])
    if got is None:
        return None
    shapes, dtype = got
    return [torch.empty(s, dtype=torch_dtype(dtype), device="meta") for s in shapes]


def _layout_ok(kind: str, i: int, a: torch.Tensor | None) -> bool:
    if a is None or a.is_contiguous():
        return True
    n, layout = _LAYOUTS.get(kind, (0, ""))
    if n is not None and i >= n:
        return False
    if layout == "any" or layout == "cat" and a.dim() not in (4, 5):
        return True
    strides = [s for s in a.stride() if s != 0]
    return all(x >= y for x, y in zip(strides, strides[1:]))


def _may_return_input(kind: str, attrs: dict[str, Any], args: Sequence[Any]) -> bool:
    """Whether the kernel may return its input tensor itself: a one-input element-wise layer, a clip
    without bounds."""
    if kind == "ElementWise":
        return len(args) == 1
    return kind == "Activation" and attrs.get("type") == "clip" and attrs.get("alpha") is None \
        and attrs.get("beta") is None
