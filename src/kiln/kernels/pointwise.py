"""Activation, Unary and ElementWise layers on torch (CPU and CUDA)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.ir.layers import attr_default
from kiln.kernels.registry import tactic

_ALPHA, _BETA = attr_default("Activation", "alpha"), attr_default("Activation", "beta")


def activation_fn(kind: str, alpha: float = 0.0, beta: float = 0.0):
    """The activation as a torch function; shared with fused epilogues."""
    a, b = alpha, beta
    table = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "leaky_relu": lambda x: F.leaky_relu(x, a),
        "elu": lambda x: F.elu(x, a),
        "selu": lambda x: b * torch.where(x > 0, x, a * torch.expm1(x)),
        "softplus": lambda x: F.softplus(x.float()).to(x.dtype) if x.dtype != torch.float64 else F.softplus(x),
        "softsign": lambda x: x / (1 + x.abs()),
        "clip": lambda x: _clip(x, a, b),
        "hard_sigmoid": lambda x: torch.clamp(a * x + b, 0, 1),
        "gelu": lambda x: F.gelu(x),
        "gelu_tanh": gelu_tanh,
        "silu": F.silu,
        "swish": lambda x: x * torch.sigmoid(a * x),
        "mish": lambda x: x * torch.tanh(F.softplus(x)),
        "hard_swish": lambda x: x * torch.clamp(x / 6 + 0.5, 0, 1),
        "thresholded_relu": lambda x: torch.where(x > a, x, torch.zeros_like(x)),
        "celu": lambda x: torch.clamp(x, min=0) + torch.clamp(a * torch.expm1(x / a), max=0),
        "scaled_tanh": lambda x: a * torch.tanh(b * x),
        "shrink": lambda x: torch.where(x < -a, x + b, torch.where(x > a, x - b, torch.zeros_like(x))),
    }
    fn = table.get(kind)
    if fn is None:
        raise BuildError(f"Unknown activation type {kind!r}; known: {', '.join(sorted(table))}.")
    return fn


# tanh-GELU on the CPU: ½x(1 + tanh u) with u = √(2/π)(x + 0.044715x³) is exactly x·σ(2u), and torch's
# vectorized sigmoid is cheaper than its tanh, so from GELU_SIGMOID_MIN FP32 elements on the CPU computes
# 2u = x·(c1 + c3·x²) and x·σ(2u) in four passes (docs/cpu.md has the timings). Past GELU_SIGMOID_CHUNK·4
# elements a contiguous tensor goes in slices of GELU_SIGMOID_CHUNK, so the passes stay in cache; a larger
# non-contiguous one, and anything else, runs torch's own.
GELU_SIGMOID_MIN = 1 << 12
GELU_SIGMOID_CHUNK = 1 << 18
_GELU_C1 = 2 * math.sqrt(2 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715
_GELU_C1_T = torch.tensor(_GELU_C1, dtype=torch.float32)


def gelu_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torch's ``gelu(x, approximate="tanh")``; with ``inplace`` written into ``x``. FP32 CPU tensors from
    GELU_SIGMOID_MIN elements on are computed as x·σ(2u) (the note above)."""
    n = x.numel()
    if (x.device.type != "cpu" or x.dtype != torch.float32 or n < GELU_SIGMOID_MIN
            or (n > 4 * GELU_SIGMOID_CHUNK and not x.is_contiguous())):
        return torch.ops.aten.gelu_(x, approximate="tanh") if inplace else F.gelu(x, approximate="tanh")
    if n <= 4 * GELU_SIGMOID_CHUNK:
        return _gelu_sigmoid(x, x if inplace else None)
    out = x if inplace else torch.empty_like(x)
    flat_x, flat_out = x.view(-1), out.view(-1)
    for s in range(0, n, GELU_SIGMOID_CHUNK):
        _gelu_sigmoid(flat_x[s:s + GELU_SIGMOID_CHUNK], flat_out[s:s + GELU_SIGMOID_CHUNK])
    return out


def _gelu_sigmoid(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x·σ(x·(c1 + c3·x²)) into ``out`` (None: a fresh tensor)."""
    t = torch.addcmul(_GELU_C1_T, x, x, value=_GELU_C3)
    t.mul_(x).sigmoid_()
    return t.mul_(x) if out is None else torch.mul(x, t, out=out)


def _clip(x, lo, hi):
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def add_around_act(y: torch.Tensor, residual: torch.Tensor | None, act, after: bool) -> torch.Tensor:
    """A fused epilogue's residual and activation: act(y + residual), or act(y) + residual with ``after``
    (``act`` None: no activation)."""
    if residual is not None and not after:
        y = y + residual
    if act is not None:
        y = act(y)
    return y + residual if residual is not None and after else y


def act_params(attrs) -> tuple[Any, Any]:
    """(alpha, beta) of an Activation layer or a fused epilogue, with the schema's defaults."""
    return attrs.get("alpha", _ALPHA), attrs.get("beta", _BETA)


@tactic("Activation")
def make_activation(attrs, ctx):
    fn = activation_fn(attrs["type"], *act_params(attrs))
    return lambda x: (fn(x),)


_UNARY = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "recip": torch.reciprocal, "abs": torch.abs,
    "neg": torch.neg, "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "sinh": torch.sinh, "cosh": torch.cosh,
    "asin": torch.asin, "acos": torch.acos, "atan": torch.atan, "asinh": torch.asinh, "acosh": torch.acosh,
    "atanh": torch.atanh, "ceil": torch.ceil, "floor": torch.floor, "round": torch.round, "erf": torch.erf,
    "not": torch.logical_not, "sign": torch.sign, "isnan": torch.isnan, "bitwise_not": torch.bitwise_not,
    "identity": lambda x: x,
}


@tactic("Unary")
def make_unary(attrs, ctx):
    op = attrs["op"]
    if op == "isinf":
        pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
        return lambda x: (torch.isinf(x) & ((x > 0) if pos else (x < 0)) if pos != neg
                          else (torch.isinf(x) if pos else torch.zeros_like(x, dtype=torch.bool)),)
    fn = _UNARY.get(op)
    if fn is None:
        raise BuildError(f"Unknown unary op {op!r}; known: {', '.join(sorted(_UNARY))}, isinf.")
    if op in ("ceil", "floor", "round") :
        return lambda x: (fn(x) if x.dtype.is_floating_point else x.clone(),)
    if not _may_widen(ctx):
        return lambda x: (fn(x),)
    return lambda x: (_widened(fn, x),)


_WIDE_UNSIGNED = tuple(d for d in (getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                                   getattr(torch, "uint64", None)) if d is not None)


def _may_widen(ctx) -> bool:
    """Whether a layer may meet uint16/32/64 inputs: unknown input dtypes, or one of those (decided once, when
    the layer is made, so a layer over other dtypes calls torch directly)."""
    dtypes = getattr(ctx, "input_dtypes", None)
    return not dtypes or any(d in ("uint16", "uint32", "uint64") for d in dtypes)


def _widened(fn, *xs):
    """torch has almost no kernels for uint16/32/64: compute in int64 (same bits, wraps the same) and cast back."""
    if not any(x.dtype in _WIDE_UNSIGNED for x in xs):
        return fn(*xs)
    dtype = next(x.dtype for x in xs if x.dtype in _WIDE_UNSIGNED)
    y = fn(*[x.to(torch.int64) if x.dtype in _WIDE_UNSIGNED else x for x in xs])
    return y if y.dtype == torch.bool or y.dtype.is_floating_point else y.to(dtype)


def _pow(a, b):
    if a.dtype.is_floating_point:
        return torch.pow(a, b.to(a.dtype) if b.dtype.is_floating_point else b)
    return torch.pow(a, b).to(a.dtype) if not b.dtype.is_floating_point else torch.pow(a.double(), b.double()).to(a.dtype)


def _div(a, b):
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _mod(a, b):
    if a.dtype.is_floating_point:
        return torch.remainder(a, b)
    return torch.remainder(a, b)


def _shift(left: bool):
    def f(a, b):
        if a.dtype == torch.uint8 or a.dtype in (getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                                                 getattr(torch, "uint64", None)):
            wide = a.to(torch.int64)
            r = (wide << b.to(torch.int64)) if left else (wide >> b.to(torch.int64))
            bits = a.element_size() * 8
            return (r & ((1 << bits) - 1) if bits < 64 else r).to(a.dtype)
        return (a << b) if left else (a >> b)
    return f


_BINARY = {
    "sum": torch.add, "sub": torch.sub, "prod": torch.mul, "div": _div, "max": torch.maximum,
    "min": torch.minimum, "pow": _pow, "mod": _mod, "fmod": torch.fmod,
    "floor_div": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor,
    "equal": torch.eq, "greater": torch.gt, "less": torch.lt, "greater_equal": torch.ge, "less_equal": torch.le,
    "bitshift_left": _shift(True), "bitshift_right": _shift(False),
    "bitwise_and": torch.bitwise_and, "bitwise_or": torch.bitwise_or, "bitwise_xor": torch.bitwise_xor,
    "prelu": lambda x, slope: torch.where(x >= 0, x, x * slope),
}


@tactic("ElementWise")
def make_elementwise(attrs, ctx):
    op = attrs["op"]
    fn = _BINARY.get(op)
    if fn is None:
        raise BuildError(f"Unknown element-wise op {op!r}; known: {', '.join(sorted(_BINARY))}.")

    widen = _may_widen(ctx)

    def run(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = _widened(fn, out, x) if widen else fn(out, x)
        if len(xs) == 1 and op in ("sum", "max", "min"):
            out = out.clone() if not out.is_meta else out
        return (out,)
    if not widen and len(ctx.input_dtypes) == 2:
        return lambda a, b: (fn(a, b),)
    return run




@tactic("Scale")
def make_scale(attrs, ctx):
    mode = attrs.get("mode", "channel")
    axis = attrs.get("channel_axis", 1)

    def shaped(p, x):
        if p is None or mode != "channel":
            return p
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)

    def run(x, scale=None, shift=None, power=None):
        y = x
        if scale is not None:
            y = y * shaped(scale, x)
        if shift is not None:
            y = y + shaped(shift, x)
        if power is not None:
            y = y ** shaped(power, x)
        return (y,)
    return run
