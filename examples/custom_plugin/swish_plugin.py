"""A user's plugin in one file: SwishBeta, y = x · sigmoid(β·x), a layer Kiln does not know.

Import this module (or pass ``--plugins swish_plugin.py``) before building or loading an engine
that uses it. The engine stores only ("SwishBeta", "example", "1") and the field ``beta``.
"""
from __future__ import annotations

import torch

import kiln
from kiln.plugins import Plugin, TensorDesc, field


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def swish_beta(x_ptr, y_ptr, n, beta, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = x / (1.0 + tl.exp(-beta * x))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    return swish_beta


@kiln.register
class SwishBeta(Plugin):
    name = "SwishBeta"
    namespace = "example"
    version = "1"
    tactics = {"cuda": ("triton", "torch"), "cpu": ("torch", "triton")}

    beta = field(float, 1.0, doc="slope inside the sigmoid")

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        return [TensorDesc(inputs[0].shape, inputs[0].dtype)]          # same shape (symbolic dims pass through)

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        return desc.dtype in ("float32", "float16", "bfloat16")

    def forward(self, inputs, outputs, workspace, tactic):
        x, y = inputs[0], outputs[0]
        if tactic == "triton":
            n = x.numel()
            block = 1024
            _triton_kernel()[((n + block - 1) // block,)](x.contiguous(), y, n, float(self.beta), BLOCK=block)
        else:
            torch.mul(x, torch.sigmoid(self.beta * x), out=y)
