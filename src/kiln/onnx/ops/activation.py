"""Activations and softmax-like ops."""
from __future__ import annotations

import numpy as np

from kiln.onnx.ops._common import const_value
from kiln.onnx.registry import converter


def _act(kind, alpha=0.0, beta=0.0):
    return lambda ctx, node: ctx.add1("Activation", [node.input(0)], {"type": kind, "alpha": alpha, "beta": beta})


for _op, _kind in [("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("Softsign", "softsign"),
                   ("Softplus", "softplus"), ("Mish", "mish"), ("HardSwish", "hard_swish")]:
    converter(_op, since=1)(_act(_kind))


@converter("LeakyRelu", since=1)
def leaky_relu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "leaky_relu", "alpha": node.attr("alpha", 0.01)})


@converter("Elu", since=1)
def elu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "elu", "alpha": node.attr("alpha", 1.0)})


@converter("Celu", since=12)
def celu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "celu", "alpha": node.attr("alpha", 1.0)})


@converter("Selu", since=1)
def selu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "selu", "alpha": node.attr("alpha", 1.67326319217681884765625),
                                                    "beta": node.attr("gamma", 1.05070102214813232421875)})


@converter("ThresholdedRelu", since=10)
def thresholded_relu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "thresholded_relu", "alpha": node.attr("alpha", 1.0)})


@converter("HardSigmoid", since=1)
def hard_sigmoid(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "hard_sigmoid", "alpha": node.attr("alpha", 0.2),
                                                    "beta": node.attr("beta", 0.5)})


@converter("Shrink", since=9)
def shrink(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "shrink", "alpha": node.attr("lambd", 0.5),
                                                    "beta": node.attr("bias", 0.0)})


@converter("Gelu", since=20)
def gelu(ctx, node):
    kind = "gelu_tanh" if node.attr("approximate", "none") == "tanh" else "gelu"
    return ctx.add1("Activation", [node.input(0)], {"type": kind})


@converter("Clip", since=1)
def clip_v1(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "clip", "alpha": node.attr("min", -3.4028234663852886e38),
                                                    "beta": node.attr("max", 3.4028234663852886e38)})


@converter("Clip", since=11)
def clip_v11(ctx, node):
    x, lo, hi = node.input(0), node.input(1), node.input(2)
    lo_v, hi_v = const_value(lo), const_value(hi)
    if (lo is None or lo_v is not None) and (hi is None or hi_v is not None) and x.dtype.startswith("float"):
        a = float(np.asarray(lo_v).reshape(-1)[0]) if lo is not None else None
        b = float(np.asarray(hi_v).reshape(-1)[0]) if hi is not None else None
        return ctx.add1("Activation", [x], {"type": "clip", "alpha": a, "beta": b})
    y = x
    if lo is not None:
        y = ctx.add1("ElementWise", [y, lo], {"op": "max"})
    if hi is not None:
        y = ctx.add1("ElementWise", [y, hi], {"op": "min"})
    if lo is None and hi is None:
        y = ctx.add1("Identity", [x])
    return y


def _prelu(ctx, node, channel_slope: bool):
    """Before opset 7 a 1-D slope of C values applies along the channel axis (dim 1), not the last."""
    x, slope = node.input(0), node.input(1)
    if (channel_slope and slope.is_constant and slope.value.ndim == 1 and slope.value.size > 1
            and x.rank is not None and x.rank > 2):
        slope = ctx.const(slope.value.reshape([-1] + [1] * (x.rank - 2)))
    return ctx.add1("ElementWise", [x, slope], {"op": "prelu"}, dtype=x.dtype)


@converter("PRelu", since=1)
def prelu_v1(ctx, node):
    return _prelu(ctx, node, channel_slope=True)


@converter("PRelu", since=7)
def prelu_v7(ctx, node):
    return _prelu(ctx, node, channel_slope=False)


@converter("Swish", since=24)
def swish(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "swish", "alpha": node.attr("alpha", 1.0)},
                    dtype=node.input(0).dtype)


@converter("SwiGLU", since=28)
def swiglu(ctx, node):
    a, b = node.input(0), node.input(1)
    gate = ctx.add1("Activation", [a], {"type": "swish", "alpha": node.attr("alpha", 1.0)}, dtype=a.dtype)
    return ctx.add1("ElementWise", [gate, b], {"op": "prod"}, dtype=a.dtype)


def _softmax(log: bool):
    def v1(ctx, node):
        # opset < 13: coerce to 2-D at axis, softmax over the flattened tail
        x = node.input(0)
        axis = node.attr("axis", 1)
        if x.rank is not None and (axis == x.rank - 1 or axis == -1):
            return ctx.add1("SoftMax", [x], {"axis": -1, "log": log})
        shape = ctx.add1("Shape", [x], {"start": 0, "end": None}, dtype="int64")
        flat = ctx.add1("Flatten", [x], {"axis": axis})
        sm = ctx.add1("SoftMax", [flat], {"axis": -1, "log": log})
        return ctx.add1("Shuffle", [sm, shape], {"first_transpose": None, "reshape": None, "second_transpose": None,
                                                 "allowzero": False})

    def v13(ctx, node):
        return ctx.add1("SoftMax", [node.input(0)], {"axis": node.attr("axis", -1), "log": log})
    return v1, v13


for _name, _log in (("Softmax", False), ("LogSoftmax", True)):
    _v1, _v13 = _softmax(_log)
    converter(_name, since=1)(_v1)
    converter(_name, since=13)(_v13)
