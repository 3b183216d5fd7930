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
        modified = False
        outputs = {id(t) for t in net.outputs}
        for layer in reversed(list(net.layers)):
            if all(not t.uses and id(t) not in outputs for t in layer.outputs):
                net.remove_layer(layer)
                modified = True
        before = len(net.tensors)
        net.remove_unused_constants()
        return PassResult(net, modified or len(net.tensors) != before)
