"""The generated conv epilogue kernel (bias + residual + activation in one pass), run through
Triton's interpreter on the CPU, against torch's own functional ops."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":                      # Triton's interpreter runs the kernel on the CPU; on a GPU it compiles
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.kernels.epilogue_triton import ACTS, apply_epilogue  # noqa: E402

REF = {
    "none": lambda v: v, "relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid, "hard_swish": F.hardswish,
    "hard_sigmoid": lambda v: torch.clamp(0.2 * v + 0.5, 0, 1), "gelu": F.gelu,
    "leaky_relu": lambda v: F.leaky_relu(v, 0.1), "tanh": torch.tanh, "clip": lambda v: torch.clamp(v, -0.5, 0.7),
}
PARAMS = {"hard_sigmoid": (0.2, 0.5), "leaky_relu": (0.1, 0.0), "clip": (-0.5, 0.7)}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_epilogue_matches_torch(act, residual):
    g = torch.Generator().manual_seed(ACTS.index(act))
    y = torch.randn(2, 12, 5, 3, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    b = torch.randn(12, generator=g).to(DEV)
    r = torch.randn(2, 12, 5, 3, generator=g).to(DEV).contiguous(memory_format=torch.channels_last) if residual else None
    ref = y + b.view(1, -1, 1, 1) + (r if r is not None else 0)
    ref = REF[act](ref)
    alpha, beta = PARAMS.get(act, (0.0, 0.0))
    out = apply_epilogue(y.clone(memory_format=torch.channels_last), b, r, act, alpha, beta, block=64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["silu", "relu", "hard_swish"])
def test_epilogue_residual_after_activation(act):
    g = torch.Generator().manual_seed(7)
    y = torch.randn(2, 12, 5, 3, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    b = torch.randn(12, generator=g).to(DEV)
    r = torch.randn(2, 12, 5, 3, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    ref = REF[act](y + b.view(1, -1, 1, 1)) + r                 # the shortcut after the activation
    out = apply_epilogue(y.clone(memory_format=torch.channels_last), b, r, act, block=64, residual_after=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_epilogue_into_a_concatenation_slice():
    g = torch.Generator().manual_seed(9)
    y = torch.randn(2, 6, 4, 3, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    b = torch.randn(6, generator=g).to(DEV)
    buf = torch.full((2, 4, 3, 10), 5.0, device=DEV).permute(0, 3, 1, 2)
    out = apply_epilogue(y.clone(memory_format=torch.channels_last), b, None, "silu", block=64, out=buf[:, 4:])
    assert out.data_ptr() == buf[:, 4:].data_ptr()
    torch.testing.assert_close(buf[:, 4:], F.silu(y + b.view(1, -1, 1, 1)), rtol=1e-5, atol=1e-6)
    assert bool((buf[:, :4] == 5).all())
