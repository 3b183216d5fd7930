"""The 8-bit GEMM fed by Hopper's Tensor Memory Accelerator, for the layers that are plain GEMMs.

QFullyConnected and 1x1, stride-1, unpadded QConvolution over channels-last codes (a GEMM over the
[N·H·W, Cin] pixel rows) read A = x [M, K] and B = the K-major weight [N, K] through TMA tensor descriptors
(``TensorDescriptor``, built on the host): each K slice arrives as one bulk copy into swizzled shared memory
that the 8-bit wgmma reads, and partial tiles are zero-filled by the copy, not masked. The epilogue is
int8_gemm's (``epilogue_tile``: dequantize, bias, residual, activation, requantize), and the output, its
second codes output and the residual move through descriptors too: TMA bulk stores from shared memory where
the pointer kernel stores 8-bit codes per thread from the MMA layout. Options per tile config: the epilogue in
two halves along N (``split``: half the registers and staging memory), and ``persistent``: one program per SM
walking the tiles, the tile loop flattened with the K loop so the next tile's loads overlap this tile's
epilogue (its tile loop runs a runtime trip count, which Triton's interpreter cannot: GPU only).

TMA addresses rows of 16-byte multiples: K must be a multiple of 16 codes and N times each output's element
size a multiple of 16 bytes (``tma_refusal``); tensors whose base is not 16-byte aligned (views) run the pointer
kernel. The tactics are offered on CUDA devices of compute capability 9.0 or later.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kiln.errors import BuildError
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


SMEM = 232448       # shared memory per block on Hopper (227 KB)


def smem_bytes(cfg: TmaConfig, out_size: int = 1) -> int:
    """Shared memory a config needs: the pipeline's A and B slices plus the store's staging tile."""
    return (cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k
            + cfg.block_m * cfg.block_n // cfg.split * out_size)


def tma_config(m: int, n: int, k: int) -> TmaConfig:
    """128x256 tiles (the epilogue in halves) where N > 128, 128x128 or 128x64 otherwise; K slices of up to 128
    codes; as many pipeline stages (3-4) as fit with a float32 staging tile."""
    bn = 256 if n > 128 else 128 if n > 64 else 64
    bk = min(128, max(32, next_pow2(k)))
    cfg = TmaConfig(128, bn, bk, 8, 4, split=2 if bn == 256 else 1)
    return cfg if smem_bytes(cfg, 4) <= SMEM else cfg._replace(num_stages=3)


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
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    out = [bm, bn // cfg.split]
    desc = {name: TensorDescriptor.from_tensor(t, out) if t is not None else None
            for name, t in (("y", y), ("q", q), ("r", r))}
    tiles = cdiv(m, bm) * cdiv(n, bn)
    sms = _sm_count(a.device.index or 0) if cfg.persistent else 1
    grid = min(tiles, sms) if cfg.persistent else tiles
    _qgemm_tma_kernel[(grid,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]), desc["y"],
        desc["q"] or desc["y"], desc["r"] or desc["y"], ep.ibias, ep.mult, m, n, K=k, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, GROUP_M=cfg.group_m, SPLIT=cfg.split, PERSISTENT=cfg.persistent, NUM_SMS=sms,
        WARP_SPEC=cfg.warp_specialize, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **epilogue)
    return True


@triton.jit
def _tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The first row and column of output tile ``tile``, tiles ordered GROUP_M row-tiles at a time (neighbours
    share their B columns and A rows in L2)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // in_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return (first_m + (tile % in_group) % rows) * BLOCK_M, ((tile % in_group) // rows) * BLOCK_N


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
            acc = tl.dot(a, b.T, acc)
        else:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _store_part(acc, off_m, off_n, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp, q_inv, q_zp,
                r_scale, r_zp, alpha, beta, MODE: tl.constexpr, OUT: tl.constexpr, LO: tl.constexpr,
                HI: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr, ACT: tl.constexpr,
                HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr, WIDTH: tl.constexpr):
    """The epilogue of the WIDTH output columns from ``off_n`` of a tile, stored through the descriptors."""
    offs_n = off_n + tl.arange(0, WIDTH)
    r = r_desc.load([off_m, off_n]) if HAS_RES else 0
    y, q = epilogue_tile(acc, r, offs_n, offs_n < N, ib_ptr, mult_ptr, out_inv, out_zp, q_inv, q_zp, r_scale, r_zp,
                         alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER, y_desc.dtype,
                         q_desc.dtype)
    y_desc.store([off_m, off_n], y)
    if QOUT != 0:
        q_desc.store([off_m, off_n], q)


@triton.jit
def _finish_tile(acc, tile, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, M, N, out_inv, out_zp, q_inv, q_zp, r_scale,
                 r_zp, alpha, beta, MODE: tl.constexpr, OUT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                 QOUT: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                 RES_AFTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                 SPLIT: tl.constexpr):
    """Tile ``tile``'s epilogue, whole or in two halves along N."""
    off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT == 2:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        _store_part(left, off_m, off_n, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp, q_inv, q_zp,
                    r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER,
                    BLOCK_N // 2)
        _store_part(right, off_m, off_n + BLOCK_N // 2, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp,
                    q_inv, q_zp, r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES,
                    RES_AFTER, BLOCK_N // 2)
    else:
        _store_part(acc, off_m, off_n, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, N, out_inv, out_zp, q_inv, q_zp,
                    r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER, BLOCK_N)


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
            off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tile_product(a_desc, b_desc, off_m, off_n, K, MODE, BLOCK_M, BLOCK_N, BLOCK_K)
            done += NUM_SMS
            _finish_tile(acc, done, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, M, N, out_inv, out_zp, q_inv, q_zp,
                         r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER,
                         BLOCK_M, BLOCK_N, GROUP_M, SPLIT)
    else:
        tile = tl.program_id(0)
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tile_product(a_desc, b_desc, off_m, off_n, K, MODE, BLOCK_M, BLOCK_N, BLOCK_K)
        _finish_tile(acc, tile, y_desc, q_desc, r_desc, ib_ptr, mult_ptr, M, N, out_inv, out_zp, q_inv, q_zp,
                     r_scale, r_zp, alpha, beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER,
                     BLOCK_M, BLOCK_N, GROUP_M, SPLIT)


def hopper() -> bool:
    """Whether the current CUDA device has TMA (compute capability 9.0 or later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def _supports_tma(fp8: bool):
    base = _supports(fp8)

    def ok(attrs, ctx) -> bool:
        if ctx.device != "cuda" or not base(attrs, ctx) or not hopper():
            return False
        return "stride" not in attrs or (tuple(attrs["stride"]) == (1, 1) and not any(attrs["pads"]))
    return ok


# timed where the pointer kernel's alternative tile tables are (builder/tactics.py: candidates)
for _kind in ("QConvolution", "QFullyConnected"):
    for _codes, _fp8 in (("int8", False), ("fp8", True)):
        tactic(_kind, f"triton_{_codes}_tma", devices=("cuda",), supports=_supports_tma(_fp8), min_level=4)(
            _make(tma_config))
        tactic(_kind, f"triton_{_codes}_tma_persistent", devices=("cuda",), supports=_supports_tma(_fp8),
               min_level=4)(_make(persistent_config))
