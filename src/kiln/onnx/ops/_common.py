"""Helpers shared by converters."""
from __future__ import annotations

import numpy as np

from kiln.errors import ParseError


def const_value(t, what: str = "value"):
    """The numpy value of a constant input, or None if it is computed at run time."""
    if t is None:
        return None
    return t.value if t.is_constant else None


def static_ints(t, node, what: str) -> list[int]:
    v = const_value(t)
    if v is None:
        raise ParseError(f"Node {node.name!r} ({node.op_type}) needs {what} to be a constant; Kiln computes it at "
                         f"build time. Fold it (e.g. onnx-simplifier) or fix the input shapes.")
    return [int(x) for x in np.asarray(v).reshape(-1)]


def spatial_pads(node, x, kernel, strides, dilations, pads_attr="pads"):
    """Explicit pads (begins then ends) from pads/auto_pad; needs static spatial dims for SAME."""
    nd = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    pads = node.attr(pads_attr)
    if auto in ("NOTSET", "") or auto is None:
        return list(pads) if pads else [0] * (2 * nd)
    if auto == "VALID":
        return [0] * (2 * nd)
    if x.shape is None or not all(isinstance(d, int) for d in x.shape[2:]):
        raise ParseError(f"Node {node.name!r} ({node.op_type}) uses auto_pad={auto} with dynamic spatial dims "
                         f"{x.shape}; export with explicit pads or static input shapes.")
    begins, ends = [], []
    for i in range(nd):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        if auto == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins + ends
