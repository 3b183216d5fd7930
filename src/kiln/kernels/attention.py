"""The fused ``Attention`` layer (made by passes/fuse_attention.py) on torch's SDPA.

``scaled_dot_product_attention`` picks flash / memory-efficient kernels on the GPU and never
materializes the S×S scores; on the CPU it is the math path. cuDNN's attention builds an execution
plan at its first call with each new input shape (milliseconds per layer), so tactic ``sdpa`` leaves
it out on the GPU, and ``sdpa_cudnn`` offers it to static builds only (``shape_setup``).

q, k and v arrive as strided views (passes/collapse_views.py makes them selects of a permuted
packed projection, e.g. [B, H, S, hd] with strides of a [B, S, 3, H, hd] tensor): every SDPA
backend reads them in place as long as the last dim is contiguous, so no tactic here calls
``.contiguous()``. The output's memory order follows q's on cuDNN, the CPU and (for a dense q)
flash attention, and is [B, S, H, hd] otherwise; with q in [B, S] order it is [B, S, H, hd] everywhere,
so the merge of heads after it (Transpose → Reshape[B, S, D]) stays a view. ``matmul_softmax``
folds [B, H] into one batch dim for cuBLAS, which copies such views; the builder times it
against the fused kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ir.layers import attr_default
from kiln.kernels.registry import tactic


_SCALE = attr_default("Attention", "scale")      # None: 1/sqrt(head size), as SDPA's own default


def _attend(attrs):
    """SDPA with the layer's scale and causality, on whichever backend torch picks."""
    scale = attrs.get("scale", _SCALE)
    causal = bool(attrs.get("causal", False))

    def attend(q, k, v, mask=None):
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=float(scale) if scale is not None else None)
        return (y,)
    return attend


def _on_backends(attend, backends: list, no_mask: str | None = None):
    """``attend`` restricted to ``backends`` on CUDA tensors; ``no_mask``: the tactic name a mask is refused with."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, mask=None):
        if q.is_meta or not q.is_cuda:
            return attend(q, k, v, mask)
        if no_mask and mask is not None:
            raise RuntimeError(f"{no_mask} takes no attention mask")
        with sdpa_kernel(backends):
            return attend(q, k, v, mask)
    return run


@tactic("Attention", "sdpa")
def make_sdpa(attrs, ctx):
    attend = _attend(attrs)
    if ctx.device != "cuda":
        return attend
    from torch.nn.attention import SDPBackend
    return _on_backends(attend, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _backend_tactic(name: str, backend_attr: str, needs_no_mask: bool = False, shape_setup: bool = False):
    def supports(attrs, ctx):
        return True

    @tactic("Attention", name, devices=("cuda",), supports=supports, shape_setup=shape_setup)
    def make(attrs, ctx):
        from torch.nn.attention import SDPBackend
        return _on_backends(_attend(attrs), [getattr(SDPBackend, backend_attr)], name if needs_no_mask else None)
    return make


for _name, _attr, _nomask, _setup in (("sdpa_flash", "FLASH_ATTENTION", True, False),
                                      ("sdpa_efficient", "EFFICIENT_ATTENTION", False, False),
                                      ("sdpa_cudnn", "CUDNN_ATTENTION", False, True)):
    _backend_tactic(_name, _attr, _nomask, _setup)


@tactic("Attention", "matmul_softmax", devices=("cuda",))
def make_attention_unfused(attrs, ctx):
    """The exported form on cuBLAS: two GEMMs around a softmax (whose statistics CUDA keeps in FP32).
    Short sequences with a mask can beat the fused kernels; the builder times both."""
    scale = attrs.get("scale", _SCALE)
    causal = bool(attrs.get("causal", False))

    fused = make_sdpa(attrs, ctx)

    def run(q, k, v, mask=None):
        if q.is_meta or causal:
            return fused(q, k, v, mask)
        s = torch.matmul(q, k.transpose(-1, -2))
        factor = float(scale) if scale is not None else q.shape[-1] ** -0.5
        if factor != 1.0:
            s = s * factor
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
        return (torch.matmul(torch.softmax(s, -1), v),)
    return run
