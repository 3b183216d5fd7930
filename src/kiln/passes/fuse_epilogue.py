"""Epilogue fusion: what follows a convolution or GEMM runs inside it.

Cases:
- Convolution → Activation (relu, silu, sigmoid, tanh, clip, gelu, leaky_relu, hard_swish,
  hard_sigmoid), the conv output read only there → Convolution with attrs activation;
- Convolution → ElementWise sum with a tensor of the same shape (a residual) → [Activation]
  → Convolution with the residual as 4th input: y = act(conv(x) + b + r);
- Convolution with a fused activation → ElementWise sum with a same-shape tensor (YOLO's C3
  bottleneck: x + SiLU(conv(...))) → Convolution with ``residual_after_activation``:
  y = act(conv(x) + b) + r;
- MatMul(x, W) with a constant 2-D W, then ElementWise sum with a constant bias of W's
  column count (its other axes 1, no more of them than the product has) → FullyConnected(x, Wᵀ, b): the bias
  rides in the GEMM;
- FullyConnected / MatMul → Activation → the GEMM with attrs activation;
- Convolution (no activation, residual or pool; constant bias or none) → [Squeeze/Unsqueeze of axes past the
  channels, Slice that keeps every channel in place]… → ElementWise sum with a constant that broadcasts over the
  channel axis only (or a scalar) → the constant added to the convolution's bias (jax2tf/tf2onnx write Conv2D and
  its bias as two ops): conv(x) + b. The tensors between carry the bias afterwards and get new names.
On the GPU a ReLU conv (with or without residual) runs as one cuDNN kernel
(conv + bias + add + ReLU); other epilogues run in place on the conv's output.
"""
from __future__ import annotations

import numpy as np

from kiln.passes._match import remove_dead, replace_output, substitute
from kiln.passes.fold_qdq import reads_dequantized
from kiln.passes.rewrite import ConstTensor, Match, Op, Rule, RulePass, Var
from kiln.passes.symbolic import sym_shape

FUSABLE = {"relu", "silu", "sigmoid", "tanh", "clip", "gelu", "gelu_tanh", "leaky_relu", "hard_swish",
           "hard_sigmoid"}
GEMMS = ("Convolution", "FullyConnected", "MatMul")


def _activation_fits(m: Match) -> str | None:
    layer, act = m["gemm"], m.root
    if layer.attrs.get("pool"):
        return "a pooled stem convolution's output is the pool's (fuse_stem_pool.py)"
    if layer.attrs.get("activation"):
        return f"{layer.name!r} already has a fused activation"
    if act.attrs.get("type") not in FUSABLE:
        return f"activation {act.attrs.get('type')!r} has no fused epilogue"
    if act.attrs["type"] == "clip" and (act.attrs.get("alpha") is None or act.attrs.get("beta") is None):
        return "a clip without both bounds"
    return None


def _fuse_activation(m: Match) -> None:
    net, layer, act = m.net, m["gemm"], m.root
    y = layer.outputs[0]
    layer.attrs["activation"] = act.attrs["type"]
    layer.attrs["alpha"] = act.attrs.get("alpha", 0.0)
    layer.attrs["beta"] = act.attrs.get("beta", 0.0)
    layer.origin = list(dict.fromkeys(layer.origin + act.origin))
    replace_output(net, act.outputs[0], y)
    remove_dead(net, [act])


def _bias_fits(m: Match) -> str | None:
    mm, w, b = m["mm"], m["w"], m["b"]
    if mm.attrs.get("activation"):
        return f"{mm.name!r} already has a fused activation"
    if mm.attrs.get("transpose_a") or mm.attrs.get("transpose_b") or w.value.ndim != 2:
        return "the weight is transposed or not 2-D"
    if not w.dtype.startswith("float") and w.dtype != "bfloat16":
        return f"the weight is {w.dtype}, not floating point"
    out = mm.outputs[0].shape
    lead_ones = b.value.ndim <= 1 or (out is not None and b.value.ndim <= len(out)
                                      and all(d == 1 for d in b.value.shape[:-1]))
    if b.value.size != w.value.shape[1] or not lead_ones or b.dtype != w.dtype:
        return "the bias is not one value per output column of the weight's dtype (leading axes of 1 at most)"
    return None


def _to_fully_connected(m: Match) -> None:
    net, mm, add, w, b = m.net, m["mm"], m.root, m["w"], m["b"]
    wt = net.add_constant(np.ascontiguousarray(w.value.T), name=net.unique_name(w.name + "_t"))
    bt = net.add_constant(b.value.reshape(-1), name=net.unique_name(b.name + "_fc"))
    fc = net.add_layer("FullyConnected", [m["x"], wt, bt], {}, name=net.unique_name(mm.name + "/fc"),
                       origin=list(dict.fromkeys(mm.origin + add.origin)))
    substitute(net, fc, mm, add.outputs, [add, mm])


def _residual_fits(m: Match) -> str | None:
    net, conv, r = m.net, m["conv"], m["r"]
    y = conv.outputs[0]
    if conv.attrs.get("pool") or conv.attrs.get("residual"):
        return f"{conv.name!r} is pooled or already has a residual"
    if len(conv.inputs[1].shape or ()) != 4:
        return "not a 2-D convolution"
    if sym_shape(r) is None or sym_shape(r) != sym_shape(y):       # equal at every shape of the profile
        return "the residual's shape is not the convolution's (broadcast or unknown)"
    if r.producer is not None and net.layers.index(r.producer) > net.layers.index(conv):
        return "the residual is computed after the convolution"
    if r.dtype != y.dtype:
        return "the residual's dtype is not the convolution's"
    return None


def _fuse_residual(m: Match) -> None:
    net, conv, add, r = m.net, m["conv"], m.root, m["r"]
    y = conv.outputs[0]
    while len(conv.inputs) < 3:
        conv.inputs.append(None)
    conv.inputs.append(None)
    conv.set_input(3, r)
    conv.attrs["residual"] = True
    if conv.attrs.get("activation"):    # y = act(conv + b) + r: the bottleneck's shortcut after its SiLU
        conv.attrs["residual_after_activation"] = True
    conv.origin = list(dict.fromkeys(conv.origin + add.origin))
    replace_output(net, add.outputs[0], y)
    remove_dead(net, [add])


def _channel_views(net, y):
    """The Convolution whose output reaches ``y`` through views that keep axis 1 as its channel axis, each tensor
    on the way read only by the next, with the views; else (None, reason)."""
    views, t = [], y
    while t.producer is not None and t.producer.kind in ("Squeeze", "Unsqueeze", "Slice"):
        view = t.producer
        if view.inputs[0].shape is None or view.outputs[0].shape is None:
            return None, f"{view.name!r} has unknown shapes"
        rank = len(view.outputs[0].shape if view.kind == "Unsqueeze" else view.inputs[0].shape)
        if view.kind == "Slice":
            keeps = _slice_keeps_channels(view, rank)
        else:
            axes = view.attrs.get("axes")
            keeps = len(view.inputs) == 1 and axes is not None and all(a % rank >= 2 for a in axes)
        if not keeps:
            return None, f"{view.name!r} may move the channel axis"
        views.append(view)
        t = view.inputs[0]
    conv = t.producer
    if conv is None or conv.kind != "Convolution":
        return None, "no convolution before the sum"
    for out in [y] + [v.inputs[0] for v in views]:
        if len(out.uses) != 1 or out in net.outputs:
            return None, f"{out.name!r} is read elsewhere"
    return (conv, views), None


def _slice_keeps_channels(view, rank: int) -> bool:
    """Whether a Slice leaves axis 1 whole and in order (constant starts/ends/axes/steps, a positive step and the
    same length there; any slicing of other axes commutes with a per-channel sum)."""
    ins = view.inputs + [None] * (5 - len(view.inputs))
    if any(t is not None and not t.is_constant for t in ins[1:]):
        return False
    n = ins[1].value.size
    axes = ins[3].value.reshape(-1) if ins[3] is not None else np.arange(n)
    steps = ins[4].value.reshape(-1) if ins[4] is not None else np.ones(n, np.int64)
    x, out = view.inputs[0].shape, view.outputs[0].shape
    for a, step in zip(axes, steps):
        if int(a) % rank == 1 and (step <= 0 or x[1] != out[1] or not isinstance(x[1], int)):
            return False
    return True


def _conv_bias_fits(m: Match) -> str | None:
    net, add, y, b = m.net, m.root, m["y"], m["b"]
    found, why = _channel_views(net, y)
    if found is None:
        return why
    conv, _ = found
    a = conv.attrs
    if a.get("activation") or a.get("residual") or a.get("pool"):
        return f"{conv.name!r} has a fused activation, residual or pool"
    if reads_dequantized(conv):
        return f"{conv.name!r} reads a dequantized input (fold_qdq's to take)"
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    if bias is not None and not bias.is_constant:
        return "the convolution's bias is not a constant"
    if y.shape is None or add.outputs[0].shape is None or conv.inputs[1].shape is None:
        return "unknown shapes"
    cout, shape, dt = conv.inputs[1].shape[0], b.shape, conv.outputs[0].dtype
    if not (dt.startswith("float") or dt == "bfloat16") or b.dtype != dt or (bias is not None and bias.dtype != dt):
        return "the constant, the bias or the output differ in dtype or are not floating point"
    rank = len(y.shape)
    if rank < 2 or len(shape) > rank or y.shape[1] != cout or tuple(add.outputs[0].shape) != tuple(y.shape):
        return "the sum broadcasts the convolution's output"
    full = (1,) * (rank - len(shape)) + tuple(shape)
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, cout):
        return "the constant varies along an axis other than the channels"
    return None


def _fold_conv_bias(m: Match) -> None:
    net, add, y, b = m.net, m.root, m["y"], m["b"]
    (conv, views), _ = _channel_views(net, y)
    cout = conv.inputs[1].shape[0]
    old = conv.inputs[2] if len(conv.inputs) > 2 else None
    total = np.broadcast_to(b.value.reshape(-1), (cout,)).astype(b.value.dtype)
    if old is not None:
        total = old.value.reshape(-1) + total
    while len(conv.inputs) < 3:
        conv.inputs.append(None)
    conv.set_input(2, net.add_constant(np.ascontiguousarray(total), name=net.unique_name(conv.name + "_bias")))
    for t in [conv.outputs[0]] + [v.outputs[0] for v in views[1:][::-1]]:   # now hold conv(x) + b: not ONNX's values
        if t is not y:
            net.rename(t, net.unique_name(t.name + "+bias"))
    conv.origin = list(dict.fromkeys(conv.origin + add.origin))
    replace_output(net, add.outputs[0], y)
    remove_dead(net, [add])


class FuseEpilogues(RulePass):
    name = "epilogue fusion"
    rules = [
        Rule("conv(x) + r -> conv with residual", Op("ElementWise", Op("Convolution", ..., name="conv"), Var("r"),
                                                       op="sum"), _residual_fits, _fuse_residual),
        Rule("x @ W + b -> FullyConnected",
             Op("ElementWise", Op("MatMul", Var("x"), ConstTensor("w"), name="mm"), ConstTensor("b"), op="sum"),
             _bias_fits, _to_fully_connected),
        Rule("conv(x) + b -> conv with bias b", Op("ElementWise", Var("y"), ConstTensor("b"), op="sum"),
             _conv_bias_fits, _fold_conv_bias),
        Rule("act(gemm(x)) -> gemm with activation", Op("Activation", Op(GEMMS, ..., name="gemm"), ...),
             _activation_fits, _fuse_activation),
    ]
