"""Shuffles through linear layers: a transpose or reshape that moves only leading dims commutes with
a layer acting on the last axis, so it can move to the side where it meets the other view chain
(and passes/collapse_views.py makes the two one view).

The linear layer is a FullyConnected, a Gemm with constant B and a bias over its columns, or a
MatMul with a constant 2-D weight (the last two become FullyConnected when they move). Cases, for
static or symbolic shapes (passes/_views.py):
- x → [views moving leading dims only] → FC → [view layers only] ⇒ x → FC → [the same views, over
  N] → [view layers]: nn.MultiheadAttention's ``LN → Transpose[1,0,2] → in-projection → Reshape…``
  (the projection then reads the LayerNorm output in place and q, k, v come out as views in
  [B, S] order);
- [views] → FC → [views moving leading dims only, each read once] → y, y read by a non-view layer ⇒
  [views] → [the same views, over K] → FC → y: ``…Reshape[S·B, D] → out-projection Gemm →
  Reshape[S, B, D] → Transpose[1,0,2]`` (the projection then writes [B, S, D] contiguous, and its
  input becomes one view of the attention output).
The two cases exclude each other (the first needs only view readers, the second a non-view one),
so they cannot undo each other.
"""
from __future__ import annotations

import numpy as np

from kiln.ir.network import Layer, Network, Tensor
from kiln.passes._match import remove_dead, replace_output
from kiln.passes._views import (
    NotAView,
    ViewMap,
    chain_to,
    collapsed_copies,
    emit,
    form_steps,
    is_view,
    layer_steps,
    local_readers,
    predicted_copies,
    static_shape,
)
from kiln.passes.base import Pass, PassResult
from kiln.passes.symbolic import Dim, ir_dim

LINEAR = ("FullyConnected", "Gemm", "MatMul")


def _weights(net: Network, layer: Layer):
    """A maker of (weight [N, K], bias or None, attrs) for FullyConnected, or None if the layer is
    not a last-axis linear map with constant weights."""
    ins = layer.inputs
    a = layer.attrs
    if layer.kind == "FullyConnected":
        return lambda: (ins[1], ins[2] if len(ins) > 2 else None, dict(a))
    b = ins[1]
    if not b.is_constant or b.value.ndim != 2 or b.value.dtype.kind != "f":
        return None
    epilogue = {k: a[k] for k in ("activation", "alpha", "beta") if k in a and layer.kind == "MatMul"}
    if layer.kind == "MatMul":
        if a.get("transpose_a"):
            return None
        w = b.value if a.get("transpose_b") else b.value.T
        return lambda: (net.add_constant(np.ascontiguousarray(w), name=net.unique_name(b.name + "_fc")), None,
                        epilogue)
    if a.get("trans_a") or ins[0].rank != 2:
        return None
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    w = b.value if a.get("trans_b") else b.value.T
    n = w.shape[0]
    c = ins[2] if len(ins) > 2 else None
    if c is not None and (not c.is_constant or c.value.dtype != b.value.dtype
                          or not (c.value.size == 1 or (c.value.size == n and c.value.shape[-1] == n))):
        return None

    def make():
        wc = net.add_constant(np.ascontiguousarray(w * np.asarray(alpha, w.dtype) if alpha != 1.0 else w),
                              name=net.unique_name(b.name + "_fc"))
        if c is None:
            return wc, None, {}
        bias = np.broadcast_to(c.value.reshape(-1), (n,)) * np.asarray(beta, c.value.dtype)
        return wc, net.add_constant(np.ascontiguousarray(bias), name=net.unique_name(c.name + "_fc")), {}
    return make


def _fc(net: Network, layer: Layer, x: Tensor, make, shape: tuple[Dim, ...], dtype: str, origin: list[str],
        where: int) -> Layer:
    w, b, attrs = make()
    fc = net.add_layer("FullyConnected", [x, w] + ([b] if b is not None else []), attrs,
                       name=net.unique_name(layer.name + "/moved"), origin=origin)
    net.layers.remove(fc)
    net.layers.insert(where, fc)
    fc.outputs[0].shape, fc.outputs[0].dtype = tuple(ir_dim(d) for d in shape), dtype
    return fc


def _view_ends(y: Tensor, net: Network) -> list[Tensor]:
    """Outputs of view layers below ``y`` (through views only) that a non-view layer or the network reads."""
    ends: list[Tensor] = []
    stack, seen = [y], {id(y)}
    while stack:
        t = stack.pop()
        for user, _ in t.uses:
            o = user.outputs[0]
            if not is_view(user) or id(o) in seen:
                continue
            seen.add(id(o))
            if o in net.outputs or not o.uses or any(not is_view(u) for u, _ in o.uses):
                ends.append(o)
            stack.append(o)
    return ends


class SinkShuffles(Pass):
    name = "shuffles through linear layers"

    def call(self, net: Network) -> PassResult:
        modified = False
        for layer in list(net.layers):
            if layer in net.layers and layer.kind in LINEAR:
                modified |= self._down(net, layer) or self._up(net, layer)
        return PassResult(net, modified)

    def _down(self, net: Network, layer: Layer) -> bool:
        x, y = layer.inputs[0], layer.outputs[0]
        src, chain = chain_to(x)
        sshape, yshape = static_shape(src), static_shape(y)
        if not chain or sshape is None or yshape is None or y in net.outputs or not y.uses \
                or not local_readers(y, net) or not all(is_view(user) for user, _ in y.uses):
            return False
        try:
            vm = ViewMap.of(sshape, chain)
        except NotAView:
            return False
        atom = vm.last_atom()
        make = _weights(net, layer) if atom is not None else None
        if make is None:
            return False
        # only where the views after the projection, joined with the moved ones, copy no more
        fshape = sshape[:-1] + (yshape[-1],)
        form = vm.canonical(yshape, {atom: yshape[-1]})
        ends = [(e, layer_steps(chain_to(e)[1])) for e in _view_ends(y, net)]
        if any(static_shape(e) is None for e, _ in ends):
            return False
        before = predicted_copies(sshape, layer_steps(chain)) + sum(predicted_copies(yshape, st) for _, st in ends)
        after = sum(collapsed_copies(fshape, form_steps(form, fshape) + st, static_shape(e)) for e, st in ends)
        if after > before:
            return False
        origin = list(dict.fromkeys([o for v in chain for o in v.origin] + layer.origin))
        fc = _fc(net, layer, src, make, fshape, y.dtype, origin, net.layers.index(layer))
        try:
            new, _ = emit(net, fc.outputs[0], form, yshape, layer.name, origin, layer)
        except NotAView:
            net.remove_layer(fc)
            return False
        replace_output(net, y, new)
        remove_dead(net, [layer] + chain)
        return True

    def _up(self, net: Network, layer: Layer) -> bool:
        x, y = layer.inputs[0], layer.outputs[0]
        if not is_view(x.producer):
            return False
        chain: list[Layer] = []
        t = y
        while len(t.uses) == 1 and t not in net.outputs and is_view(t.uses[0][0]) and local_readers(t, net):
            chain.append(t.uses[0][0])
            t = chain[-1].outputs[0]
        xshape, yshape, tshape = static_shape(x), static_shape(y), static_shape(t)
        if not chain or xshape is None or yshape is None or tshape is None:
            return False
        if t not in net.outputs and all(is_view(user) for user, _ in t.uses):
            return False                  # view readers only: the first case's ground
        try:
            vm = ViewMap.of(yshape, chain)
        except NotAView:
            return False
        atom = vm.last_atom()
        make = _weights(net, layer) if atom is not None else None
        if make is None:
            return False
        k = xshape[-1]
        moved = tshape[:-1] + (k,)
        form = vm.canonical(moved, {atom: k})
        # only where the views before the projection, joined with the moved ones, copy no more
        src, xchain = chain_to(x)
        sshape = static_shape(src)
        before = predicted_copies(sshape, layer_steps(xchain)) + predicted_copies(yshape, layer_steps(chain))
        if collapsed_copies(sshape, layer_steps(xchain) + form_steps(form, xshape), moved) > before:
            return False
        origin = list(dict.fromkeys(layer.origin + [o for v in chain for o in v.origin]))
        try:
            new_x, _ = emit(net, x, form, moved, layer.name, origin, layer)
        except NotAView:
            return False
        fc = _fc(net, layer, new_x, make, tshape, t.dtype, origin, net.layers.index(layer))
        replace_output(net, t, fc.outputs[0])
        remove_dead(net, [layer] + chain)
        return True
