"""Pointwise fusion: a chain of element-wise layers becomes one Pointwise layer (one kernel).

Cases:
- ElementWise (sum, sub, prod, div, max, min, pow), Unary (exp, log, sqrt, recip, abs, neg, erf,
  sin, cos, tanh-like) and Activation (relu, sigmoid, tanh, silu, gelu, gelu_tanh, leaky_relu,
  hard_sigmoid, hard_swish, softplus, clip) layers on floating tensors, each intermediate read only
  inside the chain → one Pointwise layer whose program lists the steps (e.g. YOLO's box decode
  ``(sigmoid(x)·2 + grid)·stride``);
- scalar constants become literals of the program; other inputs (tensors of the output's shape
  or broadcastable to it) become the layer's inputs.
Only chains of two or more steps with one output are fused. On the GPU the program becomes a
generated Triton kernel (kernels/pointwise_fused.py); elsewhere it runs step by step.
"""
from __future__ import annotations

from kiln.ir.network import Layer, Network
from kiln.passes._match import scalar, substitute
from kiln.passes.base import Pass, PassResult

BINARY = {"sum", "sub", "prod", "div", "max", "min", "pow"}
UNARY = {"exp", "log", "sqrt", "recip", "abs", "neg", "erf", "sin", "cos"}
ACTS = {"relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh", "leaky_relu", "hard_sigmoid", "hard_swish",
        "softplus", "clip"}
FLOATS = ("float32", "float16", "bfloat16")


def _fusable(layer: Layer) -> bool:
    if len(layer.outputs) != 1 or layer.outputs[0].dtype not in FLOATS:
        return False
    if layer.kind == "ElementWise":
        if layer.attrs.get("op") == "pow" and scalar(layer.inputs[1]) is None:
            return False            # only literal exponents (a tensor exponent keeps torch's pow)
        return layer.attrs.get("op") in BINARY and len(layer.inputs) == 2
    if layer.kind == "Unary":
        return layer.attrs.get("op") in UNARY
    if layer.kind == "Activation":
        t = layer.attrs.get("type")
        if t == "clip" and (layer.attrs.get("alpha") is None or layer.attrs.get("beta") is None):
            return False
        return t in ACTS
    return False


def _step(layer: Layer) -> dict:
    if layer.kind in ("ElementWise", "Unary"):
        return {"op": layer.attrs["op"]}
    return {"op": layer.attrs["type"], "alpha": float(layer.attrs.get("alpha") or 0.0),
            "beta": float(layer.attrs.get("beta") or 0.0)}


class FusePointwise(Pass):
    name = "pointwise fusion"

    def call(self, net: Network) -> PassResult:
        modified = False
        for tail in reversed(list(net.layers)):
            if tail not in net.layers or not _fusable(tail):
                continue
            out = tail.outputs[0]
            # grow the region backwards through producers read only by the region
            region = [tail]
            members = {id(tail)}
            frontier = [tail]
            while frontier:
                layer = frontier.pop()
                for t in layer.inputs:
                    p = t.producer if t is not None else None
                    if p is None or id(p) in members or not _fusable(p) or t in net.outputs:
                        continue
                    if not all(id(u) in members for u, _ in t.uses):
                        continue
                    if t.shape is None or out.shape is None or len(t.shape) > len(out.shape):
                        continue
                    region.append(p)
                    members.add(id(p))
                    frontier.append(p)
            if len(region) < 2:
                continue
            order = [layer for layer in net.layers if id(layer) in members]
            inputs: list = []
            names: dict[int, str] = {}
            program: list[dict] = []
            ok = True
            for k, layer in enumerate(order):
                step = _step(layer)
                args = []
                for t in layer.inputs:
                    if t is None:
                        ok = False
                        break
                    if t.producer is not None and id(t.producer) in members:
                        args.append(names[id(t)])
                        continue
                    c = scalar(t)
                    if c is not None and t.dtype in FLOATS + ("int64", "int32"):
                        args.append(c)
                        continue
                    if t.dtype not in FLOATS or t.shape is None or len(t.shape) > len(out.shape):
                        ok = False
                        break
                    if t not in inputs:
                        inputs.append(t)
                    args.append(f"i{inputs.index(t)}")
                if not ok:
                    break
                names[id(layer.outputs[0])] = f"v{k}"
                step["args"] = args
                program.append(step)
            if not ok or not inputs:
                continue
            fused = net.add_layer("Pointwise", inputs, {"program": program},
                                  name=net.unique_name(tail.name + "/fused"),
                                  origin=[o for layer in order for o in layer.origin])
            substitute(net, fused, tail, [out], order)
            modified = True
        return PassResult(net, modified)

