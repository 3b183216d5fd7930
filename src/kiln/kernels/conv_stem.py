"""Network stems in two Triton kernels: the first convolution over a few input channels, from the
engine's NCHW input as it comes (FP32 included: the cast happens in the copy below), with bias and
activation fused and, where the graph has one (ResNet's), the 3×3/2 max pool too.

Unfused, a stem is an FP32→FP16 cast of the input, an NCHW→NHWC copy, cuDNN's channel padding,
its first-layer kernel, then a max pool that reads the stem's output back; the traffic that has to
happen is one read of the input and one write of the pooled map (``benchmarks/stem_bench.py``
times both).

The input is first copied once into FP16 with its channels padded to 4 and its spatial padding
written out as zeros ([N, Hp, Wp, 4], one pass over a map of the input's size). On that layout the
taps of one kernel row are one contiguous, 16-byte-aligned run per output pixel (KWP taps × 4
channels, KWP = the kernel width rounded up to a power of two): the convolution is an implicit
GEMM with one K step per kernel row, [BLOCK_M, KWP·4] vector loads with no masks along K, and a
weight rearranged once to [KH, KWP, 4, Cout] with zeros in the padding. Gathering (channel, ky, kx)
elements straight from the NCHW input would need loads that are neither vectorized nor aligned.

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
from kiln.kernels._util import per_tensor, zero_bias
from kiln.kernels.epilogue_triton import ACTS, apply_act, epilogue_params, nhwc_output
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, next_pow2, tl, triton

MAX_CHANNELS = 4        # a stem: RGB(A) or a few maps; wider inputs fill an MMA's K by themselves
POOL = {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1]}   # the one max pool the kernel fuses
MAX_KW = 8              # kernel width: one K step of a kernel row holds at most 8 taps × 4 channels
TILE = 16               # convolution patch rows per program when the pool is fused (7 pooled rows)


class StemConfig(NamedTuple):
    block_m: int = 128          # output pixels per program without the pool
    num_warps: int = 4
    pool_warps: int = 4         # with the pool: TILE² = 256 pixels per program
    num_stages: int | None = None   # software-pipeline depth; None: 3, or 1 for kernels of 3 rows or fewer
    pad_block: int = 512        # padded pixels per program of the input copy
    tile_w: int = 16            # with the pool: conv-output columns per program (TILE rows)


@triton.jit(do_not_specialize=["P", "H", "W", "HP", "WP"])
def _stem_pad_kernel(x_ptr, xp_ptr, P, H, W, HP, WP, sxn, sxc, sxh, sxw, PH: tl.constexpr, PW: tl.constexpr,
                     C: tl.constexpr, CP: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr):
    """xp[n, i, j, c] = x[n, c, i - PH, j - PW] in xp's dtype; 0 in the padding and channels ≥ C."""
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    if IDX64:
        pix = pix.to(tl.int64)
    ch = tl.arange(0, CP)
    j = pix % WP
    t = pix // WP
    iy = t % HP - PH
    ix = j - PW
    n = t // HP
    ok = ((pix < P) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W))[:, None] & (ch < C)[None, :]
    v = tl.load(x_ptr + (n * sxn + iy * sxh + ix * sxw)[:, None] + (ch * sxc)[None, :], mask=ok, other=0.0)
    tl.store(xp_ptr + pix[:, None] * CP + ch[None, :], v.to(xp_ptr.dtype.element_ty), mask=(pix < P)[:, None])


@triton.jit
def _stem_acc(xp_ptr, w_ptr, img, oh, ow, m_ok, offs_n, n_ok, HP, RS, KH: tl.constexpr, SH: tl.constexpr,
              SW: tl.constexpr, CP: tl.constexpr, KWP: tl.constexpr, COUT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The FP32 [BLOCK_M, BLOCK_N] convolution tile for output pixels (img, oh, ow) of the padded
    input (RS elements per padded row): one K step of KWP·CP contiguous elements per kernel row."""
    SEG: tl.constexpr = KWP * CP
    kk = tl.arange(0, SEG)
    base = (img * HP + oh * SH) * RS + ow * (SW * CP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ky in range(KH):            # pipelined over the kernel rows (num_stages)
        a = tl.load(xp_ptr + (base + ky * RS)[:, None] + kk[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptr + (ky * SEG + kk)[:, None] * COUT + offs_n[None, :], mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit(do_not_specialize=["M", "OH", "OW", "HP"])
def _stem_kernel(xp_ptr, w_ptr, b_ptr, y_ptr, M, OH, OW, HP, RS, YS, alpha, beta,
                 KH: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, CP: tl.constexpr, KWP: tl.constexpr,
                 COUT: tl.constexpr, ACT: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < COUT
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OW * OH)
    acc = _stem_acc(xp_ptr, w_ptr, img, oh, ow, m_ok, offs_n, n_ok, HP, RS, KH, SH, SW, CP, KWP, COUT,
                    BLOCK_M, BLOCK_N)
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


@triton.jit(do_not_specialize=["OH", "OW", "HP", "PH_OUT", "PW_OUT", "TILES_X", "TILES"])
def _stem_pool_kernel(xp_ptr, w_ptr, b_ptr, y_ptr, OH, OW, HP, RS, PH_OUT, PW_OUT, TILES_X, TILES, YS, alpha, beta,
                      KH: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, CP: tl.constexpr, KWP: tl.constexpr,
                      COUT: tl.constexpr, ACT: tl.constexpr, IDX64: tl.constexpr, TILE_H: tl.constexpr,
                      TILE_W: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    HALF_H: tl.constexpr = TILE_H // 2
    HALF_W: tl.constexpr = TILE_W // 2
    pid = tl.program_id(0)
    img = pid // TILES
    t = pid - img * TILES
    ty = t // TILES_X
    tx = t - ty * TILES_X
    if IDX64:
        img = img.to(tl.int64)
    loc = tl.arange(0, BLOCK_M)
    oh = ty * (2 * (HALF_H - 1)) - 1 + loc // TILE_W       # the pool's one-row padding comes first
    ow = tx * (2 * (HALF_W - 1)) - 1 + loc % TILE_W
    inside = (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT
    acc = _stem_acc(xp_ptr, w_ptr, img, oh, ow, inside, offs_n, n_ok, HP, RS, KH, SH, SW, CP, KWP, COUT,
                    BLOCK_M, BLOCK_N)
    v = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    v = apply_act(v, alpha, beta, ACT)
    v = tl.where(inside[:, None], v, float("-inf"))
    v = tl.reshape(v.to(y_ptr.dtype.element_ty), (TILE_H, TILE_W, BLOCK_N))    # max commutes with rounding
    v = _pool_cols(v, HALF_W)
    v = _pool_rows(v, HALF_H)                                                   # [HALF_H, HALF_W, BLOCK_N]
    py = ty * (HALF_H - 1) + tl.arange(0, HALF_H)
    px = tx * (HALF_W - 1) + tl.arange(0, HALF_W)
    ok_y = (tl.arange(0, HALF_H) < HALF_H - 1) & (py < PH_OUT)
    ok_x = (tl.arange(0, HALF_W) < HALF_W - 1) & (px < PW_OUT)
    row = (img * PH_OUT + py)[:, None] * PW_OUT + px[None, :]
    ptrs = y_ptr + row[:, :, None] * YS + offs_n[None, None, :]
    tl.store(ptrs, v, mask=ok_y[:, None, None] & ok_x[None, :, None] & n_ok[None, None, :])


CP = 4                  # channels per padded input pixel (8 bytes in FP16)


def stem_taps(kw: int) -> int:
    """KWP: kernel-row taps per K step, a power of two ≥ kw with KWP·CP ≥ 16 (tl.dot's least K)."""
    return max(next_pow2(kw), 16 // CP)


def arrange_stem_weight(w: torch.Tensor) -> torch.Tensor:
    """[Cout, C, KH, KW] → [KH·KWP·CP, Cout]: rows ordered (ky, kx, c), zeros for kx ≥ KW and c ≥ C."""
    cout, c, kh, kw = w.shape
    wt = w.new_zeros(kh, stem_taps(kw), CP, cout)
    wt[:, :kw, :c] = w.permute(2, 3, 1, 0)
    return wt.reshape(-1, cout)


def stem_out_size(size: int, k: int, s: int, pb: int, pe: int) -> int:
    return (size + pb + pe - k) // s + 1


def stem_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
             dtype: torch.dtype, config: StemConfig = StemConfig()) -> torch.Tensor:
    """x [N, C ≤ 4, H, W] (any layout, any float dtype) → [N, Hp, Wp, 4] in ``dtype``: pads[0] zero rows
    and pads[1] zero columns first, zeros to the right and below up to every row and column a K step
    reads (Wp a multiple of 4, so padded rows stay 32-byte multiples), channels zero-padded to 4."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh = stem_out_size(h, kh, sh, pads[0], pads[2])
    ow = stem_out_size(w, kw, sw, pads[1], pads[3])
    hp = max(pads[0] + h, (oh - 1) * sh + kh)
    wp = cdiv(max(pads[1] + w, (ow - 1) * sw + stem_taps(kw)), 4) * 4
    xp = torch.empty((n, hp, wp, CP), dtype=dtype, device=x.device)
    p = xp.numel() // CP
    if p:
        _stem_pad_kernel[(cdiv(p, config.pad_block),)](
            x, xp, p, h, w, hp, wp, *x.stride(), PH=pads[0], PW=pads[1], C=c, CP=CP,
            IDX64=max(x.numel(), xp.numel()) >= 2 ** 31, BLOCK_P=config.pad_block, num_warps=4)
    return xp


def conv_stem(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
              pads: tuple[int, int, int, int], act: str = "none", alpha: float = 0.0, beta: float = 0.0,
              pool: bool = False, out=None, config: StemConfig = StemConfig()) -> torch.Tensor:
    """act(conv2d(x, w) + bias), then the 3×3/2 pad-1 max pool with ``pool``; channels-last output
    of ``wt``'s dtype. ``x``: [N, C ≤ 4, H, W] in any memory layout and any float dtype; ``wt``:
    ``arrange_stem_weight(w)``; ``pads`` in ONNX order (top, left, bottom, right); ``out``: see
    conv_triton.conv2d_nhwc."""
    n, c, h, w = x.shape
    kh, kw = kernel
    cout = wt.shape[1]
    if c > CP or wt.shape[0] != kh * stem_taps(kw) * CP:
        raise BuildError(f"The stem kernel takes at most {CP} input channels and a weight from arrange_stem_weight; "
                         f"got {c} channels and a [{wt.shape[0]}, {cout}] weight for a {kh}x{kw} kernel.")
    oh = stem_out_size(h, kh, stride[0], pads[0], pads[2])
    ow = stem_out_size(w, kw, stride[1], pads[1], pads[3])
    fh, fw = (stem_out_size(oh, 3, 2, 1, 1), stem_out_size(ow, 3, 2, 1, 1)) if pool else (oh, ow)
    y = nhwc_output(out, (n, cout, fh, fw), wt.dtype, x.device, x.is_meta)
    if x.is_meta or y.numel() == 0:
        return y
    xp = stem_pad(x, kernel, stride, pads, wt.dtype, config)
    hp, rs = xp.shape[1], xp.shape[2] * CP
    bn = min(128, max(16, next_pow2(cout)))
    big = max(xp.numel(), y.shape[0] * y.stride(0)) >= 2 ** 31
    # a kernel of 3 rows or fewer is as many K steps: a deep pipeline would only cost shared memory
    stages = config.num_stages or (3 if kh > 3 else 1)
    common = dict(KH=kh, SH=stride[0], SW=stride[1], CP=CP, KWP=stem_taps(kw), COUT=cout, ACT=ACTS.index(act),
                  IDX64=big, BLOCK_N=bn, num_stages=stages)
    if pool:
        th, tw = TILE, config.tile_w
        tiles_y, tiles_x = cdiv(fh, th // 2 - 1), cdiv(fw, tw // 2 - 1)
        grid = (n * tiles_y * tiles_x, cdiv(cout, bn))
        _stem_pool_kernel[grid](xp, wt, bias, y, oh, ow, hp, rs, fh, fw, tiles_x, tiles_y * tiles_x, y.stride(3),
                                float(alpha), float(beta), TILE_H=th, TILE_W=tw, num_warps=config.pool_warps,
                                **common)
    else:
        m = n * oh * ow
        grid = (cdiv(m, config.block_m), cdiv(cout, bn))
        _stem_kernel[grid](xp, wt, bias, y, m, oh, ow, hp, rs, y.stride(3), float(alpha), float(beta),
                           BLOCK_M=config.block_m, num_warps=config.num_warps, **common)
    return y


def _ok(attrs, ctx) -> bool:
    return (HAS_TRITON and len(attrs["stride"]) == 2 and attrs.get("groups", 1) == 1
            and list(attrs["dilation"]) == [1, 1] and (attrs.get("activation") or "none") in ACTS
            and attrs.get("residual") is None and ctx.precision.split()[0] in ("fp16", "bf16")
            and (not bool(attrs.get("pool")) or attrs["pool"] == POOL))


@tactic("Convolution", "triton_stem", devices=("cuda",), supports=_ok, priority=2, writes_into=True)
def make_conv_stem(attrs, ctx):
    stride, pads = tuple(attrs["stride"]), tuple(attrs["pads"])
    act, alpha, beta = epilogue_params(attrs)
    pool = bool(attrs.get("pool"))
    wcache: dict = {}
    zcache: dict = {}

    def arrange(w):
        c, kh, kw = w.shape[1:]
        if c > MAX_CHANNELS or kw > MAX_KW:
            raise BuildError(f"Convolution {ctx.layer_name!r}: the stem kernel takes at most {MAX_CHANNELS} input "
                             f"channels and kernels at most {MAX_KW} wide; this one has {c} channels, {kh}x{kw}.")
        return arrange_stem_weight(w)

    def run(x, w, b=None, residual=None, out=None):
        if residual is not None:
            raise BuildError(f"Convolution {ctx.layer_name!r}: the stem kernel fuses no residual.")
        wt = per_tensor(wcache, w, lambda: arrange(w))
        if b is None:
            b = zero_bias(zcache, w)
        return (conv_stem(x, wt, b, tuple(w.shape[2:]), stride, pads, act, alpha, beta, pool, out),)
    return run
