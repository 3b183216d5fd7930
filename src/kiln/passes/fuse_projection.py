"""Projection shortcuts: a 1×1 convolution whose fused residual is another 1×1 convolution's output
becomes one Conv1x1Sum layer, y = act(conv(x1, W1) + conv(x2, W2) + b1 + b2).

ResNet's first block of each stage adds a strided 1×1 projection of the block input x to the
block's 1×1 expansion of h: y = relu(expand(h) + project(x)). Run as two convolutions, the
projection writes its whole output (C channels, the stage's widest tensor) and the expansion reads
it back as its residual. The sum is one GEMM whose K runs over h's channels, then over x's
(kernels/conv_sum.py): only y is written. In ResNet-50 at batch 256 the projection's output is
411 MB in stage 1 and 205 MB in stage 2.

Case: Convolution A (2-D, 1×1, no padding, one group, constant weight and bias or none, a fused
residual added before its activation, no fused pool) whose residual r is the output of Convolution
B (the same, without residual, activation or pool), r read by A only and not a network output, r
of A's output shape. Either one may be strided (the unstrided one becomes the first operand, so
that a chain can follow, passes/fuse_conv_chain.py). A's activation carries over; the two biases
are summed into one constant.
"""
from __future__ import annotations

import numpy as np

from kiln.passes._match import substitute
from kiln.passes.fold_qdq import reads_dequantized
from kiln.passes.rewrite import ANY, Match, Op, Rule, RulePass
from kiln.passes.symbolic import sym_shape


def _pointwise(conv) -> bool:
    if conv.kind != "Convolution" or len(conv.inputs) < 2 or reads_dequantized(conv):    # fold_qdq's to take
        return False
    a = conv.attrs
    w = conv.inputs[1]
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    return (w is not None and w.is_constant and w.value.ndim == 4 and w.value.shape[2:] == (1, 1)
            and len(a.get("stride", ())) == 2 and not any(a.get("pads", ()))
            and list(a.get("dilation", [1, 1])) == [1, 1] and a.get("groups", 1) == 1 and not a.get("pool")
            and (b is None or b.is_constant))


def _fits(m: Match) -> str | None:
    """Whether A (the root) and B (its residual's producer) can fuse."""
    a, b = m.root, m["b"]
    r = a.inputs[3]
    if a.attrs.get("residual_after_activation") or not _pointwise(a):
        return "A is not a 1x1 convolution adding its residual before the activation"
    if not _pointwise(b) or (len(b.inputs) > 3 and b.inputs[3] is not None) or b.attrs.get("activation"):
        return "B is not a plain 1x1 convolution"
    if b.inputs[1].value.shape[0] != a.inputs[1].value.shape[0] or sym_shape(r) is None \
            or sym_shape(r) != sym_shape(a.outputs[0]):         # equal at every shape, unknown dims included
        return "B's output is not of A's shape"
    return None


def _bias(conv):
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    return None if b is None else b.value


def _fuse(m: Match) -> None:
    net, a, b = m.net, m.root, m["b"]
    wa = a.inputs[1]
    dtype = (_bias(a) if _bias(a) is not None else wa.value).dtype
    total = np.zeros(wa.value.shape[0], np.float32)
    for v in (_bias(a), _bias(b)):
        if v is not None:
            total += v.astype(np.float32)
    bias = net.add_constant(total.astype(dtype), name=net.unique_name(a.name + "_bias_sum"))
    first, second = (a, b) if list(a.attrs["stride"]) == [1, 1] else (b, a)    # the unstrided operand first
    attrs = {"stride1": list(first.attrs["stride"]), "stride2": list(second.attrs["stride"])}
    for k in ("activation", "alpha", "beta"):       # a clip's missing bound stays None (no bound)
        if k in a.attrs:
            attrs[k] = a.attrs[k]
    fused = net.add_layer("Conv1x1Sum", [first.inputs[0], first.inputs[1], second.inputs[0], second.inputs[1], bias],
                          attrs, name=net.unique_name(a.name + "+" + b.name.rsplit("/", 1)[-1]),
                          origin=list(dict.fromkeys(a.origin + b.origin)))
    substitute(net, fused, a, a.outputs, [a, b])


class FuseProjectionShortcuts(RulePass):
    name = "projection shortcut fusion"
    devices = ("cuda",)                # its fused kernels are GPU kernels
    rules = [Rule("conv1x1(x1) + conv1x1(x2) -> Conv1x1Sum",
                  Op("Convolution", ANY, ANY, ANY, Op("Convolution", ..., name="b"), ...), _fits, _fuse)]
