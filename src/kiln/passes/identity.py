"""Identity and no-op removal.

Cases:
- Identity layer → its input used directly (`x -> x`);
- Cast to the dtype the input already has → removed;
- Shuffle whose transposes are identities and whose reshape keeps the (known) shape → removed;
- Squeeze/Unsqueeze/Flatten whose output shape equals the input shape (at every shape of the profile) → removed.
A layer whose output is a network output is kept when its input is also a network
input or another output (outputs must stay distinct tensors).
"""
from __future__ import annotations

from kiln.ir.network import Layer
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var
from kiln.passes.symbolic import sym_shape

KINDS = ("Identity", "Cast", "Shuffle", "Squeeze", "Unsqueeze", "Flatten")


def _is_noop(layer: Layer) -> bool:
    x = layer.inputs[0] if layer.inputs else None
    if x is None:
        return False
    out = layer.outputs[0]
    if layer.kind == "Identity":
        return True
    if layer.kind == "Cast":
        return layer.attrs.get("to") == x.dtype
    static = sym_shape(x) is not None and sym_shape(x) == sym_shape(out)     # at every shape of the profile
    if layer.kind == "Shuffle":
        p1, p2 = layer.attrs.get("first_transpose"), layer.attrs.get("second_transpose")
        ident = all(p is None or list(p) == list(range(len(p))) for p in (p1, p2))
        return ident and static
    if layer.kind in ("Squeeze", "Unsqueeze", "Flatten"):
        return static
    return False


def _removable(m: Match) -> str | None:
    net, layer, x = m.net, m.root, m["x"]
    if len(layer.outputs) != 1 or not _is_noop(layer):
        return "not a no-op"
    y = layer.outputs[0]
    if y in net.outputs and (x in net.inputs or x in net.outputs or x.is_constant):
        return "its output is a network output and its input another (outputs stay distinct tensors)"
    if y in net.outputs and (x.producer is None or len(x.uses) != 1):
        return "its output is a network output and its input is read elsewhere"
    return None


def _remove(m: Match) -> None:
    net, layer, x = m.net, m.root, m["x"]
    y = layer.outputs[0]
    was_output = y in net.outputs
    net.replace_all_uses(y, x)
    net.remove_layer(layer)
    if was_output:      # keep the output's public name: the producer of x now writes y's name
        net.rename(x, y.name)


class RemoveIdentities(RulePass):
    name = "identity removal"
    rules = [Rule("no-op(x) -> x", Op(KINDS, Var("x"), ...), _removable, _remove)]
