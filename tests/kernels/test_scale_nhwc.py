"""The channels-last rescale kernel (squeeze-and-excitation's x * s[N,C,1,1]) through Triton's
interpreter on the CPU, against torch's broadcasting ops."""
from __future__ import annotations

import os

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.kernels.registry import KernelContext, tactics_for  # noqa: E402
from kiln.kernels.scale_nhwc import make_scale_nhwc, split_operands  # noqa: E402


def _cl(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", ["prod", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_scales", [True, False])
@pytest.mark.parametrize("swap", [False, True])
def test_matches_torch(op, dtype, batch_scales, swap) -> None:
    x = _cl(2, 24, 5, 3, dtype=dtype)
    s = torch.randn(2 if batch_scales else 1, 24, 1, 1).to(dtype).to(DEV)
    (y,) = make_scale_nhwc({"op": op}, KernelContext(device=DEV))(*((s, x) if swap else (x, s)))
    want = (x.float() * s.float()) if op == "prod" else (x.float() + s.float())
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    torch.testing.assert_close(y.float(), want, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=1e-3)


def test_other_shapes_fall_back_to_torch() -> None:
    x = _cl(2, 8, 4, 4)
    assert split_operands(x, torch.randn(2, 8, 4, 1, device=DEV)) is None        # not a per-channel scale
    assert split_operands(x.contiguous(), torch.randn(2, 8, 1, 1, device=DEV)) is None   # NCHW: torch is fine
    run = make_scale_nhwc({"op": "prod"}, KernelContext(device=DEV))
    other = torch.randn(2, 8, 4, 1, device=DEV)
    torch.testing.assert_close(run(x, other)[0], x * other)


def test_offered_on_cuda_after_torch() -> None:
    names = [t.name for t in tactics_for("ElementWise", {"op": "prod"}, KernelContext(device="cuda"))]
    assert names[0] == "torch" and "triton_nhwc_scale" in names
    assert "triton_nhwc_scale" not in [t.name for t in tactics_for("ElementWise", {"op": "prod"},
                                                                    KernelContext(device="cpu"))]
    assert "triton_nhwc_scale" not in [t.name for t in tactics_for("ElementWise", {"op": "max"},
                                                                    KernelContext(device="cuda"))]
