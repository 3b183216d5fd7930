"""Dead-layer removal.

Cases:
- a layer none of whose outputs is used or marked as a network output → removed;
- constants no layer reads → dropped.
"""
from __future__ import annotations

from kiln.ir.network import Network
from kiln.passes.base import Pass, PassResult


class RemoveDeadLayers(Pass):
    name = "dead-layer removal"

    def call(self, net: Network) -> PassResult:
        outputs = {id(t) for t in net.outputs}
        dead: dict[int, object] = {}
        for layer in reversed(net.layers):     # readers come later: seen first
            if all(id(t) not in outputs and all(id(u) in dead for u, _ in t.uses) for t in layer.outputs):
                dead[id(layer)] = layer
        net.remove_layers(dead.values())
        before = len(net.tensors)
        net.remove_unused_constants()
        return PassResult(net, bool(dead) or len(net.tensors) != before)
