"""View-chain collapse: a static chain of reshapes, transposes, squeezes and selects becomes its
canonical form (see passes/_views.py), which torch runs as views where the chain would copy.

Cases (shapes static or symbolic: passes/_views.py; the chain ends where a non-view layer or a network output reads it):
- Reshape → Transpose → Reshape (attention heads, ``[S, B·H, hd] → [B·H, S, hd] → [B, H, S, hd]``)
  → one Shuffle: split-reshape + permute (+ merge-reshape);
- chains through Unsqueeze/Squeeze/Select (nn.MultiheadAttention's packed QKV:
  ``Reshape[S, B, 3, D] → Unsqueeze → Transpose → Squeeze → Gather(i) → Reshape → Transpose →
  Reshape``) → Shuffle(split, permute) → Select(i), the first Shuffle shared by q, k and v;
- ``Transpose[2, 0, 1, 3] → Reshape[S·B, D] → Reshape[S, B, D] → Transpose[1, 0, 2]`` (an attention
  output once passes/sink_shuffles.py has moved the projection) → Shuffle(permute, merge).
A chain is replaced when its canonical form has fewer copying steps (each layer run on a
contiguous source of the chain's shape, on torch's meta device) or, at equal copies, fewer layers.
Chains whose index map is not a split/permute/select/merge of the source (a reshape that regroups
elements across dims of unrelated sizes), chains over integer tensors (shape arithmetic, placed on
the host) and chains through a dim that is not a monomial of the input symbols are left alone.
"""
from __future__ import annotations

from kiln.ir.network import Layer, Network
from kiln.passes._match import remove_dead, replace_output
from kiln.passes._views import (
    NotAView,
    ViewMap,
    chain_to,
    emit,
    is_view,
    layer_steps,
    local_readers,
    predicted_copies,
    static_shape,
)
from kiln.passes.base import Pass, PassResult

FLOATS = ("float32", "float16", "bfloat16", "float64")


class CollapseViews(Pass):
    name = "view-chain collapse"

    def call(self, net: Network) -> PassResult:
        modified = False
        cache: dict = {}
        ends = []
        outputs = {id(t) for t in net.outputs}
        for layer in net.layers:
            if not is_view(layer):
                continue
            t = layer.outputs[0]
            if not local_readers(t, net):
                continue
            if id(t) in outputs or any(not is_view(user) for user, _ in t.uses):
                ends.append(t)
        for t in ends:
            if t.producer is not None and t.producer in net.layers:
                modified |= self._collapse(net, t, cache)
        return PassResult(net, modified)

    def _collapse(self, net: Network, t, cache: dict) -> bool:
        src, chain = chain_to(t)
        shape, out_shape = static_shape(src), static_shape(t)
        if len(chain) < 2 or shape is None or out_shape is None or src.dtype not in FLOATS:
            return False              # integer chains are shape arithmetic, on the host
        try:
            form = ViewMap.of(shape, chain).canonical(out_shape)
            origin = list(dict.fromkeys(o for layer in chain for o in layer.origin))
            new, made = emit(net, src, form, out_shape, chain[-1].name, origin, chain[-1], cache)
        except NotAView:
            return False
        steps = _chain_layers(new, src)
        if (predicted_copies(shape, layer_steps(steps)), len(steps)) >= \
                (predicted_copies(shape, layer_steps(chain)), len(chain)) \
                or (new is src and t in net.outputs):
            for layer in reversed(made):
                if not layer.outputs[0].uses:
                    net.remove_layer(layer)
            return False
        replace_output(net, t, new)
        remove_dead(net, chain)
        return True


def _chain_layers(t, src) -> list[Layer]:
    layers: list[Layer] = []
    while t is not src and t.producer is not None:
        layers.insert(0, t.producer)
        t = t.producer.inputs[0]
    return layers
