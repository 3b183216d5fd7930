"""The short-sequence LSTM tactic (kernels/rnn_steps.py) against ONNX Runtime running the same ONNX LSTM node:
forward, reverse and bidirectional, one step and several, with and without bias and initial states."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.kernels import KernelContext, tactics_for

ort = pytest.importorskip("onnxruntime")


def _lstm(direction: str, T: int, bias: bool, states: bool, I: int = 6, H: int = 5, N: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    inits = {"W": rng.standard_normal((dirs, 4 * H, I)).astype(np.float32) * 0.5,
             "R": rng.standard_normal((dirs, 4 * H, H)).astype(np.float32) * 0.5}
    ins = ["x", "W", "R"]
    if bias:
        inits["B"] = rng.standard_normal((dirs, 8 * H)).astype(np.float32) * 0.5
    ins.append("B" if bias else "")
    ins.append("")                                      # no sequence lengths
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, N, I])]
    if states:
        ins += ["h0", "c0"]
        graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dirs, N, H]) for n in ("h0", "c0")]
    node = helper.make_node("LSTM", ins, ["y", "yh", "yc"], hidden_size=H, direction=direction)
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, dirs, N, H]),
            helper.make_tensor_value_info("yh", TensorProto.FLOAT, [dirs, N, H]),
            helper.make_tensor_value_info("yc", TensorProto.FLOAT, [dirs, N, H])]
    g = helper.make_graph([node], "lstm", graph_inputs, outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    feeds = {"x": rng.standard_normal((T, N, I)).astype(np.float32)}
    if states:
        feeds.update(h0=rng.standard_normal((dirs, N, H)).astype(np.float32),
                     c0=rng.standard_normal((dirs, N, H)).astype(np.float32))
    return m.SerializeToString(), feeds


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("bias,states", [(True, True), (False, False)])
def test_lstm_steps_matches_onnxruntime(monkeypatch, direction, T, bias, states):
    data, feeds = _lstm(direction, T, bias, states, seed=T)
    tactics_for("RNN", {"cell": "lstm", "hidden_size": 5}, KernelContext(device="cpu"))
    from kiln.kernels.registry import TACTICS
    mine = [t for t in TACTICS["RNN"] if t.name == "lstm_steps"]
    assert mine and mine[0].supports({"cell": "lstm", "hidden_size": 5}, KernelContext(device="cpu"))
    monkeypatch.setitem(TACTICS, "RNN", mine)               # the build can only pick this tactic
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "RNN"] == ["lstm_steps"]
    got = engine.context().run(feeds)
    ref = dict(zip(["y", "yh", "yc"], ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref[k]).max())))


def test_lstm_steps_is_not_offered_for_peepholes_clip_or_other_activations():
    ctx = KernelContext(device="cpu", input_dtypes=("float32",) * 3)
    names = lambda attrs: [t.name for t in tactics_for("RNN", {"cell": "lstm", "hidden_size": 5, **attrs}, ctx)]  # noqa: E731
    assert "lstm_steps" in names({})
    assert "lstm_steps" not in names({"clip": 1.0})
    assert "lstm_steps" not in names({"activations": ["sigmoid", "relu", "tanh"]})
    assert "lstm_steps" not in names({"cell": "gru"})
    peep = KernelContext(device="cpu", input_dtypes=("float32",) * 7 + ("float32",))
    assert "lstm_steps" not in [t.name for t in tactics_for("RNN", {"cell": "lstm", "hidden_size": 5}, peep)]
