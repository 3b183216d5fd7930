"""2-D convolution as a Triton implicit GEMM on channels-last FP16/BF16 tensors, epilogue fused.

YOLOv5's convolutions are conv + bias + SiLU (its C3 bottlenecks add a shortcut after the SiLU).
cuDNN fuses bias + ReLU only, so the other tactics either run the activation eagerly or run
cuDNN's conv and then the Triton epilogue (epilogue_triton.py): a second pass that reads and
writes the whole output again. Here one kernel computes y = act(conv(x, w) + b [+ r]) (or
act(conv(x, w) + b) + r) and writes the output once.

On NHWC memory a convolution is a GEMM: rows are the M = N·OH·OW output pixels, columns the Cout
output channels and the reduction runs over K = KH·KW·Cin (kernel tap, then input channel). A
program owns a BLOCK_M × BLOCK_N output tile and steps through K one BLOCK_K slice of input
channels of one tap at a time: the A tile is BLOCK_M pixels' channels at that tap's input
position (contiguous per pixel, so the loads coalesce; taps that fall in the padding read 0), the
B tile comes from the weight rearranged once to [KH, KW, Cin, Cout], i.e. the [K, Cout] matrix.
Taps and channel slices form one flat loop so Triton's software pipeline covers all of K even
where Cin fits one slice. A 1×1 stride-1 unpadded convolution is a plain GEMM over [M, Cin] and
skips the coordinate math. Products accumulate in FP32; bias, residual and activation (shared
with epilogue_triton.py) run on the FP32 tile before the one store.

Programs are ordered GROUP_M row-tiles at a time, so neighbouring programs share their B
columns and A rows in L2. Tile sizes come from ``ConvConfig`` tables (three tactics, each
with its own choice, which the builder times); ``conv2d_nhwc`` takes a ``config`` to sweep.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from kiln.errors import BuildError
from kiln.kernels._util import per_tensor, zero_bias
from kiln.kernels.conv import match_weight, pool_after
from kiln.kernels.epilogue_triton import ACTS, apply_act, epilogue_params, nhwc_output
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, tl, triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ConvConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def _block_k(cin: int, cap: int) -> int:
    """A K slice no wider than Cin rounded up to a power of two (tl.dot needs at least 16), so a
    narrow layer does not multiply mostly-masked zeros."""
    return min(cap, max(16, 1 << max(0, cin - 1).bit_length()))


def default_config(m: int, cout: int, cin: int, sms: int = 132) -> ConvConfig:
    """128×128 tiles (×64 where Cout ≤ 64), 64-wide K slices (32 where Cin < 64); 64-row tiles
    where 128-row ones would leave SMs idle."""
    bn = 64 if cout <= 64 else 128
    bm = 128 if cdiv(m, 128) * cdiv(cout, bn) >= sms else 64
    return ConvConfig(bm, bn, _block_k(cin, 64 if cin >= 64 else 32), 8 if bm * bn >= 128 * 128 else 4, 3)


def wide_config(m: int, cout: int, cin: int, sms: int = 132) -> ConvConfig:
    """Bigger tiles for big layers: 128×256 where Cout > 128, else 256 rows; fewer re-reads of A
    and B per output element at the price of fewer programs."""
    bn = 256 if cout > 128 else 128 if cout > 64 else 64
    bm = 128 if bn == 256 else 256
    return ConvConfig(bm, bn, _block_k(cin, 64), 8, 3)


def small_config(m: int, cout: int, cin: int, sms: int = 132) -> ConvConfig:
    """64×64 tiles and a deeper pipeline, for maps too small to fill the GPU with big tiles
    (batch-1 detection heads, ResNet's 7×7 stage)."""
    return ConvConfig(64, 64, _block_k(cin, 64), 4, 4)


@triton.jit
def tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The first row and column of output tile ``tile`` of an [M, N] GEMM, tiles ordered GROUP_M row-tiles at a
    time (neighbours share their B columns and A rows in L2)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // in_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return (first_m + (tile % in_group) % rows) * BLOCK_M, ((tile % in_group) // rows) * BLOCK_N


@triton.jit
def tile_offsets(M, N, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output rows and columns of an [M, N] GEMM (``tile_origin``'s order); rows in int64 with
    IDX64."""
    first_m, first_n = tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = first_m + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    return offs_m, first_n + tl.arange(0, BLOCK_N)


# Sizes that change with the batch or the image stay unspecialized (one compile serves them
# all). CIN is a compile-time constant: the K loop then has a fixed trip count (Triton's
# interpreter cannot loop over a runtime count) and the compiler knows how far rows are aligned.
@triton.jit
def igemm_origin(offs_m, OH, OW, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Implicit GEMM over an NHWC convolution: the image and the top-left input position (padding
    included) of each output row ``offs_m``."""
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    return offs_m // (OW * OH), oh * SH - PH, ow * SW - PW


@triton.jit
def igemm_tap(i, chunks: tl.constexpr, offs_k, m_ok, img, ih0, iw0, H, W, CIN: tl.constexpr, KW: tl.constexpr,
              DH: tl.constexpr, DW: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``i`` of the reduction (filter tap by input-channel chunk): the tap, the chunk's channels, which
    rows read inside the image, and each row's input offset."""
    tap = i // chunks
    c = (i - tap * chunks) * BLOCK_K + offs_k
    kh = tap // KW
    ih = ih0 + kh * DH
    iw = iw0 + (tap - kh * KW) * DW
    a_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tap, c, a_ok, ((img * H + ih) * W + iw) * CIN


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW"])
def _conv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, H, W, OH, OW, Cout, YS, alpha, beta, CIN: tl.constexpr,
                 KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, POINTWISE: tl.constexpr,
                 IDX64: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, Cout, IDX64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    chunks: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    if POINTWISE:
        steps: tl.constexpr = chunks
        a_row = offs_m * CIN
    else:
        steps: tl.constexpr = KH * KW * chunks
        img, ih0, iw0 = igemm_origin(offs_m, OH, OW, SH, SW, PH, PW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(steps):
        if POINTWISE:
            tap = 0
            c = i * BLOCK_K + offs_k
            a_ok = m_ok
        else:
            tap, c, a_ok, a_row = igemm_tap(i, chunks, offs_k, m_ok, img, ih0, iw0, H, W, CIN, KW, DH, DW, BLOCK_K)
        a_ptrs = x_ptr + a_row[:, None] + c[None, :]
        b_ptrs = w_ptr + (tap * CIN + c)[:, None] * Cout + offs_n[None, :]
        if CIN % BLOCK_K == 0:
            a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = c < CIN
            a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)

    v = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    r_offs = offs_m[:, None] * Cout + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES and not RES_AFTER:
        v += tl.load(r_ptr + r_offs, mask=ok, other=0.0).to(tl.float32)
    v = apply_act(v, alpha, beta, ACT)
    if HAS_RES and RES_AFTER:
        v += tl.load(r_ptr + r_offs, mask=ok, other=0.0).to(tl.float32)
    # YS: elements from one output pixel to the next (Cout, or a concatenation's channel total)
    tl.store(y_ptr + offs_m[:, None] * YS + offs_n[None, :], v.to(y_ptr.dtype.element_ty), mask=ok)


def arrange_weight(w: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, KH, KW] → contiguous [KH, KW, Cin, Cout]: the kernel's [KH·KW·Cin, Cout] B matrix,
    whose rows are read Cout-contiguous."""
    return w.permute(2, 3, 1, 0).contiguous()


def out_size(size: int, k: int, stride: int, pad_begin: int, pad_end: int, dil: int) -> int:
    return (size + pad_begin + pad_end - dil * (k - 1) - 1) // stride + 1


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def conv2d_nhwc(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
                stride: tuple[int, int] = (1, 1), pads: tuple[int, int, int, int] = (0, 0, 0, 0),
                dilation: tuple[int, int] = (1, 1), act: str = "none", alpha: float = 0.0, beta: float = 0.0,
                residual_after: bool = False,
                config: ConvConfig | Callable[..., ConvConfig] = default_config, out=None) -> torch.Tensor:
    """y = act(conv2d(x, w) + bias [+ residual]) (or act(conv2d(x, w) + bias) + residual with
    ``residual_after``) as one kernel; the output is channels-last [N, Cout, OH, OW].

    ``x``: [N, Cin, H, W], channels-last (converted otherwise); ``wt``: ``arrange_weight(w)``;
    ``bias``: [Cout]; ``residual``: like the output; ``pads``: ONNX order (top, left, bottom,
    right). FP16 and BF16; FP32 (TF32 products on a GPU) is there for the interpreter tests.
    ``config``: the tiles, or a function (M, Cout, Cin, SM count) → tiles such as ``default_config``.
    ``out``: where to write, ``out(shape, dtype, device)`` → a channels-last view whose pixels may be
    further apart than Cout (a concatenation's channel slice, runtime/concat_elision.py).
    """
    n, cin, h, w = x.shape
    kh, kw, wcin, cout = wt.shape
    if wcin != cin:
        raise BuildError(f"Convolution input has {cin} channels but its weight expects {wcin}.")
    if cin % 8:
        raise BuildError(f"The Triton implicit-GEMM convolution needs input channels in multiples of 8 "
                         f"(16-byte rows), got {cin}; another tactic runs this layer.")
    if x.dtype not in _DTYPES or wt.dtype != x.dtype:
        raise BuildError(f"The Triton implicit-GEMM convolution runs FP16, BF16 or FP32 inputs with weights of the "
                         f"same type, got {x.dtype} and {wt.dtype}.")
    oh = out_size(h, kh, stride[0], pads[0], pads[2], dilation[0])
    ow = out_size(w, kw, stride[1], pads[1], pads[3], dilation[1])
    y = nhwc_output(out, (n, cout, oh, ow), x.dtype, x.device, x.is_meta)
    if x.is_meta or y.numel() == 0:
        return y
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    m = n * oh * ow
    if callable(config):
        config = config(m, cout, cin, _sm_count(x.device))
    bm, bn, bk, warps, stages, group_m = config
    pointwise = (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and not any(pads)
    big = max(x.numel(), y.shape[0] * y.stride(0)) >= 2 ** 31
    grid = (cdiv(m, bm) * cdiv(cout, bn),)
    _conv_kernel[grid](x, wt, bias, residual if residual is not None else y, y, m, h, w, oh, ow, cout, y.stride(3),
                       float(alpha), float(beta), CIN=cin, KH=kh, KW=kw, SH=stride[0], SW=stride[1],
                       PH=pads[0], PW=pads[1], DH=dilation[0], DW=dilation[1], POINTWISE=pointwise, IDX64=big,
                       ACT=ACTS.index(act), HAS_RES=residual is not None, RES_AFTER=bool(residual_after),
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return y


def _ok(attrs, ctx) -> bool:
    return (HAS_TRITON and len(attrs["stride"]) == 2 and attrs.get("groups", 1) == 1
            and (attrs.get("activation") or "none") in ACTS and ctx.precision.split()[0] in ("fp16", "bf16"))


def _make(choose):
    def make(attrs, ctx):
        stride, dil = tuple(attrs["stride"]), tuple(attrs["dilation"])
        pads = tuple(attrs["pads"])
        act, alpha, beta = epilogue_params(attrs)
        after = bool(attrs.get("residual_after_activation"))
        pool = bool(attrs.get("pool"))
        wcache: dict = {}       # id(weight) → (weight, its rearranged copy)
        zcache: dict = {}

        def run(x, w, b=None, residual=None, out=None):
            wt = per_tensor(wcache, w, lambda: arrange_weight(w))
            if b is None:
                b = zero_bias(zcache, w)
            if pool:
                return (pool_after(conv2d_nhwc(match_weight(x, w), wt, b, residual, stride, pads, dil, act, alpha,
                                               beta, after, choose), attrs),)
            return (conv2d_nhwc(match_weight(x, w), wt, b, residual, stride, pads, dil, act, alpha, beta, after,
                                choose, out),)
        return run
    return make


# three tile tables: the builder times each against cuDNN and keeps the fastest (the wide and small
# tables only at optimization levels 4-5: each is one more compile per layer shape)
tactic("Convolution", "triton_igemm", devices=("cuda",), supports=_ok, priority=1,
       writes_into=True)(_make(default_config))
tactic("Convolution", "triton_igemm_wide", devices=("cuda",), supports=_ok, priority=1,
       writes_into=True, min_level=4)(_make(wide_config))
tactic("Convolution", "triton_igemm_small", devices=("cuda",), supports=_ok, priority=1,
       writes_into=True, min_level=4)(_make(small_config))
