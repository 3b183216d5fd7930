"""Helpers shared by converters."""
from __future__ import annotations

import numpy as np

from kiln.errors import ParseError
from kiln.ir.api import same_pads


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
    """Explicit pads (begins then ends) from pads/auto_pad. SAME needs the input's spatial dims, or a
    stride of 1 on every axis; layers that can wait for the build's shapes use ``window_pads``."""
    attrs = window_pads(node, x, kernel, strides, dilations, pads_attr)
    if "auto_pad" in attrs:
        raise ParseError(f"Node {node.name!r} ({node.op_type}) uses auto_pad={attrs['auto_pad']} with strides "
                         f"{list(strides)} on input {_name(x)} of spatial dims {_dims(x)}, which are not known here; "
                         f"export with explicit pads or static input shapes.")
    return attrs["pads"]


def window_pads(node, x, kernel, strides, dilations, pads_attr="pads") -> dict:
    """A Convolution's or Pooling's padding attributes: ``pads``, worked out now where auto_pad SAME
    allows (static spatial dims, or stride 1 on every axis), else zeros with ``auto_pad`` kept for the
    builder, which resolves it once the profile fixes the input's size."""
    nd = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    pads = node.attr(pads_attr)
    if auto in ("NOTSET", "") or auto is None:
        return {"pads": list(pads) if pads else [0] * (2 * nd)}
    if auto == "VALID":
        return {"pads": [0] * (2 * nd)}
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ParseError(f"Node {node.name!r} ({node.op_type}) has auto_pad={auto!r}; ONNX allows NOTSET, VALID, "
                         f"SAME_UPPER and SAME_LOWER.")
    spatial = list(x.shape[2:]) if x.shape is not None and len(x.shape) == nd + 2 else [None] * nd
    sizes = [d if isinstance(d, int) else None for d in spatial]
    if all(d is not None or s == 1 for d, s in zip(sizes, strides)):
        return {"pads": same_pads(auto, sizes, kernel, strides, dilations)}
    return {"pads": [0] * (2 * nd), "auto_pad": auto}


def _name(x) -> str:
    return repr(x.name) if x is not None else "?"


def _dims(x) -> str:
    if x is None or x.shape is None:
        return "unknown"
    return "[" + ", ".join(str(d) for d in x.shape[2:]) + "]"
