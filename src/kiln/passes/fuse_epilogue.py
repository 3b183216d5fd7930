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
  column count → FullyConnected(x, Wᵀ, b): the bias rides in the GEMM;
- FullyConnected / MatMul → Activation → the GEMM with attrs activation.
On the GPU a ReLU conv (with or without residual) runs as one cuDNN kernel
(conv + bias + add + ReLU); other epilogues run in place on the conv's output.
"""
from __future__ import annotations

import numpy as np

from kiln.passes._match import remove_dead, replace_output, substitute
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
    if b.value.size != w.value.shape[1] or b.value.ndim > 1 or b.dtype != w.dtype:
        return "the bias is not one value per output column of the weight's dtype"
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


class FuseEpilogues(RulePass):
    name = "epilogue fusion"
    rules = [
        Rule("conv(x) + r -> conv with residual", Op("ElementWise", Op("Convolution", ..., name="conv"), Var("r"),
                                                       op="sum"), _residual_fits, _fuse_residual),
        Rule("x @ W + b -> FullyConnected",
             Op("ElementWise", Op("MatMul", Var("x"), ConstTensor("w"), name="mm"), ConstTensor("b"), op="sum"),
             _bias_fits, _to_fully_connected),
        Rule("act(gemm(x)) -> gemm with activation", Op("Activation", Op(GEMMS, ..., name="gemm"), ...),
             _activation_fits, _fuse_activation),
    ]
