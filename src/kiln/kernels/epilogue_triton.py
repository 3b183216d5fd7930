"""A generated Triton epilogue for convolutions: y = act(conv(x) + bias [+ residual]) in one pass
(or act(conv(x) + bias) + residual, the shortcut after the activation).

cuDNN fuses bias+ReLU (see conv.py's ``cudnn_fused``) but not SiLU, HardSwish or GELU; eager
PyTorch then spends two more passes over the output (bias add, activation). Here the
convolution runs without bias and one Triton kernel adds the bias (and the residual) and applies
the activation in place, on channels-last memory where the channel is the fastest axis.

The kernels are defined at import, as the built-in plugins' are (Triton stays optional, see
plugins/builtin/_util.py), so that conv_triton.py's kernel can call ``apply_act``: Triton's
interpreter looks a kernel's callees up in module globals, never in a closure. Interpreted or
compiled (TRITON_INTERPRET=1) is therefore fixed when this module is imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.pointwise import act_params
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, tl, triton

ACTS = ("none", "relu", "silu", "sigmoid", "hard_swish", "hard_sigmoid", "gelu", "leaky_relu", "tanh", "clip")


@triton.jit
def apply_act(v, alpha, beta, ACT: tl.constexpr):
    """The activation ACTS[ACT] on FP32 values: one definition for every kernel that fuses an
    epilogue (this one, the implicit-GEMM convolution in conv_triton.py)."""
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 3:
        v = 1.0 / (1.0 + tl.exp(-v))
    elif ACT == 4:
        v = v * tl.minimum(tl.maximum(v / 6.0 + 0.5, 0.0), 1.0)
    elif ACT == 5:
        v = tl.minimum(tl.maximum(alpha * v + beta, 0.0), 1.0)
    elif ACT == 6:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 7:
        v = tl.where(v >= 0, v, v * alpha)
    elif ACT == 8:
        e = tl.exp(-2.0 * tl.abs(v))
        t = (1.0 - e) / (1.0 + e)
        v = tl.where(v >= 0, t, -t)
    elif ACT == 9:
        v = tl.minimum(tl.maximum(v, alpha), beta)
    return v


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    """``ptr``'s values as FP32, masked (zeros outside ``mask``) only where MASKED."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptr).to(tl.float32)


@triton.jit
def _epilogue_block(y_ptr, b_ptr, r_ptr, o_ptr, offs, mask, C, OS, alpha, beta, ACT: tl.constexpr,
                    HAS_RES: tl.constexpr, RES_AFTER: tl.constexpr, STRIDED: tl.constexpr, MASKED: tl.constexpr):
    v = _load(y_ptr + offs, mask, MASKED)
    v += _load(b_ptr + offs % C, mask, MASKED)
    if HAS_RES and not RES_AFTER:
        v += _load(r_ptr + offs, mask, MASKED)
    v = apply_act(v, alpha, beta, ACT)
    if HAS_RES and RES_AFTER:
        v += _load(r_ptr + offs, mask, MASKED)
    if STRIDED:     # into a concatenation's channel slice: OS elements from one pixel to the next
        dst = o_ptr + (offs // C) * OS + offs % C
    else:
        dst = o_ptr + offs
    if MASKED:
        tl.store(dst, v.to(o_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dst, v.to(o_ptr.dtype.element_ty))


# ``n`` (the element count) is not specialized: a new input shape of a range engine reuses the compiled
# kernel. Every block but the last is then unmasked, so its loads and stores stay vectorized whatever ``n``.
@triton.jit(do_not_specialize=["n"])
def _epilogue_kernel(y_ptr, b_ptr, r_ptr, o_ptr, n, C, OS, alpha, beta, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                     RES_AFTER: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if (pid + 1) * BLOCK <= n:
        _epilogue_block(y_ptr, b_ptr, r_ptr, o_ptr, offs, offs, C, OS, alpha, beta, ACT, HAS_RES, RES_AFTER,
                        STRIDED, False)
    else:
        _epilogue_block(y_ptr, b_ptr, r_ptr, o_ptr, offs, offs < n, C, OS, alpha, beta, ACT, HAS_RES, RES_AFTER,
                        STRIDED, True)


def epilogue_params(attrs) -> tuple[str, float, float]:
    """(activation name, alpha, beta) of a conv layer's fused epilogue for the Triton kernels: "none"
    without one, and a clip's missing bound made ±3e38 (no bound)."""
    act = attrs.get("activation") or "none"
    alpha, beta = act_params(attrs)
    if act == "clip" and (alpha is None or beta is None):
        alpha, beta = -3.0e38 if alpha is None else alpha, 3.0e38 if beta is None else beta
    return act, alpha, beta


def nhwc_rows(y: torch.Tensor) -> bool:
    """Whether ``y`` [N, C, H, W] is channels-last with dense pixels (C contiguous, each pixel
    ``y.stride(3)`` elements after the previous, images back to back)."""
    n, c, h, w = y.shape
    ps = y.stride(3)
    return y.stride(1) == 1 and y.stride(2) == w * ps and (n <= 1 or y.stride(0) == h * w * ps) and ps >= c


def nhwc_output(out, shape: tuple[int, int, int, int], dtype: torch.dtype, device, meta: bool) -> torch.Tensor:
    """Where a kernel writes its channels-last [N, C, H, W] result: ``out(shape, dtype, device)`` (a
    concatenation's channel slice, runtime/concat_elision.py) when it is given and has dense pixel
    rows, else a fresh channels-last tensor."""
    y = None if out is None or meta else out(shape, dtype, device)
    if y is None or not nhwc_rows(y):
        n, c, h, w = shape
        y = torch.empty((n, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)
    return y


def apply_epilogue(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None, act: str,
                   alpha: float = 0.0, beta: float = 0.0, block: int = 1024,
                   residual_after: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(y + bias + residual), or act(y + bias) + residual with ``residual_after``, in place on
    ``y`` (channels-last 4-D, or any tensor whose last axis is the channel) — or into ``out``, a
    4-D view with ``nhwc_rows`` (a concatenation's channel slice), which is returned."""
    C = bias.numel()
    n = y.numel()
    grid = ((n + block - 1) // block,)
    r = residual if residual is not None else y
    dest = y if out is None else out
    _epilogue_kernel[grid](y, bias, r, dest, n, C, dest.stride(3) if out is not None else C, float(alpha),
                           float(beta), ACT=ACTS.index(act), HAS_RES=residual is not None,
                           RES_AFTER=bool(residual_after), STRIDED=out is not None, BLOCK=block, num_warps=4)
    return dest


def _ok(attrs, ctx):
    act = attrs.get("activation") or "none"
    return HAS_TRITON and len(attrs["stride"]) == 2 and act in ACTS and attrs["pads"][:2] == attrs["pads"][2:] \
        and ctx.precision.split()[0] in ("fp16", "bf16")


@tactic("Convolution", "triton_epilogue", devices=("cuda",), supports=_ok, writes_into=True)
def make_conv_triton_epilogue(attrs, ctx):
    from kiln.kernels.conv import _channels_last, match_weight, pool_after
    stride, dil, groups = list(attrs["stride"]), list(attrs["dilation"]), attrs.get("groups", 1)
    pads = list(attrs["pads"][:2])
    act, alpha, beta = epilogue_params(attrs)
    after = bool(attrs.get("residual_after_activation"))
    pool = bool(attrs.get("pool"))
    wcache: dict = {}

    def run(x, w, b=None, residual=None, out=None):
        x = _channels_last(match_weight(x, w), None)
        w = _channels_last(w, wcache)
        y = F.conv2d(x, w, None, stride, pads, dil, groups)
        if y.is_meta:
            return (pool_after(y, attrs),)
        if pool:
            out = None
        if b is None:
            b = torch.zeros(y.shape[1], dtype=y.dtype, device=y.device)
        if not y.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        r = None
        if residual is not None:
            r = residual.contiguous(memory_format=torch.channels_last)
        dest = out(tuple(y.shape), y.dtype, y.device) if out is not None else None
        if dest is not None and not nhwc_rows(dest):
            dest = None
        return (pool_after(apply_epilogue(y, b, r, act, alpha, beta, residual_after=after, out=dest), attrs),)
    return run
