"""Reductions, SoftMax, normalizations and TopK. Statistics are computed in FP32."""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.kernels._util import ints, norm_axis
from kiln.kernels.quantize import quantize_values
from kiln.kernels.registry import tactic

_LOW = (torch.float16, torch.bfloat16)
_GATHERABLE = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


def _acc(x):
    return x.float() if x.dtype in _LOW else x


@tactic("Reduce")
def make_reduce(attrs, ctx):
    op = attrs["op"]
    keep = bool(attrs.get("keepdims", True))
    noop = bool(attrs.get("noop_with_empty_axes", False))
    static = attrs.get("axes")

    def run(x, axes=None):
        ax = ints(axes) if axes is not None else static
        if not ax:
            if noop:
                return (x,)
            ax = list(range(x.dim()))
        dims = tuple(sorted(norm_axis(a, x.dim()) for a in ax))
        if x.dim() == 0:
            dims = ()
        xf = _acc(x)
        if x.numel() == 0 and op in ("max", "min"):
            shape = [1 if i in dims else s for i, s in enumerate(x.shape)] if keep else \
                [s for i, s in enumerate(x.shape) if i not in dims]
            fill = float("-inf") if op == "max" else float("inf")
            if x.dtype == torch.bool:
                fill = op == "min"
            elif not x.dtype.is_floating_point:
                info = torch.iinfo(x.dtype)
                fill = info.min if op == "max" else info.max
            return (torch.full(shape, fill, dtype=x.dtype, device=x.device),)
        if not dims:
            y = {"sum": xf, "mean": xf, "max": xf, "min": xf, "prod": xf, "l1": xf.abs(), "l2": xf.abs(),
                 "log_sum": torch.log(xf), "log_sum_exp": xf, "sum_square": xf * xf}[op]
            return (y.to(x.dtype),)
        if op == "sum":
            y = torch.sum(xf, dims, keepdim=keep)
        elif op == "mean":
            y = torch.mean(xf if xf.dtype.is_floating_point else xf.double(), dims, keepdim=keep)
        elif op == "max":
            y = torch.amax(x, dims, keepdim=keep)
        elif op == "min":
            y = torch.amin(x, dims, keepdim=keep)
        elif op == "prod":
            y = xf
            for d in sorted(dims, reverse=True):
                y = torch.prod(y, d, keepdim=keep)
        elif op == "l1":
            y = torch.sum(xf.abs(), dims, keepdim=keep)
        elif op == "l2":
            y = torch.sqrt(torch.sum(xf.double() * xf.double() if not xf.dtype.is_floating_point else xf * xf,
                                     dims, keepdim=keep))
        elif op == "log_sum":
            y = torch.log(torch.sum(xf, dims, keepdim=keep))
        elif op == "log_sum_exp":
            y = torch.logsumexp(xf if xf.dtype.is_floating_point else xf.double(), dims, keepdim=keep)
        elif op == "sum_square":
            y = torch.sum(xf * xf, dims, keepdim=keep)
        else:
            raise BuildError(f"Unknown reduce op {op!r}.")
        return (y.to(x.dtype),)
    return run


@tactic("ArgReduce")
def make_argreduce(attrs, ctx):
    op, axis = attrs["op"], attrs.get("axis", 0)
    keep, last = bool(attrs.get("keepdims", True)), bool(attrs.get("select_last_index", False))

    def run(x):
        a = norm_axis(axis, x.dim())
        xs = torch.flip(x, [a]) if last else x
        fn = torch.argmax if op == "max" else torch.argmin
        i = fn(xs, dim=a, keepdim=keep)
        if last:
            i = x.shape[a] - 1 - i
        return (i.to(torch.int64),)
    return run


@tactic("SoftMax")
def make_softmax(attrs, ctx):
    axis, log = attrs.get("axis", -1), bool(attrs.get("log", False))

    def run(x):
        fn = torch.log_softmax if log else torch.softmax
        if x.is_cuda and x.dtype in _LOW:
            # CUDA's softmax keeps its max/sum statistics in FP32 for half inputs: one kernel
            return (fn(x, norm_axis(axis, x.dim())),)
        return (fn(_acc(x), norm_axis(axis, x.dim())).to(x.dtype),)
    return run


def cached_cast():
    """``cast(slot, p, dtype)``: ``p`` in ``dtype``, cast once per weight tensor and slot.

    FP16/BF16 engines store normalization weights in the compute dtype already (the cast is then a
    no-op); where they differ, a constant weight (the same tensor object on every call) is cast
    once, so no cast kernel runs per inference or is recorded into a CUDA graph.
    """
    memo: dict = {}

    def cast(slot: int, p, dtype):
        if p is None or p.dtype == dtype:
            return p
        hit = memo.get(slot)
        if hit is not None and hit[0]() is p and hit[1] == dtype:
            return hit[2]
        out = p.to(dtype)
        if not p.is_meta:
            memo[slot] = (weakref.ref(p), dtype, out)
        return out
    return cast


@tactic("Normalization")
def make_normalization(attrs, ctx):
    """Outputs: y, then the sum x + residual (sum_output), then y's 8-bit codes (codes_scale): QuantizeLinear of
    y as stored (in the input's dtype), divided in FP32."""
    kind = attrs.get("type", "layer")
    eps = float(attrs.get("epsilon", 1e-5))
    axis = attrs.get("axis", -1)
    groups = attrs.get("num_groups", 1)
    sum_output = bool(attrs.get("sum_output", False))
    codes = codes_of(attrs)
    cast = cached_cast()

    def affine(y, scale, bias, shape):
        if scale is not None:
            y = y * _acc(scale).reshape(shape)
        if bias is not None:
            y = y + _acc(bias).reshape(shape)
        return y

    def normalize(x, scale, bias, mean, var):
        r = x.dim()
        if kind in ("layer", "rms"):
            a = norm_axis(axis, r)
            dims = tuple(range(a, r))
            shape = tuple(x.shape[a:])
            fits = all(p is None or tuple(p.shape) == shape for p in (scale, bias))
            if fits and x.dtype.is_floating_point and x.dtype != torch.float64 and not x.is_meta:
                # one fused kernel; for FP16/BF16 inputs it accumulates mean and variance in FP32
                w, b = cast(0, scale, x.dtype), cast(1, bias, x.dtype)
                if kind == "layer":
                    return F.layer_norm(x, shape, w, b, eps)
                if hasattr(F, "rms_norm") and b is None:      # (torch's RMS norm takes no bias)
                    return F.rms_norm(x, shape, w, eps)
            xf = _acc(x)
            if kind == "layer":
                mu = xf.mean(dims, keepdim=True)
                var_ = ((xf - mu) ** 2).mean(dims, keepdim=True)
                y = (xf - mu) * torch.rsqrt(var_ + eps)
            else:
                y = xf * torch.rsqrt((xf * xf).mean(dims, keepdim=True) + eps)
            pshape = list(x.shape[a:])
            if scale is not None and scale.dim() != len(pshape):
                pshape = list(scale.shape) if scale.dim() <= len(pshape) else pshape
            y = affine(y, scale, bias, [-1] if scale is not None and scale.dim() == 1 and len(pshape) == 1
                       else (list(scale.shape) if scale is not None else pshape))
            return y.to(x.dtype)
        xf = _acc(x)
        cshape = [1, -1] + [1] * (r - 2)
        if kind == "batch":
            y = (xf - _acc(mean).reshape(cshape)) * torch.rsqrt(_acc(var).reshape(cshape) + eps)
            return affine(y, scale, bias, cshape).to(x.dtype)
        if kind == "instance":
            dims = tuple(range(2, r))
            mu = xf.mean(dims, keepdim=True)
            v = ((xf - mu) ** 2).mean(dims, keepdim=True)
            y = (xf - mu) * torch.rsqrt(v + eps)
            return affine(y, scale, bias, cshape).to(x.dtype)
        if kind == "group":
            n, c = x.shape[0], x.shape[1]
            g = xf.reshape(n, groups, -1)
            mu = g.mean(-1, keepdim=True)
            v = ((g - mu) ** 2).mean(-1, keepdim=True)
            y = ((g - mu) * torch.rsqrt(v + eps)).reshape(x.shape)
            if scale is not None and scale.numel() == groups and c != groups:
                scale = scale.repeat_interleave(c // groups)
                bias = bias.repeat_interleave(c // groups) if bias is not None else None
            return affine(y, scale, bias, cshape).to(x.dtype)
        raise BuildError(f"Unknown normalization type {kind!r}; use layer, rms, instance, group or batch.")

    def run(x, scale=None, bias=None, mean=None, var=None, residual=None):
        if residual is not None:        # fused residual add (passes/fuse_add_norm.py): normalize x + residual
            x = x + residual
        y = normalize(x, scale, bias, mean, var)
        outs = (y, x) if sum_output else (y,)
        return outs if codes is None else (*outs, codes(y))
    return run


def codes_of(attrs) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer's codes output as a function of its float output y as stored (``quantize_values``), or None
    without codes_scale."""
    scale = attrs.get("codes_scale")
    if scale is None:
        return None
    zp, to = int(attrs.get("codes_zero_point", 0)), attrs["codes_to"]
    return lambda y: quantize_values(y, float(scale), zp, to)


@tactic("TopK")
def make_topk(attrs, ctx):
    axis, largest = attrs.get("axis", -1), bool(attrs.get("largest", True))

    def run(x, k):
        kk = ints(k)[0]
        a = norm_axis(axis, x.dim())
        if x.is_meta:
            shape = list(x.shape)
            shape[a] = kk
            return (torch.empty(shape, dtype=x.dtype, device="meta"), torch.empty(shape, dtype=torch.int64,
                                                                                  device="meta"))
        # a stable sort keeps ties in index order, as ONNX requires
        key = _acc(x) if x.is_floating_point() else x.to(torch.int64)
        order = torch.sort(key, dim=a, descending=largest, stable=True).indices
        idx = order.narrow(a, 0, kk)
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or x.dtype in _GATHERABLE:
            return (torch.gather(x, a, idx), idx)
        return (torch.gather(key, a, idx).to(x.dtype), idx)      # uint16/32/64: no gather kernel
    return run
