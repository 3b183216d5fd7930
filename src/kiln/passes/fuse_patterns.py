"""Recognize exported decompositions and replace them with one layer.

Cases:
- SiLU: ``x · σ(x)`` → Activation(silu)  (YOLO exports);
- GELU: ``x · ½ · (1 + erf(x / √2))`` in its exported groupings (the √2 a Div or a Mul by 1/√2;
  ``(x·½)·(1+erf)``, ``((1+erf)·x)·½`` or ``((1+erf)·½)·x``) → Activation(gelu);
- GELU, tanh form: ``x · ½ · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`` (torch's ``approximate="tanh"``
  export, jax2tf's ``x · (½ · (1 + tanh))``; the cube a Pow or a product chain) → Activation(gelu_tanh);
- LayerNorm: ``(x − mean(x)) / √(mean((x − mean(x))²) + ε)`` over trailing axes (the square a Pow
  by 2 or a product with itself), then the optional ``· γ + β`` → Normalization(layer) with
  statistics in FP32  (opset < 17 exports).
Operands of sums and products match in either order. Rules sweep from the outputs back, so a
LayerNorm takes its ``· γ + β`` before the bare form could match.
"""
from __future__ import annotations

import math

from kiln.passes._match import scalar, substitute
from kiln.passes.rewrite import (
    Act,
    Add,
    Const,
    ConstTensor,
    Div,
    Match,
    Mul,
    Op,
    OneOf,
    Rule,
    RulePass,
    Scalar,
    Sub,
    Unary,
    Var,
)

x = Var("x")


# ---- SiLU ----------------------------------------------------------------------------------------
def _silu(m: Match) -> None:
    net, mul, sig = m.net, m.root, m["sig"]
    act = net.add_layer("Activation", [m["x"]], {"type": "silu", "alpha": 0.0, "beta": 0.0},
                        name=net.unique_name(mul.name + "/silu"), origin=sig.origin + mul.origin)
    substitute(net, act, mul, mul.outputs, [sig, mul])


SILU = Rule("silu: x·σ(x)", Mul(x, Act("sigmoid", x, name="sig")), None, _silu)


# ---- GELU ----------------------------------------------------------------------------------------
SQRT2 = math.sqrt(2)
_ONE_PLUS_ERF = Add(Const(1.0), Unary("erf", OneOf(Div(x, Const(SQRT2), name="scale"),
                                                    Mul(x, Const(1 / SQRT2), name="scale")), name="erf"), name="one")
GELU_ORDER = ("half", "scale", "erf", "one", "m1", "m2")


def _activation_of(kind: str, order: tuple[str, ...]):
    """The rewrite replacing a matched chain (its layers named in ``order``, the last one's output the result)
    by one Activation(``kind``) of x."""
    def rewrite(m: Match) -> None:
        net = m.net
        chain = [m[k] for k in order if k in m]
        last = chain[-1]
        act = net.add_layer("Activation", [m["x"]], {"type": kind, "alpha": 0.0, "beta": 0.0},
                            name=net.unique_name(f"{last.name}/{kind}"),
                            origin=[o for layer in chain for o in layer.origin])
        substitute(net, act, last, last.outputs, chain)
    return rewrite


_gelu = _activation_of("gelu", GELU_ORDER)


GELU = [
    Rule("gelu: (x·½)·(1+erf(x/√2))", Mul(Mul(x, Const(0.5), name="half"), _ONE_PLUS_ERF, name="m1"), None, _gelu),
    Rule("gelu: ((1+erf(x/√2))·x)·½", Mul(Mul(_ONE_PLUS_ERF, x, name="m1"), Const(0.5), name="m2"), None, _gelu),
    Rule("gelu: ((1+erf(x/√2))·½)·x", Mul(Mul(_ONE_PLUS_ERF, Const(0.5), name="m1"), x, name="m2"), None, _gelu),
]

# tanh form: x · ½ · (1 + tanh(√(2/π) · (x + 0.044715 · x³))), the cube a Pow by 3 or a product chain
KAPPA = Const(0.044715, tol=1e-5)
_CUBE = OneOf(Mul(KAPPA, Op("ElementWise", x, Const(3.0), op="pow", name="c2"), name="c3"),
              Mul(Mul(Mul(KAPPA, x, name="c1"), x, name="c2"), x, name="c3"),
              Mul(KAPPA, Mul(Mul(x, x, name="c1"), x, name="c2"), name="c3"))
_ONE_PLUS_TANH = Add(Const(1.0), Act("tanh", Mul(Const(math.sqrt(2 / math.pi), tol=1e-5),
                                                  Add(x, _CUBE, name="a1"), name="s1"), name="tanh"), name="one")
GELU_TANH_ORDER = ("c1", "c2", "c3", "a1", "s1", "tanh", "one", "half", "m1", "m2")


_gelu_tanh = _activation_of("gelu_tanh", GELU_TANH_ORDER)


GELU_TANH = [
    Rule("gelu_tanh: (x·½)·(1+tanh(..))", Mul(Mul(x, Const(0.5), name="half"), _ONE_PLUS_TANH, name="m1"), None,
         _gelu_tanh),
    Rule("gelu_tanh: x·(½·(1+tanh(..)))", Mul(x, Mul(Const(0.5), _ONE_PLUS_TANH, name="half"), name="m1"), None,
         _gelu_tanh),
    Rule("gelu_tanh: ((1+tanh(..))·x)·½", Mul(Mul(_ONE_PLUS_TANH, x, name="m1"), Const(0.5), name="m2"), None,
         _gelu_tanh),
]


# ---- LayerNorm -----------------------------------------------------------------------------------
# x − mean(x): read by the square and the division
_D = Sub(x, Op("Reduce", x, ..., op="mean", name="mean", shared=True), name="sub")
_SQUARE = OneOf(Op("ElementWise", _D, Const(2.0), op="pow", name="sq", shared=True),
                Mul(_D, _D, name="sq", shared=True))
_STD = Unary("sqrt", Add(Op("Reduce", _SQUARE, ..., op="mean", name="var", shared=True), Scalar("eps"),
                         name="eps_add", shared=True), name="sqrt")
_NORMALIZED = Div(_D, _STD, name="div")
_SCALED = Mul(_NORMALIZED, ConstTensor("gamma"), name="mul")
LN_ORDER = ("mean", "sub", "sq", "var", "eps_add", "sqrt", "div", "mul", "add")


def _layernorm_axes(m: Match) -> str | None:
    mean, x_ = m["mean"], m["x"]
    axes = mean.attrs.get("axes")
    if not axes:
        return "the mean has no axes"
    if m["var"].attrs.get("axes") != axes:
        return "the variance is taken over other axes than the mean"
    if x_.rank is None:
        return "x has no known rank"
    if not mean.attrs.get("keepdims", True):
        return "the mean drops its axes (keepdims=0)"
    r = x_.rank
    norm_axes = sorted(a % r for a in axes)
    if norm_axes != list(range(r - len(norm_axes), r)):
        return "the axes are not the trailing ones"
    m["axis"] = norm_axes[0] - r
    return None


def _layernorm(m: Match) -> None:
    net = m.net
    chain = [m[k] for k in LN_ORDER if k in m]
    last = chain[-1]
    ln = net.add_layer("Normalization", [m["x"], m.get("gamma"), m.get("beta")],
                       {"type": "layer", "axis": m["axis"], "epsilon": scalar(m["eps"])},
                       name=net.unique_name(last.name + "/layernorm"),
                       origin=[o for layer in chain for o in layer.origin])
    substitute(net, ln, last, [last.outputs[0]], chain)


LAYERNORM = [
    Rule("layernorm: (x−μ)/√(σ²+ε)·γ+β", Add(_SCALED, ConstTensor("beta"), name="add"), _layernorm_axes,
         _layernorm),
    Rule("layernorm: (x−μ)/√(σ²+ε)·γ", _SCALED, _layernorm_axes, _layernorm),
    Rule("layernorm: (x−μ)/√(σ²+ε)", _NORMALIZED, _layernorm_axes, _layernorm),
]


class FusePatterns(RulePass):
    name = "pattern fusion (SiLU, GELU, LayerNorm)"
    rules = [SILU, *GELU, *GELU_TANH, *LAYERNORM]
    reverse = True
