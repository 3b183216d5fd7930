"""Pointwise fusion: a chain of element-wise layers becomes one Pointwise layer (one kernel).

Cases:
- ElementWise (sum, sub, prod, div, max, min, pow), Unary (exp, log, sqrt, recip, abs, neg, erf,
  sin, cos, tanh-like) and Activation (relu, sigmoid, tanh, silu, gelu, gelu_tanh, leaky_relu,
  hard_sigmoid, hard_swish, softplus, clip) layers on floating tensors, each intermediate read only
  inside the chain → one Pointwise layer whose program lists the steps (e.g. YOLO's box decode
  ``(sigmoid(x)·2 + grid)·stride``);
- scalar constants become literals of the program; other inputs (tensors of the output's shape
  or broadcastable to it) become the layer's inputs.
Only chains of two or more steps with one output are fused, at most MAX_LAYERS steps with
MAX_INPUTS tensor inputs each (a longer chain becomes several fused layers). On the GPU the program becomes a
generated Triton kernel (kernels/pointwise_fused.py); elsewhere it runs step by step.
"""
from __future__ import annotations

from kiln.ir.network import Layer, Network
from kiln.passes._match import LayerEdits, scalar, substitute
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


MAX_LAYERS = 64       # steps of one fused program (a kernel stays small to generate and compile)
MAX_INPUTS = 16       # tensor inputs of one fused layer (kernel arguments)


class FusePointwise(Pass):
    name = "pointwise fusion"

    def call(self, net: Network) -> PassResult:
        modified = False
        outputs = {id(t) for t in net.outputs}
        position = {id(layer): i for i, layer in enumerate(net.layers)}     # fusing keeps the order of the rest
        edits = LayerEdits(net)
        for tail in reversed(list(net.layers)):
            if not edits.alive(tail) or not _fusable(tail):
                continue
            out = tail.outputs[0]
            order = _within_inputs(sorted(self._region(tail, out, outputs), key=lambda layer: position[id(layer)]))
            made = _program(order, out) if len(order) >= 2 else None
            if made is None or not made[0]:
                continue
            inputs, program = made
            fused = net.add_layer("Pointwise", inputs, {"program": program},
                                  name=net.unique_name(tail.name + "/fused"),
                                  origin=[o for layer in order for o in layer.origin])
            substitute(net, fused, tail, [out], order, edits)
            modified = True
        edits.apply()
        return PassResult(net, modified)

    @staticmethod
    def _region(tail: Layer, out, outputs: set[int]) -> list[Layer]:
        """The layers to fuse into ``tail``: grown backwards through producers read only by the region,
        at most MAX_LAYERS of them."""
        region = [tail]
        members = {id(tail)}
        frontier = [tail]
        while frontier and len(region) < MAX_LAYERS:
            layer = frontier.pop()
            for t in layer.inputs:
                p = t.producer if t is not None else None
                if p is None or id(p) in members or not _fusable(p) or id(t) in outputs:
                    continue
                if not all(id(u) in members for u, _ in t.uses):
                    continue
                if t.shape is None or out.shape is None or len(t.shape) > len(out.shape):
                    continue
                if len(region) >= MAX_LAYERS:
                    break
                region.append(p)
                members.add(id(p))
                frontier.append(p)
        return region


def _literal(t) -> bool:
    """Whether a program takes this input as a number rather than as a tensor input."""
    return scalar(t) is not None and t.dtype in FLOATS + ("int64", "int32")


def _within_inputs(order: list[Layer]) -> list[Layer]:
    """The longest tail of ``order`` whose program reads at most MAX_INPUTS tensors (the earlier steps
    stay separate layers, read as inputs)."""
    outside: set[int] = set()
    for k in range(len(order) - 1, -1, -1):
        layer = order[k]
        outside.discard(id(layer.outputs[0]))       # made inside from here on
        outside.update(id(t) for t in layer.inputs if t is not None and not _literal(t))
        if len(outside) > MAX_INPUTS:
            return order[k + 1:]
    return order


def _program(order: list[Layer], out) -> tuple[list, list[dict]] | None:
    """The fused layer's inputs and program for the layers ``order`` (topological), or None when a
    step reads something a program cannot take."""
    members = {id(layer) for layer in order}
    inputs: list = []
    slot: dict[int, int] = {}
    names: dict[int, str] = {}
    program: list[dict] = []
    for k, layer in enumerate(order):
        step = _step(layer)
        args = []
        for t in layer.inputs:
            if t is None:
                return None
            if t.producer is not None and id(t.producer) in members:
                args.append(names[id(t)])
                continue
            if _literal(t):
                args.append(scalar(t))
                continue
            if t.dtype not in FLOATS or t.shape is None or len(t.shape) > len(out.shape):
                return None
            if id(t) not in slot:
                slot[id(t)] = len(inputs)
                inputs.append(t)
            args.append(f"i{slot[id(t)]}")
        names[id(layer.outputs[0])] = f"v{k}"
        step["args"] = args
        program.append(step)
    return inputs, program
