"""QFullyConnected on torch's 8-bit GEMMs, the epilogue in torch (quantize.layer_epilogue).

``torch._int_mm`` multiplies int8 by int8 into int32 (cuBLASLt's IMMA on the GPU) and ``torch._scaled_mm``
FP8 E4M3 by E4M3 into FP32 (cuBLASLt, compute capability 8.9 or later). Both read the weight [N, K] as its
transposed view, the column-major B these GEMMs take without a copy. The sums are the Triton kernel's
(int8_gemm.py): uint8 codes shifted to int8, the zero point's share taken out of the bias
(``epilogue_terms``). The builder times them against the Triton kernel and keeps the fastest; shapes a GEMM
refuses (on the GPU: M <= 16, K or N not a multiple of 8 or 16) make that tactic invalid for the layer.
"""
from __future__ import annotations

import torch

from kiln.kernels._util import per_tensor
from kiln.kernels.int8_gemm import epilogue_terms
from kiln.kernels.quantize import layer_epilogue
from kiln.kernels.registry import tactic


def _codes(fp8: bool):
    def ok(attrs, ctx) -> bool:
        codes = ctx.input_dtypes[0] if ctx.input_dtypes else None
        return codes in (("float8_e4m3fn",) if fp8 else ("int8", "uint8"))
    return ok


def _make(fp8: bool):
    def make(attrs, ctx):
        finish = layer_epilogue(attrs)
        cache: dict = {}
        ones: dict = {}

        def run(x, w, bias):
            ep = per_tensor(cache, w, lambda: epilogue_terms(attrs, w, bias, x.dtype, ctx.layer_name))
            rows = x.reshape(-1, x.shape[-1])
            if x.dtype == torch.uint8:
                rows = (rows.to(torch.int16) - 128).to(torch.int8)
            if fp8:
                one = ones.get(x.device)
                if one is None:
                    one = ones[x.device] = torch.ones((), dtype=torch.float32, device=x.device)
                acc = torch._scaled_mm(rows.contiguous(), w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
                y = (acc + ep.ibias.to(torch.float32)) * ep.mult
            else:
                y = (torch._int_mm(rows.contiguous(), w.t()) + ep.ibias).to(torch.float32) * ep.mult
            return finish(y.reshape(*x.shape[:-1], w.shape[0]))
        return run
    return make


tactic("QFullyConnected", "int_mm", supports=_codes(False), priority=1)(_make(False))
tactic("QFullyConnected", "scaled_mm", supports=_codes(True), priority=1)(_make(True))
