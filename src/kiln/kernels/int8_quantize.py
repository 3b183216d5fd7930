"""QuantizeLinear and DequantizeLinear per tensor as one Triton pass each: float32/16 or bfloat16 to int8, uint8
or FP8 E4M3 codes, and back.

The torch tactics (quantize.py) divide, round, widen to int64, add the zero point and clamp (or widen, subtract
and multiply) in separate kernels; an 8-bit engine runs a QuantizeLinear wherever a float activation enters a
quantized layer (and a DequantizeLinear wherever codes leave one for a float layer), so here each element is
read once and written once. The arithmetic is the torch tactics': FP32 division (correctly rounded), round half
to even, saturation; (codes - zero point) * scale in FP32. Tensors keep their memory layout (a channels-last
activation gives channels-last codes, which the 8-bit convolution reads as they are). Other scales (per
channel, blocked) run the torch tactics.
"""
from __future__ import annotations

import torch

from kiln.ir.dtypes import torch_dtype
from kiln.kernels.int8_gemm import _round_half_even, _to_e4m3_grid
from kiln.kernels.quantize import RANGES
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, tl, triton

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _quantize_kernel(x_ptr, s_ptr, zp_ptr, y_ptr, n, FP8: tl.constexpr, HAS_ZP: tl.constexpr, LO: tl.constexpr,
                     HI: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.math.div_rn(tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32), tl.load(s_ptr).to(tl.float32))
    if FP8:
        q = _to_e4m3_grid(tl.minimum(tl.maximum(v, -448.0), 448.0))
    else:
        q = _round_half_even(tl.minimum(tl.maximum(v, -4194304.0), 4194304.0))
        if HAS_ZP:
            q += tl.load(zp_ptr).to(tl.float32)
        q = tl.minimum(tl.maximum(q, LO), HI)
    tl.store(y_ptr + offs, q.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_kernel(x_ptr, s_ptr, zp_ptr, y_ptr, n, HAS_ZP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
    if HAS_ZP:
        v -= tl.load(zp_ptr).to(tl.float32)
    tl.store(y_ptr + offs, (v * tl.load(s_ptr).to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` as it is where its elements are dense in some layout (row-major or channels-last), else a copy."""
    return x if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) \
        else x.contiguous()


def dequantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, out: torch.dtype,
                          block: int = 1024) -> torch.Tensor:
    """(x - zero_point) * scale in FP32 as ``out``, with one-element ``scale``/``zero_point`` tensors on x's device,
    in x's memory layout."""
    x = _dense(x)
    y = torch.empty_like(x, dtype=out)
    if x.is_meta or x.numel() == 0:
        return y
    _dequantize_kernel[(cdiv(x.numel(), block),)](x, scale, zero_point if zero_point is not None else scale, y,
                                                  x.numel(), HAS_ZP=zero_point is not None, BLOCK=block, num_warps=4)
    return y


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, out: str,
                        block: int = 1024) -> torch.Tensor:
    """round(x / scale) + zero_point saturated to ``out`` (FP8: clamped to +-448 and rounded to E4M3, no zero
    point), with one-element ``scale`` and ``zero_point`` tensors on x's device (read by the kernel: no host
    synchronization), in x's memory layout."""
    x = _dense(x)
    y = torch.empty_like(x, dtype=torch_dtype(out))
    if x.is_meta or x.numel() == 0:
        return y
    fp8 = out == "float8_e4m3fn"
    lo, hi = (0, 0) if fp8 else RANGES[out]
    has_zp = zero_point is not None and not fp8
    _quantize_kernel[(cdiv(x.numel(), block),)](x, scale, zero_point if has_zp else scale, y, x.numel(), FP8=fp8,
                                                HAS_ZP=has_zp, LO=lo, HI=hi, BLOCK=block, num_warps=4)
    return y


def _ok(attrs, ctx) -> bool:
    return (HAS_TRITON and attrs["to"] in ("int8", "uint8", "float8_e4m3fn") and not attrs.get("block_size")
            and bool(attrs.get("saturate", True)) and (not ctx.input_dtypes or ctx.input_dtypes[0] in
                                                         ("float32", "float16", "bfloat16")))


@tactic("QuantizeLinear", "triton", devices=("cuda",), supports=_ok, priority=-1)
def make_quantize_triton(attrs, ctx):
    from kiln.kernels.quantize import make_quantize
    fallback = make_quantize(attrs, ctx)        # per-channel scales: the torch tactic
    out = attrs["to"]

    def run(x, scale, zero_point=None):
        if scale.numel() != 1 or x.dtype not in _FLOATS or (zero_point is not None and zero_point.numel() != 1):
            return fallback(x, scale, zero_point)
        return (quantize_per_tensor(x, scale, zero_point, out),)
    return run


def _dq_ok(attrs, ctx) -> bool:
    return (HAS_TRITON and not attrs.get("block_size") and (attrs.get("to") or "float32") in ("float32", "float16",
                                                                                               "bfloat16")
            and (not ctx.input_dtypes or ctx.input_dtypes[0] in ("int8", "uint8", "float8_e4m3fn")))


@tactic("DequantizeLinear", "triton", devices=("cuda",), supports=_dq_ok, priority=-1)
def make_dequantize_triton(attrs, ctx):
    from kiln.kernels.quantize import make_dequantize
    fallback = make_dequantize(attrs, ctx)        # per-channel or blocked scales: the torch tactic

    def run(x, scale, zero_point=None):
        if scale.numel() != 1 or x.dtype not in (torch.int8, torch.uint8, torch.float8_e4m3fn) or (
                zero_point is not None and zero_point.numel() != 1):
            return fallback(x, scale, zero_point)
        return (dequantize_per_tensor(x, scale, zero_point, torch_dtype(attrs.get("to") or "float32")),)
    return run
