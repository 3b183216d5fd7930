"""The short-sequence LSTM tactic (kernels/rnn_steps.py): its gate buffers and packed weights against an FP64
numpy LSTM (ONNX semantics) and ONNX Runtime, with one initial state but not the other, several input shapes
on one layer, outputs that later calls leave alone, and silero_vad_v6's LSTM shape.

Tolerance: the issue's FP32 bound, max abs <= 1e-5 + 1e-4 * max|ref|. Each gate is a sum of I + H + 2 float32
products of O(1) terms (error ~ (I + H) * 6e-8), and sigmoid/tanh have slopes <= 1, so the error after T
steps stays near 1e-6 for these sizes on any CPU and thread count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.kernels import KernelContext, get_tactic

ort = pytest.importorskip("onnxruntime")


def _bound(ref: np.ndarray) -> float:
    return 1e-5 + 1e-4 * float(np.abs(ref).max())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lstm_ref(x, W, R, B, h0, c0, direction):
    """ONNX LSTM (gates i, o, f, c; default activations) in float64: Y [T, dirs, N, H], Y_h, Y_c."""
    T, N, _ = x.shape
    dirs, H = W.shape[0], R.shape[2]
    x = x.astype(np.float64)
    Y = np.zeros((T, dirs, N, H))
    hs, cs = [], []
    for d in range(dirs):
        w, r = W[d].astype(np.float64), R[d].astype(np.float64)
        b = np.zeros(8 * H) if B is None else B[d].astype(np.float64)
        h = np.zeros((N, H)) if h0 is None else h0[d].astype(np.float64)
        c = np.zeros((N, H)) if c0 is None else c0[d].astype(np.float64)
        order = range(T - 1, -1, -1) if (direction == "reverse" or d == 1) else range(T)
        for t in order:
            g = x[t] @ w.T + h @ r.T + b[:4 * H] + b[4 * H:]
            i, o, f, z = (g[:, k * H:(k + 1) * H] for k in range(4))
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(z)
            h = _sigmoid(o) * np.tanh(c)
            Y[t, d] = h
        hs.append(h)
        cs.append(c)
    return Y, np.stack(hs), np.stack(cs)


def _case(T, N, I, H, dirs, bias=True, h0=True, c0=True, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)      # noqa: E731
    return dict(x=f32(T, N, I), W=f32(dirs, 4 * H, I), R=f32(dirs, 4 * H, H), B=f32(dirs, 8 * H) if bias else None,
                h0=f32(dirs, N, H) if h0 else None, c0=f32(dirs, N, H) if c0 else None)


def _kernel(H: int, direction: str):
    return get_tactic("RNN", "lstm_steps").make({"cell": "lstm", "hidden_size": H, "direction": direction},
                                                KernelContext(device="cpu"))


def _run(fn, case):
    t = lambda a: None if a is None else torch.from_numpy(a)               # noqa: E731
    return [o.numpy().copy() for o in fn(t(case["x"]), t(case["W"]), t(case["R"]), t(case["B"]), None,
                                         t(case["h0"]), t(case["c0"]))]


def _check(got, case, direction):
    ref = _lstm_ref(case["x"], case["W"], case["R"], case["B"], case["h0"], case["c0"], direction)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= _bound(r)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias,h0,c0", [(True, True, True), (True, False, True), (False, True, False),
                                        (True, False, False)])
def test_lstm_steps_matches_fp64_reference(direction, bias, h0, c0):
    dirs = 2 if direction == "bidirectional" else 1
    case = _case(3, 2, 5, 4, dirs, bias, h0, c0, seed=dirs)
    _check(_run(_kernel(4, direction), case), case, direction)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_steps_keeps_one_buffer_per_shape_and_leaves_earlier_outputs_alone(direction):
    dirs = 2 if direction == "bidirectional" else 1
    fn = _kernel(4, direction)
    first = _case(2, 3, 3, 4, dirs, seed=1)
    outs = fn(*(torch.from_numpy(first[k]) for k in ("x", "W", "R", "B")), None,
              torch.from_numpy(first["h0"]), torch.from_numpy(first["c0"]))
    kept = [o.clone() for o in outs]
    _check([k.numpy() for k in kept], first, direction)
    same_shape = _case(2, 3, 3, 4, dirs, seed=2)
    others = [_case(T, N, 3, 4, dirs, seed=T * 10 + N) for T, N in [(1, 1), (4, 2)]]
    others += [_case(T, 1, 3, 4, dirs, seed=100 + T) for T in range(5, 15)]      # more shapes than are kept
    for case in [same_shape] + others + [first, same_shape]:
        _check(_run(fn, case), case, direction)
    for o, k in zip(outs, kept):            # later calls, of this shape or others, wrote into no earlier output
        assert torch.equal(o, k)


def test_lstm_steps_leaves_its_inputs_alone():
    fn = _kernel(4, "forward")
    case = _case(3, 2, 5, 4, 1)
    saved = {k: v.copy() for k, v in case.items() if v is not None}
    _run(fn, case)
    for k, v in saved.items():
        assert np.array_equal(case[k], v), k


def test_lstm_steps_with_a_zero_length_sequence_returns_the_initial_state():
    fn = _kernel(4, "forward")
    case = _case(0, 2, 5, 4, 1)
    y, yh, yc = _run(fn, case)
    assert y.shape == (0, 1, 2, 4)
    assert np.array_equal(yh, case["h0"]) and np.array_equal(yc, case["c0"])


def _onnx_lstm(T, N, I, H, states: str, seed: int):
    """An ONNX LSTM node; ``states`` names which of h0 / c0 are graph inputs ("hc", "h", "c" or "")."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W", (1, 4 * H, I)), ("R", (1, 4 * H, H)), ("B", (1, 8 * H)))]
    feeds = {"x": rng.standard_normal((T, N, I)).astype(np.float32)}
    ins = ["x", "W", "R", "B", "", "h0" if "h" in states else "", "c0" if "c" in states else ""]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, N, I])]
    for n in ("h0", "c0"):
        if n[0] in states:
            graph_inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, N, H]))
            feeds[n] = (rng.standard_normal((1, N, H)) * 0.5).astype(np.float32)
    node = helper.make_node("LSTM", ins, ["y", "yh", "yc"], hidden_size=H)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "yh", "yc")]
    m = helper.make_model(helper.make_graph([node], "lstm", graph_inputs, outs, inits),
                          opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m.SerializeToString(), feeds


@pytest.mark.parametrize("T,N,I,H,states", [(2, 1, 128, 128, "hc"), (3, 2, 6, 5, "h"), (3, 2, 6, 5, "c")])
def test_lstm_steps_engine_matches_onnxruntime(monkeypatch, T, N, I, H, states):
    """(2, 1, 128, 128): silero_vad_v6's LSTM, one window pair per call with its state carried in."""
    from kiln.kernels.registry import TACTICS
    data, feeds = _onnx_lstm(T, N, I, H, states, seed=T + N)
    get_tactic("RNN", "lstm_steps")
    monkeypatch.setitem(TACTICS, "RNN", [t for t in TACTICS["RNN"] if t.name == "lstm_steps"])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "RNN"] == ["lstm_steps"]
    ctx = engine.context()
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    for _ in range(2):                                  # the second run reuses the layer's buffers
        got = ctx.run(feeds)
        for name, r in zip(("y", "yh", "yc"), ref):
            assert np.abs(got[name] - r).max() <= _bound(r), name
