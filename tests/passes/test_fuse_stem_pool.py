"""Stem pooling (passes/fuse_stem_pool.py) and the input cast moved into the stem
(builder/precision.py ``absorb_input_casts``): which graphs are rewritten, and the rewritten CPU
engine computes what ONNX Runtime computes on the original model."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.builder.precision import absorb_input_casts, assign_precision
from kiln.passes import PassManager, default_passes, fusion_passes

from _models import onnx_bytes


class _Stem(torch.nn.Module):
    def __init__(self, cin=3, pool=(3, 2, 1), ceil=False, act=True, tap=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, 8, 7, 2, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
        self.act, self.tap = act, tap
        self.pool = torch.nn.MaxPool2d(pool[0], pool[1], pool[2], ceil_mode=ceil)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.act:
            y = torch.relu(y)
        out = self.head(self.pool(y))
        return (out, y.mean((2, 3))) if self.tap else out


def _onnx(model, shape=(2, 3, 41, 37)) -> tuple[bytes, np.ndarray]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return onnx_bytes(model, x), x.numpy()


def _fused(net) -> list:
    PassManager(default_passes())(net)
    PassManager(fusion_passes())(net)
    return [layer for layer in net.layers if layer.attrs.get("pool")]


@pytest.mark.parametrize("act", [True, False])
def test_pool_fuses_into_stem_and_matches(act):
    data, x = _onnx(_Stem(act=act))
    net = kiln.onnx.parse(data)
    (conv,) = _fused(net)
    assert conv.kind == "Convolution" and conv.attrs["pool"] == {"kernel": [3, 3], "stride": [2, 2],
                                                                  "pads": [1, 1, 1, 1]}
    assert not any(layer.kind == "Pooling" for layer in net.layers)
    assert conv.attrs.get("activation") == ("relu" if act else None)
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    # the fusion is for the GPU's stem kernel: a CPU engine keeps the pool apart, its convolution on oneDNN
    assert [layer["kind"] for layer in engine.layers].count("Pooling") == 1
    got = list(engine.context().run({"x": x}).values())[0]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("model", [
    _Stem(cin=8),                  # not a stem: 8 input channels fill an MMA by themselves
    _Stem(pool=(2, 2, 0)),         # another pooling geometry
    _Stem(ceil=True),              # ceil mode changes the output size
    _Stem(tap=True),               # the convolution's output has a second reader
], ids=["wide_input", "pool_2x2", "ceil_mode", "second_reader"])
def test_left_alone(model):
    shape = (1, 8, 33, 33) if model.conv.in_channels == 8 else (1, 3, 33, 33)
    data, x = _onnx(model, shape)
    assert _fused(kiln.onnx.parse(data)) == []
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    got = list(engine.context().run({"x": x}).values())
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_input_cast_moves_into_the_stem():
    data, _ = _onnx(_Stem())
    net = kiln.onnx.parse(data)
    _fused(net)
    assign_precision(net, "fp16")
    casts = [layer for layer in net.layers if layer.kind == "Cast" and layer.inputs[0] in net.inputs]
    assert len(casts) == 1
    absorb_input_casts(net)
    stem = next(layer for layer in net.layers if layer.attrs.get("pool"))
    assert stem.inputs[0] is net.inputs[0] and stem.inputs[0].dtype == "float32"
    assert not any(layer.kind == "Cast" and layer.inputs[0] in net.inputs for layer in net.layers)
    assert stem.inputs[1].dtype == "float16"


def test_input_cast_stays_when_another_layer_reads_the_input():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = _Stem()

        def forward(self, x):
            return self.stem(x), torch.flatten(x, 1)

    data, _ = _onnx(Two())
    net = kiln.onnx.parse(data)
    _fused(net)
    assign_precision(net, "fp16")
    absorb_input_casts(net)
    (cast,) = [layer for layer in net.layers if layer.kind == "Cast" and layer.inputs[0] in net.inputs]
    assert any(layer.attrs.get("pool") and layer.inputs[0] is cast.outputs[0] for layer in net.layers)
