"""Fusion passes: each rewrite happens on the exported pattern, and the fused engine computes the
same values as ONNX Runtime on the unfused model."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln


def _export(model, args, names, dynamic=None, opset=17) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, f, input_names=names, opset_version=opset, dynamo=False,
                          dynamic_axes=dynamic)
    return f.getvalue()


def _build(model_bytes, profiles, level=3):
    return kiln.build(kiln.onnx.parse(model_bytes), kiln.BuildConfig(device="cpu", profiles=profiles,
                                                                    optimization_level=level))


def _check(model_bytes, engine, feeds, tol=2e-5):
    ref = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = list(engine.context().run(feeds).values())
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


class _Block(torch.nn.Module):
    """Attention with an additive mask, LayerNorm written out by hand, erf-GELU, SiLU."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ff, self.ff2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.g, self.b = torch.nn.Parameter(torch.rand(d) + 0.5), torch.nn.Parameter(torch.randn(d))

    def ln(self, x):
        mu = x.mean(-1, keepdim=True)
        d = x - mu
        return d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5) * self.g + self.b

    def forward(self, x, mask):
        B, S, D = x.shape
        sh = lambda t: t.view(B, S, self.h, D // self.h).transpose(1, 2)     # noqa: E731
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D // self.h) + (1.0 - mask[:, None, None, :]) * -1e4
        a = torch.matmul(torch.softmax(s, -1), v).transpose(1, 2).reshape(B, S, D)
        x = self.ln(x + self.o(a))
        y = self.ff(x)
        y = y * 0.5 * (1.0 + torch.erf(y / math.sqrt(2.0)))
        y = self.ff2(y)
        return x + y * torch.sigmoid(y)


@pytest.mark.parametrize("opset", [14, 17])
def test_transformer_block_fuses_and_matches(opset):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    b = _export(_Block(), (x, mask), ["x", "mask"], opset=opset)
    engine = _build(b, {"x": (2, 8, 32), "mask": (2, 8)})
    kinds = [layer["kind"] for layer in engine.layers]
    acts = [layer["attrs"].get("type") or layer["attrs"].get("activation") for layer in engine.layers]
    assert "Attention" in kinds and "SoftMax" not in kinds
    assert "Normalization" in kinds and not any(layer["kind"] == "Unary" for layer in engine.layers)
    assert "gelu" in acts and "silu" in acts
    assert "MatMul" not in kinds                       # every MatMul+bias became FullyConnected or Attention
    _check(b, engine, {"x": x.numpy(), "mask": mask.numpy()})
    unfused = _build(b, {"x": (2, 8, 32), "mask": (2, 8)}, level=0)
    assert len(unfused.layers) > len(engine.layers)
    _check(b, unfused, {"x": x.numpy(), "mask": mask.numpy()})


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.relu(self.c2(y) + y)                 # residual + ReLU
        return torch.nn.functional.silu(self.c3(z))   # SiLU as Sigmoid*Mul in the export


def test_conv_epilogues_fuse_and_match():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 10)
    b = _export(_ConvNet(), (x,), ["x"])
    engine = _build(b, {"x": (2, 4, 10, 10)})
    convs = [layer for layer in engine.layers if layer["kind"] == "Convolution"]
    assert [c["attrs"].get("activation") for c in convs] == ["relu", "relu", "silu"]
    assert convs[1]["attrs"].get("residual") is True and len(convs[1]["inputs"]) == 4
    assert len(engine.layers) == 3
    _check(b, engine, {"x": x.numpy()})


class _Shuffles(torch.nn.Module):
    def forward(self, x, y):
        a = x.permute(0, 2, 1).permute(0, 2, 1) + y       # transposes cancel
        return a.permute(2, 0, 1).permute(1, 2, 0)         # compose to identity as well


def test_transpose_pairs_cancel_and_repeats_merge():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    b = _export(_Shuffles(), (x, y), ["x", "y"])
    engine = _build(b, {"x": (2, 3, 4), "y": (2, 3, 4)})
    assert [layer["kind"] for layer in engine.layers] == ["ElementWise"] or \
        sum(layer["kind"] == "Shuffle" for layer in engine.layers) == 0
    _check(b, engine, {"x": x.numpy(), "y": y.numpy()})


class _Bottleneck(torch.nn.Module):
    """YOLO's C3 bottleneck: x + SiLU(conv(SiLU(conv(x)))), the shortcut after the activation."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(8, 8, 1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + torch.nn.functional.silu(self.c2(torch.nn.functional.silu(self.c1(x))))


def test_residual_after_activation_fuses_and_matches():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    b = _export(_Bottleneck(), (x,), ["x"])
    engine = _build(b, {"x": (2, 8, 9, 9)})
    convs = [layer for layer in engine.layers if layer["kind"] == "Convolution"]
    assert len(engine.layers) == 2 and [c["attrs"].get("activation") for c in convs] == ["silu", "silu"]
    assert convs[1]["attrs"].get("residual_after_activation") is True and len(convs[1]["inputs"]) == 4
    assert not convs[0]["attrs"].get("residual")
    _check(b, engine, {"x": x.numpy()})


class _TanhGelu(torch.nn.Module):
    """Linear → GELU written in the tanh form three ways (torch's export of approximate="tanh": (x·½)·(1+tanh(
    √(2/π)·(x+κ·x³))) with a Pow; jax2tf's x·(½·(1+tanh(..))) with κ·x·x·x; ((1+tanh)·x)·½ with κ·(x·x·x))."""

    def __init__(self, form: int, d: int = 16):
        super().__init__()
        self.form, self.fc = form, torch.nn.Linear(d, d)

    def forward(self, x):
        y = self.fc(x)
        c = math.sqrt(2 / math.pi)
        if self.form == 0:
            return torch.nn.functional.gelu(y, approximate="tanh")
        if self.form == 1:
            return y * (0.5 * (1.0 + torch.tanh(c * (y + 0.044715 * y * y * y))))
        return (1.0 + torch.tanh(c * (y + 0.044715 * (y * y * y)))) * y * 0.5


@pytest.mark.parametrize("form", [0, 1, 2])
def test_tanh_gelu_fuses_to_one_activation(form):
    torch.manual_seed(form)
    x = torch.randn(3, 5, 16) * 2
    b = _export(_TanhGelu(form), (x,), ["x"], opset=17)
    engine = _build(b, {"x": (3, 5, 16)})
    acts = [layer["attrs"].get("type") or layer["attrs"].get("activation") for layer in engine.layers]
    assert "gelu_tanh" in acts, [layer["kind"] for layer in engine.layers]
    assert not any(layer["kind"] in ("ElementWise", "Pointwise", "Activation") and
                   (layer["attrs"].get("type") == "tanh") for layer in engine.layers)
    _check(b, engine, {"x": x.numpy()})
