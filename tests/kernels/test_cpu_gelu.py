"""tanh-GELU on the CPU (kernels/pointwise.py ``gelu_tanh``): x·σ(2u) from GELU_SIGMOID_MIN FP32 elements on,
torch's own below; every path (the helper, activation_fn, the in-place epilogue table, an Activation layer, a
FullyConnected and a gemm convolution with the activation, a Pointwise step) against the formula in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.kernels import KernelContext, tactics_for
from kiln.kernels.cpu_conv import activation_in_place, make_convolution_gemm_cpu
from kiln.kernels.cpu_linear import make_fc_onednn_unfused, onednn_linear_available
from kiln.kernels.pointwise import GELU_SIGMOID_CHUNK, GELU_SIGMOID_MIN, activation_fn, gelu_tanh
from kiln.kernels.pointwise_fused import make_pointwise_torch

EPS = 2.0 ** -24
CPU = KernelContext(device="cpu", precision="fp32", input_dtypes=["float32"])


def _exact(x: np.ndarray) -> np.ndarray:
    """½x(1 + tanh(√(2/π)(x + 0.044715x³))) in float64; 1 + tanh(u) as 2/(1 + e^(-2u)) so large negative x keeps
    its relative accuracy."""
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
        y = x / (1 + np.exp(-2 * u))
    return np.where(np.isnan(x), np.nan, np.where(np.isposinf(x), np.inf, np.where(np.isneginf(x), np.nan, y)))


def _check(got: torch.Tensor, x: torch.Tensor) -> None:
    """Within 16 FP32 units of |x|: 2u carries ~6 roundings, which σ turns into an absolute error of at most
    max|t|σ(t) ≈ 0.28 of them times |x|; σ's own few ulp and the last product add about 4 more. The 1e-36 allows
    for a CPU set to flush denormals."""
    x64 = x.double().numpy()
    ref, y = _exact(x64), got.double().numpy()
    assert y.shape == ref.shape
    nan = np.isnan(ref)
    assert (np.isnan(y) == nan).all()
    finite = np.isfinite(ref)
    assert (y[~finite & ~nan] == ref[~finite & ~nan]).all()
    err = np.abs(y[finite] - ref[finite])
    bound = 16 * EPS * np.abs(x64[finite]) + 1e-36
    worst = int(np.argmax(err - bound))
    assert (err <= bound).all(), f"x={x64[finite][worst]!r}: {y[finite][worst]!r} vs {ref[finite][worst]!r}"


def _values(n: int, seed: int = 0) -> torch.Tensor:
    """Magnitudes from 1e-30 to 1e6, both signs, plus ±0, ±inf, NaN and values where x² or x³ overflow FP32."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.pow(10.0, torch.rand(n, generator=g, dtype=torch.float64) * 36 - 30)
    x = (mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)).float()
    x[: n // 2] = torch.randn(n // 2, generator=g) * 4            # most where GELU bends
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e20, -1e20, 3e13, -3e13,
                            -5.0, -10.0, -20.0, 1e-39, -1e-39])
    x[n // 2: n // 2 + len(special)] = special
    return x


@pytest.mark.parametrize("n", [GELU_SIGMOID_MIN - 1, GELU_SIGMOID_MIN, 260_096, 4 * GELU_SIGMOID_CHUNK + 1000],
                         ids=["torch_below", "sigmoid_at_min", "magika_size", "sliced"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "in_place"])
def test_helper_matches_float64(n: int, inplace: bool) -> None:
    x = _values(n)
    arg = x.clone()
    y = gelu_tanh(arg, inplace=inplace)
    _check(y, x)
    assert (y.data_ptr() == arg.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(arg, x) or torch.equal(arg.nan_to_num(), x.nan_to_num())    # input left alone


@pytest.mark.parametrize("shape, dims", [((512, 508), (1, 0)), ((1100, 1000), (1, 0))],
                         ids=["transposed", "transposed_large"])
def test_non_contiguous_keeps_layout_and_values(shape, dims) -> None:
    """A transposed input (magika's channels-last convolution output is one): same values; a large one runs
    torch's tanh-GELU (no slicing), a smaller one the sigmoid form in its own layout."""
    x = _values(shape[0] * shape[1], seed=1).reshape(shape).permute(*dims)
    y = gelu_tanh(x)
    _check(y, x)
    assert y.stride() == x.stride()
    z = x.clone()
    gelu_tanh(z, inplace=True)
    _check(z, x)


def test_other_dtypes_and_devices_run_torch() -> None:
    x = _values(GELU_SIGMOID_MIN * 2, seed=2)
    for dtype in (torch.float64, torch.bfloat16):
        xd = x.to(dtype)
        ref = torch.nn.functional.gelu(xd, approximate="tanh")
        assert torch.equal(gelu_tanh(xd).nan_to_num(), ref.nan_to_num())
    meta = gelu_tanh(torch.empty(64, 128, device="meta"))
    assert meta.is_meta and meta.shape == (64, 128)


def test_activation_table_and_in_place_table_use_it() -> None:
    x = _values(3 * GELU_SIGMOID_MIN, seed=3).reshape(3, -1)
    _check(activation_fn("gelu_tanh")(x), x)
    y = x.clone()
    out = activation_in_place({"activation": "gelu_tanh"})(y)
    assert out.data_ptr() == y.data_ptr()
    _check(out, x)


def test_activation_layer_and_pointwise_step() -> None:
    x = _values(2 * GELU_SIGMOID_MIN, seed=4).reshape(2, 64, -1)
    attrs = {"type": "gelu_tanh", "alpha": 0.0, "beta": 0.0}
    (act,) = tactics_for("Activation", attrs, CPU)
    _check(act.make(attrs, CPU)(x)[0], x)
    program = [{"op": "sum", "args": ["i0", 0.0]}, {"op": "gelu_tanh", "args": ["v0"]}]
    (y,) = make_pointwise_torch({"program": program}, CPU)(x)
    _check(y, x)


def _layer_input(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.skipif(not onednn_linear_available(), reason="torch without oneDNN's linear ops")
def test_fully_connected_epilogue() -> None:
    """x @ W.T + b, then the GELU in place on the GEMM's output ([1, 2048, 64] as magika's first Dense)."""
    x, w, b = _layer_input(2048 * 16, 5).reshape(1, 2048, 16), _layer_input(64 * 16, 6).reshape(64, 16), \
        _layer_input(64, 7)
    (y,) = make_fc_onednn_unfused({"activation": "gelu_tanh"}, CPU)(x, w, b)
    pre = torch.nn.functional.linear(x.double(), w.double(), b.double())
    # the GEMM's own rounding (16 terms) moves the GELU's input: allow GELU's slope (< 1.13) times it
    gemm_err = 16 * 16 * EPS * (x.double().abs() @ w.double().abs().T + b.double().abs())
    ref = torch.from_numpy(_exact(pre.numpy()))
    assert (y.double() - ref).abs().le(1.13 * gemm_err + 16 * EPS * pre.abs() + 1e-36).all()


def test_gemm_convolution_epilogue() -> None:
    """A 1x1 convolution through the ``gemm`` tactic (NHWC output) with the tanh-GELU in place."""
    x, w = _layer_input(8 * 32 * 32, 8).reshape(1, 8, 32, 32), _layer_input(16 * 8, 9).reshape(16, 8, 1, 1)
    attrs = {"stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1, "activation": "gelu_tanh"}
    (y,) = make_convolution_gemm_cpu(attrs, CPU)(x, w)
    pre = torch.nn.functional.conv2d(x.double(), w.double())
    gemm_err = 8 * 8 * EPS * torch.nn.functional.conv2d(x.double().abs(), w.double().abs())
    ref = torch.from_numpy(_exact(pre.numpy()))
    assert (y.double() - ref).abs().le(1.13 * gemm_err + 16 * EPS * pre.abs() + 1e-36).all()
