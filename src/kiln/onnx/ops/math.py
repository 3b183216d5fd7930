"""Element-wise arithmetic, logic, comparisons, unary math, MatMul/Gemm/Einsum."""
from __future__ import annotations

import numpy as np

from kiln.onnx.registry import converter


def _binary(op):
    def conv(ctx, node):
        return ctx.add1("ElementWise", [node.input(0), node.input(1)], {"op": op})
    return conv


for _name, _op in [("Add", "sum"), ("Sub", "sub"), ("Mul", "prod"), ("Div", "div"), ("Pow", "pow"),
                   ("And", "and"), ("Or", "or"), ("Xor", "xor"), ("Equal", "equal"), ("Greater", "greater"),
                   ("Less", "less"), ("GreaterOrEqual", "greater_equal"), ("LessOrEqual", "less_equal"),
                   ("BitwiseAnd", "bitwise_and"), ("BitwiseOr", "bitwise_or"), ("BitwiseXor", "bitwise_xor")]:
    converter(_name, since=1)(_binary(_op))


def _bool_out(op):
    def conv(ctx, node):
        return ctx.add1("ElementWise", [node.input(0), node.input(1)], {"op": op}, dtype="bool")
    return conv


for _name, _op in [("Equal", "equal"), ("Greater", "greater"), ("Less", "less"),
                   ("GreaterOrEqual", "greater_equal"), ("LessOrEqual", "less_equal"),
                   ("And", "and"), ("Or", "or"), ("Xor", "xor")]:
    converter(_name, since=7)(_bool_out(_op))


@converter("Mod", since=10)
def mod(ctx, node):
    op = "fmod" if node.attr("fmod", 0) else "mod"
    return ctx.add1("ElementWise", [node.input(0), node.input(1)], {"op": op})


@converter("BitShift", since=11)
def bitshift(ctx, node):
    op = "bitshift_left" if node.attr("direction") == "LEFT" else "bitshift_right"
    return ctx.add1("ElementWise", [node.input(0), node.input(1)], {"op": op})


def _variadic(op):
    def conv(ctx, node):
        ins = [t for t in node.inputs if t is not None]
        if len(ins) == 1:
            return ctx.add1("Identity", ins)
        return ctx.add1("ElementWise", ins, {"op": op})
    return conv


for _name, _op in [("Sum", "sum"), ("Max", "max"), ("Min", "min")]:
    converter(_name, since=1)(_variadic(_op))


@converter("Mean", since=1)
def mean(ctx, node):
    ins = [t for t in node.inputs if t is not None]
    s = ctx.add1("ElementWise", ins, {"op": "sum"}) if len(ins) > 1 else ins[0]
    return ctx.add1("ElementWise", [s, ctx.const(np.asarray(len(ins), dtype=ins[0].dtype))], {"op": "div"})


def _unary(op):
    def conv(ctx, node):
        return ctx.add1("Unary", [node.input(0)], {"op": op})
    return conv


for _name, _op in [("Abs", "abs"), ("Neg", "neg"), ("Exp", "exp"), ("Log", "log"), ("Sqrt", "sqrt"),
                   ("Reciprocal", "recip"), ("Sin", "sin"), ("Cos", "cos"), ("Tan", "tan"), ("Sinh", "sinh"),
                   ("Cosh", "cosh"), ("Asin", "asin"), ("Acos", "acos"), ("Atan", "atan"), ("Asinh", "asinh"),
                   ("Acosh", "acosh"), ("Atanh", "atanh"), ("Ceil", "ceil"), ("Floor", "floor"), ("Round", "round"),
                   ("Erf", "erf"), ("Not", "not"), ("Sign", "sign"), ("BitwiseNot", "bitwise_not")]:
    converter(_name, since=1)(_unary(_op))


@converter("IsNaN", since=9)
def isnan(ctx, node):
    return ctx.add1("Unary", [node.input(0)], {"op": "isnan"}, dtype="bool")


@converter("IsInf", since=10)
def isinf(ctx, node):
    return ctx.add1("Unary", [node.input(0)], {"op": "isinf", "detect_positive": node.attr("detect_positive", 1),
                                               "detect_negative": node.attr("detect_negative", 1)}, dtype="bool")


@converter("MatMul", since=1)
def matmul(ctx, node):
    return ctx.add1("MatMul", [node.input(0), node.input(1)], {"transpose_a": False, "transpose_b": False})


@converter("Gemm", since=1)
def gemm(ctx, node):
    a, b, c = node.input(0), node.input(1), node.input(2)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    ta, tb = node.attr("transA", 0), node.attr("transB", 0)
    if (b.is_constant and alpha == 1.0 and not ta and b.dtype.startswith("float") and b.value.ndim == 2
            and (c is None or (beta == 1.0 and c.is_constant and c.value.ndim <= 1
                               and c.value.size == (b.value.shape[0] if tb else b.value.shape[1])))):
        w = b.value if tb else np.ascontiguousarray(b.value.T)
        wt = ctx.const(w)
        ins = [a, wt] + ([ctx.const(c.value.reshape(-1).astype(b.value.dtype))] if c is not None else [])
        return ctx.add1("FullyConnected", ins)
    return ctx.add1("Gemm", [a, b, c], {"alpha": alpha, "beta": beta, "trans_a": ta, "trans_b": tb})


@converter("Einsum", since=12)
def einsum(ctx, node):
    return ctx.add1("Einsum", list(node.inputs), {"equation": node.attr("equation")})


@converter("CumSum", since=11)
def cumsum(ctx, node):
    return ctx.add1("CumSum", [node.input(0), node.input(1)], {"exclusive": node.attr("exclusive", 0),
                                                               "reverse": node.attr("reverse", 0)})


@converter("Where", since=9)
def where(ctx, node):
    return ctx.add1("Where", [node.input(0), node.input(1), node.input(2)], dtype=node.input(1).dtype)


@converter("CumProd", since=26)
def cumprod(ctx, node):
    x = node.input(0)
    return ctx.add1("CumSum", [x, node.input(1)], {"exclusive": node.attr("exclusive", 0),
                                                   "reverse": node.attr("reverse", 0), "op": "prod"}, dtype=x.dtype)


@converter("Det", since=11)
def det(ctx, node):
    x = node.input(0)
    return ctx.add1("Det", [x], {}, dtype=x.dtype)


def _hardmax(ctx, node, coerce_2d: bool):
    """Opsets < 13 flatten to 2-D at axis and take the max over the whole tail, as Softmax did."""
    x = node.input(0)
    axis = node.attr("axis", 1 if coerce_2d else -1)
    if not coerce_2d or (x.rank is not None and axis in (-1, x.rank - 1)):
        return ctx.add1("Hardmax", [x], {"axis": axis}, dtype=x.dtype)
    shape = ctx.add1("Shape", [x], {"start": 0, "end": None}, dtype="int64")
    flat = ctx.add1("Flatten", [x], {"axis": axis}, dtype=x.dtype)
    hm = ctx.add1("Hardmax", [flat], {"axis": -1}, dtype=x.dtype)
    return ctx.add1("Shuffle", [hm, shape], {"first_transpose": None, "reshape": None, "second_transpose": None,
                                             "allowzero": False}, dtype=x.dtype)


@converter("Hardmax", since=1)
def hardmax_v1(ctx, node):
    return _hardmax(ctx, node, coerce_2d=True)


@converter("Hardmax", since=13)
def hardmax_v13(ctx, node):
    return _hardmax(ctx, node, coerce_2d=False)


@converter("LpNormalization", since=1)
def lp_normalization(ctx, node):
    """x / ||x||_p along axis (p = 1 or 2); an all-zero slice stays zero."""
    x = node.input(0)
    p = node.attr("p", 2)
    norm = ctx.add1("Reduce", [x], {"op": "l1" if p == 1 else "l2", "axes": [node.attr("axis", -1)], "keepdims": True,
                                    "noop_with_empty_axes": False}, dtype=x.dtype)
    y = ctx.add1("ElementWise", [x, norm], {"op": "div"}, dtype=x.dtype)
    zero = ctx.const(0, x.dtype)
    is_zero = ctx.add1("ElementWise", [norm, zero], {"op": "equal"}, dtype="bool")
    return ctx.add1("Where", [is_zero, zero, y], dtype=x.dtype)


@converter("MeanVarianceNormalization", since=9)
def mean_variance_normalization(ctx, node):
    """(x - E[x]) / (sqrt(E[x²] - E[x]²) + 1e-9) over axes, as the op's function body computes it."""
    x = node.input(0)
    axes = list(node.attr("axes", [0, 2, 3]))

    def mean(t):
        return ctx.add1("Reduce", [t], {"op": "mean", "axes": axes, "keepdims": True, "noop_with_empty_axes": False},
                        dtype=x.dtype)

    def ew(op, a, b):
        return ctx.add1("ElementWise", [a, b], {"op": op}, dtype=x.dtype)

    mu = mean(x)
    var = ew("sub", mean(ew("prod", x, x)), ew("prod", mu, mu))
    std = ctx.add1("Unary", [var], {"op": "sqrt"}, dtype=x.dtype)
    return ew("div", ew("sub", x, mu), ew("sum", std, ctx.const(1e-9, x.dtype)))
