"""QuantizeLinear per tensor as one Triton pass: float32/16 or bfloat16 in, int8, uint8 or FP8 E4M3 codes out.

The torch tactic (quantize.py) divides, rounds, widens to int64, adds the zero point and clamps in separate
kernels; an 8-bit engine runs a QuantizeLinear wherever a float activation enters a quantized layer, so here
each element is read once and written once as its code. The arithmetic is the torch tactic's: FP32 division
(correctly rounded), round half to even, saturation; the input keeps its memory layout (a channels-last
activation gives channels-last codes, which the 8-bit convolution reads as they are).
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
        q = _round_half_even(v)
        if HAS_ZP:
            q += tl.load(zp_ptr).to(tl.float32)
        q = tl.minimum(tl.maximum(q, LO), HI)
    tl.store(y_ptr + offs, q.to(y_ptr.dtype.element_ty), mask=ok)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, out: str,
                        block: int = 1024) -> torch.Tensor:
    """round(x / scale) + zero_point saturated to ``out`` (FP8: clamped to +-448 and rounded to E4M3, no zero
    point), with one-element ``scale`` and ``zero_point`` tensors on x's device (read by the kernel: no host
    synchronization), in x's memory layout."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        x = x.contiguous()
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
