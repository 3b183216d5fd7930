"""FP16 builds and their FP32 outputs: a network output made element-wise or as a statistic from one
activation is computed in FP32 (never rounded to FP16 and widened back), a recurrent layer that
outputs its state runs in FP32, and a residual sum's output keeps the FP16 layer and its cast.
References are numpy in FP64 from the FP16-rounded values the engine really holds. Runs on the CPU:
the precision rewrite is the same on CUDA."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx



def _model(nodes, inits, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, onnx.IR_VERSION)
    return m.SerializeToString()


def _build(data: bytes, precision: str = "fp16") -> kiln.Engine:
    return kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(precision=precision, device="cpu"))


def _layer(engine, name: str) -> dict:
    return next(layer for layer in engine.layers if layer["name"] == name)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float64)


def test_softmax_output_is_not_rounded_to_fp16() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (64, 8)).astype(np.float32)
    data = _model([helper.make_node("MatMul", ["x", "w"], ["z"], name="mm"),
                   helper.make_node("Softmax", ["z"], ["y"], name="sm", axis=-1)], {"w": w},
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 8])])
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    engine = _build(data)
    assert _layer(engine, "sm")["precision"] == "fp32"
    assert not any(layer["kind"] == "Cast" and layer["outputs"] == ["y"] for layer in engine.layers)
    y = np.asarray(engine.context().run({"x": x})["y"], np.float64)
    z = _f16(_f16(x) @ _f16(w))                  # the FP16 MatMul's stored result
    e = np.exp(z - z.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    assert np.abs(y - ref).max() < 2e-6           # an FP16-rounded probability is off by up to 2.4e-4
    assert np.any(y != _f16(y))


def test_residual_sum_output_keeps_its_fp16_layer_and_cast() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (8, 8)).astype(np.float32)
    data = _model([helper.make_node("MatMul", ["x", "w"], ["z"], name="mm"),
                   helper.make_node("MatMul", ["x", "w2"], ["r"], name="mm2"),
                   helper.make_node("Add", ["z", "r"], ["y"], name="add")], {"w": w, "w2": w[::-1].copy()},
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])])
    engine = _build(data)
    producer = next(layer for layer in engine.layers if layer["outputs"] == ["y"])
    assert producer["kind"] == "Cast"
    x = rng.normal(0, 1, (4, 8)).astype(np.float32)
    y = np.asarray(engine.context().run({"x": x})["y"], np.float64)
    assert np.array_equal(y, _f16(y))             # the sum was stored in FP16


class _Gru(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)
        self.gru = torch.nn.GRU(6, 12, batch_first=True)

    def forward(self, x, h):
        y, h_out = self.gru(self.proj(x), h)
        return y.sum(-1), h_out


def test_a_recurrent_layer_that_outputs_its_state_runs_in_fp32() -> None:
    torch.manual_seed(0)
    net = _Gru().eval()
    x, h = torch.randn(1, 20, 6), torch.randn(1, 1, 12) * 0.5
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x, h), f, input_names=["x", "h"], output_names=["s", "h_out"], opset_version=17,
                          dynamo=False)
    data = f.getvalue()
    engine = _build(data)
    rnn = [layer for layer in engine.layers if layer["kind"] == "RNN"]
    assert len(rnn) == 1 and rnn[0]["precision"] == "fp32"
    got = engine.context().run({"x": x.numpy(), "h": h.numpy()})["h_out"]
    with torch.no_grad():                          # FP64 reference from the FP16-rounded projection
        net64 = _Gru().double().eval()
        net64.load_state_dict(net.state_dict())
        p = net64.proj.weight.half().double()
        b = net64.proj.bias.half().double()
        xin = (x.double().half().double() @ p.T + b).half().double()
        _, ref = net64.gru(xin, h.double())
    assert np.abs(np.asarray(got, np.float64) - ref.numpy()).max() < 1e-5
    assert np.any(np.asarray(got, np.float64) != _f16(np.asarray(got)))
