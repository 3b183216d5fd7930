"""Two 1×1 convolutions back to back in one Triton kernel (layer kind Conv1x1Chain).

In a ResNet bottleneck stage, block i ends with a 1×1 expansion + residual + ReLU whose output y
(C channels) is read twice: as the next block's residual and by the next block's 1×1 reduction.
At large batch these 1×1 layers are memory-bound, and re-reading y costs a full pass over the
stage's widest tensor. Here a program owns BLOCK_M pixels and walks y's channels in BLOCK_N chunks: each
chunk is computed (x @ W3 + b3 + r, activation), stored, and straight away multiplied into the
second convolution's accumulator (chunk @ W1[chunk, :]), so y is written once, never read back:

    y = act1(x @ W3 + b3 + r)          [M, C]   (stored: the next residual)
    z = act2(y @ W1 + b1)              [M, CN]  (the next block's reduction)

A stage's first block leads its chain with a projection shortcut instead of a residual
(passes/fuse_projection.py): y = act1(x @ W3 + x2 @ W2 + b3), x2 the block input read at the
projection's stride, its rows loaded once beside x's.

The second product takes y rounded to the layer precision, as the unfused engine's would read it.
The whole second accumulator lives in registers, so CN is at most MAX_CN (ResNet-50's stages 1-2;
with a wider one only small tiles fit the registers and shared memory).
Tensors are channels-last: rows of pixels. The "split" tactics run the two convolutions with the
engine's usual kernels, and the builder times all of them (``benchmarks/chain_bench.py`` compares
them per stage).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.kernels._util import per_tensor
from kiln.kernels.conv import match_weight
from kiln.kernels.conv_sum import arrange, conv_sum
from kiln.kernels.epilogue_triton import ACTS, apply_act
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, tl, triton

MAX_CN = 128      # widest second convolution the fused kernel takes; wider ones run faster apart
MAX_SUM_IN = 128  # a projection-led chain holds both inputs' rows: at most this many channels together


class ChainConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_chain_config(c4: int, c: int, cn: int, c2: int = 0) -> ChainConfig:
    """64-channel chunks of y, 128 pixels per program, 3 stages; with a projection operand (a stage's
    first block), 64 pixels, 32-channel chunks and 2 stages (the sweep: benchmarks/chain_bench.py)."""
    if c2:
        return ChainConfig(64, min(32, c), 4, 2)
    return ChainConfig(128, min(64, c), 8, 3)


@triton.jit(do_not_specialize=["M", "OH", "OW", "H2", "W2"])
def _chain_kernel(x_ptr, w3_ptr, b3_ptr, r_ptr, y_ptr, w1_ptr, b1_ptr, z_ptr, x2_ptr, w2_ptr, M, OH, OW, H2, W2,
                  C4: tl.constexpr, C: tl.constexpr, CN: tl.constexpr, C2: tl.constexpr, S2H: tl.constexpr,
                  S2W: tl.constexpr, HAS_RES: tl.constexpr, HAS_X2: tl.constexpr, ACT1: tl.constexpr,
                  ACT2: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The program's x rows (all C4 channels, and x2's C2 with a projection) are loaded once; the
    # loop over y's channel chunks is software-pipelined (num_stages), so the next chunk's weight
    # columns, residual and W1 rows load while this chunk multiplies.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    m_ok = offs_m < M
    offs_c4 = tl.arange(0, C4)
    offs_cn = tl.arange(0, CN)
    x = tl.load(x_ptr + offs_m[:, None] * C4 + offs_c4[None, :], mask=m_ok[:, None], other=0.0)
    if HAS_X2:
        offs_c2 = tl.arange(0, C2)
        ow = offs_m % OW
        oh = (offs_m // OW) % OH
        img = offs_m // (OW * OH)
        row2 = ((img * H2 + oh * S2H) * W2 + ow * S2W) * C2
        x2 = tl.load(x2_ptr + row2[:, None] + offs_c2[None, :], mask=m_ok[:, None], other=0.0)
    acc2 = tl.zeros((BLOCK_M, CN), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w3 = tl.load(w3_ptr + offs_c4[:, None] * C + offs_n[None, :])
        rows = offs_m[:, None] * C + offs_n[None, :]
        w1 = tl.load(w1_ptr + offs_n[:, None] * CN + offs_cn[None, :])
        v = tl.dot(x, w3)
        if HAS_X2:
            v = tl.dot(x2, tl.load(w2_ptr + offs_c2[:, None] * C + offs_n[None, :]), v)
        v += tl.load(b3_ptr + offs_n).to(tl.float32)[None, :]
        if HAS_RES:
            v += tl.load(r_ptr + rows, mask=m_ok[:, None], other=0.0).to(tl.float32)
        v = apply_act(v, 0.0, 0.0, ACT1).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows, v, mask=m_ok[:, None])
        acc2 = tl.dot(v, w1, acc2)
    z = apply_act(acc2 + tl.load(b1_ptr + offs_cn).to(tl.float32)[None, :], 0.0, 0.0, ACT2)
    tl.store(z_ptr + offs_m[:, None] * CN + offs_cn[None, :], z.to(z_ptr.dtype.element_ty), mask=m_ok[:, None])


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def conv_chain(x: torch.Tensor, w3t: torch.Tensor, b3: torch.Tensor, r: torch.Tensor | None, w1t: torch.Tensor,
               b1: torch.Tensor, act1: str = "relu", act2: str = "relu", config: ChainConfig | None = None,
               x2: torch.Tensor | None = None, w2t: torch.Tensor | None = None,
               stride2: tuple[int, int] = (1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) as in the module docstring. ``x`` [N, C4, H, W] and ``r`` [N, C, H, W] channels-last
    (converted otherwise); ``w3t`` [C4, C] and ``w1t`` [C, CN] (the 1×1 weights transposed,
    contiguous); outputs channels-last. With a projection (passes/fuse_projection.py), ``x2``
    [N, C2, H2, W2] read at ``stride2`` and ``w2t`` [C2, C] add x2 @ W2 to the first product (``r``
    is then usually None)."""
    n, c4, h, w = x.shape
    c, cn = w3t.shape[1], w1t.shape[1]
    c2 = 0 if x2 is None else x2.shape[1]
    if (w3t.shape[0] != c4 or w1t.shape[0] != c or (r is not None and tuple(r.shape) != (n, c, h, w))
            or (x2 is not None and (w2t is None or tuple(w2t.shape) != (c2, c) or x2.shape[0] != n
                                    or ((x2.shape[2] - 1) // stride2[0] + 1, (x2.shape[3] - 1) // stride2[1] + 1)
                                    != (h, w)))):
        raise BuildError(f"Conv1x1Chain shapes disagree: x {tuple(x.shape)}, W3ᵀ {tuple(w3t.shape)}, "
                         f"W1ᵀ {tuple(w1t.shape)}, residual {None if r is None else tuple(r.shape)}, projection "
                         f"{None if x2 is None else tuple(x2.shape)} stride {tuple(stride2)}.")
    if not (_pow2(c4) and _pow2(c) and _pow2(cn) and (x2 is None or _pow2(c2))) or cn > MAX_CN:
        raise BuildError(f"The fused 1x1 chain takes power-of-two channel counts (16 or more) and at most {MAX_CN} "
                         f"output channels; got {c4} (+ {c2}) → {c} → {cn}. The unfused tactic runs this layer.")
    y = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    z = torch.empty((n, h, w, cn), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    if x.is_meta or y.numel() == 0:
        return y, z
    x = x.contiguous(memory_format=torch.channels_last)
    if r is not None:
        r = r.contiguous(memory_format=torch.channels_last)
    if x2 is not None:
        x2 = x2.contiguous(memory_format=torch.channels_last)
    bm, bn, warps, stages = config or default_chain_config(c4, c, cn, c2)
    m = n * h * w
    big = max(y.numel(), x.numel(), 0 if x2 is None else x2.numel()) >= 2 ** 31
    _chain_kernel[(cdiv(m, bm),)](x, w3t, b3, y if r is None else r, y, w1t, b1, z, x if x2 is None else x2,
                                  w3t if w2t is None else w2t, m, h, w, 1 if x2 is None else x2.shape[2],
                                  1 if x2 is None else x2.shape[3], C4=c4, C=c, CN=cn, C2=max(c2, 16),
                                  S2H=stride2[0], S2W=stride2[1], HAS_RES=r is not None, HAS_X2=x2 is not None,
                                  ACT1=ACTS.index(act1), ACT2=ACTS.index(act2), IDX64=big, BLOCK_M=bm,
                                  BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return y, z


_ACT = {"relu": F.relu, None: None}


@tactic("Conv1x1Chain")
def make_chain_torch(attrs, ctx):
    """The two convolutions one after the other (any device; the reference for the fused kernel)."""
    act1, act2 = _ACT[attrs.get("activation")], _ACT[attrs.get("activation2")]
    s2 = tuple(attrs.get("stride2", (1, 1)))
    from kiln.kernels.conv import _channels_last

    def run(x, w3, b3, r, w1, b1, x2=None, w2=None):
        x = _channels_last(match_weight(x, w3), None)
        y = F.conv2d(x, _channels_last(w3, None), b3)
        for extra in (r, None if x2 is None else
                      F.conv2d(_channels_last(match_weight(x2, w2), None), _channels_last(w2, None), None, s2)):
            if extra is not None:
                y = y + extra if y.is_meta else y.add_(extra)
        if act1 is not None:
            y = act1(y)
        z = F.conv2d(y, _channels_last(w1, None), b1)
        if act2 is not None:
            z = act2(z)
        return y, z
    return run


def _ok(attrs, ctx) -> bool:
    return HAS_TRITON and ctx.precision.split()[0] in ("fp16", "bf16")


def _transposed(cache: dict, w: torch.Tensor) -> torch.Tensor:
    return per_tensor(cache, w, lambda: arrange(w))


@tactic("Conv1x1Chain", "triton_chain", devices=("cuda",), supports=_ok, priority=1)
def make_chain_triton(attrs, ctx):
    act1, act2 = attrs.get("activation") or "none", attrs.get("activation2") or "none"
    s2 = tuple(attrs.get("stride2", (1, 1)))
    cache: dict = {}

    def run(x, w3, b3, r, w1, b1, x2=None, w2=None):
        return conv_chain(match_weight(x, w3), _transposed(cache, w3), b3, r, _transposed(cache, w1), b1, act1, act2,
                          x2=None if x2 is None else match_weight(x2, w2),
                          w2t=None if w2 is None else _transposed(cache, w2), stride2=s2)
    return run


def _split(second_cudnn: bool):
    def make(attrs, ctx):
        from kiln.kernels.conv_triton import arrange_weight, conv2d_nhwc
        act1, act2 = attrs.get("activation") or "none", attrs.get("activation2") or "none"
        s2 = tuple(attrs.get("stride2", (1, 1)))
        cache: dict = {}

        def run(x, w3, b3, r, w1, b1, x2=None, w2=None):
            if x2 is None:
                y = conv2d_nhwc(match_weight(x, w3), per_tensor(cache, w3, lambda: arrange_weight(w3)), b3, r,
                                act=act1)
            elif r is None:
                y = conv_sum(match_weight(x, w3), _transposed(cache, w3), match_weight(x2, w2), _transposed(cache, w2),
                             b3, (1, 1), s2, act1)
            else:
                raise BuildError("The split chain tactics take a residual or a projection, not both.")
            if second_cudnn and act2 == "relu" and not y.is_meta:
                w1c = per_tensor(cache, w1, lambda: w1.contiguous(memory_format=torch.channels_last))
                return y, torch.cudnn_convolution_relu(y, w1c, b1, (1, 1), (0, 0), (1, 1), 1)
            if second_cudnn:
                raise BuildError("The cuDNN split tactic fuses ReLU only.")
            return y, conv2d_nhwc(y, per_tensor(cache, w1, lambda: arrange_weight(w1)), b1, act=act2)
        return run
    return make


# the two convolutions one after the other with the engine's usual kernels (small batches, where
# re-reading y is cheap and the fused kernel's long per-program loop is not)
tactic("Conv1x1Chain", "split_igemm", devices=("cuda",), supports=_ok, priority=2)(_split(False))
tactic("Conv1x1Chain", "split_igemm_cudnn", devices=("cuda",), supports=_ok, priority=2)(_split(True))
