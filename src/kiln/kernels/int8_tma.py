"""8-bit GEMM and convolution fed by Hopper's Tensor Memory Accelerator.

QFullyConnected and 1x1, stride-1, unpadded QConvolution over channels-last codes (a GEMM over the
[N·H·W, Cin] pixel rows) read A = x [M, K] and B = the K-major weight [N, K] through TMA tensor descriptors
(``TensorDescriptor``, built on the host): each K slice arrives as one bulk copy into swizzled shared memory
that the 8-bit wgmma reads, and partial tiles are zero-filled by the copy, not masked. The epilogue is
int8_gemm's (``epilogue_tile``: dequantize, bias, residual, activation, requantize), and the output, its
second codes output and the residual move through descriptors too: TMA bulk stores from shared memory where
the pointer kernel stores 8-bit codes per thread from the MMA layout. Options per tile config: the epilogue in
two halves along N (``split``: half the registers and staging memory), and ``persistent``: one program per SM
walking the tiles, the tile loop flattened with the K loop so the next tile's loads overlap this tile's
epilogue (its tile loop has a runtime trip count, which Triton's interpreter bounds only with the help its
test gives it).

Other stride-1 convolutions run as an implicit GEMM over 4-D descriptors of the NHWC input and output: a tile
is a block of output pixels (``pixel_tile``: block_m pixels, the shape that wastes least on the map) and
channels; each tap's K slice is one copy of the input box shifted by the tap, which the copy zero-fills outside
the image: the padding, so the input's zero point must be 0 where the layer is padded.

TMA addresses rows of 16-byte multiples: K (Cin) must be a multiple of 16 codes and N times each output's element
size a multiple of 16 bytes (``tma_refusal``); tensors whose base is not 16-byte aligned (views) run the pointer
kernel. The tactics are offered on CUDA devices of compute capability 9.0 or later.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kiln.errors import BuildError
from kiln.kernels.conv_triton import tile_origin
from kiln.kernels.int8_gemm import _make, _supports, epilogue_tile
from kiln.kernels.registry import tactic
from kiln.triton_support import cdiv, next_pow2, tl, triton


class TmaConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split: int = 1              # the epilogue in this many parts along N (1 or 2)
    persistent: bool = False
    warp_specialize: bool = False
    tile_w: int = 0             # a convolution's tile: block_m pixels, tile_w wide (0: pixel_tile's choice)


SMEM = 232448       # shared memory per block on Hopper (227 KB)


def smem_bytes(cfg: TmaConfig, out_size: int = 1) -> int:
    """Shared memory a config needs: the pipeline's A and B slices plus the store's staging tile."""
    return (cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k
            + cfg.block_m * cfg.block_n // cfg.split * out_size)


def tma_config(m: int, n: int, k: int) -> TmaConfig:
    """128x256 tiles (the epilogue in halves) where N > 128, 128x128 or 128x64 otherwise; K slices of up to 128
    codes; 4 pipeline stages (fewer where the output's staging tile leaves no room: ``fitted``)."""
    bn = 256 if n > 128 else 128 if n > 64 else 64
    return TmaConfig(128, bn, min(128, max(32, next_pow2(k))), 8, 4, split=2 if bn == 256 else 1)


def fitted(cfg: TmaConfig, out_size: int) -> TmaConfig:
    """``cfg`` with as many of its pipeline stages (2 at least) as fit in shared memory beside a staging tile of
    ``out_size``-byte elements."""
    while cfg.num_stages > 2 and smem_bytes(cfg, out_size) > SMEM:
        cfg = cfg._replace(num_stages=cfg.num_stages - 1)
    return cfg


def persistent_config(m: int, n: int, k: int) -> TmaConfig:
    """``tma_config``'s tiles, one program per SM."""
    return tma_config(m, n, k)._replace(persistent=True)


def tma_refusal(k: int, n: int, out_sizes: tuple[int, ...]) -> str | None:
    """Why TMA cannot address a [M, K] x [N, K] GEMM whose outputs (and residual) have element sizes
    ``out_sizes``; None where it can."""
    if k % 16:
        return f"K = {k} is not a multiple of 16"
    bad = [s for s in out_sizes if (n * s) % 16]
    return f"N = {n} times {bad[0]} bytes is not a multiple of 16" if bad else None


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_tma(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, q: torch.Tensor | None, r: torch.Tensor | None,
               ep, cfg: TmaConfig, epilogue: dict) -> bool:
    """Run the TMA kernel on the row matrices ``a`` [M, K] codes, ``b`` [N, K] weight codes, ``y`` (and ``q``,
    ``r``) [M, N], with int8_gemm's epilogue terms ``ep`` and epilogue arguments ``epilogue``; False (nothing
    run) where a base address is not 16-byte aligned. Shapes TMA cannot address are a BuildError."""
    (m, k), n = a.shape, b.shape[0]
    mats = [t for t in (a, b, y, q, r) if t is not None]
    why = tma_refusal(k, n, tuple(t.element_size() for t in (y, q, r) if t is not None))
    if why is not None:
        raise BuildError(f"The TMA 8-bit GEMM needs rows of 16-byte multiples: {why}; the pointer kernel runs "
                         f"this layer.")
    if any(t.data_ptr() % 16 or t.stride(-1) != 1 or t.stride(0) != t.shape[1] for t in mats):
        return False
    from triton.tools.tensor_descriptor import TensorDescriptor
    cfg = fitted(cfg, max(t.element_size() for t in mats))
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tiles = cdiv(m, bm) * cdiv(n, bn)
    sms = _sm_count(a.device.index or 0) if cfg.persistent else 1
    grid = min(tiles, sms) if cfg.persistent else tiles
    _qgemm_tma_kernel[(grid,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
        *_output_descriptors([bm, bn // cfg.split], y, q, r), ep.ibias, ep.mult, m, n, K=k, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, GROUP_M=cfg.group_m, SPLIT=cfg.split, PERSISTENT=cfg.persistent, NUM_SMS=sms,
        WARP_SPEC=cfg.warp_specialize, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **epilogue)
    return True


def _output_descriptors(block: list[int], y: torch.Tensor, q: torch.Tensor | None, r: torch.Tensor | None) -> list:
    """Descriptors of the output, its codes and the residual (the output's standing in for those absent)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    yd = TensorDescriptor.from_tensor(y, block)
    return [yd] + [yd if t is None else TensorDescriptor.from_tensor(t, block) for t in (q, r)]


def pixel_tile(oh: int, ow: int, pixels: int) -> int:
    """The width of the block of ``pixels`` output pixels (both sides powers of two) that covers an oh x ow map
    with the fewest wasted pixels (the widest among equals)."""
    widths = [1 << i for i in range(pixels.bit_length()) if (1 << i) <= pixels]
    return min(widths, key=lambda tw: (cdiv(oh, pixels // tw) * (pixels // tw) * cdiv(ow, tw) * tw, -tw))


def launch_tma_conv(x: torch.Tensor, wk: torch.Tensor, y: torch.Tensor, q: torch.Tensor | None,
                    r: torch.Tensor | None, ep, geometry, cfg: TmaConfig, epilogue: dict) -> bool:
    """Run the TMA convolution on NHWC views: ``x`` [N, H, W, Cin] codes, ``y`` (and ``q``, ``r``) [N, OH, OW,
    Cout], the K-major weight ``wk`` [Cout, KH·KW·Cin]; False (nothing run) where a base address is not 16-byte
    aligned. Convolutions it cannot run are a BuildError."""
    g = geometry
    if g.stride != (1, 1):
        why = "it is strided"
    elif any(g.pads) and ep.x_zp != 0:
        why = "its padding must read the input's nonzero zero point"
    elif cfg.persistent:
        why = "the persistent kernel runs plain GEMMs only"
    else:
        why = tma_refusal(x.shape[3], wk.shape[0], tuple(t.element_size() for t in (y, q, r) if t is not None))
    if why is not None:
        raise BuildError(f"The TMA 8-bit convolution cannot run this layer: {why}; the pointer kernel runs it.")
    mats = [t for t in (x, y, q, r) if t is not None]
    if any(t.data_ptr() % 16 or t.stride() != (t.shape[1] * t.shape[2] * t.shape[3], t.shape[2] * t.shape[3],
                                                 t.shape[3], 1) for t in mats) or wk.data_ptr() % 16:
        return False
    from triton.tools.tensor_descriptor import TensorDescriptor

    cfg = fitted(cfg, max(t.element_size() for t in mats))
    (n, _, _, cin), (oh, ow), cout = x.shape, y.shape[1:3], wk.shape[0]
    tw = cfg.tile_w or pixel_tile(oh, ow, cfg.block_m)
    th, bn, bk = cfg.block_m // tw, cfg.block_n, cfg.block_k
    grid = n * cdiv(oh, th) * cdiv(ow, tw) * cdiv(cout, bn)
    _qconv_tma_kernel[(grid,)](
        TensorDescriptor.from_tensor(x, [1, th, tw, bk]), TensorDescriptor.from_tensor(wk, [bn, bk]),
        *_output_descriptors([1, th, tw, bn // cfg.split], y, q, r), ep.ibias, ep.mult, oh, ow, cout, CIN=cin, KH=g.kh,
        KW=g.kw, PH=g.pads[0], PW=g.pads[1], DH=g.dilation[0], DW=g.dilation[1], TH=th, TW=tw, BLOCK_N=bn,
        BLOCK_K=bk, SPLIT=cfg.split, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **epilogue)
    return True


@triton.jit
def _tile_product(a_desc, b_desc, off_m, off_n, K: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] accumulator of one output tile: int32 (int8 and uint8 codes, the latter shifted by
    -128) or FP32 (FP8)."""
    if MODE == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range((K + BLOCK_K - 1) // BLOCK_K):
        a = a_desc.load([off_m, i * BLOCK_K])
        b = b_desc.load([off_n, i * BLOCK_K])
        if MODE == 1:
            a = (a.to(tl.int16) - 128).to(tl.int8)
        if MODE == 2:
            acc += tl.dot(a, b.T)     # each K slice summed on its own, then added in FP32
        else:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _put(desc, v, off_m, off_n, img, oh0, ow0, TH: tl.constexpr, TW: tl.constexpr, WIDTH: tl.constexpr):
    """Store tile ``v`` at rows ``off_m`` (a GEMM, TH = 0) or at the TH x TW pixels from (oh0, ow0) of image
    ``img`` (a convolution's NHWC output), columns from ``off_n``."""
    if TH == 0:
        desc.store([off_m, off_n], v)
    else:
        desc.store([img, oh0, ow0, off_n], tl.reshape(v, (1, TH, TW, WIDTH)))


@triton.jit
def _store_part(acc, off_m, off_n, img, oh0, ow0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp,
                q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE: tl.constexpr, OUT: tl.constexpr, LO: tl.constexpr,
                HI: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr, ACT: tl.constexpr,
                HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr, WIDTH: tl.constexpr, TH: tl.constexpr,
                TW: tl.constexpr):
    """The epilogue of the WIDTH output columns from ``off_n`` of a tile, stored through the descriptors."""
    offs_n = off_n + tl.arange(0, WIDTH)
    if HAS_RES and TH == 0:
        r = r_desc.load([off_m, off_n])
    elif HAS_RES:
        r = tl.reshape(r_desc.load([img, oh0, ow0, off_n]), (TH * TW, WIDTH))
    else:
        r = 0
    y, q = epilogue_tile(acc, r, offs_n, offs_n < N, ib_ptr, mult_ptr, out_inv, out_zp, q_inv, q_zp, r_scale, r_zp,
                         alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER, y_desc.dtype,
                         q_desc.dtype)
    _put(y_desc, y, off_m, off_n, img, oh0, ow0, TH, TW, WIDTH)
    if QOUT != 0:
        _put(q_desc, q, off_m, off_n, img, oh0, ow0, TH, TW, WIDTH)


@triton.jit
def _finish_tile(acc, off_m, off_n, img, oh0, ow0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp,
                 q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE: tl.constexpr, OUT: tl.constexpr, LO: tl.constexpr,
                 HI: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr, ACT: tl.constexpr,
                 HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """A tile's epilogue, whole or in two halves along N."""
    if SPLIT == 2:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        _store_part(left, off_m, off_n, img, oh0, ow0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv,
                    out_zp, q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT,
                    HAS_RES, RES_AFTER, BLOCK_N // 2, TH, TW)
        _store_part(right, off_m, off_n + BLOCK_N // 2, img, oh0, ow0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N,
                    out_inv, out_zp, q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI,
                    ACT, HAS_RES, RES_AFTER, BLOCK_N // 2, TH, TW)
    else:
        _store_part(acc, off_m, off_n, img, oh0, ow0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp,
                    q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES,
                    RES_AFTER, BLOCK_N, TH, TW)


@triton.jit(do_not_specialize=["M"])
def _qgemm_tma_kernel(a_desc, b_desc, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, M, N, out_inv, out_zp, q_inv, q_zp,
                      r_scale, r_zp, alpha, beta, K: tl.constexpr, MODE: tl.constexpr, OUT: tl.constexpr,
                      LO: tl.constexpr, HI: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr,
                      ACT: tl.constexpr, HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr,
                      PERSISTENT: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPEC: tl.constexpr):
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        # the epilogue's tile counter is a second one, so the flattened loop's prologue does not carry it
        done = tl.program_id(0) - NUM_SMS
        for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPEC):
            off_m, off_n = tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tile_product(a_desc, b_desc, off_m, off_n, K, MODE, BLOCK_M, BLOCK_N, BLOCK_K)
            done += NUM_SMS
            out_m, out_n = tile_origin(done, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _finish_tile(acc, out_m, out_n, 0, 0, 0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp,
                         q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES,
                         RES_AFTER, BLOCK_M, BLOCK_N, SPLIT, 0, 0)
    else:
        off_m, off_n = tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tile_product(a_desc, b_desc, off_m, off_n, K, MODE, BLOCK_M, BLOCK_N, BLOCK_K)
        _finish_tile(acc, off_m, off_n, 0, 0, 0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp, q_inv,
                     q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER,
                     BLOCK_M, BLOCK_N, SPLIT, 0, 0)


@triton.jit(do_not_specialize=["OH", "OW"])
def _qconv_tma_kernel(x_desc, w_desc, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, OH, OW, N, out_inv, out_zp, q_inv,
                      q_zp, r_scale, r_zp, alpha, beta, CIN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, MODE: tl.constexpr,
                      OUT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr,
                      QHI: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr,
                      TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr):
    """A stride-1 convolution over NHWC codes, one program per TH x TW block of output pixels and BLOCK_N
    channels: per tap and K slice, one TMA copy of the input box shifted by the tap (the copy zero-fills rows and
    columns outside the image, the padding) and one of the weight slice."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_w = tl.cdiv(OW, TW)
    tiles_h = tl.cdiv(OH, TH)
    off_n = (pid % tiles_n) * BLOCK_N
    ow0 = (pid // tiles_n % tiles_w) * TW
    oh0 = (pid // (tiles_n * tiles_w) % tiles_h) * TH
    img = pid // (tiles_n * tiles_w * tiles_h)
    if MODE == 2:
        acc = tl.zeros((TH * TW, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((TH * TW, BLOCK_N), dtype=tl.int32)
    chunks: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    for i in range(KH * KW * chunks):
        tap = i // chunks
        c = (i % chunks) * BLOCK_K
        a = tl.reshape(x_desc.load([img, oh0 + (tap // KW) * DH - PH, ow0 + (tap % KW) * DW - PW, c]),
                       (TH * TW, BLOCK_K))
        # a slice past Cin reads the next tap's weights against the input box's zero-filled channels
        b = w_desc.load([off_n, tap * CIN + c])
        if MODE == 1:
            a = (a.to(tl.int16) - 128).to(tl.int8)
            if CIN % BLOCK_K != 0:      # shifted, the zero-filled channels would be -128: zero them again
                a = tl.where((c + tl.arange(0, BLOCK_K) < CIN)[None, :], a, 0)
        if MODE == 2:
            acc += tl.dot(a, b.T)     # each K slice summed on its own, then added in FP32
        else:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    _finish_tile(acc, 0, off_n, img, oh0, ow0, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp, q_inv,
                 q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER,
                 TH * TW, BLOCK_N, SPLIT, TH, TW)


def hopper() -> bool:
    """Whether the current CUDA device has TMA (compute capability 9.0 or later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def _supports_tma(fp8: bool, persistent: bool):
    """Fully connected layers and stride-1 convolutions (unpadded for the persistent kernel; padded ones where the
    input's zero point is 0, the value the copies fill the padding with) of the code type, on Hopper."""
    base = _supports(fp8)

    def ok(attrs, ctx) -> bool:
        if ctx.device != "cuda" or not base(attrs, ctx) or not hopper():
            return False
        if "stride" not in attrs:
            return True
        padded = any(attrs["pads"])
        return tuple(attrs["stride"]) == (1, 1) and not (padded and (persistent or attrs.get("x_zero_point", 0)))
    return ok


# timed where the pointer kernel's alternative tile tables are (builder/tactics.py: candidates)
for _kind in ("QConvolution", "QFullyConnected"):
    for _codes, _fp8 in (("int8", False), ("fp8", True)):
        tactic(_kind, f"triton_{_codes}_tma", devices=("cuda",), supports=_supports_tma(_fp8, False),
               min_level=4)(_make(tma_config))
        tactic(_kind, f"triton_{_codes}_tma_persistent", devices=("cuda",), supports=_supports_tma(_fp8, True),
               min_level=4)(_make(persistent_config))
