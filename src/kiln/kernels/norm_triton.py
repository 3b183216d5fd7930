"""Residual add + LayerNorm (or RMSNorm) as one Triton kernel, for the Normalization layer.

``passes/fuse_add_norm.py`` folds the residual ``ElementWise(sum)`` of a transformer block into
the Normalization after it. Eager PyTorch then runs two kernels (an add that writes the sum,
a layer norm that reads it back); this one reads x and the residual once, adds in FP32, writes
the sum only where the graph reads it again (pre-LN blocks), keeps mean and variance in FP32 and
writes y in the input dtype. Each program normalizes ROWS rows of up to BLOCK elements (BLOCK is
the hidden size rounded up to a power of two, at most 8192; the tail is masked). Plain
LayerNorm/RMSNorm layers (no residual) run through the same kernel, so the builder times it
against torch's layer norm everywhere. A layer with codes_scale (a QuantizeLinear folded in:
passes/fold_qdq.py) also writes y's 8-bit codes in the same pass, from y as stored (rounded to its
dtype), requantized as the 8-bit GEMM's epilogue does (int8_gemm.py: the FP32 reciprocal of the
scale, round half to even, saturation; FP8 E4M3 onto its grid).
"""
from __future__ import annotations

import functools

import torch

from kiln.ir.dtypes import torch_dtype
from kiln.kernels._util import norm_axis
from kiln.kernels.int8_gemm import Codes, _out_type, _reciprocal, _requantize
from kiln.kernels.reduce import make_normalization
from kiln.kernels.registry import tactic
from kiln.triton_support import load_triton, next_pow2

MAX_HIDDEN = 8192
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _kernel():
    load_triton()           # int8_gemm's deferred _requantize becomes Triton's function here too
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows", "x_inner", "r_inner"])     # row counts: one compile for every shape
    def add_norm(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, q_ptr, rows, n, x_inner, x_s0, x_s1, r_inner, r_s0, r_s1,
                 eps, q_inv, q_zp, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 WRITE_SUM: tl.constexpr, RMS: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr,
                 QHI: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # row r of an input sits at (r // inner) * s0 + (r % inner) * s1: contiguous rows, or a
        # transposed view such as a [B, S, D] tensor laid out as [S, B, D]
        row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None]
        col = tl.arange(0, BLOCK)[None, :]
        in_row = row < rows
        in_col = col < n
        mask = in_row & in_col
        row = row.to(tl.int64)
        x_row = (row // x_inner) * x_s0 + (row % x_inner) * x_s1
        v = tl.load(x_ptr + x_row + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r_row = (row // r_inner) * r_s0 + (row % r_inner) * r_s1
            v += tl.load(r_ptr + r_row + col, mask=mask, other=0.0).to(tl.float32)
        if WRITE_SUM:
            tl.store(s_ptr + row * n + col, v.to(s_ptr.dtype.element_ty), mask=mask)
        if RMS:
            d = v
        else:
            mean = tl.sum(v, axis=1) / n
            d = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / n
        y = d * tl.rsqrt(var + eps)[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + col, mask=in_col, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + col, mask=in_col, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * n + col, y, mask=mask)
        if QOUT != 0:       # y's codes, from y as stored
            q = _requantize(y.to(tl.float32), q_inv, q_zp, QOUT, QLO, QHI)
            tl.store(q_ptr + row * n + col, q.to(q_ptr.dtype.element_ty), mask=mask)
    return add_norm


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(t, inner, s0, s1): row r of ``t`` (its leading dims flattened) starts at element
    (r // inner) * s0 + (r % inner) * s1. Leading dims that do not merge into two are copied first."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    dims: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        t = t.contiguous()
        return t, 1, t.shape[-1], 0
    if not dims:
        return t, 1, 0, 0
    if len(dims) == 1:
        return t, dims[0][0], 0, dims[0][1]
    return t, dims[1][0], dims[0][1], dims[1][1]


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, write_sum: bool = False, rms: bool = False,
             rows_per_program: int | None = None, codes: Codes | None = None) -> tuple[torch.Tensor | None, ...]:
    """y = norm(x + residual) · weight + bias over the last axis, and the sum when ``write_sum``: (y, sum or None),
    and with ``codes`` y's 8-bit codes third."""
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"the fused norm kernel takes hidden sizes up to {MAX_HIDDEN}, got {n}")
    qout, qlo, qhi = _out_type(codes.dtype) if codes is not None else (0, 0, 0)
    if codes is not None and qout == 0:
        raise ValueError(f"the fused norm kernel writes int8, uint8 or FP8 E4M3 codes, not {codes.dtype}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_sum else None
    q = torch.empty(x.shape, dtype=codes.dtype, device=x.device) if codes is not None else None
    done = (y, s) if q is None else (y, s, q)
    rows = x.numel() // n if n else 0
    if rows == 0:
        return done
    x, x_inner, x_s0, x_s1 = _rows(x)
    r, r_inner, r_s0, r_s1 = _rows(residual) if residual is not None else (x, 1, 0, 0)
    block = max(16, next_pow2(n))
    per = rows_per_program or max(1, min(16, 2048 // block))
    warps = min(16, max(4, per * block // 512))
    grid = ((rows + per - 1) // per,)
    qc = codes or Codes(torch.int8)
    _kernel()[grid](x, r, weight if weight is not None else x, bias if bias is not None else x, y,
                    s if s is not None else y, q if q is not None else y, rows, n, x_inner, x_s0, x_s1, r_inner, r_s0,
                    r_s1, float(eps), _reciprocal(qc.scale), float(qc.zero_point), HAS_RES=residual is not None,
                    HAS_W=weight is not None, HAS_B=bias is not None, WRITE_SUM=write_sum, RMS=rms, QOUT=qout,
                    QLO=qlo, QHI=qhi, ROWS=per, BLOCK=block, num_warps=warps)
    return done


def _supports(attrs, ctx) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return attrs.get("type", "layer") in ("layer", "rms")


def _make(rows_per_program: int | None):
    def make(attrs, ctx):
        rms = attrs.get("type", "layer") == "rms"
        eps = float(attrs.get("epsilon", 1e-5))
        axis = attrs.get("axis", -1)
        write_sum = bool(attrs.get("sum_output", False))
        codes = None
        if attrs.get("codes_scale") is not None:
            codes = Codes(torch_dtype(attrs["codes_to"]), float(attrs["codes_scale"]),
                          int(attrs.get("codes_zero_point", 0)))
        ref = make_normalization(attrs, ctx)

        def fits(x, p):
            return p is None or (p.dim() == 1 and p.shape[0] == x.shape[-1] and p.is_contiguous())

        def run(x, scale=None, bias=None, mean=None, var=None, residual=None):
            if (x.is_meta or not x.is_cuda or x.dim() == 0 or norm_axis(axis, x.dim()) != x.dim() - 1
                    or x.dtype not in _DTYPES or x.shape[-1] > MAX_HIDDEN or not fits(x, scale) or not fits(x, bias)
                    or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype))):
                return ref(x, scale, bias, mean, var, residual)
            y, s, *q = add_norm(x, residual, scale, bias, eps, write_sum, rms, rows_per_program, codes)
            return (y, s, *q) if write_sum else (y, *q)
        return run
    return make


# two row packings: the builder times both against torch's layer norm and keeps the fastest
tactic("Normalization", "triton", devices=("cuda",), supports=_supports, priority=1)(_make(None))
tactic("Normalization", "triton_row", devices=("cuda",), supports=_supports, priority=1)(_make(1))
