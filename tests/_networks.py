"""Networks compared as a whole: what a parse decides (tensors, constants, layers, attributes, origins)."""
from __future__ import annotations

import numpy as np

from kiln.ir.network import Network


def network_signature(net: Network) -> list:
    """Everything a parse decides, comparable across two parses of one model."""
    def value(v):
        if isinstance(v, Network):
            return network_signature(v)
        if isinstance(v, np.ndarray):
            return (v.dtype.str, v.shape, v.tolist() if v.dtype == object else v.tobytes())
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        return repr(v)
    out: list = [("in", t.name, t.dtype, t.shape) for t in net.inputs]
    out += [("const", t.name, t.dtype, value(t.value)) for t in net.constants()]
    out += [(layer.name, layer.kind, [t.name if t is not None else None for t in layer.inputs],
             [(o.name, o.dtype, o.shape) for o in layer.outputs], sorted((k, value(v)) for k, v in layer.attrs.items()),
             layer.origin) for layer in net.layers]
    return out + [("out", t.name, t.dtype, t.shape) for t in net.outputs]
