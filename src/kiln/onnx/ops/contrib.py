"""ONNX Runtime contrib ops (domain com.microsoft) that its optimizer and exporters write, built from layers.

Fused convolution/GEMM/MatMul, the GELU family, bias and skip additions, layer and RMS
normalization with a skip input, and BERT's embedding + layer norm, with ONNX Runtime's
semantics (its operator schemas are the spec; tests compare against ONNX Runtime itself).
ONNX Runtime registers ``LayerNormalization`` (before opset 17) and ``SimplifiedLayerNormalization``
in the default domain, so they are registered there.
Attention ops live in ``contrib_attention.py``, quantized ones in ``contrib_quant.py``.
"""
from __future__ import annotations

import numpy as np

from kiln.errors import ParseError
from kiln.onnx.registry import converter

MS = "com.microsoft"


# ---- helpers shared by the contrib converters --------------------------------------------------

def ew(ctx, op: str, a, b, dtype: str | None = None):
    """One broadcasting ElementWise layer."""
    return ctx.add1("ElementWise", [a, b], {"op": op}, dtype=dtype or a.dtype)


def refuse(node, what: str, fix: str) -> ParseError:
    """The one-line error for a contrib feature Kiln does not run."""
    return ParseError(f"Node {node.name!r} ({node.op_type}, domain {node.domain or 'ai.onnx'}) uses {what}, which Kiln "
                      f"does not support; {fix}.")


def dim_of(ctx, t, axis: int):
    """``t.shape[axis]`` as a one-element int64 tensor computed at run time."""
    return ctx.add1("Shape", [t], {"start": axis, "end": axis + 1 if axis != -1 else None}, dtype="int64")


def last_dim(t) -> int | None:
    """The static size of the last axis, or None."""
    if t is None or t.shape is None or not t.shape or not isinstance(t.shape[-1], int):
        return None
    return t.shape[-1]


# ---- fused activations (FusedConv, FusedGemm) --------------------------------------------------

# ONNX Runtime activation name → (Kiln activation type, default parameters in attribute order)
_ACTIVATIONS = {
    "Relu": ("relu", ()), "Tanh": ("tanh", ()), "Sigmoid": ("sigmoid", ()), "Softsign": ("softsign", ()),
    "Softplus": ("softplus", ()), "LeakyRelu": ("leaky_relu", (0.01,)), "Clip": ("clip", (None, None)),
    "HardSigmoid": ("hard_sigmoid", (0.2, 0.5)), "Elu": ("elu", (1.0,)),
    "ThresholdedRelu": ("thresholded_relu", (1.0,)),
    "Selu": ("selu", (1.67326319217681884765625, 1.05070102214813232421875)),
    "ScaledTanh": ("scaled_tanh", (1.0, 1.0)),
}


def fused_activation(ctx, node, y, name: str, params: list[float]):
    """``y`` through ONNX Runtime's fused activation ``name`` with its parameters (alpha, beta, ...)."""
    if not name:
        return y
    if name == "ParametricSoftplus":         # alpha * softplus(beta * x)
        alpha, beta = (list(params) + [1.0, 1.0][len(params):])[:2]
        z = ctx.add1("Activation", [ew(ctx, "prod", y, ctx.const(np.float32(beta)))], {"type": "softplus"})
        return ew(ctx, "prod", z, ctx.const(np.float32(alpha)))
    if name not in _ACTIVATIONS:
        raise refuse(node, f"activation {name!r}",
                     f"use one of {', '.join(sorted(_ACTIVATIONS))} or ParametricSoftplus")
    kind, defaults = _ACTIVATIONS[name]
    vals = list(params[:len(defaults)]) + list(defaults[len(params):])
    attrs = {"type": kind}
    if vals:
        attrs["alpha"] = vals[0]
    if len(vals) > 1:
        attrs["beta"] = vals[1]
    return ctx.add1("Activation", [y], attrs)


@converter("FusedConv", since=1, domain=MS)
def fused_conv(ctx, node):
    """act(Conv(X, W, B) + Z): the sum input Z is added before the activation."""
    from kiln.onnx.ops.conv import conv
    y = conv(ctx, node)
    z = node.input(3)
    if z is not None:
        y = ew(ctx, "sum", y, z)
    return fused_activation(ctx, node, y, node.attr("activation", ""), node.attr("activation_params", []) or [])


@converter("FusedGemm", since=1, domain=MS)
def fused_gemm(ctx, node):
    from kiln.onnx.ops.math import gemm
    y = gemm(ctx, node)
    name = node.attr("activation", "")
    keys = {"Selu": ("activation_alpha", "activation_gamma")}.get(name, ("activation_alpha", "activation_beta"))
    params = []
    for key in keys:
        if key not in node.attrs:
            break
        params.append(node.attr(key))
    return fused_activation(ctx, node, y, name, params)


@converter("FusedMatMul", since=1, domain=MS)
def fused_matmul(ctx, node):
    """alpha · op(A) @ op(B); transBatch moves the first axis behind the batch axes (an einsum with '...')."""
    a, b = node.input(0), node.input(1)
    ta, tb = bool(node.attr("transA", 0)), bool(node.attr("transB", 0))
    tba, tbb = bool(node.attr("transBatchA", 0)), bool(node.attr("transBatchB", 0))
    if tba or tbb:
        # op(A) is [..., m, k]; stored, the first axis becomes the one before the last (transBatch)
        sa = {(False, False): "...mk", (True, False): "...km", (False, True): "m...k", (True, True): "k...m"}[(ta, tba)]
        sb = {(False, False): "...kn", (True, False): "...nk", (False, True): "k...n", (True, True): "n...k"}[(tb, tbb)]
        y = ctx.add1("Einsum", [a, b], {"equation": f"{sa},{sb}->...mn"})
    else:
        y = ctx.add1("MatMul", [a, b], {"transpose_a": ta, "transpose_b": tb})
    alpha = float(node.attr("alpha", 1.0))
    return y if alpha == 1.0 else ew(ctx, "prod", y, ctx.const(np.asarray(alpha, a.dtype)))


# ---- GELU family and bias additions ------------------------------------------------------------

@converter("Gelu", since=1, domain=MS)
def gelu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "gelu"})


@converter("BiasGelu", since=1, domain=MS)
def bias_gelu(ctx, node):
    return ctx.add1("Activation", [ew(ctx, "sum", node.input(0), node.input(1))], {"type": "gelu"})


@converter("FastGelu", since=1, domain=MS)
def fast_gelu(ctx, node):
    """The tanh approximation of GELU, after the optional bias."""
    x, bias = node.input(0), node.input(1)
    if bias is not None:
        x = ew(ctx, "sum", x, bias)
    return ctx.add1("Activation", [x], {"type": "gelu_tanh"})


@converter("QuickGelu", since=1, domain=MS)
def quick_gelu(ctx, node):
    return ctx.add1("Activation", [node.input(0)], {"type": "swish", "alpha": float(node.attr("alpha", 1.702))})


@converter("BiasAdd", since=1, domain=MS)
def bias_add(ctx, node):
    return ew(ctx, "sum", ew(ctx, "sum", node.input(0), node.input(1)), node.input(2))


# ---- normalization -----------------------------------------------------------------------------

def _inv_std(ctx, x, epsilon: float, rms: bool):
    """1 / sqrt(mean((x - mean)²) + eps) over the last axis (mean(x²) for RMS), kept as a size-1 axis,
    with the mean (None for RMS)."""
    def mean(t):
        return ctx.add1("Reduce", [t], {"op": "mean", "axes": [-1], "keepdims": True, "noop_with_empty_axes": False})
    mu = None if rms else mean(x)
    d = x if rms else ew(ctx, "sub", x, mu)
    var = ew(ctx, "sum", mean(ew(ctx, "prod", d, d)), ctx.const(np.asarray(epsilon, x.dtype)))
    return mu, ctx.add1("Unary", [ctx.add1("Unary", [var], {"op": "sqrt"})], {"op": "recip"})


def _skip_norm(ctx, node, rms: bool):
    """Normalize input + skip (+ bias) over the last axis; outputs y, mean, inv_std_var, the sum.

    The sum is added so that the residual add + norm fusion can take it (passes/fuse_add_norm.py).
    """
    x, skip, gamma = node.input(0), node.input(1), node.input(2)
    beta, bias = (None, node.input(3)) if rms else (node.input(3), node.input(4))
    eps = float(node.attr("epsilon", 1e-12))
    if bias is not None:
        x = ew(ctx, "sum", x, bias)
    s = ew(ctx, "sum", x, skip)
    wanted = [bool(n) for n in node.output_names] + [False] * 4
    kind = "rms" if rms else "layer"
    if not (wanted[1] or wanted[2]):
        y = ctx.add1("Normalization", [s, gamma, beta], {"type": kind, "axis": -1, "epsilon": eps})
        return [y, None, None, s][:node.num_outputs]
    mu, inv = _inv_std(ctx, s, eps, rms)
    y = ctx.add1("Normalization", [s, gamma, beta], {"type": kind, "axis": -1, "epsilon": eps})
    return [y, mu, inv, s][:node.num_outputs]


@converter("SkipLayerNormalization", since=1, domain=MS)
def skip_layer_norm(ctx, node):
    return _skip_norm(ctx, node, rms=False)


@converter("SkipSimplifiedLayerNormalization", since=1, domain=MS)
def skip_simplified_layer_norm(ctx, node):
    return _skip_norm(ctx, node, rms=True)


@converter("SimplifiedLayerNormalization", since=1)
def simplified_layer_norm(ctx, node):
    """RMS normalization over axis..last; the optional second output is 1/sqrt(mean(x²) + eps)."""
    x, scale = node.input(0), node.input(1)
    axis, eps = node.attr("axis", -1), float(node.attr("epsilon", 1e-5))
    y = ctx.add1("Normalization", [x, scale], {"type": "rms", "axis": axis, "epsilon": eps})
    if node.num_outputs < 2 or not node.output_names[1]:
        return [y]
    if axis != -1 and (x.rank is None or axis % x.rank != x.rank - 1):
        raise refuse(node, f"the inv_std_var output with axis={axis}", "normalize over the last axis only")
    return [y, _inv_std(ctx, x, eps, rms=True)[1]]


def _contrib_layer_norm(ctx, node):
    from kiln.onnx.ops.conv import layer_norm
    return layer_norm(ctx, node)


converter("LayerNormalization", since=1)(_contrib_layer_norm)


# ---- BERT embeddings ---------------------------------------------------------------------------

@converter("EmbedLayerNormalization", since=1, domain=MS)
def embed_layer_norm(ctx, node):
    """LayerNorm(word[ids] + position[pos] + segment[seg]); mask_index is the count of non-zero mask
    entries per row (int32; zeros without a mask); embedding_sum is the sum before normalization."""
    ids, seg, word, pos_table, seg_table, gamma, beta, mask, pos_ids = (node.input(i) for i in range(9))
    emb = ctx.add1("Gather", [word, ids], {"axis": 0}, dtype=word.dtype)
    if pos_ids is None:                     # positions 0..S-1, the first S rows of the table
        zero = ctx.const(np.asarray([0], np.int64))
        pos = ctx.add1("Slice", [pos_table, zero, dim_of(ctx, ids, 1), zero], {}, dtype=pos_table.dtype)
    else:
        pos = ctx.add1("Gather", [pos_table, pos_ids], {"axis": 0}, dtype=pos_table.dtype)
    emb = ew(ctx, "sum", emb, pos)
    if seg is not None and seg_table is not None:
        emb = ew(ctx, "sum", emb, ctx.add1("Gather", [seg_table, seg], {"axis": 0}, dtype=seg_table.dtype))
    y = ctx.add1("Normalization", [emb, gamma, beta],
                 {"type": "layer", "axis": -1, "epsilon": float(node.attr("epsilon", 1e-12))})
    outs = [y, None, emb]
    if node.num_outputs > 1 and node.output_names[1] and mask is None:       # zeros, as ONNX Runtime gives
        outs[1] = ctx.add1("ConstantOfShape", [dim_of(ctx, ids, 0)], {"value": np.zeros(1, np.int32)}, dtype="int32")
    elif node.num_outputs > 1 and node.output_names[1]:
        is_zero = ew(ctx, "equal", mask, ctx.const(np.zeros((), np.dtype(mask.dtype))), "bool")
        nonzero = ctx.add1("Cast", [ctx.add1("Unary", [is_zero], {"op": "not"}, dtype="bool")], {"to": "int32"},
                           dtype="int32")
        outs[1] = ctx.add1("Reduce", [nonzero], {"op": "sum", "axes": [1], "keepdims": False,
                                                 "noop_with_empty_axes": False}, dtype="int32")
    return outs[:node.num_outputs]

