"""The oneDNN RNN tactics (kernels/cpu_dnnl_rnn.py: onednn_lstm, onednn_gru): each direction, with and without
bias and initial states, GRU in both linear_before_reset forms, against an FP64 numpy RNN (ONNX semantics) and
ONNX Runtime; several shapes and weights on one layer, outputs that later calls leave alone, operands that
disagree with the layer refused before oneDNN reads them, 1 and 2 threads, the shapes of silero_vad_v6's LSTM and
akiki_vad's GRU. The oneDNN enum values the module uses are checked by these runs against the installed library
(a wrong gate order, direction or tag gives wrong numbers or a refused primitive). Skipped where no oneDNN
library is installed (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY).

Tolerance: the issue's FP32 bound (test_cpu_rnn_steps: each gate a sum of I + H + 2 float32 products of O(1)
terms, slopes <= 1, so the error stays near 1e-6 for these sizes on any CPU and thread count)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
import test_cpu_rnn_steps as steps   # FP64 numpy RNN (_ref, _step), random cases (_case, _args), the FP32 bound
from kiln.errors import IncompatibleEngineError, ShapeError
from kiln.kernels import KernelContext, cpu_dnnl_rnn, get_tactic, tactics_for
from kiln.kernels.registry import TACTICS

pytestmark = pytest.mark.skipif(cpu_dnnl_rnn.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")
ort = pytest.importorskip("onnxruntime")

TACTIC = {"lstm": "onednn_lstm", "gru": "onednn_gru"}
FORMS = [("lstm", 0), ("gru", 1), ("gru", 0)]           # (cell, linear_before_reset)


def _step_lbr0(cell, x, h, c, w, r, b, H):
    """One ONNX GRU step with linear_before_reset=0 in float64: the reset gate scales h before R_h."""
    xg = x @ w.T + b[:3 * H]
    hg = h @ r[:2 * H].T + b[3 * H:5 * H]
    z = steps._sigmoid(xg[:, :H] + hg[:, :H])
    rr = steps._sigmoid(xg[:, H:2 * H] + hg[:, H:])
    n = np.tanh(xg[:, 2 * H:] + (rr * h) @ r[2 * H:].T + b[5 * H:])
    return (1 - z) * n + z * h, None


def _ref(cell, lbr, case, direction):
    with pytest.MonkeyPatch.context() as m:
        if cell == "gru" and lbr == 0:
            m.setattr(steps, "_step", _step_lbr0)       # the same loop over steps and directions
        return steps._ref(cell, case, direction)


def _kernel(cell, lbr, H, direction="forward"):
    attrs = {"cell": cell, "hidden_size": H, "direction": direction, "linear_before_reset": lbr}
    return get_tactic("RNN", TACTIC[cell]).make(attrs, KernelContext(device="cpu", layer_name="rnn"))


def _check(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        g = g.numpy() if isinstance(g, torch.Tensor) else g
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= steps._bound(r)


@pytest.mark.parametrize("cell,lbr", FORMS)
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias,h0,c0", [(True, True, True), (True, False, True), (False, True, False),
                                        (True, False, False)])
def test_matches_fp64_reference(cell, lbr, direction, bias, h0, c0):
    dirs = 2 if direction == "bidirectional" else 1
    case = steps._case(cell, 3, 2, 5, 4, dirs, bias, h0, c0, seed=dirs + lbr)
    _check(_kernel(cell, lbr, 4, direction)(*steps._args(case)), _ref(cell, lbr, case, direction))


@pytest.mark.parametrize("cell,lbr", FORMS)
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_shapes_and_weights_change_and_earlier_outputs_stay(cell, lbr, direction):
    """A primitive per input shape (more shapes than are kept, the first again after them), T=1, N>1, new
    weights; no call writes into an earlier call's outputs."""
    dirs = 2 if direction == "bidirectional" else 1
    fn = _kernel(cell, lbr, 4, direction)
    first = steps._case(cell, 2, 3, 3, 4, dirs, seed=1)
    outs = fn(*steps._args(first))
    kept = [o.clone() for o in outs]
    _check(kept, _ref(cell, lbr, first, direction))
    cases = [steps._case(cell, T, N, 3, 4, dirs, seed=T * 10 + N) for T, N in [(1, 1), (1, 4), (4, 2), (7, 1)]]
    cases += [first, steps._case(cell, 2, 3, 3, 4, dirs, seed=2)]
    new_weights = dict(first, W=first["W"] * -1.5, R=first["R"] * 0.5)
    cases += [new_weights, dict(new_weights, B=None), first]
    for case in cases:
        _check(fn(*steps._args(case)), _ref(cell, lbr, case, direction))
    assert all(torch.equal(o, k) for o, k in zip(outs, kept))


@pytest.mark.parametrize("cell,lbr", FORMS)
def test_one_shape_with_inputs_and_outputs_at_new_and_reused_addresses(cell, lbr):
    """A call points oneDNN only at the tensors whose address changed since its primitive's last call: one
    primitive (the same weight tensors, as in an engine) fed the same X, h0, c0 refilled in place (same addresses,
    new values) and new tensors, its outputs kept alive or dropped (the allocator then hands their memory back):
    every call matches the reference for the values it was given."""
    fn = _kernel(cell, lbr, 4)
    base = steps._case(cell, 2, 1, 3, 4, 1, seed=0)
    cases = [dict(base, **{k: v for k, v in steps._case(cell, 2, 1, 3, 4, 1, seed=s).items() if k in ("x", "h0", "c0")})
             for s in range(4)]
    weights = steps._args(base)[1:4]
    states = (0, 5, 6)                  # X, initial_h, initial_c (None for a GRU) in _args' order
    fixed = [None if a is None else a.clone() for a in steps._args(base)]
    kept = []
    for i, case in enumerate(cases * 2):
        given = steps._args(case)
        if i % 2:
            for j in states:
                if fixed[j] is not None:
                    fixed[j].copy_(given[j])
            x, h0, c0 = (fixed[j] for j in states)
        else:
            x, h0, c0 = (None if given[j] is None else given[j].clone() for j in states)
        outs = fn(x, *weights, None, h0, c0)
        _check(outs, _ref(cell, lbr, case, "forward"))
        if i % 3 == 0:
            kept.append(outs)


@pytest.mark.parametrize("cell,lbr", FORMS)
def test_inputs_left_alone_and_other_layouts_read(cell, lbr):
    case = steps._case(cell, 3, 2, 5, 4, 1)
    saved = {k: v.copy() for k, v in case.items() if v is not None}
    args = list(steps._args(case))
    args[0] = torch.from_numpy(np.ascontiguousarray(case["x"].transpose(1, 0, 2))).transpose(0, 1)    # strided X
    args[5] = torch.from_numpy(np.ascontiguousarray(case["h0"].transpose(1, 0, 2))).transpose(0, 1)   # strided h0
    _check(_kernel(cell, lbr, 4)(*args), _ref(cell, lbr, case, "forward"))
    for k, v in saved.items():
        assert np.array_equal(case[k], v), k


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell,lbr,T,I,H", [("lstm", 0, 2, 128, 128), ("gru", 1, 1, 64, 128), ("lstm", 0, 16, 32, 64)])
def test_silero_and_akiki_shapes_on_one_and_two_threads(threads, cell, lbr, T, I, H):
    """silero_vad_v6's LSTM (T=2, N=1, I=H=128, state carried in), akiki_vad's GRU (T=1, H=128), a longer one."""
    case = steps._case(cell, T, 1, I, H, 1, seed=T)
    ref = _ref(cell, lbr, case, "forward")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fn = _kernel(cell, lbr, H)
        for _ in range(2):
            _check(fn(*steps._args(case)), ref)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cell,lbr", FORMS)
def test_meta_and_empty_inputs(cell, lbr):
    fn = _kernel(cell, lbr, 4, "bidirectional")
    case = steps._case(cell, 0, 2, 5, 4, 2)
    got = fn(*steps._args(case))
    assert got[0].shape == (0, 2, 2, 4) and torch.equal(got[1], torch.from_numpy(case["h0"]))
    meta = [None if a is None else a.to("meta") for a in steps._args(steps._case(cell, 3, 2, 5, 4, 2))]
    shapes = [tuple(o.shape) for o in fn(*meta)]
    assert shapes == [(3, 2, 2, 4)] + [(2, 2, 4)] * (2 if cell == "lstm" else 1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_operands_that_disagree_are_refused_before_onednn(monkeypatch, cell):
    """Weights, biases or states whose shapes or dtypes do not fit the layer and X (a damaged engine) are refused
    in one line naming the operand; oneDNN, which would read past them, never sees them."""
    case = steps._case(cell, 2, 3, 5, 4, 1)
    good = steps._args(case)
    fn = _kernel(cell, 1, 4)
    fn(*good)                                            # a primitive for this shape exists: still checked

    def primitive_never_made(*a, **k):
        raise AssertionError("oneDNN reached")
    monkeypatch.setattr(cpu_dnnl_rnn, "RnnPrimitive", primitive_never_made)
    bad = {"W": (1, good[1][:, :, :4].contiguous()), "R": (2, good[2][:, :-1].contiguous()),
           "B": (3, good[3][:, :-2].contiguous()), "initial_h": (5, good[5][:, :2].contiguous()),
           "X": (0, good[0].double())}
    if cell == "lstm":
        bad["initial_c"] = (6, torch.zeros(1, 3, 5))
    for what, (i, t) in bad.items():
        args = list(good)
        args[i] = t
        with pytest.raises(ShapeError, match=rf"^Layer 'rnn' \({TACTIC[cell]}\): its {what} is .*kiln build\.$"):
            fn(*args)


def test_offered_where_it_runs(monkeypatch):
    ctx = KernelContext(device="cpu", input_dtypes=("float32",) * 3)

    def names(cell="gru", context=ctx, **attrs) -> list[str]:
        return [t.name for t in tactics_for("RNN", {"cell": cell, "hidden_size": 5, **attrs}, context)]
    assert "onednn_lstm" in names("lstm") and "onednn_gru" not in names("lstm")
    assert "onednn_gru" in names(linear_before_reset=1) and "onednn_gru" in names(linear_before_reset=0)
    assert "onednn_lstm" not in names("lstm", input_forget=1)
    assert "onednn_lstm" not in names("lstm", clip=1.0)
    assert "onednn_gru" not in names(activations=["sigmoid", "relu"])
    assert "onednn_gru" not in names(layout=1)
    assert "onednn_lstm" not in names("lstm", KernelContext(device="cpu", input_dtypes=("float32",) * 7 + ("float32",)))
    assert "onednn_gru" not in names(context=KernelContext(device="cpu", input_dtypes=("float32",) * 4 + ("int32",)))
    assert "onednn_gru" not in names(context=KernelContext(device="cpu", input_dtypes=("float16",) * 3))
    assert "onednn_gru" not in names(context=KernelContext(device="cpu", precision="fp16"))
    assert "onednn_gru" not in names(context=KernelContext(device="cuda"))
    monkeypatch.setattr(cpu_dnnl_rnn, "library", lambda: None)
    assert "onednn_lstm" not in names("lstm") and "onednn_gru" not in names()
    with pytest.raises(IncompatibleEngineError, match=r"^Layer 'rnn' runs tactic onednn_gru, which needs oneDNN's "
                                                      r"library: .*kiln build\.$"):
        _kernel("gru", 1, 4)


def _onnx_rnn(cell, lbr, case, direction, states: str, outs: list[str], seq_dim: str | None = None):
    """An ONNX LSTM/GRU node on ``case``'s arrays; ``states`` names which of h0 / c0 are graph inputs, ``outs``
    which of Y, Y_h, Y_c the graph returns; ``seq_dim`` names X's sequence length (else it is fixed)."""
    x = case["x"]
    H = case["R"].shape[2]
    inits = [numpy_helper.from_array(case[n], n) for n in ("W", "R", "B") if case[n] is not None]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq_dim or x.shape[0], *x.shape[1:]])]
    feeds = {"x": x}
    for n in ("h0", "c0"):
        if n[0] in states:
            graph_inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, list(case[n].shape)))
            feeds[n] = case[n]
    ins = ["x", "W", "R", "B" if case["B"] is not None else "", "", "h0" if "h" in states else ""]
    ins += ["c0" if "c" in states else ""] if cell == "lstm" else []
    node_outs = [o if o in outs else "" for o in ("y", "yh", "yc")[:3 if cell == "lstm" else 2]]
    extra = {"linear_before_reset": lbr} if cell == "gru" else {}
    node = helper.make_node(cell.upper(), ins, node_outs, hidden_size=H, direction=direction, **extra)
    m = helper.make_model(helper.make_graph([node], "rnn", graph_inputs,
                                            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs],
                                            inits), opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m.SerializeToString(), feeds


@pytest.mark.parametrize("cell,lbr,T,N,I,H,direction,states,outs", [
    ("lstm", 0, 2, 1, 128, 128, "forward", "hc", ["y", "yh", "yc"]),    # silero_vad_v6's LSTM
    ("gru", 1, 1, 1, 64, 128, "forward", "h", ["y", "yh"]),             # akiki_vad's GRU
    ("lstm", 0, 3, 2, 6, 5, "bidirectional", "", ["y"]),
    ("lstm", 0, 3, 2, 6, 5, "reverse", "c", ["yc", "yh"]),
    ("gru", 0, 4, 3, 6, 5, "bidirectional", "h", ["yh"]),
    ("gru", 1, 3, 2, 6, 5, "reverse", "", ["y", "yh"]),
])
def test_engine_matches_onnxruntime(monkeypatch, cell, lbr, T, N, I, H, direction, states, outs):
    dirs = 2 if direction == "bidirectional" else 1
    case = steps._case(cell, T, N, I, H, dirs, seed=T + N)
    data, feeds = _onnx_rnn(cell, lbr, case, direction, states, outs)
    monkeypatch.setitem(TACTICS, "RNN", [t for t in TACTICS["RNN"] if t.name == TACTIC[cell]])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "RNN"] == [TACTIC[cell]]
    ctx = engine.context()
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    first = None
    for _ in range(2):                                  # the second run reuses the layer's primitive
        got = ctx.run(feeds)
        first = first or {k: v.copy() for k, v in got.items()}
        assert sorted(got) == sorted(outs)
        for name, r in zip(outs, ref):
            assert np.abs(got[name] - r).max() <= steps._bound(r), name
    assert all(np.array_equal(first[k], v) for k, v in got.items())


@pytest.mark.parametrize("cell,lbr", FORMS)
def test_first_on_the_cpu_where_nothing_is_timed(cell, lbr):
    """An RNN inside an If branch (never timed) gets the oneDNN tactic on the CPU and matches ONNX Runtime; with
    no library the step loop comes first (test_tactic_priority)."""
    from test_tactic_priority import _rnn_in_if, _rnn_tactics     # If(flag) then RNN else RNN'; the plan's tactics
    attrs = {"cell": cell, "hidden_size": 8, "linear_before_reset": lbr}
    assert tactics_for("RNN", attrs, KernelContext(device="cpu", input_dtypes=("float32",) * 3))[0].name == TACTIC[cell]
    if lbr == 0:
        return                                           # _rnn_in_if builds the linear_before_reset=1 GRU
    data, feeds = _rnn_in_if(cell, T=2, N=1, I=16, H=8)
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", profiles={"x": [(1, 1, 16), (2, 1, 16),
                                                                                          (4, 1, 16)]}))
    assert _rnn_tactics(engine.plan) == [TACTIC[cell]] * 2
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context(threads=1)
    for flag, T in ((True, 2), (False, 2), (True, 4), (False, 1)):
        run = {**feeds, "x": np.resize(feeds["x"], (T, 1, 16)), "flag": np.array(flag)}
        ref = sess.run(None, run)[0]
        got = ctx.run(run)["h"]
        assert got.shape == ref.shape and np.abs(got - ref).max() <= steps._bound(ref)


def test_timed_for_one_shape_point_not_for_a_range_engine():
    """A range engine's first run at a new shape would make a primitive, so it does not time these tactics; a
    build at one shape times them against the others."""
    case = steps._case("lstm", 3, 1, 6, 5, 1, seed=3)
    data, feeds = _onnx_rnn("lstm", 0, case, "forward", "", ["y"], seq_dim="T")
    timed = []
    with pytest.MonkeyPatch.context() as m:
        import kiln.builder.tactics as builder_tactics
        real = builder_tactics._layer_times
        m.setattr(builder_tactics, "_layer_times", lambda layer, cands, *a: timed.append([c.name for c in cands])
                  or real(layer, cands, *a))
        ranged = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", profiles={"x": [(1, 1, 6), (3, 1, 6),
                                                                                               (40, 1, 6)]}))
        assert timed and all("onednn_lstm" not in names and "lstm_steps" in names for names in timed)
        timed.clear()
        kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", profiles={"x": (3, 1, 6)}))
        assert timed and all("onednn_lstm" in names for names in timed)
    ctx = ranged.context()
    for T in (1, 3, 40):
        run = {"x": np.resize(feeds["x"], (T, 1, 6))}
        ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, run)[0]
        assert np.abs(ctx.run(run)["y"] - ref).max() <= steps._bound(ref)


@pytest.mark.parametrize("cell,lbr", FORMS)
@pytest.mark.parametrize("H", [4, 128])
def test_primitives_of_one_layer_share_their_reordered_weights(monkeypatch, cell, lbr, H):
    """Primitives of one layer whose chosen weight layouts are equal read one reordered copy: W and R are
    reordered once per distinct layout, not per input shape (the same shape with and without initial states
    surely shares); new weights are reordered again."""
    reorders, made = [], []
    real_reorder, real_init = cpu_dnnl_rnn.RnnPrimitive._reordered, cpu_dnnl_rnn.RnnPrimitive.__init__
    monkeypatch.setattr(cpu_dnnl_rnn.RnnPrimitive, "_reordered",
                        lambda self, *a: reorders.append(1) or real_reorder(self, *a))
    monkeypatch.setattr(cpu_dnnl_rnn.RnnPrimitive, "__init__",
                        lambda self, *a: made.append(self) or real_init(self, *a))      # all kept alive here
    fn = _kernel(cell, lbr, H, "bidirectional")
    cases = [steps._case(cell, T, N, 3, H, 2, h0=h0, c0=h0, seed=T * 10 + N)
             for T, N in [(2, 3), (1, 1), (5, 2), (3, 1), (4, 4)] for h0 in (True, False)]
    weights = steps._args(cases[0])[1:4]                # one layer: the same weight tensors every call
    for case in cases:
        case.update(W=cases[0]["W"], R=cases[0]["R"], B=cases[0]["B"])
        args = steps._args(case)
        _check(fn(args[0], *weights, *args[4:]), _ref(cell, lbr, case, "bidirectional"))
    equal = cpu_dnnl_rnn.library().lib.dnnl_memory_desc_equal
    distinct = 0
    for arg, mem in ((cpu_dnnl_rnn.ARG_WEIGHTS, "weights_layer"), (cpu_dnnl_rnn.ARG_WEIGHTS_1, "weights_iter")):
        reps: list = []
        for p in made:
            same = [q for q in reps if equal(p.layouts[arg], q.layouts[arg])]
            assert all(getattr(p, mem).value == getattr(q, mem).value for q in same)
            reps += [] if same else [p]
        distinct += len(reps)
    assert len(reorders) == distinct < 2 * len(made)
    changed = dict(cases[0], W=cases[0]["W"] * 0.5)
    _check(fn(*steps._args(changed)), _ref(cell, lbr, changed, "bidirectional"))
    assert len(reorders) == distinct + 2


def test_a_saved_engine_runs_after_loading_and_is_refused_in_one_line_without_the_library(monkeypatch, tmp_path):
    case = steps._case("lstm", 2, 1, 6, 5, 1, seed=4)
    data, feeds = _onnx_rnn("lstm", 0, case, "forward", "hc", ["y", "yh", "yc"])
    with monkeypatch.context() as m:
        m.setitem(TACTICS, "RNN", [t for t in TACTICS["RNN"] if t.name == "onednn_lstm"])
        kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu")).save(str(tmp_path / "m.kiln"))
    got = kiln.load(str(tmp_path / "m.kiln")).context().run(feeds)
    for name, r in zip(["y", "yh", "yc"], ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)):
        assert np.abs(got[name] - r).max() <= steps._bound(r), name
    monkeypatch.setattr(cpu_dnnl_rnn, "library", lambda: None)
    with pytest.raises(IncompatibleEngineError) as err:       # the tactic's own line, not "the plan is damaged"
        kiln.load(str(tmp_path / "m.kiln")).context()
    msg = str(err.value)
    assert "\n" not in msg and "onednn_lstm" in msg and "kiln[cpu-onednn]" in msg and "damaged" not in msg
