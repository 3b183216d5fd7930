"""FullyConnected on the CPU through a oneDNN matmul primitive made once per layer and row count.

Tactics ``onednn_gemm`` and ``onednn_gemm_unfused`` run ``y = act(x @ W.T + b)`` on the ``libdnnl`` of the
other oneDNN tactics (kernels/dnnl_api.py). The weight is copied once per layer into a plain [K, N] row-major
buffer whose rows are padded by ``PAD`` floats: with N·4 bytes a multiple of the 4 KiB page (N = 1024, 3072,
...) the rows of an unpadded B alias in the cache, and oneDNN's GEMM reads it much slower. A primitive per row
count M (at most MAX_PACKED_SHAPES) shares that buffer; bias is fused. ``onednn_gemm`` fuses the activation as
an eltwise post-op where oneDNN has it; ``onednn_gemm_unfused`` leaves it to torch, in place on the fresh
output. The builder times both against the other FullyConnected tactics. Without the library neither is offered.
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.errors import IncompatibleEngineError
from kiln.kernels.cpu_conv import MAX_PACKED_SHAPES, activation_in_place, fp32_cpu
from kiln.kernels.cpu_dnnl import eltwise_post_op
from kiln.kernels.cpu_linear import as_rows
from kiln.kernels.dnnl_api import (ALLOCATE, ARG_BIAS, ARG_DST, ARG_SCRATCHPAD, ARG_SRC, ARG_WEIGHTS, F32,
                                   LIBRARY_ENV, QUERY_SCRATCHPAD_MD, Dims, Dnnl, P, PrimitiveBase, library)
from kiln.kernels.pointwise import act_params, activation_fn
from kiln.kernels.registry import KernelContext, tactic

PAD = 16        # floats added to each row of the [K, N] weight copy (one 64-byte cache line)


class _Handles(PrimitiveBase):
    """Strided memory descriptors beside PrimitiveBase's tagged ones."""

    def _strided(self, dims: list[int], strides: list[int]) -> P:
        md = P()
        self.lib.check(self.lib.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), len(dims), Dims(*dims), F32, Dims(*strides)), "memory descriptor")
        self.handles.append(("memory_desc", md))
        return md


class PaddedWeight(_Handles):
    """A [N, K] weight and its [N] bias copied once: W as [K, N] row-major with rows of N + PAD floats in a
    buffer the library allocates, the bias as a kept contiguous tensor."""

    def __init__(self, lib: Dnnl, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().__init__(lib)
        n, k = w.shape
        self.n, self.k = n, k
        self.md = self._strided([k, n], [n + PAD, 1])
        self.memory = self._reordered(w.detach().contiguous(), self._strided([k, n], [1, k]), self.md)
        self.bias = None if b is None else b.detach().float().contiguous().clone()


class Matmul(_Handles):
    """One matmul primitive for M rows on a PaddedWeight (kept alive by it), bias and ``post`` (an eltwise
    post-op (algorithm, alpha, beta) or None) fused. ``run(x, y)`` executes it on contiguous [M, K] and [M, N]."""

    def __init__(self, lib: Dnnl, m: int, weight: PaddedWeight, post: tuple[int, float, float] | None) -> None:
        super().__init__(lib)
        d = lib.lib
        k, n = weight.k, weight.n
        self.weight = weight
        src, dst = self._strided([m, k], [k, 1]), self._strided([m, n], [n, 1])
        bias = None if weight.bias is None else self._strided([1, n], [n, 1])
        attr = self._attr_user_scratchpad()
        if post is not None:
            ops = P()
            lib.check(d.dnnl_post_ops_create(ctypes.byref(ops)), "post-ops")
            self.handles.append(("post_ops", ops))
            lib.check(d.dnnl_post_ops_append_eltwise(ops, post[0], ctypes.c_float(post[1]), ctypes.c_float(post[2])),
                      "eltwise post-op")
            lib.check(d.dnnl_primitive_attr_set_post_ops(attr, ops), "post-ops")
        pd = P()
        lib.check(d.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), lib.engine, src, weight.md, bias, dst, attr),
                  "matmul")
        self.handles.append(("primitive_desc", pd))
        scratch_md = self._query(pd, QUERY_SCRATCHPAD_MD, 0)
        self.prim = self._primitive(pd)
        self.src, self.dst = self._memory(src, None), self._memory(dst, None)
        bound = [(ARG_SRC, self.src), (ARG_WEIGHTS, weight.memory), (ARG_DST, self.dst),
                 (ARG_SCRATCHPAD, self._memory(scratch_md, ALLOCATE))]
        if bias is not None:
            bound.append((ARG_BIAS, self._memory(bias, ctypes.c_void_p(weight.bias.data_ptr()))))
        self._bind(bound)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._set(self.src, x.data_ptr())
        self._set(self.dst, y.data_ptr())
        self._execute()


def _ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return fp32_cpu(ctx) and library() is not None


def _fused_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return (not attrs.get("activation") or eltwise_post_op(attrs) is not None) and _ok(attrs, ctx)


def _unfused_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return bool(attrs.get("activation")) and _ok(attrs, ctx)


def _make(attrs: dict[str, Any], ctx: KernelContext, name: str, fuse: bool) -> Callable[..., tuple]:
    """x @ W.T + b through Matmul primitives on one PaddedWeight per weight tensor; the activation as a post-op
    where ``fuse``, else by torch in place."""
    lib = library()
    if lib is None:
        raise IncompatibleEngineError(
            f"Layer {ctx.layer_name[:60]!r} runs tactic {name}, which needs oneDNN's library: pip install "
            f"'kiln[cpu-onednn]' (or set {LIBRARY_ENV}), or rebuild the engine here with kiln build.")
    post = eltwise_post_op(attrs) if fuse and attrs.get("activation") else None
    act = None if post is not None else activation_in_place(attrs)
    ref_act = activation_fn(attrs["activation"], *act_params(attrs)) if attrs.get("activation") else None
    kept: dict[str, Any] = {"w": None, "b": None, "weight": None}
    prims: OrderedDict[int, Matmul] = OrderedDict()

    def primitive(m: int, w: torch.Tensor, b: torch.Tensor | None) -> Matmul:
        if kept["w"] is not w or kept["b"] is not b:
            kept.update(w=w, b=b, weight=PaddedWeight(lib, w, b))
            prims.clear()
        hit = prims.get(m)
        if hit is None:
            hit = prims[m] = Matmul(lib, m, kept["weight"], post)
            if len(prims) > MAX_PACKED_SHAPES:
                prims.popitem(last=False)
        else:
            prims.move_to_end(m)
        return hit

    def run(x, w, b=None):
        # operands that disagree (a damaged engine) or that oneDNN is not given take torch's path, whose checks
        # name the mismatch
        if (x.is_meta or x.dim() == 0 or x.dtype != torch.float32 or w.dtype != torch.float32 or w.dim() != 2
                or x.shape[-1] != w.shape[1] or x.numel() == 0 or w.numel() == 0
                or (b is not None and (b.dtype != torch.float32 or b.numel() != w.shape[0]))):
            y = F.linear(x, w, b)
            return (ref_act(y) if ref_act is not None else y,)
        lead, x2 = as_rows(x)
        p = primitive(x2.shape[0], w, b)
        y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
        p.run(x2, y)
        if act is not None:
            y = act(y)
        return (y.reshape(*lead, w.shape[0]),)
    return run


@tactic("FullyConnected", "onednn_gemm", devices=("cpu",), supports=_fused_ok, priority=1)
def make_fc_onednn_gemm(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """x @ W.T + b (+ the activation as a post-op) as one oneDNN matmul on a padded plain weight copy."""
    return _make(attrs, ctx, "onednn_gemm", fuse=True)


@tactic("FullyConnected", "onednn_gemm_unfused", devices=("cpu",), supports=_unfused_ok, priority=1)
def make_fc_onednn_gemm_unfused(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """x @ W.T + b as one oneDNN matmul on a padded plain weight copy, then the activation in place by torch."""
    return _make(attrs, ctx, "onednn_gemm_unfused", fuse=False)
