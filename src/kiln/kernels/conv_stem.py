"""Network stems in one Triton kernel: the first convolution over a few input channels, read
straight from the engine's NCHW input (FP32 included: the input cast happens in the load), with
bias and activation fused and, where the graph has one (ResNet's), the 3×3/2 max pool too.

On an H100, ResNet-50's stem at batch 256 took 0.73 ms of a 7.2 ms forward before this kernel:
FP32→FP16 cast of the input, NCHW→NHWC copy, cuDNN's channel padding 3→8, cuDNN's first-layer
kernel, then a 0.19 ms max pool that reads the 112² stem output back. The traffic that has to
happen is one read of the input and one write of the pooled 56² map.

The convolution is an implicit GEMM whose reduction runs over K = C·KH·KW (147 for a 7×7 over
3 channels, zero-padded to a multiple of BLOCK_K): row m of the A tile is one output pixel,
column k one (channel, tap) pair, gathered from the NCHW input with the padding masked to 0.
The weight is rearranged once to a [K, Cout] matrix with zero rows past K.

With the pool fused, a program computes a TILE×TILE patch of convolution outputs whose origin is
one row and column before its pooled outputs' first window (the pool's padding), so the patch
holds every window of (TILE/2 - 1)² pooled outputs; positions outside the map are -inf. The 3-wide
stride-2 window max is taken along columns, then rows: the patch is split into (even, odd)
pairs, and each pooled value is max(even, odd, next pair's even), the "next" fetched with
``tl.gather``. The patch overlaps its neighbours by one row and column (1.31× the convolution's
arithmetic at TILE = 16), which the saved write and re-read of the 112² map pay for.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kiln.errors import BuildError
from kiln.kernels._util import per_tensor
from kiln.kernels.epilogue_triton import ACTS, apply_act, nhwc_rows
from kiln.kernels.registry import tactic
from kiln.passes.fuse_stem_pool import POOL
from kiln.plugins.builtin._util import HAS_TRITON, tl, triton

MAX_CHANNELS = 4        # a stem: RGB(A) or a few maps; wider inputs fill an MMA's K by themselves
MAX_K = 512             # C·KH·KW; beyond it the gather-per-element A tile costs more than a reformat
TILE = 16               # convolution patch side per program when the pool is fused (7×7 pooled outputs)


class StemConfig(NamedTuple):
    block_m: int = 128          # output pixels per program without the pool
    num_warps: int = 4
    pool_warps: int = 8         # with the pool: TILE² = 256 pixels per program
    num_stages: int = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@triton.jit
def _stem_tile(x_ptr, w_ptr, img, oh, ow, m_ok, offs_n, n_ok, H, W, sxn, sxc, sxh, sxw,
               C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               PH: tl.constexpr, PW: tl.constexpr, COUT: tl.constexpr, KPAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The FP32 [BLOCK_M, BLOCK_N] convolution tile for output pixels (img, oh, ow)."""
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    base = img * sxn + ih0 * sxh + iw0 * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.static_range(0, KPAD, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        c = k // (KH * KW)
        tap = k - c * (KH * KW)
        ky = tap // KW
        kx = tap - ky * KW
        ih = ih0[:, None] + ky[None, :]
        iw = iw0[:, None] + kx[None, :]
        ok = (m_ok[:, None] & (k < C * KH * KW)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        a = tl.load(x_ptr + base[:, None] + (c * sxc + ky * sxh + kx * sxw)[None, :], mask=ok, other=0.0)
        b = tl.load(w_ptr + k[:, None] * COUT + offs_n[None, :], mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(w_ptr.dtype.element_ty), b, acc)
    return acc


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW"])
def _stem_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, H, W, OH, OW, sxn, sxc, sxh, sxw, YS, alpha, beta,
                 C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 PH: tl.constexpr, PW: tl.constexpr, COUT: tl.constexpr, KPAD: tl.constexpr, ACT: tl.constexpr,
                 IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < COUT
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OW * OH)
    acc = _stem_tile(x_ptr, w_ptr, img, oh, ow, m_ok, offs_n, n_ok, H, W, sxn, sxc, sxh, sxw, C, KH, KW, SH, SW,
                     PH, PW, COUT, KPAD, BLOCK_M, BLOCK_N, BLOCK_K)
    v = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    v = apply_act(v, alpha, beta, ACT)
    tl.store(y_ptr + offs_m[:, None] * YS + offs_n[None, :], v.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _pool_cols(v, HALF: tl.constexpr):
    """Along axis 1 of a [A, 2·HALF, N] tensor: out[:, i] = max(v[:, 2i], v[:, 2i+1], v[:, 2i+2]) (the
    last one, which would need v[:, 2·HALF], is garbage and masked by the caller)."""
    ev, od = tl.split(tl.permute(tl.reshape(v, (v.shape[0], HALF, 2, v.shape[2])), (0, 1, 3, 2)))
    nxt = tl.minimum(tl.arange(0, HALF) + 1, HALF - 1)
    return tl.maximum(tl.maximum(ev, od), tl.gather(ev, tl.broadcast_to(nxt[None, :, None], ev.shape), 1))


@triton.jit
def _pool_rows(v, HALF: tl.constexpr):
    """The same along axis 0 of a [2·HALF, B, N] tensor."""
    ev, od = tl.split(tl.permute(tl.reshape(v, (HALF, 2, v.shape[1], v.shape[2])), (0, 2, 3, 1)))
    nxt = tl.minimum(tl.arange(0, HALF) + 1, HALF - 1)
    return tl.maximum(tl.maximum(ev, od), tl.gather(ev, tl.broadcast_to(nxt[:, None, None], ev.shape), 0))


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "PH_OUT", "PW_OUT", "TILES_X", "TILES"])
def _stem_pool_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, OH, OW, PH_OUT, PW_OUT, TILES_X, TILES,
                      sxn, sxc, sxh, sxw, YS, alpha, beta,
                      C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                      PH: tl.constexpr, PW: tl.constexpr, COUT: tl.constexpr, KPAD: tl.constexpr, ACT: tl.constexpr,
                      IDX64: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    BLOCK_M: tl.constexpr = TILE * TILE
    HALF: tl.constexpr = TILE // 2
    pid = tl.program_id(0)
    img = pid // TILES
    t = pid - img * TILES
    ty = t // TILES_X
    tx = t - ty * TILES_X
    if IDX64:
        img = img.to(tl.int64)
    loc = tl.arange(0, BLOCK_M)
    oh = ty * (2 * (HALF - 1)) - 1 + loc // TILE       # the pool's one-row padding comes first
    ow = tx * (2 * (HALF - 1)) - 1 + loc % TILE
    inside = (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT
    acc = _stem_tile(x_ptr, w_ptr, img, oh, ow, inside, offs_n, n_ok, H, W, sxn, sxc, sxh, sxw,
                     C, KH, KW, SH, SW, PH, PW, COUT, KPAD, BLOCK_M, BLOCK_N, BLOCK_K)
    v = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    v = apply_act(v, alpha, beta, ACT)
    v = tl.where(inside[:, None], v, float("-inf"))
    v = tl.reshape(v.to(y_ptr.dtype.element_ty), (TILE, TILE, BLOCK_N))    # max commutes with rounding
    v = _pool_cols(v, HALF)
    v = _pool_rows(v, HALF)                                                 # [HALF, HALF, BLOCK_N]
    py = ty * (HALF - 1) + tl.arange(0, HALF)
    px = tx * (HALF - 1) + tl.arange(0, HALF)
    ok_y = (tl.arange(0, HALF) < HALF - 1) & (py < PH_OUT)
    ok_x = (tl.arange(0, HALF) < HALF - 1) & (px < PW_OUT)
    row = (img * PH_OUT + py)[:, None] * PW_OUT + px[None, :]
    ptrs = y_ptr + row[:, :, None] * YS + offs_n[None, None, :]
    tl.store(ptrs, v, mask=ok_y[:, None, None] & ok_x[None, :, None] & n_ok[None, None, :])


def arrange_stem_weight(w: torch.Tensor, block_k: int) -> torch.Tensor:
    """[Cout, C, KH, KW] → [KPAD, Cout], rows ordered (c, ky, kx), zero rows up to a multiple of block_k."""
    cout = w.shape[0]
    k = w[0].numel()
    wt = w.new_zeros(_cdiv(k, block_k) * block_k, cout)
    wt[:k] = w.reshape(cout, k).t()
    return wt


def stem_block_k(k: int) -> int:
    return 32 if k > 16 else 16


def stem_out_size(size: int, k: int, s: int, pb: int, pe: int) -> int:
    return (size + pb + pe - k) // s + 1


def conv_stem(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
              pads: tuple[int, int, int, int], act: str = "none", alpha: float = 0.0, beta: float = 0.0,
              pool: bool = False, out=None, dtype: torch.dtype | None = None,
              config: StemConfig = StemConfig()) -> torch.Tensor:
    """act(conv2d(x, w) + bias), then the 3×3/2 pad-1 max pool with ``pool``; channels-last output
    of ``wt``'s dtype. ``x``: [N, C, H, W] in any memory layout and any float dtype; ``wt``:
    ``arrange_stem_weight(w, stem_block_k(C·KH·KW))``; ``pads`` in ONNX order (top, left, bottom,
    right); ``out``: see conv_triton.conv2d_nhwc."""
    n, c, h, w = x.shape
    kh, kw = kernel
    cout = wt.shape[1]
    dtype = dtype or wt.dtype
    oh = stem_out_size(h, kh, stride[0], pads[0], pads[2])
    ow = stem_out_size(w, kw, stride[1], pads[1], pads[3])
    fh, fw = (stem_out_size(oh, 3, 2, 1, 1), stem_out_size(ow, 3, 2, 1, 1)) if pool else (oh, ow)
    y = None if out is None or x.is_meta else out((n, cout, fh, fw), dtype, x.device)
    if y is None or not nhwc_rows(y):
        y = torch.empty((n, fh, fw, cout), dtype=dtype, device=x.device).permute(0, 3, 1, 2)
    if x.is_meta or y.numel() == 0:
        return y
    k = c * kh * kw
    bk = stem_block_k(k)
    if wt.shape[0] != _cdiv(k, bk) * bk:
        raise BuildError(f"Stem weight has {wt.shape[0]} rows; {c}x{kh}x{kw} needs {_cdiv(k, bk) * bk}.")
    bn = min(128, max(16, _pow2(cout)))
    big = max(x.numel(), y.shape[0] * y.stride(0)) >= 2 ** 31
    common = dict(C=c, KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=pads[0], PW=pads[1], COUT=cout,
                  KPAD=wt.shape[0], ACT=ACTS.index(act), IDX64=big, BLOCK_N=bn, BLOCK_K=bk)
    if pool:
        tiles_y, tiles_x = _cdiv(fh, TILE // 2 - 1), _cdiv(fw, TILE // 2 - 1)
        grid = (n * tiles_y * tiles_x, _cdiv(cout, bn))
        _stem_pool_kernel[grid](x, wt, bias, y, h, w, oh, ow, fh, fw, tiles_x, tiles_y * tiles_x, *x.stride(),
                                y.stride(3), float(alpha), float(beta), TILE=TILE, num_warps=config.pool_warps,
                                num_stages=config.num_stages, **common)
    else:
        m = n * oh * ow
        grid = (_cdiv(m, config.block_m), _cdiv(cout, bn))
        _stem_kernel[grid](x, wt, bias, y, m, h, w, oh, ow, *x.stride(), y.stride(3), float(alpha), float(beta),
                           BLOCK_M=config.block_m, num_warps=config.num_warps, num_stages=config.num_stages, **common)
    return y


def _ok(attrs, ctx) -> bool:
    return (HAS_TRITON and len(attrs["stride"]) == 2 and attrs.get("groups", 1) == 1
            and list(attrs["dilation"]) == [1, 1] and (attrs.get("activation") or "none") in ACTS
            and attrs.get("residual") is None and ctx.precision.split()[0] in ("fp16", "bf16")
            and (not bool(attrs.get("pool")) or attrs["pool"] == POOL))


@tactic("Convolution", "triton_stem", devices=("cuda",), supports=_ok, priority=2, writes_into=True)
def make_conv_stem(attrs, ctx):
    stride, pads = tuple(attrs["stride"]), tuple(attrs["pads"])
    act = attrs.get("activation") or "none"
    alpha, beta = attrs.get("alpha", 0.0), attrs.get("beta", 0.0)
    if act == "clip" and (alpha is None or beta is None):
        alpha, beta = -3.0e38 if alpha is None else alpha, 3.0e38 if beta is None else beta
    pool = bool(attrs.get("pool"))
    wcache: dict = {}
    zcache: dict = {}

    def arrange(w):
        c, kh, kw = w.shape[1:]
        if c > MAX_CHANNELS or c * kh * kw > MAX_K:
            raise BuildError(f"Convolution {ctx.layer_name!r}: the stem kernel takes at most {MAX_CHANNELS} input "
                             f"channels and {MAX_K} weights per output channel; this one has {c}x{kh}x{kw}.")
        return arrange_stem_weight(w, stem_block_k(c * kh * kw))

    def run(x, w, b=None, residual=None, out=None):
        if residual is not None:
            raise BuildError(f"Convolution {ctx.layer_name!r}: the stem kernel fuses no residual.")
        wt = per_tensor(wcache, w, lambda: arrange(w))
        if b is None:
            b = per_tensor(zcache, w, lambda: torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        return (conv_stem(x, wt, b, tuple(w.shape[2:]), stride, pads, act, alpha, beta, pool, out),)
    return run
