"""Quantize/dequantize and the integer ops (QLinearMatMul/QLinearConv, MatMulInteger/ConvInteger).

Integer products are computed in float64: exact for every int8/uint8/int16 product sum a
model can hold (< 2**53), and float64 matmul/convolution exist on CPU and CUDA where
integer ones do not. IntegerOp's matrix products of 8-bit codes (and its convolutions on the CPU)
run in float32 instead where no partial sum can pass 2**24 (``float32_exact``: 255 times the
largest sum of |weight - zero point| over one output), which holds for the weights of common
quantized models; the centered weight is kept while the same weight (a constant) comes back. Rounding is half to even (torch.round), as ONNX specifies; FP8 E4M3
codes round half to even too (torch's conversion), clamped to +-448 when saturating.

The 8-bit layers QConvolution and QFullyConnected (passes/fold_qdq.py) have a reference tactic here
on every device: dequantize, the float32 torch op, requantize — what the Q/DQ graph they replace
computes. Their 8-bit kernels are in int8_gemm.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import BuildError, ShapeError
from kiln.ir.dtypes import torch_dtype
from kiln.kernels._util import norm_axis, per_tensor
from kiln.kernels.pointwise import act_params, activation_fn, add_around_act
from kiln.kernels.registry import tactic

RANGES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767),
          "int32": (-2 ** 31, 2 ** 31 - 1)}


def _broadcast(v: torch.Tensor | None, x: torch.Tensor, axis: int, block: int) -> torch.Tensor | None:
    """Scale/zero point as per-tensor (scalar), per-axis (1-D along ``axis``) or blocked (same rank)."""
    if v is None or v.dim() == 0 or v.numel() == 1 and not block:
        return v.reshape(()) if v is not None else None
    axis = norm_axis(axis, x.dim())
    if not block:
        shape = [1] * x.dim()
        shape[axis] = v.numel()
        return v.reshape(shape)
    v = v.repeat_interleave(block, dim=axis)
    return v.narrow(axis, 0, x.shape[axis])


FP8_MAX = {"float8_e4m3fn": 448.0}


def quantize_values(v: torch.Tensor, scale, zero_point, out: str, saturate: bool = True) -> torch.Tensor:
    """ONNX QuantizeLinear of float ``v``: round(v / scale) + zero_point, saturated to ``out`` (an integer type,
    or FP8 E4M3 whose zero point is 0); ``scale``/``zero_point`` are numbers or tensors broadcast to ``v``.
    FP16/BF16 values are divided in FP32 (as ONNX Runtime does), not in their own type."""
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.to(torch.float32)
    if out in FP8_MAX:
        q = v / scale
        if saturate:
            q = q.clamp(-FP8_MAX[out], FP8_MAX[out])
        return q.to(torch_dtype(out))
    lo, hi = RANGES[out]
    q = torch.round(v / scale).to(torch.int64)
    if zero_point is not None:
        q = q + (zero_point.to(torch.int64) if isinstance(zero_point, torch.Tensor) else int(zero_point))
    return q.clamp(lo, hi).to(torch_dtype(out))


@tactic("QuantizeLinear")
def make_quantize(attrs, ctx):
    out = attrs["to"]
    if out not in RANGES and out not in FP8_MAX:
        raise BuildError(f"QuantizeLinear {ctx.layer_name!r} to {out} is not supported; Kiln quantizes to "
                         f"{', '.join([*RANGES, *FP8_MAX])}.")
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0) or 0
    saturate = bool(attrs.get("saturate", True))

    def run(x, scale, zero_point=None):
        zp = _broadcast(zero_point, x, axis, block) if zero_point is not None and out not in FP8_MAX else None
        return (quantize_values(x, _broadcast(scale, x, axis, block), zp, out, saturate),)
    return run


@tactic("DequantizeLinear")
def make_dequantize(attrs, ctx):
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0) or 0
    out = attrs.get("to")

    def run(x, scale, zero_point=None):
        dx = x.to(torch.float32)
        if zero_point is not None:
            dx = dx - _broadcast(zero_point, x, axis, block).to(torch.float32)
        y = dx * _broadcast(scale, x, axis, block)
        return (y.to(torch_dtype(out) if out else scale.dtype),)
    return run


@tactic("DynamicQuantizeLinear")
def make_dynamic_quantize(attrs, ctx):
    def run(x):
        xf = x.to(torch.float32)
        hi = torch.clamp(xf.max(), min=0.0) if xf.numel() else torch.tensor(0.0)
        lo = torch.clamp(xf.min(), max=0.0) if xf.numel() else torch.tensor(0.0)
        scale = torch.where(hi == lo, torch.ones_like(hi), hi - lo) / 255.0
        zp = torch.round(torch.clamp(0.0 - lo / scale, 0.0, 255.0))
        y = torch.clamp(torch.round(xf / scale) + zp, 0, 255)
        return (y.to(torch.uint8), scale.to(x.dtype), zp.to(torch.uint8))
    return run


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _product(attrs):
    """The float64 matmul or convolution of two zero-point-corrected integer tensors."""
    if attrs["op"] == "matmul":
        return lambda a, b: torch.matmul(a, b)
    stride, dil, groups = attrs["stride"], attrs["dilation"], attrs.get("groups", 1)
    nd = len(stride)
    begins, ends = list(attrs["pads"][:nd]), list(attrs["pads"][nd:])

    def conv(a, b):
        if begins != ends:
            pad: list[int] = []
            for bg, en in zip(reversed(begins), reversed(ends)):
                pad += [bg, en]
            return _CONV[nd](F.pad(a, pad), b, None, stride, 0, dil, groups)
        return _CONV[nd](a, b, None, stride, begins, dil, groups)
    return conv


EXACT_F32 = float(1 << 24)     # float32 holds every integer up to this exactly
_CODES8 = (torch.uint8, torch.int8)


def float32_exact(centered: torch.Tensor, conv: bool = False) -> bool:
    """Whether a product of 8-bit codes minus their zero points (each within ±255) with ``centered`` keeps every
    partial sum below 2**24, so float32 computes it exactly: 255 times the largest sum of |centered| over one
    output (a column of a matmul's [.., K, N]; a convolution weight's output channel, [Cout, Cin/g, k...]) is
    below 2**24."""
    if not centered.numel():
        return True
    sums = centered.abs().flatten(1).sum(dim=1) if conv else centered.abs().sum(dim=-2)
    return 255.0 * float(sums.max()) < EXACT_F32


def _centered(v: torch.Tensor, zp: torch.Tensor | None, axis_len_dim: int | None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``v - zp`` in float64 (or ``dtype``); a 1-D zero point lies along ``axis_len_dim`` (rows of A, output
    channels of W)."""
    out = v.to(torch.float64)
    if zp is None:
        return out
    z = zp.to(torch.float64)
    if z.dim() == 1 and z.numel() > 1 and axis_len_dim is not None:
        shape = [1] * v.dim()
        shape[axis_len_dim] = z.numel()
        z = z.reshape(shape)
    elif z.numel() == 1:
        z = z.reshape(())
    return (out - z).to(dtype)


@tactic("IntegerOp")
def make_integer_op(attrs, ctx):
    prod = _product(attrs)
    is_conv = attrs["op"] == "conv"
    last: list = [None]      # (b, b_zp, a's dtype, centered b) of the last call

    def centered_b(a, b, b_zp) -> torch.Tensor:
        hit = last[0]
        if hit is None or hit[0] is not b or hit[1] is not b_zp or hit[2] != a.dtype:
            bc = _centered(b, b_zp, 0 if is_conv else b.dim() - 1)
            # float32 convolutions only on the CPU: cuDNN may pick Winograd or FFT algorithms, which round
            if a.dtype in _CODES8 and b.dtype in _CODES8 and (not is_conv or b.device.type == "cpu") \
                    and float32_exact(bc, is_conv):
                bc = bc.to(torch.float32)
            hit = last[0] = (b, b_zp, a.dtype, bc)
        return hit[3]

    def run(a, b, a_zp=None, b_zp=None):
        # per-row zero point of A [.., M, K] (dim -2); per-column of B [.., K, N] (dim -1); per-channel of W (dim 0)
        bc = centered_b(a, b, b_zp)
        return (prod(_centered(a, a_zp, None if is_conv else a.dim() - 2, bc.dtype), bc).to(torch.int32),)
    return run


@tactic("QLinearOp")
def make_qlinear_op(attrs, ctx):
    prod = _product(attrs)
    is_conv = attrs["op"] == "conv"

    def run(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias=None):
        acc = prod(_centered(a, a_zp, None), _centered(b, b_zp, 0 if is_conv else None))
        if bias is not None:
            acc = acc + bias.to(torch.float64).reshape([1, -1] + [1] * (acc.dim() - 2))
        ws = b_scale
        if is_conv and ws.numel() > 1:
            ws = ws.reshape([1, -1] + [1] * (acc.dim() - 2))
        mult = (a_scale * ws / y_scale).to(torch.float64)     # in the scales' precision, as the reference does
        r = acc * mult
        out_dt = y_zp.dtype if y_zp is not None else a.dtype
        if y_zp is not None:
            r = r + y_zp.to(torch.float64)
        lo, hi = RANGES[str(out_dt).replace("torch.", "")]
        return (torch.round(r).clamp(lo, hi).to(out_dt),)
    return run


def weight_scales(attrs, w: torch.Tensor, bias: torch.Tensor, layer: str) -> torch.Tensor:
    """An 8-bit layer's float32 weight scale per output channel (on the CPU), refused unless the weight ``w`` and
    the bias codes have that many output channels."""
    import numpy as np
    ws = torch.as_tensor(np.asarray(attrs["w_scale"], np.float32).reshape(-1))
    if not ws.numel() == bias.numel() == w.shape[0]:
        raise ShapeError(f"8-bit layer {layer!r} has {ws.numel()} weight scales and {bias.numel()} bias codes for a "
                         f"weight of {w.shape[0]} output channels; the network or engine is damaged: rebuild it "
                         f"from the model.")
    return ws


def layer_epilogue(attrs):
    """The tail every torch tactic of an 8-bit layer shares: float32 ``y`` (bias included) -> the residual (float,
    or codes dequantized with residual_scale) added before or after the activation -> requantized to the 8-bit
    ``to``, or cast to the float ``to`` (and, with codes_scale, that float output's codes as a second output):
    the layer's outputs, a tuple."""
    act = activation_fn(attrs["activation"], *act_params(attrs)) if attrs.get("activation") else None
    after = bool(attrs.get("residual_after_activation"))
    out, out_scale, out_zp = attrs["to"], attrs.get("out_scale"), int(attrs.get("out_zero_point", 0))
    r_scale, r_zp = attrs.get("residual_scale"), int(attrs.get("residual_zero_point", 0))
    q_scale = attrs.get("codes_scale")

    def finish(y: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if residual is not None:        # float, or 8-bit codes with their scale
            residual = residual.to(torch.float32) if r_scale is None else (residual.to(torch.float32) - r_zp) * r_scale
        y = add_around_act(y, residual, act, after)
        if out_scale is not None:
            return (quantize_values(y, out_scale, out_zp, out),)
        y = y.to(torch_dtype(out))
        if q_scale is None:
            return (y,)
        return y, quantize_values(y, q_scale, int(attrs.get("codes_zero_point", 0)), attrs["codes_to"])
    return finish


def _make_quantized_reference(attrs, ctx):
    """Dequantize the codes (the weight and bias once per weight tensor), run the float32 torch op with the
    dequantized bias, then ``layer_epilogue``."""
    conv = "stride" in attrs
    prod = _product({**attrs, "op": "conv"}) if conv else None
    finish = layer_epilogue(attrs)
    x_scale, x_zp = float(attrs["x_scale"]), int(attrs.get("x_zero_point", 0))
    weights: dict = {}

    def dequantized(w, bias):
        ws = weight_scales(attrs, w, bias, ctx.layer_name).to(w.device)
        return w.to(torch.float32) * ws.reshape([-1] + [1] * (w.dim() - 1)), bias.to(torch.float32) * (x_scale * ws)

    def run(x, w, bias, residual=None):
        wf, bf = dequantized(w, bias) if x.is_meta else per_tensor(weights, w, lambda: dequantized(w, bias))
        xf = (x.to(torch.float32) - x_zp) * x_scale
        y = prod(xf, wf) + bf.reshape(1, -1, 1, 1) if conv else F.linear(xf, wf, bf)
        return finish(y, residual)
    return run


tactic("QConvolution", "reference")(_make_quantized_reference)
tactic("QFullyConnected", "reference")(_make_quantized_reference)
