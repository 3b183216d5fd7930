"""Integer nearest-neighbour upsampling of channels-last maps as a Triton kernel (Resize on the GPU).

Detector necks (YOLOv5's nn.Upsample(scale_factor=2), FPN top-down paths) upsample channels-last
FP16 maps between convolutions. torch's NHWC nearest kernel is far off the bandwidth floor. Here a
program owns a block of output pixels × a block of channels; each output pixel
reads its source pixel's channel run (16-byte vectors along the fast channel axis) and writes it.

Only the ONNX form that means "repeat each pixel s times" takes this path — mode nearest,
coordinate_transformation_mode asymmetric, nearest_mode floor, integer scales on H and W, N and C
unchanged — exactly the torch tactic's fast path; anything else runs the torch tactic.
"""
from __future__ import annotations

import functools

import torch

from kiln.kernels.registry import tactic
from kiln.kernels.resize import make_resize, resize_plan
from kiln.triton_support import cdiv

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["P", "OH", "OW"])
    def upsample_nearest_nhwc(x_ptr, y_ptr, P, C, OH, OW, YS, SH: tl.constexpr, SW: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # P = N·OH·OW output pixels; x is [N, OH/SH, OW/SW, C] dense and y [N, OH, OW, ≥C] with YS
        # elements from one pixel to the next (C, or a concatenation's total channels).
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ox = p % OW
        t = p // OW
        oy = t % OH
        n = t // OH
        src = ((n.to(tl.int64) * (OH // SH) + oy // SH) * (OW // SW) + ox // SW) * C
        m = (p < P)[:, None] & (c < C)[None, :]
        v = tl.load(x_ptr + src[:, None] + c[None, :], mask=m)
        tl.store(y_ptr + (p.to(tl.int64) * YS)[:, None] + c[None, :], v, mask=m)
    return upsample_nearest_nhwc


def upsample_nearest_nhwc(x: torch.Tensor, sh: int, sw: int, block_p: int = 32, out=None) -> torch.Tensor:
    """x: 4-D channels-last → [N, C, H·sh, W·sw] channels-last, each pixel repeated sh×sw times;
    written into ``out(shape, dtype, device)`` (a concatenation's channel slice) when given."""
    n, c, h, w = x.shape
    shape = (n, c, h * sh, w * sw)
    y = out(shape, x.dtype, x.device) if out is not None else None
    if y is None or y.stride(1) != 1 or y.stride(2) != y.shape[3] * y.stride(3):
        y = torch.empty((n, h * sh, w * sw, c), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    p = n * h * sh * w * sw
    if p == 0 or c == 0:
        return y
    block_c = min(128 if x.element_size() <= 2 else 64, 1 << max(0, c - 1).bit_length())
    grid = (cdiv(p, block_p), cdiv(c, block_c))
    _kernel()[grid](x, y, p, c, h * sh, w * sw, y.stride(3), SH=sh, SW=sw, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return y


def _ok(attrs, ctx) -> bool:
    return (attrs.get("mode", "nearest") == "nearest"
            and attrs.get("coordinate_transformation_mode", "half_pixel") == "asymmetric"
            and attrs.get("nearest_mode", "round_prefer_floor") == "floor")


@tactic("Resize", "triton_nearest_nhwc", devices=("cuda",), supports=_ok, writes_into=True)
def make_resize_nearest_nhwc(attrs, ctx):
    general = make_resize(attrs, ctx)

    def run(x, roi=None, scales=None, sizes=None, out=None):
        if x.dim() == 4 and x.dtype in _DTYPES and not x.is_meta and x.is_contiguous(memory_format=torch.channels_last):
            shape, full = resize_plan(attrs, x, scales, sizes)
            if shape[:2] == list(x.shape[:2]) and all(float(full[a]).is_integer() and full[a] >= 1
                                                       and shape[a] == x.shape[a] * int(full[a]) for a in (2, 3)):
                return (upsample_nearest_nhwc(x, int(full[2]), int(full[3]), out=out),)
        return general(x, roi, scales, sizes)
    return run
