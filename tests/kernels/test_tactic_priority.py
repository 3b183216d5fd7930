"""Per-device tactic priority: where a build times nothing, the CPU runs the step-loop RNNs first and CUDA the
fused ones; an LSTM/GRU inside an If branch (never timed) gets them and matches ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import BuildError
from kiln.kernels import KernelContext, tactics_for
from kiln.kernels.registry import TACTICS, tactic

ort = pytest.importorskip("onnxruntime")


def test_a_priority_per_device_orders_the_tactics_per_device(monkeypatch):
    monkeypatch.setitem(TACTICS, "Priority_Test", [])
    tactic("Priority_Test", "a")(lambda attrs, ctx: None)
    tactic("Priority_Test", "b", priority={"cpu": -1, "cuda": 1})(lambda attrs, ctx: None)

    def order(device: str) -> list[str]:
        return [t.name for t in tactics_for("Priority_Test", {}, KernelContext(device=device))]
    assert order("cpu") == ["b", "a"]
    assert order("cuda") == ["a", "b"]


def test_a_priority_per_device_must_name_every_device_of_the_tactic(monkeypatch):
    monkeypatch.setitem(TACTICS, "Priority_Test", [])
    with pytest.raises(BuildError, match=r"^Tactic 'b' for layer kind 'Priority_Test' gives priorities for "
                                         r"\['cpu'\], not for its devices \['cpu', 'cuda'\]\.$"):
        tactic("Priority_Test", "b", priority={"cpu": -1})


@pytest.mark.parametrize("cell,steps,fused", [("lstm", "lstm_steps", "fused_lstm"), ("gru", "gru_steps", "fused_gru")])
def test_step_loop_rnns_come_first_on_the_cpu_and_fused_ones_on_cuda(monkeypatch, cell, steps, fused):
    monkeypatch.setattr("kiln.kernels.cpu_dnnl_rnn.library", lambda: None)   # else oneDNN's: test_cpu_onednn_rnn
    attrs = {"cell": cell, "hidden_size": 8, **({"linear_before_reset": 1} if cell == "gru" else {})}

    def first(device: str) -> str:
        ctx = KernelContext(device=device, input_dtypes=("float32",) * 3)
        return tactics_for("RNN", attrs, ctx)[0].name
    assert first("cpu") == steps
    assert first("cuda") == fused


def _rnn_in_if(cell: str, T: int, N: int, I: int, H: int, seed: int = 0):
    """y = If(flag) then RNN(x) else RNN'(x) (another set of weights): the branches' RNNs are not timed."""
    rng = np.random.default_rng(seed)
    G = {"lstm": 4, "gru": 3}[cell]
    extra = {"linear_before_reset": 1} if cell == "gru" else {}
    f = TensorProto.FLOAT

    def branch(tag: str):
        inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), f"{n}_{tag}")
                 for n, s in (("W", (1, G * H, I)), ("R", (1, G * H, H)), ("B", (1, 2 * G * H)))]
        node = helper.make_node(cell.upper(), ["x", f"W_{tag}", f"R_{tag}", f"B_{tag}", "", "h0"],
                                [f"y_{tag}", f"h_{tag}"], hidden_size=H, **extra)
        return helper.make_graph([node], tag, [], [helper.make_tensor_value_info(f"h_{tag}", f, None)], inits)
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["h"], then_branch=branch("then"), else_branch=branch("else"))], "rnn_if",
        [helper.make_tensor_value_info("x", f, ["T", N, I]), helper.make_tensor_value_info("h0", f, [1, N, H]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("h", f, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    feeds = {"x": rng.standard_normal((T, N, I)).astype(np.float32),
             "h0": (rng.standard_normal((1, N, H)) * 0.5).astype(np.float32)}
    return m.SerializeToString(), feeds


def _rnn_tactics(plan: dict) -> list[str]:
    found = []
    for layer in plan["layers"]:
        if layer["kind"] == "RNN":
            found.append(layer["tactic"])
        for v in layer.get("attrs", {}).values():
            if isinstance(v, dict) and "__graph__" in v:
                found += _rnn_tactics(v["__graph__"])
    return found


@pytest.mark.parametrize("cell,steps", [("lstm", "lstm_steps"), ("gru", "gru_steps")])
def test_an_rnn_in_an_if_branch_runs_the_step_loop_on_the_cpu_and_matches_onnxruntime(monkeypatch, cell, steps):
    monkeypatch.setattr("kiln.kernels.cpu_dnnl_rnn.library", lambda: None)   # else oneDNN's: test_cpu_onednn_rnn
    data, feeds = _rnn_in_if(cell, T=2, N=1, I=16, H=8)
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", profiles={"x": [(1, 1, 16), (2, 1, 16),
                                                                                          (4, 1, 16)]}))
    assert _rnn_tactics(engine.plan) == [steps, steps]
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context(threads=1)
    for flag in (True, False):
        run = {**feeds, "flag": np.array(flag)}
        ref = sess.run(None, run)[0]
        got = ctx.run(run)["h"]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
