"""FullyConnected + bias + GELU through cuBLASLt's GELU epilogue: offered for FP16/BF16 only, and within
an FP16 output rounding of the exact (erf) GELU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.linear import make_fc_gelu_epilogue
from kiln.kernels.registry import KernelContext, tactics_for


def _names(precision: str, device: str = "cuda", act: str = "gelu") -> list[str]:
    attrs = {"activation": act}
    return [t.name for t in tactics_for("FullyConnected", attrs, KernelContext(device=device, precision=precision))]


def test_offered_for_low_precision_gelu_only() -> None:
    assert _names("fp16")[0] == "torch" and "cublaslt_gelu" in _names("fp16")     # torch stays the reference
    assert "cublaslt_gelu" in _names("bf16")
    assert "cublaslt_gelu" not in _names("fp32")                  # FP32 engines keep the exact erf GELU
    assert "cublaslt_gelu" not in _names("fp16", act="relu")
    assert "cublaslt_gelu" not in _names("fp16", device="cpu")


def test_cpu_fallback_is_exact() -> None:
    x, w, b = torch.randn(2, 5, 16), torch.randn(8, 16), torch.randn(8)
    (y,) = make_fc_gelu_epilogue({"activation": "gelu"}, KernelContext())(x, w, b)
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_within_output_rounding(dtype) -> None:
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(4, 128, 768, device="cuda", generator=g).to(dtype)
    w = (torch.randn(3072, 768, device="cuda", generator=g) * 0.03).to(dtype)
    b = torch.randn(3072, device="cuda", generator=g).to(dtype)
    (y,) = make_fc_gelu_epilogue({"activation": "gelu"}, KernelContext(device="cuda", precision="fp16"))(x, w, b)
    exact = F.gelu(F.linear(x.float(), w.float(), b.float()))
    assert y.shape == (4, 128, 3072)
    rel = float((y.float() - exact).norm() / exact.norm())
    assert rel < (2e-3 if dtype == torch.float16 else 1e-2)
