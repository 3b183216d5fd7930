"""Structural verification of a Network, before any build work."""
from __future__ import annotations

from kiln.errors import NetworkError
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network, subgraphs


def verify(net: Network) -> None:
    """Raise NetworkError naming the first inconsistency; fix-it hints in the message."""
    if not net.outputs:
        raise NetworkError(f"Network {net.name!r} has no outputs; mark at least one with network.mark_output(tensor).")
    produced = {id(t) for t in net.inputs} | {id(t) for t in net.tensors.values() if t.is_constant}
    net.toposort()
    for layer in net.layers:
        spec = LAYER_KINDS.get(layer.kind)
        if spec is None:
            raise NetworkError(f"Layer {layer.name!r} has unknown kind {layer.kind!r}.")
        for t in layer.inputs:
            if t is None:
                continue
            if id(t) not in produced and t.producer is None and t.network is net:
                raise NetworkError(f"Layer {layer.name!r} ({layer.kind}) reads {t.name!r}, which is neither a network "
                                   f"input, a constant nor any layer's output.")
        for t in layer.outputs:
            produced.add(id(t))
        for g in subgraphs(layer):
            if g.outer is None:
                g.outer = net
            _verify_sub(g)
    for t in net.outputs:
        if id(t) not in produced and t.producer is None and not t.is_constant and t not in net.inputs:
            raise NetworkError(f"Output {t.name!r} is produced by no layer; mark a layer's output instead.")


def _verify_sub(g: Network) -> None:
    for layer in g.layers:
        for sg in subgraphs(layer):
            if sg.outer is None:
                sg.outer = g
            _verify_sub(sg)
