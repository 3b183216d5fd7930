"""ElementWise product or sum of a channels-last 4-D activation with a per-image, per-channel tensor
of shape [N, C, 1, 1] (or [1, C, 1, 1]): squeeze-and-excitation's rescale in MobileNetV3 and
EfficientNet.

torch broadcasts the small operand over a channels-last tensor through its generic, unvectorized
element-wise kernel. Here one Triton program walks a block of the big tensor in memory order (channel fastest), loads the
matching scales and writes a channels-last result. Anything else falls back to torch at run time.
"""
from __future__ import annotations

import functools

import torch

from kiln.kernels.pointwise import make_elementwise
from kiln.kernels.registry import tactic
from kiln.triton_support import cdiv, interpreting

_OPS = ("prod", "sum")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["total", "HWC"])     # shape-dependent: one compile serves every input shape
    def scale_nhwc(x_ptr, s_ptr, y_ptr, total, C, HWC, s_batch, OP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        c = offs % C
        n = offs // HWC
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + n * s_batch + c, mask=mask, other=0.0).to(tl.float32)
        if OP == 0:
            v = x * s
        else:
            v = x + s
        tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)
    return scale_nhwc


def split_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(big channels-last activation, [N|1, C, 1, 1] scales) when this kernel applies, else None."""
    for big, small in ((a, b), (b, a)):
        if big.dim() != 4 or small.dim() != 4 or big.is_meta or not big.is_cuda and not interpreting():
            continue
        n, c, h, w = big.shape
        if big.dtype not in _FLOATS or small.dtype != big.dtype or h * w <= 1:
            continue
        if not big.is_contiguous(memory_format=torch.channels_last) or big.is_contiguous():
            continue
        if tuple(small.shape[1:]) == (c, 1, 1) and small.shape[0] in (1, n) and small.device == big.device:
            return big, small
    return None


def scale_channels_last(big: torch.Tensor, small: torch.Tensor, op: str, block: int = 1024) -> torch.Tensor:
    n, c, h, w = big.shape
    s = small.reshape(small.shape[0], c).contiguous()
    y = torch.empty_like(big)                      # keeps the channels-last layout
    total = big.numel()
    _kernel()[(cdiv(total, block),)](big, s, y, total, c, h * w * c, c if s.shape[0] > 1 else 0,
                                            OP=_OPS.index(op), BLOCK=block, num_warps=4)
    return y


def _ok(attrs, ctx) -> bool:
    return attrs.get("op") in _OPS


@tactic("ElementWise", "triton_nhwc_scale", devices=("cuda",), supports=_ok, priority=1)
def make_scale_nhwc(attrs, ctx):
    op = attrs["op"]
    fallback = make_elementwise(attrs, ctx)

    def run(*xs):
        if len(xs) == 2:
            pair = split_operands(xs[0], xs[1])
            if pair is not None:
                return (scale_channels_last(pair[0], pair[1], op),)
        return fallback(*xs)
    return run
