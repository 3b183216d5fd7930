"""2-D max and average pooling as Triton kernels, for the Pooling layer on the GPU.

Convolution stacks run channels-last, and torch's NHWC max pool is far off the bandwidth floor. Here a
program owns a block of output pixels × a block of channels. For a channels-last input the channel
axis is the fast one of the tile, so neighbouring threads read neighbouring channels of one pixel
(coalesced, vectorized loads); for an NCHW input the pixel axis is the fast one. Each window tap
is one masked tile load; taps outside the input count as -inf for max (NaN still wins, as in
torch) and as nothing for average, whose sum and divisor stay in FP32. A kernel that covers the
whole H×W (GlobalAveragePool, a 7×7 pool over a 7×7 map) reduces over H·W per (image, channel
block) instead. The output takes the input's memory format, as torch's does.

Block sizes and warps come from ``pool_launch_config`` / ``global_pool_launch_config``; both entry
points take a ``config`` override so they can be swept on a GPU.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from kiln.kernels.conv import _pool_out, _split_pads, make_pooling
from kiln.kernels.registry import tactic
from kiln.triton_support import cdiv, interpreting, next_pow2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = ("float16", "bfloat16", "float32")


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    # sizes that change with the input shape stay unspecialized (one compile serves every batch
    # size); strides stay specialized, so a channels-last input's channel stride is a known 1
    @triton.jit(do_not_specialize=["P", "H", "W", "Ho", "Wo"])
    def pool2d(x_ptr, y_ptr, P, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
               KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               PT: tl.constexpr, PL: tl.constexpr, PB: tl.constexpr, PR: tl.constexpr,
               DH: tl.constexpr, DW: tl.constexpr, MAX: tl.constexpr, INCLUDE_PAD: tl.constexpr,
               VEC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # P = N·Ho·Wo output pixels, flattened so that small maps still fill the GPU; the tile is
        # [pixels, channels]. Triton lays threads along the axis it can prove contiguous: the
        # channels of a channels-last input (sxc == 1), else the pixels (axis 0 wins the tie).
        # VEC divides C and every pixel stride: it lets loads and stores be 16 bytes wide.
        p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P))[:, None]
        c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        if MAX:
            acc += float("-inf")
        pm = p < P
        cm = (c // VEC) < (C // VEC)        # c < C, in runs of VEC lanes
        ow = p % Wo
        t = p // Wo
        oh = t % Ho
        n = (t // Ho).to(tl.int64)
        hs = oh * SH - PT
        ws = ow * SW - PL
        xc = x_ptr + c.to(tl.int64) * sxc
        xn = n * sxn
        cnt = tl.zeros_like(hs).to(tl.float32)
        for kh in tl.static_range(KH):
            ih = hs + kh * DH
            h_ok = (ih >= 0) & (ih < H) & pm
            for kw in tl.static_range(KW):
                iw = ws + kw * DW
                ok = h_ok & (iw >= 0) & (iw < W)
                ptrs = xc + tl.multiple_of(xn + ih * sxh + iw * sxw, [VEC, VEC])
                if MAX:
                    v = tl.load(ptrs, mask=ok & cm, other=float("-inf")).to(tl.float32)
                    acc = tl.where((v > acc) | (v != v), v, acc)        # NaN wins, as in torch
                else:
                    acc += tl.load(ptrs, mask=ok & cm, other=0.0).to(tl.float32)
                    if INCLUDE_PAD:       # taps in the padding count, taps past it (ceil overhang) do not
                        cnt += ((ih >= -PT) & (ih < H + PB) & (iw >= -PL) & (iw < W + PR)).to(tl.float32)
                    else:
                        cnt += ok.to(tl.float32)
        if not MAX:
            acc = acc / tl.where(pm, cnt, 1.0)      # pixels past the end divide by 1, not 0
        yp = y_ptr + c.to(tl.int64) * syc + tl.multiple_of(n * syn + oh * syh + ow * syw, [VEC, VEC])
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=pm & cm)

    @triton.jit(do_not_specialize=["HW"])
    def global_pool(x_ptr, y_ptr, C, HW, sxn, sxc, shw, syn, syc,
                    MAX: tl.constexpr, VEC: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        # one image × BLOCK_C channels per program; element (hw, c) sits at hw·shw + c·sxc, so the
        # channels-last case (sxc = 1) and the NCHW case (shw = 1) each have one contiguous axis
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = (c // VEC) < (C // VEC)
        base = x_ptr + tl.multiple_of(n * sxn, VEC) + (c.to(tl.int64) * sxc)[None, :]
        if MAX:
            acc = tl.full([BLOCK_HW, BLOCK_C], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        start = 0
        while start < HW:
            hw = start + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None] & cm[None, :]
            ptrs = base + tl.multiple_of(hw.to(tl.int64) * shw, VEC)[:, None]
            if MAX:
                v = tl.load(ptrs, mask=m, other=float("-inf")).to(tl.float32)
                acc = tl.where((v > acc) | (v != v), v, acc)
            else:
                acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
            start += BLOCK_HW
        if MAX:
            # tl.max does not promise NaN propagation: count NaNs apart
            nan = tl.sum((acc != acc).to(tl.int32), axis=0) > 0
            r = tl.where(nan, float("nan"), tl.max(acc, axis=0))
        else:
            r = tl.sum(acc, axis=0) / HW
        tl.store(y_ptr + n * syn + c * syc, r.to(y_ptr.dtype.element_ty), mask=cm)

    return pool2d, global_pool


MIN_PROGRAMS = 264          # two per SM of a 132-SM GPU: below that, blocks shrink
TILE = 2048                 # elements per program (per loop step for the global kernel)
CL_TILE = 512               # channels-last windowed kernel: 8 pixels x 64 channels (the sweep's best)


def _warps(elements: int) -> int:
    """About 8 elements (one 16-byte fp16 vector) per thread, 1 to 4 warps."""
    return max(1, min(4, elements // 256))


def pool_launch_config(n: int, c: int, hw_out: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for the windowed kernel. Channels-last: up to 64 channels on
    the fast axis (8 threads × 8 fp16 = 64 channels, one 16-byte load each) and pixels to make
    TILE elements; NCHW: up to 256 pixels on the fast axis and a few channels. Pixel blocks halve
    (down to 8) while there are fewer than MIN_PROGRAMS programs."""
    pixels = n * hw_out
    if channels_last:
        block_c = min(64, next_pow2(c))
        block_p = max(1, min(next_pow2(pixels), CL_TILE // block_c))
    else:
        block_p = min(256, next_pow2(pixels))
        block_c = max(1, min(next_pow2(c), TILE // block_p))
    while block_p > 8 and cdiv(pixels, block_p) * cdiv(c, block_c) < MIN_PROGRAMS:
        block_p //= 2
    return block_p, block_c, 4 if channels_last else _warps(block_p * block_c)


def global_pool_launch_config(n: int, c: int, hw: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_HW, BLOCK_C, num_warps) for the global kernel: one image × BLOCK_C channels per
    program, a BLOCK_HW × BLOCK_C tile per loop step. Channels-last: up to 64 channels on the fast
    axis, halved (down to 16, a 32-byte sector of fp16) while there are fewer than MIN_PROGRAMS
    programs; NCHW: H·W on the fast axis. Not yet swept on a GPU."""
    if channels_last:
        block_c = min(64, next_pow2(c))
        while block_c > 16 and n * cdiv(c, block_c) < MIN_PROGRAMS:
            block_c //= 2
        block_hw = max(1, min(next_pow2(hw), TILE // block_c))
    else:
        block_hw = min(1024, next_pow2(hw))
        block_c = max(1, min(next_pow2(c), TILE // block_hw))
    return block_hw, block_c, _warps(block_hw * block_c)


def _vec(c: int, *strides: int) -> int:
    """The largest power of two up to 16 that divides C and every pixel stride (1 for NCHW)."""
    v = 16
    while v > 1 and any(s % v for s in (c, *strides)):
        v //= 2
    return v


def _is_channels_last(x: torch.Tensor) -> bool:
    """Channels are the innermost axis (and there is more than one of them)."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def _empty_like_format(x: torch.Tensor, shape: tuple[int, ...], cl: bool) -> torch.Tensor:
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def pool2d(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
           dilation: tuple[int, int] = (1, 1), ceil_mode: bool = False, ptype: str = "max",
           count_include_pad: bool = False, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Max/average pooling of a 4-D tensor; ``pads`` are (top, left, bottom, right), ONNX order.
    ``config`` overrides ``pool_launch_config`` (BLOCK_P, BLOCK_C, num_warps)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    pt, pl, pb, pr = pads
    ho = _pool_out(h, kh, sh, pt, pb, dh, ceil_mode)
    wo = _pool_out(w, kw, sw, pl, pr, dw, ceil_mode)
    cl = _is_channels_last(x)
    y = _empty_like_format(x, (n, c, max(ho, 0), max(wo, 0)), cl)
    if y.numel() == 0:
        return y
    block_p, block_c, warps = config or pool_launch_config(n, c, ho * wo, cl)
    grid = (cdiv(n * ho * wo, block_p), cdiv(c, block_c))
    _kernels()[0][grid](x, y, n * ho * wo, c, h, w, ho, wo, *x.stride(), *y.stride(),
                        KH=kh, KW=kw, SH=sh, SW=sw, PT=pt, PL=pl, PB=pb, PR=pr, DH=dh, DW=dw,
                        MAX=ptype == "max", INCLUDE_PAD=bool(count_include_pad),
                        VEC=_vec(c, x.stride(0), x.stride(2), x.stride(3), y.stride(0), y.stride(2), y.stride(3)),
                        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return y


def global_pool(x: torch.Tensor, ptype: str = "average", config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """[N,C,H,W] → [N,C,1,1] mean (FP32 sum) or max over H×W. ``config`` overrides
    ``global_pool_launch_config`` (BLOCK_HW, BLOCK_C, num_warps)."""
    n, c, h, w = x.shape
    cl = _is_channels_last(x)
    y = _empty_like_format(x, (n, c, 1, 1), cl)
    if y.numel() == 0:
        return y
    if h * w == 0:
        return y.fill_(float("nan") if ptype == "average" else float("-inf"))
    if h > 1 and x.stride(2) != w * x.stride(3):       # H and W must merge into one axis
        x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    block_hw, block_c, warps = config or global_pool_launch_config(n, c, h * w, cl)
    _kernels()[1][(n, cdiv(c, block_c))](x, y, c, h * w, x.stride(0), x.stride(1), x.stride(3), y.stride(0),
                                          y.stride(1), MAX=ptype == "max", VEC=_vec(c, x.stride(0), x.stride(3)),
                                          BLOCK_HW=block_hw, BLOCK_C=block_c,
                                          num_warps=warps)
    return y


def _runs_triton(x: torch.Tensor) -> bool:
    if x.is_meta or x.dim() != 4 or x.dtype not in _DTYPES:
        return False
    return x.is_cuda or interpreting()


def _supports(attrs: dict[str, Any], ctx: Any) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if attrs.get("type") not in ("max", "average") or attrs.get("return_indices"):
        return False
    kernel = attrs.get("kernel")
    if kernel is not None and len(kernel) != 2:
        return False
    dtype = ctx.input_dtypes[0] if ctx.input_dtypes else None
    return dtype is None or dtype in _DTYPE_NAMES


@tactic("Pooling", "triton_nhwc", devices=("cuda",), supports=_supports, priority=1)
def make_pooling_triton(attrs: dict[str, Any], ctx: Any):
    """The Triton pooling tactic; inputs it does not cover (not 4-D, integer, meta) take torch's."""
    ref = make_pooling(attrs, ctx)
    ptype = attrs["type"]
    kernel = attrs.get("kernel")
    if kernel is None:
        def run_global(x):
            return (global_pool(x, ptype),) if _runs_triton(x) else ref(x)
        return run_global
    kernel = tuple(int(k) for k in kernel)
    stride = tuple(int(s) for s in (attrs.get("stride") or [1, 1]))
    dil = tuple(int(d) for d in (attrs.get("dilation") or [1, 1]))
    begins, ends = _split_pads(list(attrs.get("pads") or [0] * 4), 2)
    pads = (begins[0], begins[1], ends[0], ends[1])
    ceil = bool(attrs.get("ceil_mode", False))
    include_pad = bool(attrs.get("count_include_pad", False))
    whole = not any(pads) and dil == (1, 1)

    def run(x):
        if not _runs_triton(x):
            return ref(x)
        if whole and kernel == tuple(x.shape[2:]):      # one window over the whole map
            return (global_pool(x, ptype),)
        return (pool2d(x, kernel, stride, pads, dil, ceil, ptype, include_pad),)
    return run
