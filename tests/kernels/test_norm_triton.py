"""The fused residual add + LayerNorm/RMSNorm Triton kernel (kernels/norm_triton.py), through Triton's
interpreter on the CPU (compiled on a GPU), against torch's own layer norm on the FP32 sum."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":                      # Triton's interpreter runs the kernel on the CPU; on a GPU it compiles
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.kernels.norm_triton import add_norm  # noqa: E402


def _reference(x, r, w, b, eps, rms=False):
    s = x.float() + (r.float() if r is not None else 0.0)
    n = x.shape[-1]
    wf = w.float() if w is not None else None
    bf = b.float() if b is not None else None
    y = F.rms_norm(s, (n,), wf, eps) + (bf if bf is not None else 0.0) if rms else F.layer_norm(s, (n,), wf, bf, eps)
    return y, s


def _tensors(shape, dtype, seed, residual=True, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEV, dtype)
    r = torch.randn(shape, generator=g).to(DEV, dtype) if residual else None
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV, dtype) if affine else None
    b = torch.randn(shape[-1], generator=g).to(DEV, dtype) if affine else None
    return x, r, w, b


TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 4e-3}}


@pytest.mark.parametrize("shape", [(3, 40), (2, 7, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("write_sum", [False, True])
def test_add_layer_norm_matches_torch(shape, dtype, write_sum):
    x, r, w, b = _tensors(shape, dtype, seed=len(shape) + write_sum)
    y, s = add_norm(x, r, w, b, 1e-5, write_sum)
    ref_y, ref_s = _reference(x, r, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y.float(), ref_y, **TOL[dtype])
    if write_sum:
        torch.testing.assert_close(s, ref_s.to(dtype), rtol=0, atol=0)     # the FP32 sum rounded once
    else:
        assert s is None


@pytest.mark.parametrize("rows_per_program", [None, 1, 4])
def test_row_packings_and_a_ragged_last_program(rows_per_program):
    x, r, w, b = _tensors((5, 3, 40), torch.float32, seed=3)
    y, _ = add_norm(x, r, w, b, 1e-6, rows_per_program=rows_per_program)
    torch.testing.assert_close(y, _reference(x, r, w, b, 1e-6)[0], **TOL[torch.float32])


def test_plain_norm_rms_and_no_affine():
    x, _, w, _ = _tensors((4, 24), torch.float32, seed=5, residual=False)
    y, _ = add_norm(x, None, None, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (24,), eps=1e-5), **TOL[torch.float32])
    y, _ = add_norm(x, None, w, None, 1e-5, rms=True)
    torch.testing.assert_close(y, F.rms_norm(x, (24,), w, 1e-5), **TOL[torch.float32])


def test_strided_operands_are_read_in_place():
    """A [B, S, D] operand laid out as [S, B, D] (a transposed view) is addressed, not copied."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, 48, generator=g).to(DEV).transpose(0, 1)
    r = torch.randn(2, 6, 48, generator=g).to(DEV)
    y, s = add_norm(x, r, None, None, 1e-5, write_sum=True)
    ref_y, ref_s = _reference(x, r, None, None, 1e-5)
    torch.testing.assert_close(y, ref_y, **TOL[torch.float32])
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)


def test_hidden_size_limit():
    x = torch.zeros(1, 8193, device=DEV)
    with pytest.raises(ValueError, match="8192"):
        add_norm(x, None, None, None, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 1000, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sizes_against_torch(n, dtype):
    x, r, w, b = _tensors((64, 3, n), dtype, seed=n)
    y, s = add_norm(x, r, w, b, 1e-12, write_sum=True)
    ref_y, ref_s = _reference(x, r, w, b, 1e-12)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else TOL[torch.float16]
    torch.testing.assert_close(y.float(), ref_y, **tol)
    torch.testing.assert_close(s, ref_s.to(dtype), rtol=0, atol=0)
