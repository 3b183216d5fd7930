"""The ``onednn_wide`` convolution tactic (kernels/cpu_conv_wide.py): one-column images as the transposed oneDNN
convolution, against a float64 convolution; other shapes through the plain ``onednn`` path; offered only where
the width is untouched by stride, dilation, padding and a fused pool."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.cpu_conv import onednn_available
from kiln.kernels.cpu_conv_wide import make_convolution_onednn_wide
from kiln.kernels.registry import KernelContext, tactics_for

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN's convolution ops")
CPU = KernelContext(device="cpu", precision="fp32", input_dtypes=("float32",))
EPS = 2.0 ** -24


def _attrs(stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), **kw):
    return {"stride": list(stride), "pads": list(pads), "dilation": list(dilation), "groups": 1, **kw}


def _reference(x, w, b, attrs, residual=None):
    """float64 conv (+ residual) (+ activation), and a bound on FP32 accumulation error: k·ε·Σ|x||w| per output."""
    bh, bw, eh, ew = attrs["pads"]
    xd = F.pad(x.double(), [bw, ew, bh, eh])
    conv = lambda a, c, d: F.conv2d(a, c, d, attrs["stride"], 0, attrs["dilation"])     # noqa: E731
    y = conv(xd, w.double(), None if b is None else b.double())
    k = w[0].numel() + 2
    bound = k * EPS * (conv(xd.abs(), w.double().abs(), None if b is None else b.double().abs()))
    if residual is not None:
        y = y + residual.double()
        bound = bound + EPS * residual.double().abs()
    if attrs.get("activation") == "relu":
        y = y.relu()
    elif attrs.get("activation") == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
        bound = 1.13 * bound + 16 * EPS * y.abs().clamp(min=1.0)
    return y, bound + 1e-30


@pytest.mark.parametrize("attrs", [
    _attrs(),
    _attrs(stride=(2, 1), pads=(1, 0, 2, 0), dilation=(2, 1)),
    _attrs(activation="gelu_tanh"),
    _attrs(activation="relu", pads=(2, 0, 2, 0)),
], ids=["plain", "strided_padded_dilated", "gelu_tanh", "relu_padded"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_column_matches_float64(attrs, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 41, 1, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 8, 5, 1, generator=g), torch.randn(16, generator=g) if bias else None
    (y,) = make_convolution_onednn_wide(attrs, CPU)(x, w, b)
    ref, bound = _reference(x, w, b, attrs)
    assert y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all()


def test_residual_and_weight_view_kept():
    """relu(conv + r) with the residual turned too; a second call reuses the weight's view (the packed copy)."""
    g = torch.Generator().manual_seed(4)
    attrs = _attrs(activation="relu")
    x, w, b = torch.randn(1, 8, 30, 1, generator=g), torch.randn(8, 8, 3, 1, generator=g), torch.randn(8, generator=g)
    r = torch.randn(1, 8, 28, 1, generator=g)
    run = make_convolution_onednn_wide(attrs, CPU)
    first = run(x, w, b, r)[0]
    ref, bound = _reference(x, w, b, attrs, residual=r)
    assert ((first.double() - ref).abs() <= bound).all()
    assert torch.equal(run(x, w, b, r)[0], first)
    assert torch.equal(run(x, w.clone(), b, r)[0], first)     # a new weight tensor: its own view and packing


@pytest.mark.parametrize("r_shape", [(28, 1), (1, 8, 1, 1), (1, 8, 28, 1)], ids=["rank2", "per_channel", "full"])
def test_broadcast_residuals(r_shape):
    """A residual of lower rank runs the plain path; 4-D ones (full or broadcasting) are turned with the output."""
    g = torch.Generator().manual_seed(6)
    attrs = _attrs()
    x, w, b = torch.randn(1, 8, 30, 1, generator=g), torch.randn(8, 8, 3, 1, generator=g), torch.randn(8, generator=g)
    r = torch.randn(*r_shape, generator=g)
    (y,) = make_convolution_onednn_wide(attrs, CPU)(x, w, b, r)
    ref, bound = _reference(x, w, b, attrs, residual=r)
    assert y.shape == ref.shape and ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("x_shape, w_shape", [((1, 8, 12, 10), (16, 8, 3, 3)), ((1, 8, 1, 1), (16, 8, 1, 1)),
                                              ((1, 8, 12, 3), (16, 8, 3, 1))],
                         ids=["square", "single_pixel", "three_columns"])
def test_other_shapes_run_plain_onednn(x_shape, w_shape):
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(*x_shape, generator=g), torch.randn(*w_shape, generator=g), torch.randn(w_shape[0], generator=g)
    (y,) = make_convolution_onednn_wide(_attrs(), CPU)(x, w, b)
    ref, bound = _reference(x, w, b, _attrs())
    assert ((y.double() - ref).abs() <= bound).all()


def test_meta_shapes():
    (y,) = make_convolution_onednn_wide(_attrs(stride=(2, 1)), CPU)(torch.empty(1, 8, 41, 1, device="meta"),
                                                                   torch.empty(16, 8, 5, 1, device="meta"))
    assert y.is_meta and y.shape == (1, 16, 19, 1)


@pytest.mark.parametrize("attrs, offered", [
    (_attrs(stride=(2, 1)), True),
    (_attrs(stride=(1, 2)), False),
    (_attrs(dilation=(1, 2)), False),
    (_attrs(pads=(0, 1, 0, 0)), False),
    (_attrs(pool={"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1]}), False),
], ids=["height_stride", "width_stride", "width_dilation", "width_pad", "fused_pool"])
def test_offered_only_where_the_width_is_untouched(attrs, offered):
    names = [t.name for t in tactics_for("Convolution", attrs, CPU)]
    assert ("onednn_wide" in names) == offered
    assert "onednn_wide" not in [t.name for t in tactics_for("Convolution", attrs, KernelContext(device="cuda"))]
