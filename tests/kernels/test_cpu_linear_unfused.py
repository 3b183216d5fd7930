"""The CPU FullyConnected tactic ``onednn_unfused`` (kernels/cpu_linear.py): oneDNN GEMM on a prepacked
weight, the activation by torch in place afterwards. Each activation, input rank, bias or none, changing row
counts, against FP64 formulas; offered only for FP32 CPU layers with an activation; an MLP built with it
(and saved and loaded) against ONNX Runtime."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kiln
import kiln.onnx
from kiln.kernels.cpu_linear import make_fc_onednn_unfused, onednn_linear_available
from kiln.kernels.registry import TACTICS, KernelContext, get_tactic, tactics_for
from test_cpu_linear import CPU, _check      # FP32 products over K <= 24 terms: rounding is far below its bound

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN fused linear")

REF_ACT = {       # independent FP64 formulas
    "relu": lambda t: t.clamp(min=0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5)),
    "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t ** 3))),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "sigmoid": lambda t: 1 / (1 + torch.exp(-t)),
    "tanh": lambda t: 1 - 2 / (torch.exp(2 * t) + 1),
    "hard_swish": lambda t: t * (t + 3).clamp(0, 6) / 6,
    "clip": lambda t: t.clamp(0.0, 6.0),
    "leaky_relu": lambda t: torch.where(t > 0, t, 0.1 * t),
    "elu": lambda t: torch.where(t > 0, t, 0.7 * torch.expm1(t)),
}
PARAMS = {"clip": (0.0, 6.0), "leaky_relu": (0.1, None), "elu": (0.7, None)}


def _attrs(act):
    alpha, beta = PARAMS.get(act, (None, None))
    return {"activation": act, "alpha": alpha, "beta": beta}


@pytest.mark.parametrize("act", list(REF_ACT))
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64(act, shape, bias):
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(shape, generator=g)
    w = torch.randn(10, 24, generator=g) / 24 ** 0.5
    b = torch.randn(10, generator=g) if bias else None
    y, = make_fc_onednn_unfused(_attrs(act), CPU)(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    _check(y, REF_ACT[act](ref))


def test_row_counts_weights_and_layouts_change():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    run = make_fc_onednn_unfused(_attrs("gelu"), CPU)
    for rows in (1, 7, 1, 3, 9, 2):
        x = torch.randn(rows, 8, generator=g)
        _check(run(x, w, b)[0], REF_ACT["gelu"](F.linear(x.double(), w.double(), b.double())))
    w2 = torch.randn(6, 8, generator=g)
    x = torch.randn(4, 8, generator=g)
    _check(run(x, w2, b)[0], REF_ACT["gelu"](F.linear(x.double(), w2.double(), b.double())))
    xt = torch.randn(8, 5, generator=g).t()            # a non-contiguous input, left unchanged
    before = xt.clone()
    _check(run(xt, w, b)[0], REF_ACT["gelu"](F.linear(xt.double(), w.double(), b.double())))
    assert torch.equal(xt, before)


def test_meta_and_offered_only_with_an_activation(monkeypatch):
    y, = make_fc_onednn_unfused(_attrs("gelu"), CPU)(torch.empty(3, 5, 8, device="meta"), torch.randn(4, 8), None)
    assert y.is_meta and tuple(y.shape) == (3, 5, 4)
    names = lambda attrs, ctx: [t.name for t in tactics_for("FullyConnected", attrs, ctx)]  # noqa: E731
    assert "onednn_unfused" in names(_attrs("gelu"), CPU)
    assert "onednn_unfused" not in names(_attrs(None), CPU)          # same as ``onednn``: nothing to time
    assert "onednn_unfused" not in names(_attrs("gelu"), KernelContext(device="cpu", precision="bf16"))
    assert "onednn_unfused" not in names(_attrs("gelu"), KernelContext(device="cuda", precision="fp32"))
    monkeypatch.setattr("kiln.kernels.cpu_linear.onednn_linear_available", lambda: False)
    assert "onednn_unfused" not in names(_attrs("gelu"), CPU)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(F.gelu(self.a(x)))))


def test_mlp_matches_onnxruntime(monkeypatch, tmp_path):
    import onnxruntime as ort
    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(_MLP().eval(), (torch.randn(2, 7, 12),), f, input_names=["x"], opset_version=17,
                      dynamo=False)
    data = f.getvalue()
    # one candidate per layer, so nothing is timed: this tactic wherever there is an activation
    plain = dataclasses.replace(get_tactic("FullyConnected", "torch"), supports=lambda a, c: not a.get("activation"))
    monkeypatch.setitem(TACTICS, "FullyConnected", [get_tactic("FullyConnected", "onednn_unfused"), plain])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", optimization_level=3))
    fcs = [layer for layer in engine.layers if layer["kind"] == "FullyConnected"]
    assert [layer["tactic"] for layer in fcs] == ["onednn_unfused", "onednn_unfused", "torch"]
    x = np.random.default_rng(0).standard_normal((2, 7, 12)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    engine.save(str(tmp_path / "mlp.kiln"))
    loaded = kiln.load(str(tmp_path / "mlp.kiln"))
    assert [layer["tactic"] for layer in loaded.layers if layer["kind"] == "FullyConnected"][0] == "onednn_unfused"
    for e in (engine, loaded):
        got = next(iter(e.context().run({"x": x}).values()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
