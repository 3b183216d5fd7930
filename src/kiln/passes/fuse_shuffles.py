"""Transpose/reshape cleanup.

Cases:
- Shuffle(transpose p1) → Shuffle(transpose p2), the first read only by the second → one
  Shuffle with the composed permutation; an identity result removes both (``xᵀᵀ -> x``);
- Shuffle(static reshape) → Shuffle(static reshape), no transposes → the second reshape alone;
- a Shuffle whose transpose is the identity and that has no reshape → removed.
"""
from __future__ import annotations

from kiln.ir.network import Network
from kiln.passes._match import only_consumer, remove_dead, replace_output
from kiln.passes.base import Pass, PassResult


def _pure_perm(layer):
    a = layer.attrs
    if layer.kind != "Shuffle" or len(layer.inputs) != 1 or a.get("reshape") is not None \
            or a.get("second_transpose") is not None or a.get("first_transpose") is None:
        return None
    return list(a["first_transpose"])


def _pure_reshape(layer):
    a = layer.attrs
    if layer.kind != "Shuffle" or len(layer.inputs) != 1 or a.get("first_transpose") is not None \
            or a.get("second_transpose") is not None or a.get("reshape") is None:
        return None
    return list(a["reshape"])


class FuseShuffles(Pass):
    name = "transpose/reshape cleanup"

    def call(self, net: Network) -> PassResult:
        modified = False
        for layer in list(net.layers):
            if layer not in net.layers or layer.kind != "Shuffle":
                continue
            p1 = _pure_perm(layer)
            if p1 is not None and p1 == list(range(len(p1))):
                replace_output(net, layer.outputs[0], layer.inputs[0]) if layer.outputs[0] not in net.outputs \
                    else None
                if not layer.outputs[0].uses and layer.outputs[0] not in net.outputs:
                    remove_dead(net, [layer])
                    modified = True
                continue
            nxt = only_consumer(layer.outputs[0], net, "Shuffle")
            if nxt is None:
                continue
            p2 = _pure_perm(nxt)
            if p1 is not None and p2 is not None and len(p1) == len(p2):
                composed = [p1[i] for i in p2]
                out = nxt.outputs[0]
                if composed == list(range(len(composed))) and out not in net.outputs:
                    replace_output(net, out, layer.inputs[0])
                    remove_dead(net, [nxt, layer])
                else:
                    nxt.attrs["first_transpose"] = composed
                    nxt.set_input(0, layer.inputs[0])
                    nxt.origin = list(dict.fromkeys(layer.origin + nxt.origin))
                    remove_dead(net, [layer])
                modified = True
                continue
            r1, r2 = _pure_reshape(layer), _pure_reshape(nxt)
            if r1 is not None and r2 is not None and 0 not in r2 and not nxt.attrs.get("allowzero"):
                nxt.set_input(0, layer.inputs[0])
                nxt.origin = list(dict.fromkeys(layer.origin + nxt.origin))
                remove_dead(net, [layer])
                modified = True
        return PassResult(net, modified)
