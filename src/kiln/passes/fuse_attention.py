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

from kiln.ir.network import Network
from kiln.passes._match import only_consumer, producer, scalar, single_use, substitute
from kiln.passes.base import Pass, PassResult


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


def _nan_guard(net, probs):
    """``Where(IsNaN(p), 0, p)`` after the softmax (exporters guard fully masked rows) → [isnan, where]."""
    if len(probs.uses) != 2 or probs in net.outputs:
        return None
    kinds = {layer.kind: layer for layer, _ in probs.uses}
    isnan, where = kinds.get("Unary"), kinds.get("Where")
    if isnan is None or where is None or isnan.attrs.get("op") != "isnan":
        return None
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or scalar(where.inputs[1]) != 0.0:
        return None
    return [isnan, where]


class FuseAttention(Pass):
    name = "attention fusion"

    def call(self, net: Network) -> PassResult:
        modified = False
        for sm in list(net.layers):
            if sm in net.layers and sm.kind == "SoftMax" and not sm.attrs.get("log"):
                modified |= self._try(net, sm)
        return PassResult(net, modified)

    def _try(self, net: Network, sm) -> bool:
        x = sm.inputs[0]
        if x.rank is None or x.rank < 3 or sm.attrs.get("axis", -1) % x.rank != x.rank - 1:
            return False
        probs = sm.outputs[0]
        chain = [sm]
        guard = _nan_guard(net, probs)
        if guard is not None:
            chain += guard
            probs = guard[-1].outputs[0]
        pv = only_consumer(probs, net, "MatMul")
        if pv is None or pv.inputs[0] is not probs or pv.attrs.get("transpose_a") or pv.attrs.get("transpose_b"):
            return False
        v = pv.inputs[1]
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
            return False
        chain.append(qk)
        q, s_q = _strip_scale(qk.inputs[0], net, chain)
        kt, s_k = _strip_scale(qk.inputs[1], net, chain)
        if qk.attrs.get("transpose_b"):
            k, k_view = kt, None
        else:
            tr = producer(kt, "Shuffle")
            r = kt.rank
            perm = tr.attrs.get("first_transpose") if tr is not None else None
            pure = (tr is not None and r is not None and perm is not None and tr.attrs.get("reshape") is None
                    and tr.attrs.get("second_transpose") is None and len(tr.inputs) == 1)
            if pure and list(perm) == list(range(r - 2)) + [r - 1, r - 2]:
                k, k_view = tr.inputs[0], None
                if single_use(kt, net):
                    chain.append(tr)
            elif pure:
                # Kᵀ = permute(Z, P): K = permute(Z, P with its last two entries swapped), a view
                k_perm = list(perm[:-2]) + [perm[-1], perm[-2]]
                z = tr.inputs[0]
                kl = net.add_layer("Shuffle", [z], {"first_transpose": k_perm, "reshape": None,
                                                    "second_transpose": None, "allowzero": False},
                                   name=net.unique_name(tr.name + "/k"), origin=tr.origin)
                net.layers.remove(kl)
                net.layers.insert(net.layers.index(tr) + 1, kl)
                k = kl.outputs[0]
                k.dtype = z.dtype
                if z.shape is not None:
                    k.shape = tuple(z.shape[i] for i in k_perm)
                k_view = None
                if single_use(kt, net):
                    chain.append(tr)
            else:
                k, k_view = None, kt
        if q.rank is None or v.rank is None or q.rank != v.rank:
            return False
        if k_view is not None:
            r = k_view.rank
            kl = net.add_layer("Shuffle", [k_view], {"first_transpose": list(range(r - 2)) + [r - 1, r - 2],
                                                     "reshape": None, "second_transpose": None, "allowzero": False},
                               name=net.unique_name(qk.name + "/k"), origin=qk.origin)
            net.layers.remove(kl)
            net.layers.insert(net.layers.index(pv), kl)
            k = kl.outputs[0]
            k.dtype = k_view.dtype
            if k_view.shape is not None:
                k.shape = tuple(k_view.shape[:-2]) + (k_view.shape[-1], k_view.shape[-2])
        scale = s_scores * s_q * s_k
        ins = [q, k, v] + ([mask] if mask is not None else [])
        att = net.add_layer("Attention", ins, {"scale": scale, "causal": False},
                            name=net.unique_name(pv.name + "/attention"),
                            origin=[o for layer in chain + [pv] for o in layer.origin])
        substitute(net, att, pv, pv.outputs, [pv] + chain)
        return True
