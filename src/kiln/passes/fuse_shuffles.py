"""Transpose/reshape cleanup.

Cases:
- Shuffle(transpose p1) → Shuffle(transpose p2), the first read only by the second → one
  Shuffle with the composed permutation; an identity result removes both (``xᵀᵀ -> x``);
- Shuffle(static reshape) → Shuffle(static reshape), no transposes → the second reshape alone;
- a Shuffle whose transpose is the identity and that has no reshape → removed.
"""
from __future__ import annotations

from kiln.passes._match import remove_dead, replace_output
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var


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
    r1, r2 = _pure_reshape(m["first"]), _pure_reshape(m.root)
    if r1 is None or r2 is None:
        return "not two pure static reshapes"
    if 0 in r2 or m.root.attrs.get("allowzero"):
        return "the second reshape copies a dim from its input (0 in its target)"
    return None


def _second_only(m: Match) -> None:
    first, nxt = m["first"], m.root
    nxt.set_input(0, m["x"])
    nxt.origin = list(dict.fromkeys(first.origin + nxt.origin))
    remove_dead(m.net, [first])


def _noop(m: Match) -> str | None:
    if not _identity(_pure_perm(m.root)):
        return "not an identity transpose"
    if m.root.outputs[0] in m.net.outputs:
        return "its output is a network output"
    return None


def _drop(m: Match) -> None:
    replace_output(m.net, m.root.outputs[0], m["x"])
    remove_dead(m.net, [m.root])


_PAIR = Op("Shuffle", Op("Shuffle", Var("x"), name="first"))


class FuseShuffles(RulePass):
    name = "transpose/reshape cleanup"
    rules = [
        Rule("transpose(transpose(x, p1), p2) -> transpose(x, p1∘p2)", _PAIR, _transposes, _compose),
        Rule("reshape(reshape(x)) -> reshape(x)", _PAIR, _reshapes, _second_only),
        Rule("transpose(x, identity) -> x", Op("Shuffle", Var("x")), _noop, _drop),
    ]
