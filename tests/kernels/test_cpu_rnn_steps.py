"""The short-sequence RNN tactics (kernels/rnn_steps.py: lstm_steps, gru_steps): their gate buffers and packed
weights against an FP64 numpy RNN (ONNX semantics) and ONNX Runtime, with initial states given or not,
several input shapes on one layer, outputs that later calls leave alone, and the shapes of silero_vad_v6's
LSTM and akiki_vad's GRU.

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
from kiln.kernels import KernelContext, get_tactic, tactics_for

ort = pytest.importorskip("onnxruntime")

GATES = {"lstm": 4, "gru": 3}
TACTIC = {"lstm": "lstm_steps", "gru": "gru_steps"}


def _bound(ref: np.ndarray) -> float:
    return 1e-5 + 1e-4 * float(np.abs(ref).max())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _step(cell: str, x, h, c, w, r, b, H):
    """One ONNX step in float64: LSTM gates i, o, f, c; GRU gates z, r, h with linear_before_reset=1."""
    if cell == "lstm":
        g = x @ w.T + h @ r.T + b[:4 * H] + b[4 * H:]
        i, o, f, z = (g[:, k * H:(k + 1) * H] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(z)
        return _sigmoid(o) * np.tanh(c), c
    xg, hg = x @ w.T + b[:3 * H], h @ r.T + b[3 * H:]
    z = _sigmoid(xg[:, :H] + hg[:, :H])
    rr = _sigmoid(xg[:, H:2 * H] + hg[:, H:2 * H])
    n = np.tanh(xg[:, 2 * H:] + rr * hg[:, 2 * H:])
    return (1 - z) * n + z * h, None


def _ref(cell, case, direction):
    """Y [T, dirs, N, H], Y_h and (LSTM) Y_c in float64."""
    x, W, R, B = case["x"].astype(np.float64), case["W"], case["R"], case["B"]
    T, N, _ = x.shape
    dirs, H = W.shape[0], R.shape[2]
    Y = np.zeros((T, dirs, N, H))
    hs, cs = [], []
    for d in range(dirs):
        b = np.zeros(2 * GATES[cell] * H) if B is None else B[d].astype(np.float64)
        h = np.zeros((N, H)) if case["h0"] is None else case["h0"][d].astype(np.float64)
        c = np.zeros((N, H)) if case.get("c0") is None else case["c0"][d].astype(np.float64)
        for t in (range(T - 1, -1, -1) if (direction == "reverse" or d == 1) else range(T)):
            h, c = _step(cell, x[t], h, c, W[d].astype(np.float64), R[d].astype(np.float64), b, H)
            Y[t, d] = h
        hs.append(h)
        cs.append(c)
    return (Y, np.stack(hs)) + ((np.stack(cs),) if cell == "lstm" else ())


def _case(cell, T, N, I, H, dirs, bias=True, h0=True, c0=True, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)      # noqa: E731
    G = GATES[cell]
    return dict(x=f32(T, N, I), W=f32(dirs, G * H, I), R=f32(dirs, G * H, H), B=f32(dirs, 2 * G * H) if bias else None,
                h0=f32(dirs, N, H) if h0 else None, c0=f32(dirs, N, H) if c0 and cell == "lstm" else None)


def _kernel(cell: str, H: int, direction: str):
    attrs = {"cell": cell, "hidden_size": H, "direction": direction, "linear_before_reset": int(cell == "gru")}
    return get_tactic("RNN", TACTIC[cell]).make(attrs, KernelContext(device="cpu"))


def _args(case):
    t = lambda a: None if a is None else torch.from_numpy(a)               # noqa: E731
    return (t(case["x"]), t(case["W"]), t(case["R"]), t(case["B"]), None, t(case["h0"]), t(case["c0"]))


def _run(fn, case):
    return [o.numpy().copy() for o in fn(*_args(case))]


def _check(cell, got, case, direction):
    ref = _ref(cell, case, direction)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= _bound(r)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias,h0,c0", [(True, True, True), (True, False, True), (False, True, False),
                                        (True, False, False)])
def test_steps_match_fp64_reference(cell, direction, bias, h0, c0):
    dirs = 2 if direction == "bidirectional" else 1
    case = _case(cell, 3, 2, 5, 4, dirs, bias, h0, c0, seed=dirs)
    _check(cell, _run(_kernel(cell, 4, direction), case), case, direction)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_steps_keep_one_buffer_per_shape_and_leave_earlier_outputs_alone(cell, direction):
    dirs = 2 if direction == "bidirectional" else 1
    fn = _kernel(cell, 4, direction)
    first = _case(cell, 2, 3, 3, 4, dirs, seed=1)
    outs = fn(*_args(first))
    kept = [o.clone() for o in outs]
    _check(cell, [k.numpy() for k in kept], first, direction)
    same_shape = _case(cell, 2, 3, 3, 4, dirs, seed=2)
    others = [_case(cell, T, N, 3, 4, dirs, seed=T * 10 + N) for T, N in [(1, 1), (4, 2)]]
    others += [_case(cell, T, 1, 3, 4, dirs, seed=100 + T) for T in range(5, 15)]      # more shapes than are kept
    for case in [same_shape] + others + [first, same_shape]:
        _check(cell, _run(fn, case), case, direction)
    for o, k in zip(outs, kept):            # later calls, of this shape or others, wrote into no earlier output
        assert torch.equal(o, k)


def test_steps_keep_buffers_within_their_shape_and_byte_bounds(monkeypatch):
    from kiln.kernels import rnn_steps
    monkeypatch.setattr(rnn_steps, "MAX_KEPT_BYTES", 40_000)
    layer = rnn_steps._Layer({"cell": "lstm", "hidden_size": 4})
    for T in range(1, 30):
        newest = layer.scratch(torch.zeros(T, 3, 5))
        kept = list(layer.buffers.values())
        assert kept[-1] is newest and layer.kept_bytes == sum(b.nbytes for b in kept)
        assert len(kept) <= rnn_steps.MAX_SHAPES and layer.kept_bytes <= 40_000
    big = layer.scratch(torch.zeros(2000, 3, 5))            # over the bound alone: kept, and alone
    assert big.nbytes > 40_000 and list(layer.buffers.values()) == [big]
    fn = _kernel("lstm", 4, "bidirectional")                # results right while buffers come and go
    for T in (40, 3, 40, 3):
        case = _case("lstm", T, 3, 5, 4, 2, seed=T)
        _check("lstm", _run(fn, case), case, "bidirectional")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_steps_leave_their_inputs_alone(cell):
    case = _case(cell, 3, 2, 5, 4, 1)
    saved = {k: v.copy() for k, v in case.items() if v is not None}
    _run(_kernel(cell, 4, "forward"), case)
    for k, v in saved.items():
        assert np.array_equal(case[k], v), k


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_steps_with_a_zero_length_sequence_return_the_initial_state(cell):
    case = _case(cell, 0, 2, 5, 4, 1)
    got = _run(_kernel(cell, 4, "forward"), case)
    assert got[0].shape == (0, 1, 2, 4)
    assert np.array_equal(got[1], case["h0"])
    if cell == "lstm":
        assert np.array_equal(got[2], case["c0"])


@pytest.mark.parametrize("cell,tactic", [("lstm", "lstm_steps"), ("gru", "gru_steps"), ("lstm", "torch"),
                                         ("gru", "torch")])
def test_an_input_that_is_not_3d_is_refused_in_one_line(cell, tactic):
    from kiln.errors import ShapeError
    case = _case(cell, 2, 1, 5, 4, 1)
    fn = get_tactic("RNN", tactic).make({"cell": cell, "hidden_size": 4, "linear_before_reset": 1},
                                        KernelContext(device="cpu"))
    args = list(_args(case))
    args[0] = args[0].reshape(1, 2, 1, 5)
    with pytest.raises(ShapeError, match=r"^The (LSTM|GRU) input X has shape \[1, 2, 1, 5\]; it must be 3-D, "
                                         r"\[seq_length, batch_size, input_size\]\.$"):
        fn(*args)


def test_gru_steps_is_offered_only_for_the_linear_before_reset_form():
    ctx = KernelContext(device="cpu", input_dtypes=("float32",) * 3)

    def names(**attrs) -> list[str]:
        return [t.name for t in tactics_for("RNN", {"cell": "gru", "hidden_size": 5, **attrs}, ctx)]
    assert "gru_steps" in names(linear_before_reset=1)
    assert "gru_steps" not in names(linear_before_reset=0)
    assert "gru_steps" not in names(linear_before_reset=1, clip=1.0)
    assert "gru_steps" not in names(linear_before_reset=1, activations=["sigmoid", "relu"])
    assert "gru_steps" not in names(linear_before_reset=1, layout=1)
    lens = KernelContext(device="cpu", input_dtypes=("float32",) * 4 + ("int32",))
    assert "gru_steps" not in [t.name for t in tactics_for(
        "RNN", {"cell": "gru", "hidden_size": 5, "linear_before_reset": 1}, lens)]
    assert "gru_steps" not in [t.name for t in tactics_for("RNN", {"cell": "lstm", "hidden_size": 5}, ctx)]


def _onnx_rnn(cell, T, N, I, H, states: str, seed: int):
    """An ONNX LSTM/GRU node; ``states`` names which of h0 / c0 are graph inputs ("hc", "h", "c" or "")."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W", (1, G * H, I)), ("R", (1, G * H, H)), ("B", (1, 2 * G * H)))]
    feeds = {"x": rng.standard_normal((T, N, I)).astype(np.float32)}
    ins = ["x", "W", "R", "B", "", "h0" if "h" in states else ""]
    if cell == "lstm":
        ins.append("c0" if "c" in states else "")
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, N, I])]
    for n in ("h0", "c0"):
        if n[0] in states:
            graph_inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, N, H]))
            feeds[n] = (rng.standard_normal((1, N, H)) * 0.5).astype(np.float32)
    outs = ["y", "yh", "yc"][:3 if cell == "lstm" else 2]
    extra = {"linear_before_reset": 1} if cell == "gru" else {}
    node = helper.make_node(cell.upper(), ins, outs, hidden_size=H, **extra)
    m = helper.make_model(helper.make_graph([node], "rnn", graph_inputs,
                                            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs],
                                            inits), opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m.SerializeToString(), feeds, outs


@pytest.mark.parametrize("cell,T,N,I,H,states", [("lstm", 2, 1, 128, 128, "hc"), ("lstm", 3, 2, 6, 5, "h"),
                                                 ("lstm", 3, 2, 6, 5, "c"), ("gru", 1, 1, 128, 128, "h"),
                                                 ("gru", 3, 2, 6, 5, "")])
def test_steps_engine_matches_onnxruntime(monkeypatch, cell, T, N, I, H, states):
    """("lstm", 2, 1, 128, 128): silero_vad_v6's LSTM, a window pair per call with its state carried in;
    ("gru", 1, 1, 128, 128): akiki_vad's GRU."""
    from kiln.kernels.registry import TACTICS
    data, feeds, names = _onnx_rnn(cell, T, N, I, H, states, seed=T + N)
    get_tactic("RNN", TACTIC[cell])
    monkeypatch.setitem(TACTICS, "RNN", [t for t in TACTICS["RNN"] if t.name == TACTIC[cell]])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "RNN"] == [TACTIC[cell]]
    ctx = engine.context()
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    for _ in range(2):                                  # the second run reuses the layer's buffers
        got = ctx.run(feeds)
        for name, r in zip(names, ref):
            assert np.abs(got[name] - r).max() <= _bound(r), name
