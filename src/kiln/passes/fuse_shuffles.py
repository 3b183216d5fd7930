"""Transpose/reshape cleanup.

Cases:
- Shuffle(transpose p1) → Shuffle(transpose p2), the first read only by the second → one
  Shuffle with the composed permutation; an identity result removes both (``xᵀᵀ -> x``);
- Shuffle(reshape) → Shuffle(reshape), no transposes → the second reshape alone, reading the
  first's input (its target written for that input: static dims, 0 and -1; passes/symbolic.py);
- a Shuffle whose transpose is the identity and that has no reshape → removed;
- a Shuffle reshaping to a computed target that no static attribute can state (``[B, H·W, C] →
  [B, H, W, C]``) next to a pure transpose → one Shuffle (transpose, reshape to the target,
  transpose), as passes/collapse_views.py makes of static chains.
Reshape targets computed from dynamic dims become attributes first where they can
(passes/fold_shapes.py).
"""
from __future__ import annotations

from kiln.passes._match import remove_computation, remove_dead, replace_output
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var
from kiln.passes.symbolic import reshape_attr, sym_shape


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


def _identity(perm) -> bool:
    return perm is not None and perm == list(range(len(perm)))


def _transposes(m: Match) -> str | None:
    p1, p2 = _pure_perm(m["first"]), _pure_perm(m.root)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return "not two pure transposes of one rank"
    if _identity(p1):
        return "the first transpose is the identity (removed by itself)"
    return None


def _compose(m: Match) -> None:
    net, first, nxt = m.net, m["first"], m.root
    p1, p2 = _pure_perm(first), _pure_perm(nxt)
    composed = [p1[i] for i in p2]
    out = nxt.outputs[0]
    if _identity(composed) and out not in net.outputs:
        replace_output(net, out, m["x"])
        remove_dead(net, [nxt, first])
    else:
        nxt.attrs["first_transpose"] = composed
        nxt.set_input(0, m["x"])
        nxt.origin = list(dict.fromkeys(first.origin + nxt.origin))
        remove_dead(net, [first])


def _reshapes(m: Match) -> str | None:
    first, nxt = m["first"], m.root
    if not (_only_reshape(first) and _only_reshape(nxt)):
        return "not two pure reshapes"
    attr = _pure_reshape(nxt)
    if attr is None or 0 in attr or nxt.attrs.get("allowzero"):
        # its target depends on the first's output (0 copies a dim of it, or it is computed): say it
        # for the first's input
        x, out = sym_shape(m["x"]), sym_shape(nxt.outputs[0])
        attr = reshape_attr(x, out) if x is not None and out is not None else None
        if attr is None:
            return "the second reshape's target cannot be written for the first's input"
    m.update(attr=attr)     # static dims and -1 mean the same for any input of the element count
    return None


def _only_reshape(layer) -> bool:
    a = layer.attrs
    return layer.kind == "Shuffle" and a.get("first_transpose") is None and a.get("second_transpose") is None \
        and (a.get("reshape") is not None or len(layer.inputs) > 1 and layer.inputs[1] is not None)


def _second_only(m: Match) -> None:
    first, nxt = m["first"], m.root
    shape = nxt.inputs[1] if len(nxt.inputs) > 1 else None
    if shape is not None:
        nxt.set_input(1, None)
        nxt.inputs.pop()
    nxt.attrs["reshape"], nxt.attrs["allowzero"] = m["attr"], False
    nxt.set_input(0, m["x"])
    nxt.origin = list(dict.fromkeys(first.origin + nxt.origin))
    remove_dead(m.net, [first])
    if shape is not None:
        remove_computation(m.net, shape)


def _noop(m: Match) -> str | None:
    if not _identity(_pure_perm(m.root)):
        return "not an identity transpose"
    if m.root.outputs[0] in m.net.outputs:
        return "its output is a network output"
    return None


def _drop(m: Match) -> None:
    replace_output(m.net, m.root.outputs[0], m["x"])
    remove_dead(m.net, [m.root])


def _computed_reshape(layer, transposes: str) -> bool:
    """A Shuffle whose reshape target is an input, without the transpose(s) named (first/second)."""
    a = layer.attrs
    return layer.kind == "Shuffle" and len(layer.inputs) > 1 and layer.inputs[1] is not None \
        and a.get("reshape") is None and all(a.get(f"{w}_transpose") is None for w in transposes.split("/"))


def _transpose_after(m: Match) -> str | None:
    if not _computed_reshape(m["first"], "second") or _pure_perm(m.root) is None:
        return "not a reshape to a computed target, then a pure transpose"
    return None


def _into_first(m: Match) -> None:
    first, nxt = m["first"], m.root
    first.attrs["second_transpose"] = _pure_perm(nxt)
    first.outputs[0].shape = nxt.outputs[0].shape
    first.origin = list(dict.fromkeys(first.origin + nxt.origin))
    replace_output(m.net, nxt.outputs[0], first.outputs[0])
    remove_dead(m.net, [nxt])


def _transpose_before(m: Match) -> str | None:
    if _pure_perm(m["first"]) is None or not _computed_reshape(m.root, "first"):
        return "not a pure transpose, then a reshape to a computed target"
    return None


def _into_second(m: Match) -> None:
    first, nxt = m["first"], m.root
    nxt.attrs["first_transpose"] = _pure_perm(first)
    nxt.set_input(0, m["x"])
    nxt.origin = list(dict.fromkeys(first.origin + nxt.origin))
    remove_dead(m.net, [first])


_PAIR = Op("Shuffle", Op("Shuffle", Var("x"), name="first"))
_PAIR_ANY = Op("Shuffle", Op("Shuffle", Var("x"), ..., name="first"), ...)     # shape inputs too


class FuseShuffles(RulePass):
    name = "transpose/reshape cleanup"
    rules = [
        Rule("transpose(transpose(x, p1), p2) -> transpose(x, p1∘p2)", _PAIR, _transposes, _compose),
        Rule("reshape(reshape(x)) -> reshape(x)", _PAIR_ANY, _reshapes, _second_only),
        Rule("transpose(x, identity) -> x", Op("Shuffle", Var("x")), _noop, _drop),
        Rule("transpose(reshape(x, computed), p) -> shuffle(x, computed, p)",
             Op("Shuffle", Op("Shuffle", Var("x"), Var("shape"), name="first")), _transpose_after, _into_first),
        Rule("reshape(transpose(x, p), computed) -> shuffle(x, p, computed)",
             Op("Shuffle", Op("Shuffle", Var("x"), name="first"), Var("shape")), _transpose_before, _into_second),
    ]
