"""MatMul, Gemm, FullyConnected and Einsum (cuBLAS on the GPU, accumulation in FP32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.pointwise import act_params, activation_fn
from kiln.kernels.registry import tactic


def _mm(a, b):
    if not a.dtype.is_floating_point and a.dtype != torch.bool:
        # integer matmul: torch has no CUDA kernel; go through int64 on the same device
        if a.is_cuda:
            return torch.matmul(a.double(), b.double()).to(torch.promote_types(a.dtype, b.dtype))
        return torch.matmul(a.to(torch.int64), b.to(torch.int64)).to(torch.promote_types(a.dtype, b.dtype))
    return torch.matmul(a, b)


@tactic("MatMul")
def make_matmul(attrs, ctx):
    ta, tb = attrs.get("transpose_a", False), attrs.get("transpose_b", False)
    act = activation_fn(attrs["activation"], *act_params(attrs)) if attrs.get("activation") else None

    def run(a, b, bias=None):
        if ta:
            a = a.transpose(-1, -2)
        if tb:
            b = b.transpose(-1, -2)
        y = _mm(a, b)
        if bias is not None:
            y = y + bias
        if act is not None:
            y = act(y)
        return (y,)
    return run


@tactic("Gemm")
def make_gemm(attrs, ctx):
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    ta, tb = attrs.get("trans_a", 0), attrs.get("trans_b", 0)

    def run(a, b, c=None):
        if ta:
            a = a.t()
        if tb:
            b = b.t()
        if (c is not None and alpha == 1.0 and beta == 1.0 and a.dtype.is_floating_point and c.dtype == a.dtype
                and a.dim() == 2 and c.dim() <= 2):
            return (torch.addmm(c, a, b),)           # bias in the GEMM's epilogue: one kernel
        y = _mm(a, b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return (y.to(a.dtype) if y.dtype != a.dtype else y,)
    return run


@tactic("FullyConnected")
def make_fc(attrs, ctx):
    act = activation_fn(attrs["activation"], *act_params(attrs)) if attrs.get("activation") else None

    name = attrs.get("activation")

    def run(x, w, b=None):
        if name == "relu" and b is not None and x.is_cuda and x.dim() == 2:
            return (torch._addmm_activation(b, x, w.t()),)     # cuBLASLt bias+ReLU epilogue
        y = F.linear(x, w, b)
        if act is not None:
            y = act(y)
        return (y,)
    return run


def _gelu_epilogue_ok(attrs, ctx) -> bool:
    return attrs.get("activation") == "gelu" and ctx.precision.split()[0] in ("fp16", "bf16")


@tactic("FullyConnected", "cublaslt_gelu", devices=("cuda",), supports=_gelu_epilogue_ok, priority=1)
def make_fc_gelu_epilogue(attrs, ctx):
    """GEMM + bias + GELU in one cuBLASLt call (its GELU epilogue). cuBLASLt evaluates GELU with the
    tanh formula, at most 4.7e-4 from the erf form (at x = 2.7) — under half an FP16/BF16 output ulp
    wherever they differ — so it is offered for FP16/BF16 layers only, and the builder still checks it
    against the exact tactic before timing it."""
    def run(x, w, b=None):
        if b is None or x.is_meta or not x.is_cuda:
            return (F.gelu(F.linear(x, w, b)),)
        lead = x.shape[:-1]
        y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
        return (y.reshape(*lead, y.shape[-1]),)
    return run


@tactic("Einsum")
def make_einsum(attrs, ctx):
    eq = attrs["equation"].replace(" ", "")

    def run(*xs):
        if xs and not xs[0].dtype.is_floating_point:
            return (torch.einsum(eq, *[x.to(torch.int64) if not x.is_cuda else x.double() for x in xs])
                    .to(xs[0].dtype),)
        return (torch.einsum(eq, *xs),)
    return run
