"""FullyConnected on the CPU through oneDNN: prepacked weight, bias and activation fused.

Tactic ``onednn`` runs ``y = act(x @ W.T + b)`` as one call of torch's mkldnn pointwise-fused
linear (``torch.ops.mkldnn._linear_pointwise``) on the weight reordered once into oneDNN's layout
for the row count it meets; activations without a oneDNN post-op run after it on its fresh output.

Tactic ``onednn_unfused`` runs the same GEMM with its bias and leaves the activation to torch, in place
on the fresh output. oneDNN's GEMM applies an eltwise post-op block by block, which on some CPUs and
thread counts costs more than one vectorized pass over the output (docs/cpu.md); the builder times both
where the layer has an activation and keeps the faster.

Both come after kernels/cpu_gemm.py's padded-weight tactics in preference order (priority 2), so where the
builder finds them tied with those it keeps the padded GEMM.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.kernels.cpu_conv import PackedWeight, activation_in_place, fp32_cpu, unary_post_op
from kiln.kernels.pointwise import act_params, activation_fn
from kiln.kernels.registry import KernelContext, tactic


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN and the fused linear and weight-reorder ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def _ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return fp32_cpu(ctx) and onednn_linear_available()


def _unfused_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return bool(attrs.get("activation")) and _ok(attrs, ctx)


def as_rows(x: torch.Tensor) -> tuple[torch.Size, torch.Tensor]:
    """x's leading dims and x as a contiguous [rows, features] matrix (a view where x allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x.shape[:-1], x2 if x2.is_contiguous() else x2.contiguous()


def _make(attrs: dict[str, Any], fuse: bool) -> Callable[..., tuple]:
    """x @ W.T + b on a prepacked weight; the activation as a oneDNN post-op where ``fuse`` and oneDNN
    has it, else by torch on the GEMM's fresh output."""
    unary = unary_post_op(attrs) if fuse else ("none", [], None)
    after = None if unary is not None and unary[0] != "none" else activation_in_place(attrs)
    ref_act = activation_fn(attrs["activation"], *act_params(attrs)) if attrs.get("activation") else None
    packs = PackedWeight(lambda w, shape: torch.ops.mkldnn._reorder_linear_weight(w, shape[0]))
    linear = torch.ops.mkldnn._linear_pointwise
    plain = ("none", [], None)

    def run(x, w, b=None):
        if x.is_meta or x.dim() == 0:
            y = F.linear(x, w, b)
            return (ref_act(y) if ref_act is not None else y,)
        lead, x2 = as_rows(x)
        y = linear(x2, packs.get(w, x2), b, *(unary or plain))
        if after is not None:
            y = after(y)
        return (y.reshape(*lead, w.shape[0]),)
    return run


@tactic("FullyConnected", "onednn", devices=("cpu",), supports=_ok, priority=2)
def make_fc_onednn(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """x @ W.T + b with the activation as a oneDNN post-op, on a prepacked weight."""
    return _make(attrs, fuse=True)


@tactic("FullyConnected", "onednn_unfused", devices=("cpu",), supports=_unfused_ok, priority=2)
def make_fc_onednn_unfused(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """x @ W.T + b on a prepacked weight (oneDNN), then the activation in place by torch."""
    return _make(attrs, fuse=False)
