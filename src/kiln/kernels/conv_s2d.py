"""Strided convolutions over few input channels (network stems) as space-to-depth + a stride-1 conv.

A stem such as YOLOv5's 6×6 stride-2 conv over 3 channels, or ResNet's 7×7 stride-2, gets no
tensor-core kernel from cuDNN (3 channels cannot fill an MMA's K), only a generic direct kernel.
Regrouping each s×s block of pixels into channels makes the same convolution a stride-1 one
over C·s² channels with a ⌈k/s⌉ kernel (YOLOv5's old "Focus" layer, done exactly):

    out[y, x] = Σ w[c, s·a+p, s·b+q] · xpad[c, s·(y+a)+p, s·(x+b)+q]
              = Σ w'[(c,p,q), a, b] · xs[(c,p,q), y+a, x+b]

with ``w`` zero-padded to a multiple of s and the channels of ``xs``/``w'`` zero-padded to a
multiple of 8 (16-byte rows for the tensor cores). The rearranged weight is made once; the
input costs one gather pass. The builder times this against the direct convolution and keeps
the faster (ResNet-50's 7×7 stem at large batch may go either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.kernels._util import per_tensor, zero_bias
from kiln.kernels.conv import _epilogue, pool_after
from kiln.kernels.pointwise import act_params, add_around_act
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, tl, triton

MAX_CHANNELS = 64     # C·s² beyond this is an ordinary convolution that cuDNN handles well ...
# ... except a patchify conv (kernel = stride, ViT's 16×16/16 embedding): regrouped, it is one GEMM
# over C·s² channels with no zero weights, where cuDNN runs a slow direct kernel.


def _ok(attrs, ctx) -> bool:
    stride = attrs["stride"]
    return (len(stride) == 2 and stride[0] == stride[1] >= 2 and list(attrs["dilation"]) == [1, 1]
            and attrs.get("groups", 1) == 1)


def s2d_weight(w: torch.Tensor, s: int) -> torch.Tensor:
    """[O, C, kh, kw] → [O, Cp, ⌈kh/s⌉, ⌈kw/s⌉], channels ordered (c, p, q), zero-padded to Cp = 8·⌈C·s²/8⌉."""
    o, c, kh, kw = w.shape
    ah, aw = cdiv(kh, s), cdiv(kw, s)
    wp = w.new_zeros(o, c, ah * s, aw * s)
    wp[:, :, :kh, :kw] = w
    w2 = wp.view(o, c, ah, s, aw, s).permute(0, 1, 3, 5, 2, 4).reshape(o, c * s * s, ah, aw)
    cp = cdiv(c * s * s, 8) * 8
    if cp != c * s * s:
        w2 = torch.cat([w2, w2.new_zeros(o, cp - c * s * s, ah, aw)], 1)
    return w2.contiguous(memory_format=torch.channels_last)


def s2d_geometry(x_shape, s: int, kh: int, kw: int, pads: list[int]) -> tuple[int, int, int, int]:
    """(Hs, Ws, C·s², Cp): the regrouped map is Hs = OH + ⌈kh/s⌉ - 1 rows (so that a valid stride-1
    convolution yields the original OH), Ws columns, C·s² real channels padded to Cp."""
    n, c, h, w = x_shape
    oh = (h + pads[0] + pads[2] - kh) // s + 1
    ow = (w + pads[1] + pads[3] - kw) // s + 1
    cs = c * s * s
    return oh + cdiv(kh, s) - 1, ow + cdiv(kw, s) - 1, cs, cdiv(cs, 8) * 8


def s2d_input(x: torch.Tensor, s: int, kh: int, kw: int, pads: list[int], use_triton: bool | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [N, C, H, W] (pads top, left, bottom, right) → xs [N, Cp, Hs, Ws] in channels-last memory:
    xs[n, (c, p, q), i, j] = xpad[n, c, s·i + p, s·j + q], zero in the padding and the extra channels.
    One Triton pass on the GPU (``use_triton`` None); torch's pad, permute and copy elsewhere.
    ``dtype``: the result's (an FP32 engine input regrouped straight into FP16), x's by default."""
    n, c, h, w = x.shape
    hs, ws, cs, cp = s2d_geometry(x.shape, s, kh, kw, pads)
    buf = torch.empty(n, hs, ws, cp, dtype=dtype or x.dtype, device=x.device)
    if (x.is_cuda and HAS_TRITON if use_triton is None else use_triton) and buf.numel():
        p = n * hs * ws
        block_c = max(8, 1 << (cp - 1).bit_length())
        block_p = max(1, 4096 // block_c)
        _s2d_kernel[(cdiv(p, block_p),)](x, buf, p, h, w, hs, ws, *x.stride(), pads[0], pads[1], CS=cs, CP=cp,
                                            S=s, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
        return buf.permute(0, 3, 1, 2)
    # Rows past the original bottom padding only ever meet the weight's zero padding: pad or crop to s·Hs.
    xp = F.pad(x, (pads[1], s * ws - w - pads[1], pads[0], s * hs - h - pads[0]))
    if cp != cs:
        buf[..., cs:].zero_()
    buf[..., :cs].view(n, hs, ws, c, s, s).copy_(xp.view(n, c, hs, s, ws, s).permute(0, 2, 4, 1, 3, 5))
    return buf.permute(0, 3, 1, 2)


@triton.jit(do_not_specialize=["P", "H", "W", "HS", "WS"])
def _s2d_kernel(x_ptr, y_ptr, P, H, W, HS, WS, sxn, sxc, sxh, sxw, PT, PL, CS: tl.constexpr, CP: tl.constexpr,
                S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # A program writes BLOCK_P whole output pixels (CP channels each, contiguous) and gathers each
    # channel (c, p, q) from input row s·i + p - PT, column s·j + q - PL.
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    j = pix % WS
    t = pix // WS
    i = t % HS
    n = (t // HS).to(tl.int64)
    c = ch // (S * S)
    p = (ch // S) % S
    q = ch % S
    iy = (i * S - PT)[:, None] + p[None, :]
    ix = (j * S - PL)[:, None] + q[None, :]
    ok = (pix < P)[:, None] & (ch < CS)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    src = x_ptr + (n * sxn)[:, None] + (c * sxc)[None, :] + iy * sxh + ix * sxw
    v = tl.load(src, mask=ok, other=0.0)
    dst = y_ptr + (pix.to(tl.int64) * CP)[:, None] + ch[None, :]
    tl.store(dst, v, mask=(pix < P)[:, None] & (ch < CP)[None, :])


@tactic("Convolution", "space_to_depth", devices=("cuda",), supports=_ok, priority=10, writes_into=True)
def make_conv_space_to_depth(attrs, ctx):
    s = attrs["stride"][0]
    pads = list(attrs["pads"])
    act_name = attrs.get("activation")
    act = _epilogue(attrs)
    alpha, beta = act_params(attrs)
    after = bool(attrs.get("residual_after_activation"))
    pool = bool(attrs.get("pool"))
    wcache: dict = {}       # id(weight) → (weight, its regrouped copy)
    zcache: dict = {}

    def regroup(w):
        c, kh, kw = w.shape[1:]
        if c * s * s > MAX_CHANNELS and not kh == kw == s:
            raise BuildError(f"Convolution {ctx.layer_name!r}: space-to-depth is for stems of at most "
                             f"{MAX_CHANNELS} regrouped channels or patchify convs (kernel = stride); this "
                             f"one has {c * s * s} channels and a {kh}x{kw} kernel at stride {s}.")
        return s2d_weight(w, s)

    def run(x, w, b=None, residual=None, out=None):
        w2 = per_tensor(wcache, w, lambda: regroup(w))
        kh, kw = w.shape[2], w.shape[3]
        if x.is_meta:
            oh = (x.shape[2] + pads[0] + pads[2] - kh) // s + 1
            ow = (x.shape[3] + pads[1] + pads[3] - kw) // s + 1
            return (pool_after(w.new_empty(x.shape[0], w.shape[0], oh, ow), attrs),)
        xs = s2d_input(x, s, kh, kw, pads, dtype=w.dtype)
        x = xs
        if pool:
            out = None
        fused = (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and act_name in _TRITON_ACTS
                 and (act_name is not None or residual is not None or out is not None))
        if fused and b is None:
            b = zero_bias(zcache, w)
        y = F.conv2d(xs, w2, None if fused else b)
        if fused:
            from kiln.kernels.epilogue_triton import apply_epilogue, nhwc_rows
            if not y.is_contiguous(memory_format=torch.channels_last):
                y = y.contiguous(memory_format=torch.channels_last)
            r = residual.contiguous(memory_format=torch.channels_last) if residual is not None else None
            dest = out(tuple(y.shape), y.dtype, y.device) if out is not None else None
            if dest is not None and not nhwc_rows(dest):
                dest = None
            return (pool_after(apply_epilogue(y, b, r, act_name or "none", alpha, beta, residual_after=after,
                                              out=dest), attrs),)
        return (pool_after(add_around_act(y, residual, act, after), attrs),)
    return run


# Activations the Triton epilogue applies with the layer's attributes as they are (clip's optional
# bounds take the torch path).
_TRITON_ACTS = (None, "relu", "silu", "sigmoid", "hard_swish", "hard_sigmoid", "gelu", "leaky_relu", "tanh")
