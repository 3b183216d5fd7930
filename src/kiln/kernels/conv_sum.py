"""Two 1×1 convolutions added, as one Triton GEMM (layer kind Conv1x1Sum, passes/fuse_projection.py).

    y = act(x1 @ W1 + x2 @ W2 + b)      rows: output pixels; x1, x2 read at stride s1, s2

ResNet's projection shortcut: the expansion of h and the strided projection of the block input x
accumulate into one FP32 tile, K running over h's channels then over x's, so the projection's
output is never written or read back. Inputs and output are channels-last; a strided operand's
rows are the pixels (oh·s, ow·s) of its map. Tiles come from the implicit-GEMM convolution's tables
(kernels/conv_triton.py); K slices are the widest power of two (≤ 64) dividing each operand's
channels.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.kernels._util import per_tensor
from kiln.kernels.conv import _channels_last, _epilogue, match_weight
from kiln.kernels.conv_triton import ConvConfig, _sm_count, default_config, tile_offsets, wide_config
from kiln.kernels.epilogue_triton import ACTS, apply_act, epilogue_params, nhwc_output
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, tl, triton


@triton.jit
def _operand(x_ptr, w_ptr, img, oh, ow, m_ok, offs_n, n_ok, Cout, H, W, acc, C: tl.constexpr, SH: tl.constexpr,
             SW: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[img, oh·SH, ow·SW, :] @ Wᵀ[:, offs_n], one BLOCK_K slice of channels per step."""
    row = ((img * H + oh * SH) * W + ow * SW) * C
    offs_k = tl.arange(0, BLOCK_K)
    for i in range(C // BLOCK_K):
        k = i * BLOCK_K + offs_k
        a = tl.load(x_ptr + row[:, None] + k[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptr + k[:, None] * Cout + offs_n[None, :], mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit(do_not_specialize=["M", "OH", "OW", "H1", "W1", "H2", "W2"])
def _conv_sum_kernel(x1_ptr, w1_ptr, x2_ptr, w2_ptr, b_ptr, y_ptr, M, OH, OW, H1, W1, H2, W2, Cout, YS, alpha, beta,
                     C1: tl.constexpr, C2: tl.constexpr, S1H: tl.constexpr, S1W: tl.constexpr, S2H: tl.constexpr,
                     S2W: tl.constexpr, IDX64: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, Cout, IDX64, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OW * OH)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _operand(x1_ptr, w1_ptr, img, oh, ow, m_ok, offs_n, n_ok, Cout, H1, W1, acc, C1, S1H, S1W, BLOCK_K1)
    acc = _operand(x2_ptr, w2_ptr, img, oh, ow, m_ok, offs_n, n_ok, Cout, H2, W2, acc, C2, S2H, S2W, BLOCK_K2)
    v = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    v = apply_act(v, alpha, beta, ACT)
    tl.store(y_ptr + offs_m[:, None] * YS + offs_n[None, :], v.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _slice(c: int, cap: int) -> int:
    """The widest power-of-two K slice (16 to ``cap``) that divides ``c`` channels."""
    k = cap
    while k > 16 and c % k:
        k //= 2
    return k


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def arrange(w: torch.Tensor) -> torch.Tensor:
    """[Cout, C, 1, 1] → contiguous [C, Cout]."""
    return w.reshape(w.shape[0], -1).t().contiguous()


def conv_sum(x1: torch.Tensor, w1t: torch.Tensor, x2: torch.Tensor, w2t: torch.Tensor, bias: torch.Tensor,
             stride1: tuple[int, int] = (1, 1), stride2: tuple[int, int] = (1, 1), act: str = "none",
             alpha: float = 0.0, beta: float = 0.0,
             config: ConvConfig | Callable[..., ConvConfig] = default_config, out=None) -> torch.Tensor:
    """act(conv(x1, W1, stride1) + conv(x2, W2, stride2) + bias), channels-last [N, Cout, OH, OW].
    ``x1``, ``x2``: [N, C, H, W] (converted to channels-last if they are not); ``w1t``, ``w2t``:
    ``arrange(w)``; ``out``: as in conv_triton.conv2d_nhwc."""
    n, c1, h1, wd1 = x1.shape
    c2, h2, wd2 = x2.shape[1:]
    cout = w1t.shape[1]
    oh, ow = _out_size(h1, stride1[0]), _out_size(wd1, stride1[1])
    if (tuple(w1t.shape) != (c1, cout) or tuple(w2t.shape) != (c2, cout) or x2.shape[0] != n
            or (_out_size(h2, stride2[0]), _out_size(wd2, stride2[1])) != (oh, ow)):
        raise BuildError(f"Conv1x1Sum shapes disagree: x1 {tuple(x1.shape)} stride {tuple(stride1)}, W1ᵀ "
                         f"{tuple(w1t.shape)}, x2 {tuple(x2.shape)} stride {tuple(stride2)}, W2ᵀ {tuple(w2t.shape)}.")
    if c1 % 16 or c2 % 16:
        raise BuildError(f"The fused 1x1 sum takes channel counts in multiples of 16, got {c1} and {c2}; the torch "
                         f"tactic runs this layer.")
    if x1.dtype != w1t.dtype or x2.dtype != w1t.dtype or w2t.dtype != w1t.dtype:
        raise BuildError(f"The fused 1x1 sum takes inputs and weights of one type, got {x1.dtype}, {x2.dtype}, "
                         f"{w1t.dtype} and {w2t.dtype}.")
    y = nhwc_output(out, (n, cout, oh, ow), x1.dtype, x1.device, x1.is_meta)
    if x1.is_meta or y.numel() == 0:
        return y
    x1 = x1.contiguous(memory_format=torch.channels_last)
    x2 = x2.contiguous(memory_format=torch.channels_last)
    m = n * oh * ow
    if callable(config):
        config = config(m, cout, c1 + c2, _sm_count(x1.device))
    bm, bn, bk, warps, stages, group_m = config
    big = max(x1.numel(), x2.numel(), y.shape[0] * y.stride(0)) >= 2 ** 31
    _conv_sum_kernel[(cdiv(m, bm) * cdiv(cout, bn),)](
        x1, w1t, x2, w2t, bias, y, m, oh, ow, h1, wd1, h2, wd2, cout, y.stride(3), float(alpha), float(beta),
        C1=c1, C2=c2, S1H=stride1[0], S1W=stride1[1], S2H=stride2[0], S2W=stride2[1], IDX64=big,
        ACT=ACTS.index(act), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K1=_slice(c1, bk), BLOCK_K2=_slice(c2, bk),
        GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return y


@tactic("Conv1x1Sum")
def make_sum_torch(attrs, ctx):
    """The two convolutions and an add (any device; the reference for the fused kernel)."""
    s1, s2 = tuple(attrs["stride1"]), tuple(attrs["stride2"])
    act = _epilogue(attrs)
    cache: dict = {}

    def run(x1, w1, x2, w2, b):
        y = F.conv2d(_channels_last(match_weight(x1, w1), None), _channels_last(w1, cache), b, s1)
        p = F.conv2d(_channels_last(match_weight(x2, w2), None), _channels_last(w2, cache), None, s2)
        y = y + p if y.is_meta else y.add_(p)
        return (act(y) if act is not None else y,)
    return run


def _ok(attrs, ctx) -> bool:
    return (HAS_TRITON and ctx.precision.split()[0] in ("fp16", "bf16")
            and (attrs.get("activation") or "none") in ACTS)


def _make(choose):
    def make(attrs, ctx):
        s1, s2 = tuple(attrs["stride1"]), tuple(attrs["stride2"])
        act, alpha, beta = epilogue_params(attrs)
        cache: dict = {}

        def run(x1, w1, x2, w2, b, out=None):
            w1t = per_tensor(cache, w1, lambda: arrange(w1))
            w2t = per_tensor(cache, w2, lambda: arrange(w2))
            return (conv_sum(match_weight(x1, w1), w1t, match_weight(x2, w2), w2t, b, s1, s2, act, alpha, beta,
                             choose, out),)
        return run
    return make


tactic("Conv1x1Sum", "triton_sum", devices=("cuda",), supports=_ok, priority=1, writes_into=True)(_make(default_config))
# both tile tables at every level, timed by the builder (each wins some layers; benchmarks/sum_bench.py):
# a network has a handful of these layers
tactic("Conv1x1Sum", "triton_sum_wide", devices=("cuda",), supports=_ok, priority=1,
       writes_into=True)(_make(wide_config))
