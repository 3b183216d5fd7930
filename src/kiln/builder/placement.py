"""Which tensors live on the host: shape arithmetic stays on the CPU, as in TensorRT.

A layer runs on the host when its kind always does (Shape, Size: ``host="always"`` in
kiln.ir.layers), or when its kind may (``host="capable"``: small shape arithmetic) and every
input is already a host value. Its outputs
are then host values too; device layers read them only at their host-input
positions (or get a small copy).
"""
from __future__ import annotations

from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Layer, Network, Tensor

SMALL = 64   # constants up to this many elements may serve as host values


def is_host_constant(t: Tensor) -> bool:
    return t.is_constant and t.value.size <= SMALL and t.dtype != "string"


def host_layers(net: Network) -> set[int]:
    """ids of the layers that run on the host."""
    host_tensors: set[int] = set()
    hosts: set[int] = set()
    for layer in net.layers:
        ins = [t for t in layer.inputs if t is not None]
        where = LAYER_KINDS[layer.kind].host
        on_host = where == "always" or (
            where == "capable" and ins and any(not t.is_constant for t in ins)
            and all(id(t) in host_tensors or is_host_constant(t) for t in ins))
        if on_host:
            hosts.add(id(layer))
            for t in layer.outputs:
                host_tensors.add(id(t))
    return hosts


def is_host(layer: Layer, hosts: set[int]) -> bool:
    return id(layer) in hosts
