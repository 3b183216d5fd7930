"""Closed-form output shapes and dtypes of the common device layer kinds, without torch.

A rule maps a layer's attributes and input shapes (and Kiln dtype names) to its output shapes and dtype,
as the kind's CPU tactic computes them. A rule answers only where it is sure: the attributes are ones it
was written for (``rule``'s ``knows``), the inputs have one floating dtype (element-wise ops, Where and
Concatenation: integer and boolean ones too), and the shapes are ones the tactic accepts. Anything else
returns None. ``kiln.builder.shape_rules`` uses the rules for shape inference on meta tensors;
``kiln check`` uses them directly on a model's static shapes (NOTE: this module must not import torch).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from kiln.ir.layers import ACTIVATIONS, REDUCE_OPS
from kiln.ir.pointwise import Ref, validate_program

Shape = tuple[int, ...]
Rule = Callable[[dict[str, Any], list[Any]], "list[Shape] | None"]

_FLOATS = ("float32", "float16", "bfloat16", "float64")
_RULES: dict[str, Rule] = {}
_KNOWS: dict[str, frozenset[str]] = {}    # the attributes each kind's rule reads or knows to leave alone
_SHAPE_OPS = frozenset({"sum", "sub", "prod", "div", "max", "min", "pow", "mod", "fmod", "floor_div", "prelu"})
_COMPARE_OPS = frozenset({"equal", "greater", "less", "greater_equal", "less_equal"})
_LOGICAL_OPS = frozenset({"and", "or", "xor"})
# element-wise ops by input dtype (all inputs of one dtype): each keeps it, but comparisons and logical ops
_ELEMENTWISE_OPS = {
    **{d: _SHAPE_OPS | _COMPARE_OPS for d in _FLOATS},
    **{d: (_SHAPE_OPS - {"prelu"}) | _COMPARE_OPS | _LOGICAL_OPS | {"bitwise_and", "bitwise_or", "bitwise_xor",
                                                                  "bitshift_left", "bitshift_right"}
       for d in ("int8", "int16", "int32", "int64", "uint8")},
    "bool": _LOGICAL_OPS | {"equal"},
}
_FLOAT_UNARY = frozenset({"exp", "log", "sqrt", "recip", "abs", "neg", "sin", "cos", "tan", "sinh", "cosh",
                          "asin", "acos", "atan", "asinh", "acosh", "atanh", "ceil", "floor", "round", "erf",
                          "sign", "identity"})
_BOOL_UNARY = frozenset({"isnan", "isinf"})


def rule(kind: str, knows: str = "") -> Callable[[Rule], Rule]:
    """Register the rule of ``kind``; ``knows``: the kind's attributes it was written for (a layer with any
    other attribute set gets no answer)."""
    def deco(fn: Rule) -> Rule:
        _RULES[kind], _KNOWS[kind] = fn, frozenset(knows.split())
        return fn
    return deco


def ruled(kind: str) -> bool:
    """Whether ``kind`` has a rule."""
    return kind in _RULES


def answer(kind: str, attrs: dict[str, Any], shapes: Sequence[Shape | None],
           dtypes: Sequence[str | None]) -> tuple[list[Shape], str] | None:
    """The layer's output shapes and their dtype for inputs of these shapes and dtypes (None for an absent
    input, position by position), or None where no rule is sure."""
    fn = _RULES.get(kind)
    if fn is None or attrs.get("codes_scale") is not None:       # a layer that also writes 8-bit codes
        return None
    if any(v is not None and v is not False and k not in _KNOWS[kind] for k, v in attrs.items()):
        return None
    present = [d for s, d in zip(shapes, dtypes) if s is not None]
    if not present or len(shapes) != len(dtypes):
        return None
    out_dtype = _out_dtype(kind, attrs, present)
    if out_dtype is None:
        return None
    try:
        out = fn(attrs, list(shapes))
    except Exception:       # attributes of a form the rule does not know: the tactic decides
        return None
    return None if out is None else (out, out_dtype)


def _out_dtype(kind: str, attrs: dict[str, Any], dtypes: list[str | None]) -> str | None:
    """The dtype of the outputs, or None where the rules do not answer for these input dtypes."""
    if kind == "Where":                 # a boolean condition choosing between values of one dtype
        ok = len(dtypes) == 3 and dtypes[0] == "bool" and dtypes[1] == dtypes[2]
        return dtypes[1] if ok and dtypes[1] in _ELEMENTWISE_OPS else None
    dtype = dtypes[0]
    if any(d != dtype for d in dtypes):
        return None
    if kind == "Concatenation":
        return dtype if dtype in _ELEMENTWISE_OPS else None
    if kind == "ElementWise":
        op = attrs.get("op")
        if op not in _ELEMENTWISE_OPS.get(dtype, ()):
            return None
        return "bool" if op in _COMPARE_OPS | _LOGICAL_OPS else dtype
    if dtype not in _FLOATS:
        return None
    return "bool" if kind == "Unary" and attrs.get("op") in _BOOL_UNARY else dtype


def broadcast(*shapes: Shape | None) -> Shape | None:
    """numpy broadcasting of the given shapes (None entries are skipped); None if they do not broadcast."""
    out: list[int] = []
    for s in shapes:
        if s is None:
            continue
        if len(s) > len(out):
            out = [1] * (len(s) - len(out)) + out
        for i, d in enumerate(s, start=len(out) - len(s)):
            if out[i] == 1:
                out[i] = d
            elif d != 1 and d != out[i]:
                return None
    return tuple(out)


def _act_ok(attrs: dict[str, Any], key: str = "activation") -> bool:
    return attrs.get(key) is None or attrs[key] in ACTIVATIONS


def _pool_out(size: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool) -> int:
    """Windows along one axis (torch's and ONNX's rule: with ceil_mode the last window starts inside the
    input or its begin padding)."""
    num = size + pb + pe - (d * (k - 1) + 1)
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + pb:
        out -= 1
    return out


@rule("Activation", "type alpha beta")
def _activation(attrs, shapes):
    return [shapes[0]] if _act_ok(attrs, "type") and attrs.get("type") is not None else None


@rule("Unary", "op detect_positive detect_negative")
def _unary(attrs, shapes):
    return [shapes[0]] if attrs.get("op") in _FLOAT_UNARY | _BOOL_UNARY else None


@rule("ElementWise", "op")
def _elementwise(attrs, shapes):
    if any(s is None for s in shapes) or len(shapes) != 2 and attrs["op"] in _COMPARE_OPS | {"prelu"}:
        return None
    out = broadcast(*shapes)
    return None if out is None else [out]


@rule("Where")
def _where(attrs, shapes):
    out = broadcast(*shapes)
    return None if out is None else [out]


@rule("Pointwise", "program")
def _pointwise(attrs, shapes):
    if any(s is None for s in shapes):
        return None
    steps = validate_program(attrs.get("program"), len(shapes))
    vals: list[Shape | None] = []
    for st in steps:
        refs = [(shapes if a.kind == "i" else vals)[a.index] for a in st.args if isinstance(a, Ref)]
        if not refs:
            return None
        vals.append(broadcast(*refs))
        if vals[-1] is None:
            return None
    return [vals[-1]]


@rule("MatMul", "transpose_a transpose_b activation alpha beta")
def _matmul(attrs, shapes):
    a, b = shapes[0], shapes[1]
    bias = shapes[2] if len(shapes) > 2 else None
    if a is None or b is None or len(a) < 2 or len(b) < 2 or not _act_ok(attrs):
        return None
    if attrs.get("transpose_a"):
        a = a[:-2] + (a[-1], a[-2])
    if attrs.get("transpose_b"):
        b = b[:-2] + (b[-1], b[-2])
    batch = broadcast(a[:-2], b[:-2])
    if a[-1] != b[-2] or batch is None:
        return None
    out = broadcast(batch + (a[-2], b[-1]), bias)
    return None if out is None else [out]


@rule("FullyConnected", "activation alpha beta")
def _fully_connected(attrs, shapes):
    x, w = shapes[0], shapes[1]
    b = shapes[2] if len(shapes) > 2 else None
    if x is None or w is None or not x or len(w) != 2 or x[-1] != w[1] or b not in (None, (w[0],)) \
            or not _act_ok(attrs):
        return None
    return [x[:-1] + (w[0],)]


@rule("Gemm", "alpha beta trans_a trans_b")
def _gemm(attrs, shapes):
    a, b = shapes[0], shapes[1]
    c = shapes[2] if len(shapes) > 2 else None
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attrs.get("trans_a") else a
    k2, n = (b[1], b[0]) if attrs.get("trans_b") else b
    if k != k2 or (c is not None and broadcast((m, n), c) != (m, n)):
        return None
    return [(m, n)]


@rule("Convolution", "stride pads dilation groups auto_pad activation alpha beta residual "
      "residual_after_activation pool")
def _convolution(attrs, shapes):
    x, w = shapes[0], shapes[1]
    b = shapes[2] if len(shapes) > 2 else None
    residual = shapes[3] if len(shapes) > 3 else None
    stride, dil, pads = list(attrs["stride"]), list(attrs["dilation"]), list(attrs["pads"])
    groups = attrs.get("groups", 1)
    nd = len(stride)
    if attrs.get("pool") or nd not in (1, 2, 3) or x is None or w is None or len(x) != nd + 2 or len(w) != nd + 2 \
            or len(dil) != nd or len(pads) != 2 * nd or min(pads) < 0 or not _act_ok(attrs):
        return None
    if groups < 1 or x[1] != w[1] * groups or w[0] % groups or w[0] == 0 or b not in (None, (w[0],)):
        return None
    spatial = tuple(_pool_out(x[2 + i], w[2 + i], stride[i], pads[i], pads[nd + i], dil[i], False) for i in range(nd))
    if min(spatial) < 1 or min(stride) < 1 or min(dil) < 1 or min(w[2:]) < 1:
        return None
    out = broadcast((x[0], w[0]) + spatial, residual)
    return None if out is None else [out]


@rule("Deconvolution", "stride pads dilation groups output_padding")
def _deconvolution(attrs, shapes):
    x, w = shapes[0], shapes[1]
    b = shapes[2] if len(shapes) > 2 else None
    stride, dil, pads = list(attrs["stride"]), list(attrs["dilation"]), list(attrs["pads"])
    groups = attrs.get("groups", 1)
    nd = len(stride)
    out_pad = list(attrs.get("output_padding") or [0] * nd)
    if nd not in (1, 2, 3) or x is None or w is None or len(x) != nd + 2 or len(w) != nd + 2 or len(dil) != nd \
            or len(pads) != 2 * nd or len(out_pad) != nd or min(pads + out_pad) < 0 or min(stride + dil) < 1:
        return None
    cout = w[1] * groups
    if groups < 1 or x[1] != w[0] or w[0] % groups or cout == 0 or b not in (None, (cout,)):
        return None
    if b is None and any(pads):          # the kernel's crop is then a strided view: its layout is the kernel's
        return None
    spatial = tuple((x[2 + i] - 1) * stride[i] + dil[i] * (w[2 + i] - 1) + 1 + out_pad[i] - pads[i] - pads[nd + i]
                    for i in range(nd))
    return None if min(spatial) < 1 else [(x[0], cout) + spatial]


@rule("Pooling", "type kernel stride pads dilation auto_pad ceil_mode count_include_pad "
      "return_indices storage_order p")
def _pooling(attrs, shapes):
    (x,) = shapes
    kernel = attrs.get("kernel")
    if attrs.get("return_indices") or attrs.get("type") not in ("max", "average", "lp") or x is None or len(x) < 3:
        return None
    if kernel is None:
        return [x[:2] + (1,) * (len(x) - 2)]
    nd = len(kernel)
    stride = list(attrs.get("stride") or [1] * nd)
    dil = list(attrs.get("dilation") or [1] * nd)
    pads = list(attrs.get("pads") or [0] * 2 * nd)
    if len(x) != nd + 2 or len(stride) != nd or len(dil) != nd or len(pads) != 2 * nd or min(pads) < 0 \
            or min(kernel) < 1 or min(stride) < 1 or min(dil) < 1:
        return None
    ceil = bool(attrs.get("ceil_mode", False))
    spatial = tuple(_pool_out(x[2 + i], kernel[i], stride[i], pads[i], pads[nd + i], dil[i], ceil) for i in range(nd))
    return None if min(spatial) < 1 else [x[:2] + spatial]


@rule("SoftMax", "axis log")
def _softmax(attrs, shapes):
    (x,) = shapes
    return [x] if x and -len(x) <= attrs.get("axis", -1) < len(x) else None


@rule("Concatenation", "axis")
def _concatenation(attrs, shapes):
    xs = [s for s in shapes if s is not None]
    if shapes[0] is None:
        return None
    r = len(xs[0])
    axis = attrs["axis"] + r if attrs["axis"] < 0 else attrs["axis"]
    if not 0 <= axis < r or any(len(s) != r or 0 in s for s in xs):
        return None
    if any(s[:axis] + s[axis + 1:] != xs[0][:axis] + xs[0][axis + 1:] for s in xs):
        return None
    return [xs[0][:axis] + (sum(s[axis] for s in xs),) + xs[0][axis + 1:]]


@rule("Scale", "mode channel_axis")
def _scale(attrs, shapes):
    x = shapes[0]
    mode, axis = attrs.get("mode", "channel"), attrs.get("channel_axis", 1)
    params = list(shapes[1:4])
    if mode == "channel":
        if not -len(x) <= axis < len(x):
            return None
        for i, p in enumerate(params):
            if p is not None:
                n = 1
                for d in p:
                    n *= d
                shape = [1] * len(x)
                shape[axis] = n
                params[i] = tuple(shape)
    out = broadcast(x, *params)
    return None if out is None else [out]


@rule("Normalization", "type axis epsilon num_groups sum_output codes_scale codes_zero_point "
      "codes_to")
def _normalization(attrs, shapes):
    x = shapes[0]
    scale, bias, mean, var, residual = (list(shapes[1:]) + [None] * 5)[:5]
    kind, r = attrs.get("type", "layer"), len(x) if x is not None else 0
    if x is None or r < 2 or residual not in (None, x):
        return None
    if kind in ("layer", "rms"):
        a = attrs.get("axis", -1)
        a = a + r if a < 0 else a
        if not 0 <= a < r or any(p not in (None, x[a:]) for p in (scale, bias)) or (mean, var) != (None, None):
            return None
    elif kind in ("batch", "instance", "group"):
        if residual is not None or any(p not in (None, (x[1],)) for p in (scale, bias)):
            return None
        if (mean, var) != (((x[1],), (x[1],)) if kind == "batch" else (None, None)):
            return None
        if kind == "group" and (0 in x or x[1] % attrs.get("num_groups", 1)):
            return None
    else:
        return None
    return [x, x] if attrs.get("sum_output") else [x]


@rule("Reduce", "op axes keepdims noop_with_empty_axes")
def _reduce(attrs, shapes):
    x = shapes[0]
    if len(shapes) > 1 and shapes[1] is not None or x is None or not x or attrs.get("op") not in REDUCE_OPS:
        return None
    axes = attrs.get("axes")
    keep = bool(attrs.get("keepdims", True))
    if not axes:
        if attrs.get("noop_with_empty_axes"):
            return [x]
        axes = list(range(len(x)))
    dims = {a + len(x) if a < 0 else a for a in axes}
    if len(dims) != len(axes) or any(not 0 <= d < len(x) for d in dims):
        return None
    if keep:
        return [tuple(1 if i in dims else d for i, d in enumerate(x))]
    return [tuple(d for i, d in enumerate(x) if i not in dims)]
