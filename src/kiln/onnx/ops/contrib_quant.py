"""ONNX Runtime's quantized contrib ops (com.microsoft): QLinearConv (channels-last too), QLinearAdd,
QLinearMul, QLinearSigmoid, QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearConcat, QGemm,
MatMulIntegerToFloat, DynamicQuantizeMatMul, MatMulNBits and DynamicQuantizeLSTM (kernels/rnn_quant.py).

Element-wise ops are computed as ONNX Runtime's CPU kernels define them: zero-point-corrected
inputs scaled by float32 scale ratios, then rounded half to even and saturated (within one
quantization step of ONNX Runtime, whose vectorized kernels may round a product differently).
MatMulNBits unpacks its block-quantized weights at parse time into a float FullyConnected weight.
"""
from __future__ import annotations

import numpy as np

from kiln.errors import ParseError
from kiln.onnx.ops._common import const_value
from kiln.onnx.ops.contrib import MS, ew, refuse
from kiln.onnx.registry import converter

_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def _qtype(node, t) -> str:
    if t.dtype not in _RANGES:
        raise refuse(node, f"{t.dtype} data", "quantize to uint8 or int8")
    return t.dtype


def _centered(ctx, x, zp):
    """float32(x - zero_point)."""
    xf = ctx.add1("Cast", [x], {"to": "float32"}, dtype="float32")
    if zp is None:
        return xf
    return ew(ctx, "sub", xf, ctx.add1("Cast", [zp], {"to": "float32"}, dtype="float32"))


def _ratio(ctx, num, den):
    """num / den in float32: folded now when both scales are constants."""
    a, b = const_value(num), const_value(den)
    if a is not None and b is not None:
        return ctx.const(np.asarray(a, np.float32).reshape(-1)[0] / np.asarray(b, np.float32).reshape(-1)[0])
    return ew(ctx, "div", num, den)


def _requantize(ctx, value, zp, out: str):
    """saturate(round_half_even(value + zero_point)) as ``out``."""
    if zp is not None:
        value = ew(ctx, "sum", value, ctx.add1("Cast", [zp], {"to": "float32"}, dtype="float32"))
    return ctx.add1("QuantizeLinear", [value, ctx.const(np.float32(1.0))], {"axis": 1, "to": out, "block_size": 0,
                                                                           "saturate": True}, dtype=out)


@converter("QLinearAdd", since=1, domain=MS)
def qlinear_add(ctx, node):
    """C = (A_scale/C_scale)·(A - A_zp) + (B_scale/C_scale)·(B - B_zp) + C_zp."""
    a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp = (node.input(i) for i in range(8))
    out = _qtype(node, a)
    va = ew(ctx, "prod", _centered(ctx, a, a_zp), _ratio(ctx, a_s, c_s))
    vb = ew(ctx, "prod", _centered(ctx, b, b_zp), _ratio(ctx, b_s, c_s))
    return _requantize(ctx, ew(ctx, "sum", va, vb), c_zp, out)


@converter("QLinearMul", since=1, domain=MS)
def qlinear_mul(ctx, node):
    """C = (A_scale·B_scale/C_scale)·(A - A_zp)·(B - B_zp) + C_zp."""
    a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp = (node.input(i) for i in range(8))
    out = _qtype(node, a)
    prod = ew(ctx, "prod", _centered(ctx, a, a_zp), _centered(ctx, b, b_zp))
    sa, sb, sc = const_value(a_s), const_value(b_s), const_value(c_s)
    if sa is not None and sb is not None and sc is not None:
        mult = ctx.const(np.float32(np.float32(np.float32(sa.reshape(-1)[0]) * np.float32(sb.reshape(-1)[0]))
                                    / np.float32(sc.reshape(-1)[0])))
    else:
        mult = ew(ctx, "div", ew(ctx, "prod", a_s, b_s), c_s)
    return _requantize(ctx, ew(ctx, "prod", prod, mult), c_zp, out)


def _lookup_op(ctx, node, act: dict):
    """quantize(f(dequantize(x))) for a float activation f, as ONNX Runtime's table-driven kernels do."""
    x, x_s, x_zp, y_s, y_zp = (node.input(i) for i in range(5))
    out = _qtype(node, x)
    xf = ctx.add1("DequantizeLinear", [x, x_s, x_zp], {"axis": 1, "block_size": 0, "to": "float32"}, dtype="float32")
    yf = ctx.add1("Activation", [xf], act, dtype="float32")
    zp = y_zp if y_zp is not None else ctx.const(np.zeros((), out))
    return ctx.add1("QuantizeLinear", [yf, y_s, zp], {"axis": 1, "to": out, "block_size": 0, "saturate": True},
                    dtype=out)


@converter("QLinearSigmoid", since=1, domain=MS)
def qlinear_sigmoid(ctx, node):
    return _lookup_op(ctx, node, {"type": "sigmoid"})


@converter("QLinearLeakyRelu", since=1, domain=MS)
def qlinear_leaky_relu(ctx, node):
    return _lookup_op(ctx, node, {"type": "leaky_relu", "alpha": float(node.attr("alpha", 0.01))})


@converter("QLinearConv", since=1, domain=MS)
def qlinear_conv_ms(ctx, node):
    """The standard QLinearConv; with channels_last the input and output are [N, spatial..., C]."""
    from kiln.onnx.ops.quantize import _conv_attrs, qlinear_conv
    if not node.attr("channels_last", 0):
        return qlinear_conv(ctx, node)
    w = node.input(3)
    if w.shape is None:
        raise refuse(node, "channels_last with a weight of unknown rank", "give the weight as an initializer")
    rank = len(w.shape)
    to_first = [0, rank - 1] + list(range(1, rank - 1))
    to_last = [0] + list(range(2, rank)) + [1]
    x = node.input(0)
    nchw = ctx.add1("Shuffle", [x], {"first_transpose": to_first}, dtype=x.dtype)
    ins = [nchw] + [node.input(i) for i in range(1, 9)]
    out = ins[7].dtype if ins[7] is not None else x.dtype
    y = ctx.add1("QLinearOp", ins if ins[8] is not None else ins[:8], _conv_attrs(node, nchw, w), dtype=out)
    return ctx.add1("Shuffle", [y], {"first_transpose": to_last}, dtype=out)


def _transposed_rank(node, x) -> int:
    rank = x.rank
    if rank is None:
        raise refuse(node, "channels_last with an input of unknown rank", "give the input a static shape")
    return rank


@converter("QLinearGlobalAveragePool", since=1, domain=MS)
def qlinear_global_average_pool(ctx, node):
    """quantize(mean over the spatial axes of (x - x_zp) · x_scale / y_scale) with y_zp; [N, C, 1, ...]
    (channels_last: [N, 1, ..., C])."""
    x, x_s, x_zp, y_s, y_zp = (node.input(i) for i in range(5))
    out = _qtype(node, x)
    xf = _centered(ctx, x, x_zp)
    last = bool(node.attr("channels_last", 0))
    if last:
        rank = _transposed_rank(node, x)
        xf = ctx.add1("Shuffle", [xf], {"first_transpose": [0, rank - 1] + list(range(1, rank - 1))}, dtype="float32")
    mean = ctx.add1("Pooling", [xf], {"type": "average", "kernel": None}, dtype="float32")
    if last:
        mean = ctx.add1("Shuffle", [mean], {"first_transpose": [0] + list(range(2, rank)) + [1]}, dtype="float32")
    return _requantize(ctx, ew(ctx, "prod", mean, _ratio(ctx, x_s, y_s)), y_zp, out)


@converter("QLinearConcat", since=1, domain=MS)
def qlinear_concat(ctx, node):
    """Each (x, scale, zero point) requantized to (Y_scale, Y_zero_point) unless they already match, then joined."""
    y_s, y_zp = node.input(0), node.input(1)
    out = y_zp.dtype
    parts = []
    for i in range(2, len(node.inputs), 3):
        x, x_s, x_zp = node.input(i), node.input(i + 1), node.input(i + 2)
        same = all(a is not None and b is not None and np.array_equal(a, b) for a, b in
                   ((const_value(x_s), const_value(y_s)), (const_value(x_zp), const_value(y_zp))))
        if not same:
            xf = ctx.add1("DequantizeLinear", [x, x_s, x_zp], {"axis": 1, "block_size": 0, "to": "float32"},
                          dtype="float32")
            x = ctx.add1("QuantizeLinear", [xf, y_s, y_zp], {"axis": 1, "to": out, "block_size": 0, "saturate": True},
                         dtype=out)
        parts.append(x)
    return ctx.add1("Concatenation", parts, {"axis": int(node.attr("axis"))}, dtype=out)


def _integer_matmul(ctx, a, b, a_zp, b_zp):
    return ctx.add1("IntegerOp", [a, b, a_zp, b_zp], {"op": "matmul"}, dtype="int32")


def _scaled(ctx, acc, scale, bias=None):
    """float32(acc) · scale (+ bias)."""
    y = ew(ctx, "prod", ctx.add1("Cast", [acc], {"to": "float32"}, dtype="float32"), scale)
    return ew(ctx, "sum", y, bias) if bias is not None else y


@converter("MatMulIntegerToFloat", since=1, domain=MS)
def matmul_integer_to_float(ctx, node):
    """(A - a_zp) @ (B - b_zp) · a_scale · b_scale + bias, in float32."""
    a, b, a_s, b_s, a_zp, b_zp, bias = (node.input(i) for i in range(7))
    return _scaled(ctx, _integer_matmul(ctx, a, b, a_zp, b_zp), ew(ctx, "prod", a_s, b_s), bias)


@converter("DynamicQuantizeMatMul", since=1, domain=MS)
def dynamic_quantize_matmul(ctx, node):
    """A quantized to uint8 from its own range (DynamicQuantizeLinear), then MatMulIntegerToFloat."""
    a, b, b_s, b_zp, bias = (node.input(i) for i in range(5))
    q, a_s, a_zp = ctx.add("DynamicQuantizeLinear", [a], {}, num_outputs=3,
                           output_dtypes=["uint8", a.dtype, "uint8"]).outputs
    return _scaled(ctx, _integer_matmul(ctx, q, b, a_zp, b_zp), ew(ctx, "prod", a_s, b_s), bias)


@converter("QGemm", since=1, domain=MS)
def qgemm(ctx, node):
    """alpha · a_scale · b_scale · ((A - a_zp) @ (B - b_zp) + C), C int32; float32 out, or quantized to
    (y_scale, y_zero_point) when they are given."""
    a, a_s, a_zp, b, b_s, b_zp, c, y_s, y_zp = (node.input(i) for i in range(9))
    if node.attr("transA", 0):
        a = ctx.add1("Shuffle", [a], {"first_transpose": [1, 0]}, dtype=a.dtype)
    if node.attr("transB", 0):
        b = ctx.add1("Shuffle", [b], {"first_transpose": [1, 0]}, dtype=b.dtype)
    acc = _integer_matmul(ctx, a, b, a_zp, b_zp)
    if c is not None:
        acc = ew(ctx, "sum", acc, c)
    scale = ew(ctx, "prod", a_s, b_s)
    alpha = float(node.attr("alpha", 1.0))
    if alpha != 1.0:
        scale = ew(ctx, "prod", scale, ctx.const(np.float32(alpha)))
    if y_s is None:
        return _scaled(ctx, acc, scale)
    out = y_zp.dtype if y_zp is not None else "uint8"
    return _requantize(ctx, _scaled(ctx, acc, ew(ctx, "div", scale, y_s)), y_zp, out)


# ---- MatMulNBits -------------------------------------------------------------------------------

def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-end-first bit fields of ``packed`` (uint8) along its last axis, the first ``count`` of them."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    fields = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_nbits(node, b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int, bits: int,
                     block: int) -> np.ndarray:
    """The float weight [N, K] that MatMulNBits' packed blocks, scales and zero points encode."""
    blocks = -(-k // block)
    if b.size == 0:
        return np.zeros((n, k), np.float32)
    blob = block * bits // 8
    if b.dtype != np.uint8 or b.size != n * blocks * blob:
        raise ParseError(f"Node {node.name!r} (MatMulNBits) has packed weights of shape {b.shape} ({b.dtype}); "
                         f"N={n}, K={k}, bits={bits}, block_size={block} need uint8 [{n}, {blocks}, {blob}].")
    q = _unpack(b.reshape(n, blocks, blob), bits, block).astype(np.float32)          # [N, blocks, block]
    s = np.asarray(scales, np.float32)
    if s.size != n * blocks:
        raise ParseError(f"Node {node.name!r} (MatMulNBits) has {s.size} scales; N×blocks is {n * blocks}.")
    s = s.reshape(n, blocks, 1)
    if zp is None:
        z = np.float32(1 << (bits - 1))
    elif zp.dtype == np.uint8:
        z = _unpack(zp.reshape(n, -1), bits, blocks).astype(np.float32).reshape(n, blocks, 1)
    else:
        z = np.asarray(zp, np.float32).reshape(n, blocks, 1)
    return ((q - z) * s).reshape(n, blocks * block)[:, :k]


@converter("MatMulNBits", since=1, domain=MS)
def matmul_nbits(ctx, node):
    """A @ dequantize(B)ᵀ + bias with B block-quantized along K (2, 4 or 8 bits); B, scales and zero
    points must be initializers. Computed at float accuracy whatever accuracy_level asks."""
    a, b, scales, zp, g_idx, bias = (node.input(i) for i in range(6))
    if g_idx is not None:
        raise refuse(node, "the g_idx input", "export without act-order group indices")
    if node.attr("weight_prepacked", 0):
        raise refuse(node, "prepacked weights", "export with weight_prepacked=0")
    bits, block = int(node.attr("bits", 4)), int(node.attr("block_size"))
    n, k = int(node.attr("N")), int(node.attr("K"))
    if bits not in (2, 4, 8) or block < 16 or block & (block - 1):
        raise refuse(node, f"bits={bits}, block_size={block}",
                     "use 2, 4 or 8 bits and a power-of-two block of 16 or more")
    values = [const_value(t) for t in (b, scales, zp)]
    if values[0] is None or values[1] is None or (zp is not None and values[2] is None):
        raise refuse(node, "packed weights, scales or zero points computed at run time", "store them as initializers")
    w = dequantize_nbits(node, values[0], values[1], values[2], n, k, bits, block)
    if a.dtype not in ("float32", "float16", "float64"):
        raise refuse(node, f"a {a.dtype} input", "run it in float32 or float16")
    ins = [a, ctx.const(w.astype(a.dtype))]
    if bias is not None:
        ins.append(bias)
    return ctx.add1("FullyConnected", ins, {}, dtype=a.dtype)


# ---- DynamicQuantizeLSTM -----------------------------------------------------------------------

_LSTM_ACTS = ("relu", "tanh", "sigmoid", "affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu",
              "softsign", "softplus")


def _lstm_error(node, text: str) -> ParseError:
    return ParseError(f"Node {node.name!r} (DynamicQuantizeLSTM, domain {MS}) {text}")


def _lstm_quant_params(node, dirs: int, hidden: int, weight, scale, zp, name: str) -> None:
    """Refuse a missing, mistyped or misshapen scale or zero point of W or R (``name``), or zero points that
    ONNX Runtime's kernel does not accept (per column: all zero for int8 codes, one value per direction)."""
    if scale is None or zp is None:
        missing = f"{name}_scale" if scale is None else f"{name}_zero_point"
        raise _lstm_error(node, f"has no {missing} input; the op needs {name}_scale and {name}_zero_point "
                                f"(inputs 8-11): quantize the model again with ONNX Runtime's quantizer.")
    if scale.dtype != "float32" or zp.dtype != weight.dtype:
        raise _lstm_error(node, f"has {name}_scale of type {scale.dtype} and {name}_zero_point of type {zp.dtype}; "
                                f"they must be float32 and {weight.dtype} (like {name}).")
    for t, what in ((scale, "scale"), (zp, "zero_point")):
        if t.shape is not None and tuple(t.shape) not in ((dirs,), (dirs, 4 * hidden)):
            raise _lstm_error(node, f"has {name}_{what} of shape {list(t.shape)}; it must be [{dirs}] (per "
                                    f"direction) or [{dirs}, {4 * hidden}] (per column).")
    z = const_value(zp)
    if z is None:
        raise refuse(node, f"a {name}_zero_point computed at run time", "store it as an initializer")
    z = np.asarray(z).reshape(dirs, -1)
    if (z != z[:, :1]).any() or (z.shape[1] > 1 and weight.dtype == "int8" and z.any()):
        raise refuse(node, f"per-column {name} zero points that vary within a direction (or are not 0 for int8 codes)",
                     "quantize the weights with one zero point per direction, as ONNX Runtime requires")


@converter("DynamicQuantizeLSTM", since=1, domain=MS)
def dynamic_quantize_lstm(ctx, node):
    """ONNX's LSTM with 8-bit W [dirs, input, 4H] and R [dirs, H, 4H] (transposed relative to ONNX's LSTM),
    their scales and zero points; both products run on activations quantized to uint8 per call, as ONNX
    Runtime computes them (kernels/rnn_quant.py)."""
    ins = [node.input(i) for i in range(12)]
    x, w, r = ins[:3]
    direction = node.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _lstm_error(node, f"has direction {direction!r}; use forward, reverse or bidirectional.")
    if node.attr("hidden_size") is None or int(node.attr("hidden_size")) < 1:
        raise _lstm_error(node, "needs a positive hidden_size attribute.")
    if node.attr("layout", 0):
        raise refuse(node, f"layout={node.attr('layout')}", "use layout 0 ([seq_length, batch_size, input_size])")
    dirs, hidden = (2 if direction == "bidirectional" else 1), int(node.attr("hidden_size"))
    if x is None or w is None or r is None:
        raise _lstm_error(node, "needs the inputs X, W and R.")
    if x.dtype != "float32":
        raise refuse(node, f"a {x.dtype} X", "run it in float32 (ONNX Runtime's kernel takes float32 only)")
    for t, name, k in ((w, "W", None), (r, "R", hidden)):
        if t.dtype not in _RANGES:
            raise refuse(node, f"{name} of type {t.dtype}", f"give {name} as int8 or uint8 codes")
        if t.shape is not None and (len(t.shape) != 3 or t.shape[0] != dirs or t.shape[2] != 4 * hidden
                                    or (k is not None and t.shape[1] != k)):
            size = "input_size" if k is None else str(k)
            raise _lstm_error(node, f"has {name} of shape {list(t.shape)}; it must be [{dirs}, {size}, {4 * hidden}] "
                                    f"(num_directions, {'input' if k is None else 'hidden'}_size, 4*hidden_size: "
                                    f"transposed relative to ONNX's LSTM).")
    if ins[4] is not None and ins[4].dtype != "int32":
        raise _lstm_error(node, f"has sequence_lens of type {ins[4].dtype}; it must be int32.")
    _lstm_quant_params(node, dirs, hidden, w, ins[8], ins[9], "W")
    _lstm_quant_params(node, dirs, hidden, r, ins[10], ins[11], "R")
    acts = node.attr("activations")
    if acts is not None:
        bad = [a for a in acts if a.lower() not in _LSTM_ACTS]
        if len(acts) != 3 * dirs or bad:
            raise _lstm_error(node, f"has activations {list(acts)}; give {3 * dirs} of {', '.join(_LSTM_ACTS)} "
                                    f"(f, g, h per direction).")
    attrs = {"hidden_size": hidden, "direction": direction, "activations": acts,
             "activation_alpha": node.attr("activation_alpha"), "activation_beta": node.attr("activation_beta"),
             "clip": node.attr("clip"), "input_forget": bool(node.attr("input_forget", 0)),
             "sequence_output": bool(node.output_names and node.output_names[0])}
    return ctx.add("DynamicQuantizeLSTM", ins, attrs, num_outputs=3, output_dtypes=["float32"] * 3).outputs
