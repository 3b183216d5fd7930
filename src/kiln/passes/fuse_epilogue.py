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

from kiln.ir.network import Network
from kiln.passes._match import only_consumer, other_input, remove_dead, replace_output, substitute
from kiln.passes.base import Pass, PassResult

FUSABLE = {"relu", "silu", "sigmoid", "tanh", "clip", "gelu", "gelu_tanh", "leaky_relu", "hard_swish",
           "hard_sigmoid"}


class FuseEpilogues(Pass):
    name = "epilogue fusion"

    def call(self, net: Network) -> PassResult:
        modified = False
        for layer in list(net.layers):
            if layer not in net.layers or layer.attrs.get("pool"):
                continue        # a pooled stem convolution's output is the pool's (fuse_stem_pool.py)
            if layer.kind == "Convolution" and not layer.attrs.get("activation"):
                if not layer.attrs.get("residual"):
                    modified |= self._residual(net, layer)
                modified |= self._activation(net, layer)
            elif layer.kind == "Convolution" and not layer.attrs.get("residual"):
                modified |= self._residual(net, layer, after_activation=True)
            elif layer.kind in ("FullyConnected", "MatMul") and not layer.attrs.get("activation"):
                if layer.kind == "MatMul":
                    fc = self._linear(net, layer)
                    if fc is not None:
                        modified = True
                        layer = fc
                modified |= self._activation(net, layer)
        return PassResult(net, modified)

    def _activation(self, net, layer) -> bool:
        y = layer.outputs[0]
        act = only_consumer(y, net, "Activation")
        if act is None or act.attrs.get("type") not in FUSABLE:
            return False
        if act.attrs["type"] == "clip" and (act.attrs.get("alpha") is None or act.attrs.get("beta") is None):
            return False
        layer.attrs["activation"] = act.attrs["type"]
        layer.attrs["alpha"] = act.attrs.get("alpha", 0.0)
        layer.attrs["beta"] = act.attrs.get("beta", 0.0)
        layer.origin = list(dict.fromkeys(layer.origin + act.origin))
        replace_output(net, act.outputs[0], y)
        remove_dead(net, [act])
        return True

    def _linear(self, net, mm):
        x, w = mm.inputs
        if mm.attrs.get("transpose_a") or mm.attrs.get("transpose_b") or not w.is_constant or w.value.ndim != 2:
            return None
        if not w.dtype.startswith("float") and w.dtype != "bfloat16":
            return None
        y = mm.outputs[0]
        add = only_consumer(y, net, "ElementWise")
        if add is None or add.attrs.get("op") != "sum":
            return None
        b = other_input(add, y)
        if b is None or not b.is_constant or b.value.size != w.value.shape[1] or b.value.ndim > 1 \
                or b.dtype != w.dtype:
            return None
        import numpy as np
        wt = net.add_constant(np.ascontiguousarray(w.value.T), name=net.unique_name(w.name + "_t"))
        bt = net.add_constant(b.value.reshape(-1), name=net.unique_name(b.name + "_fc"))
        fc = net.add_layer("FullyConnected", [x, wt, bt], {}, name=net.unique_name(mm.name + "/fc"),
                           origin=list(dict.fromkeys(mm.origin + add.origin)))
        substitute(net, fc, mm, add.outputs, [add, mm])
        return fc

    def _residual(self, net, conv, after_activation: bool = False) -> bool:
        if len(conv.inputs[1].shape or ()) != 4:
            return False
        y = conv.outputs[0]
        add = only_consumer(y, net, "ElementWise")
        if add is None or add.attrs.get("op") != "sum" or len(add.inputs) != 2:
            return False
        r = other_input(add, y)
        if r is None or r.shape is None or y.shape is None or tuple(r.shape) != tuple(y.shape) or None in y.shape:
            return False
        if r.producer is not None and net.layers.index(r.producer) > net.layers.index(conv):
            return False
        if r.dtype != y.dtype:
            return False
        while len(conv.inputs) < 3:
            conv.inputs.append(None)
        conv.inputs.append(None)
        conv.set_input(3, r)
        conv.attrs["residual"] = True
        if after_activation:                # y = act(conv + b) + r: the bottleneck's shortcut after its SiLU
            conv.attrs["residual_after_activation"] = True
        conv.origin = list(dict.fromkeys(conv.origin + add.origin))
        replace_output(net, add.outputs[0], y)
        remove_dead(net, [add])
        return True
