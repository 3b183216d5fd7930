"""1×1 chains: a ResNet block's last 1×1 convolution and the next block's first run as one layer.

Case: Convolution A (1×1, stride 1, no padding, one group, constant weight and bias, a fused
residual before its ReLU or no activation) whose output y is read by a Convolution B (1×1,
stride 1, no padding, one group, constant weight and bias, no residual, ReLU or no activation)
over y's channels, with B's output channels at most 128 and every channel count a power of two
≥ 16 → one Conv1x1Chain layer (x, W_A, b_A, r, W_B, b_B) → (y, z) whose fused kernel
(kernels/conv_chain.py) writes y once and never reads it back. y's other readers (the next
block's residual) still read it. Where a block's add was fused into its strided projection
shortcut instead (the projection comes later in the graph), the add moves to the expansion first.
ResNet-50's stages 1-2 fuse; in stage 3 (256 channels in B) the
fused kernel was slower than the two convolutions on an H100 (benchmarks/chain_bench.py), so
stages 3-4 stay apart. The layer also has tactics that run the two convolutions one after the
other with the engine's usual kernels, and the builder times them against the fused one.
"""
from __future__ import annotations

from kiln.ir.network import Network
from kiln.passes._match import remove_dead, replace_output
from kiln.passes.base import Pass, PassResult

MAX_CN = 128      # wider second convolutions (ResNet-50's stages 3-4) ran slower fused on an H100
ACTS = (None, "relu")


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _pointwise(conv, residual: bool) -> bool:
    if conv.kind != "Convolution" or len(conv.inputs) < 3:
        return False
    a = conv.attrs
    ins = conv.inputs
    w = ins[1]
    b = ins[2] if len(ins) > 2 else None
    r = ins[3] if len(ins) > 3 else None
    return (w is not None and w.is_constant and w.value.ndim == 4
            and w.value.shape[2:] == (1, 1) and list(a.get("stride", ())) == [1, 1] and not any(a.get("pads", ()))
            and list(a.get("dilation", [1, 1])) == [1, 1] and a.get("groups", 1) == 1 and not a.get("pool")
            and b is not None and b.is_constant and (r is not None) == residual
            and not a.get("residual_after_activation") and a.get("activation") in ACTS
            and _pow2(w.value.shape[0]) and _pow2(w.value.shape[1]))


def _second(y):
    return next((layer for layer, i in y.uses if i == 0 and _pointwise(layer, residual=False)
                 and layer.inputs[1].value.shape[0] <= MAX_CN), None)


def _move_shortcut(net: Network, a) -> bool:
    """A block whose shortcut is a strided 1×1 projection (ResNet's first block of stages 2-4) had
    its residual add fused into the projection, which comes later in the graph than the 1×1
    expansion: y = act(proj(x) + expand(h)). Move the add and activation into the expansion,
    y = act(expand(h) + proj(x)), so that the expansion can lead a chain."""
    if a.kind != "Convolution" or len(a.inputs) < 4 or a.inputs[3] is None or a.attrs.get("pool") \
            or a.attrs.get("residual_after_activation") or a.attrs.get("activation") not in ACTS:
        return False
    r = a.inputs[3]
    p = r.producer
    if p is None or len(r.uses) != 1 or r in net.outputs or not _pointwise(p, residual=False) \
            or p.attrs.get("activation") is not None:
        return False
    y = a.outputs[0]
    if _second(y) is None:
        return False
    act = a.attrs.get("activation")
    a.set_input(3, None)
    del a.inputs[3:]
    a.attrs.pop("residual", None)
    for k in ("activation", "alpha", "beta"):
        a.attrs.pop(k, None)
    name = y.name
    net.rename(y, net.unique_name(name + "/projection"))
    net.rename(r, name)
    for layer, i in list(y.uses):
        layer.set_input(i, r)
    net.outputs[:] = [r if t is y else t for t in net.outputs]
    while len(p.inputs) < 3:
        p.inputs.append(None)
    p.inputs.append(None)
    p.set_input(3, y)
    p.attrs.update({"residual": True, "activation": act, "alpha": 0.0, "beta": 0.0})
    p.origin = list(dict.fromkeys(p.origin + a.origin[1:]))
    a.origin = a.origin[:1]
    net.layers.remove(p)
    net.layers.insert(net.layers.index(a) + 1, p)
    return True


class FuseConvChains(Pass):
    name = "1x1 chain fusion"

    def call(self, net: Network) -> PassResult:
        modified = False
        for a in list(net.layers):
            if a in net.layers and not _pointwise(a, residual=True):
                modified |= _move_shortcut(net, a)
        for a in list(net.layers):
            if a not in net.layers or not _pointwise(a, residual=True):
                continue
            y = a.outputs[0]
            b = _second(y)
            if b is None:
                continue
            x, wa, ba, r = a.inputs[:4]
            chain = net.add_layer("Conv1x1Chain", [x, wa, ba, r, b.inputs[1], b.inputs[2]],
                                  {"activation": a.attrs.get("activation"), "activation2": b.attrs.get("activation")},
                                  num_outputs=2, name=net.unique_name(a.name + "+" + b.name.rsplit("/", 1)[-1]),
                                  origin=list(dict.fromkeys(a.origin + b.origin)))
            net.layers.remove(chain)
            net.layers.insert(net.layers.index(a), chain)
            for new, old in zip(chain.outputs, (y, b.outputs[0])):
                new.shape, new.dtype = old.shape, old.dtype
                replace_output(net, old, new)
            remove_dead(net, [b, a])
            modified = True
        return PassResult(net, modified)
