"""Attention fusion: the exported MatMul → scale → mask → Softmax → MatMul becomes one layer.

Cases (Q, K, V of shape [..., S, D]):
- ``Softmax(MatMul(Q, Kᵀ) · s) @ V`` where the scale is a Div or Mul by a constant,
  applied to the scores or to Q and/or Kᵀ separately (the product is the scale);
- with an additive mask: ``Softmax(... + M) @ V`` (M broadcastable to the scores);
- Kᵀ is a Shuffle swapping the last two axes of K (its input becomes K), or any tensor
  (then K is its transpose, a view);
- no scale found → scale 1;
- Kᵀ = any pure permutation of a tensor Z (K is then Z permuted with the last two axes swapped);
- the softmax followed by ``Where(IsNaN(p), 0, p)`` (a guard for fully masked rows, which an
  additive finite mask never produces) before the second MatMul.
The fused layer runs ``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient
kernels on the GPU), never materializing the S×S scores in memory.
"""
from __future__ import annotations

from kiln.passes._match import producer, scalar, single_use, substitute
from kiln.passes.rewrite import Const, Match, Op, Rule, RulePass, Var


def _strip_scale(t, net, chain):
    """Follow single-use Mul/Div by a constant back from ``t``; return (base tensor, scale)."""
    scale = 1.0
    while True:
        p = producer(t, "ElementWise")
        if p is None or not single_use(t, net) or p.attrs.get("op") not in ("prod", "div"):
            return t, scale
        a, b = p.inputs[0], p.inputs[1]
        sb, sa = scalar(b), scalar(a)
        if p.attrs["op"] == "div" and sb is not None and sb != 0:
            scale /= sb
            t = a
        elif p.attrs["op"] == "prod" and sb is not None:
            scale *= sb
            t = a
        elif p.attrs["op"] == "prod" and sa is not None:
            scale *= sa
            t = b
        else:
            return t, scale
        chain.append(p)


def _plan(m: Match) -> str | None:
    """Follow the scores back from the softmax to Q·Kᵀ (through a mask and scales); store what the
    fused layer reads in ``m``."""
    net, sm, pv, v = m.net, m["sm"], m.root, m["v"]
    x = sm.inputs[0]
    if x.rank is None or x.rank < 3 or sm.attrs.get("axis", -1) % x.rank != x.rank - 1:
        return "the softmax is not over the last axis of a tensor of rank 3 or more"
    if pv.attrs.get("transpose_a") or pv.attrs.get("transpose_b"):
        return "the second MatMul transposes an operand"
    chain = [sm] + [m[k] for k in ("isnan", "where") if k in m]
    mask = None
    t = x
    add = producer(t, "ElementWise", op="sum")
    if add is not None and single_use(t, net):
        # the scores side is the one that leads to a MatMul (possibly through a scale)
        for i in (0, 1):
            base, _ = _strip_scale(add.inputs[i], net, [])
            if producer(base, "MatMul") is not None:
                mask = add.inputs[1 - i]
                t = add.inputs[i]
                chain.append(add)
                break
    t, s_scores = _strip_scale(t, net, chain)
    qk = producer(t, "MatMul")
    if qk is None or not single_use(t, net) or qk.attrs.get("transpose_a"):
        return "the scores are not Q·Kᵀ read only by the softmax"
    chain.append(qk)
    q, s_q = _strip_scale(qk.inputs[0], net, chain)
    kt, s_k = _strip_scale(qk.inputs[1], net, chain)
    k = tr = None
    if not qk.attrs.get("transpose_b"):
        tr = producer(kt, "Shuffle")
        r = kt.rank
        perm = tr.attrs.get("first_transpose") if tr is not None else None
        pure = (tr is not None and r is not None and perm is not None and tr.attrs.get("reshape") is None
                and tr.attrs.get("second_transpose") is None and len(tr.inputs) == 1)
        if not pure:
            tr = None
        elif single_use(kt, net):
            chain.append(tr)
        if pure and list(perm) == list(range(r - 2)) + [r - 1, r - 2]:
            k, tr = tr.inputs[0], None
    else:
        k = kt
    if q.rank is None or v.rank is None or q.rank != v.rank:
        return "Q and V differ in rank"
    m.update(chain=chain, mask=mask, q=q, k=k, kt=kt, tr=tr, qk=qk, scale=s_scores * s_q * s_k)
    return None


def _shuffle_after(net, src, perm, name: str, origin, where: int):
    """A transpose of ``src`` placed at ``where`` in the layer order; its output."""
    kl = net.add_layer("Shuffle", [src], {"first_transpose": perm, "reshape": None, "second_transpose": None,
                                          "allowzero": False}, name=net.unique_name(name), origin=origin)
    net.layers.remove(kl)
    net.layers.insert(where, kl)
    k = kl.outputs[0]
    k.dtype = src.dtype
    if src.shape is not None:
        k.shape = tuple(src.shape[i] for i in perm)
    return k


def _fuse(m: Match) -> None:
    net, pv, k, tr = m.net, m.root, m["k"], m["tr"]
    if k is None and tr is not None:
        # Kᵀ = permute(Z, P): K = permute(Z, P with its last two entries swapped), a view
        perm = tr.attrs["first_transpose"]
        k = _shuffle_after(net, tr.inputs[0], list(perm[:-2]) + [perm[-1], perm[-2]], tr.name + "/k", tr.origin,
                           net.layers.index(tr) + 1)
    elif k is None:
        r = m["kt"].rank
        k = _shuffle_after(net, m["kt"], list(range(r - 2)) + [r - 1, r - 2], m["qk"].name + "/k", m["qk"].origin,
                           net.layers.index(pv))
    chain = m["chain"]
    ins = [m["q"], k, m["v"]] + ([m["mask"]] if m["mask"] is not None else [])
    att = net.add_layer("Attention", ins, {"scale": m["scale"], "causal": False},
                        name=net.unique_name(pv.name + "/attention"),
                        origin=[o for layer in chain + [pv] for o in layer.origin])
    substitute(net, att, pv, pv.outputs, [pv] + chain)


_SOFTMAX = Op("SoftMax", Var("s"), name="sm", log=lambda v: not v)
# exporters guard fully masked rows: Where(IsNaN(p), 0, p), which an additive finite mask never needs
_GUARDED = Op("Where", Op("Unary", _SOFTMAX, op="isnan", name="isnan", shared=True), Const(0.0, tol=0.0), _SOFTMAX,
              name="where")


class FuseAttention(RulePass):
    name = "attention fusion"
    rules = [
        Rule("softmax(Q·Kᵀ·s + M) @ V -> Attention", Op("MatMul", _SOFTMAX, Var("v")), _plan, _fuse),
        Rule("where(isnan(p), 0, p) @ V, p = softmax(Q·Kᵀ·s + M) -> Attention", Op("MatMul", _GUARDED, Var("v")),
             _plan, _fuse),
    ]
