"""The ``torch`` tactic's global average pool (kernels/conv.py ``_global_average``) against numpy's float64 mean:
ranks 3 to 6, channels-last memory, and FP16/BF16 inputs averaged in FP32 and returned in their own dtype."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.kernels.registry import KernelContext, get_tactic

POOL = get_tactic("Pooling", "torch").make({"type": "average"}, KernelContext(device="cpu"))


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 8, 7, 7), (2, 4, 3, 5, 2), (1, 2, 2, 3, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_matches_numpy(shape, channels_last):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 10 + 3
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y, = POOL(x)
    want = x.double().numpy().mean(axis=tuple(range(2, x.dim())), keepdims=True)
    assert y.dtype == torch.float32 and tuple(y.shape) == want.shape
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_keep_their_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 6, 9, 9, generator=g) * 4).to(dtype)
    y, = POOL(x)
    want = x.double().numpy().mean(axis=(2, 3), keepdims=True)
    assert y.dtype == dtype and tuple(y.shape) == want.shape
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(y.double().numpy(), want, rtol=tol, atol=tol)
