"""The bidirectional oneDNN RNN tactics that run each direction as a one-thread primitive, the reverse one on a
second thread where torch has two or more (kernels/cpu_dnnl_rnn.py: onednn_lstm_dirs, onednn_gru_dirs): against
the FP64 numpy RNN (ONNX semantics) and ONNX Runtime, on 1 and 2 threads, with and without bias and initial
states; the second thread used only on two threads; the primitives made for one thread whatever torch's count;
offered for bidirectional layers only, after onednn_lstm/onednn_gru. Skipped without a oneDNN library.
Tolerance: the FP32 bound of test_cpu_rnn_steps (as test_cpu_onednn_rnn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
import kiln.onnx
import test_cpu_onednn_rnn as base      # the FP64 reference (_ref), ONNX models (_onnx_rnn), _check
import test_cpu_rnn_steps as steps
from kiln.kernels import KernelContext, cpu_dnnl_rnn, get_tactic, tactics_for
from kiln.kernels.registry import TACTICS

pytestmark = pytest.mark.skipif(cpu_dnnl_rnn.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")
ort = pytest.importorskip("onnxruntime")

DIRS = {"lstm": "onednn_lstm_dirs", "gru": "onednn_gru_dirs"}


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _kernel(cell, lbr, H):
    attrs = {"cell": cell, "hidden_size": H, "direction": "bidirectional", "linear_before_reset": lbr}
    return get_tactic("RNN", DIRS[cell]).make(attrs, KernelContext(device="cpu", layer_name="rnn"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell,lbr", base.FORMS)
@pytest.mark.parametrize("bias,h0,c0", [(True, True, True), (False, True, False), (True, False, False)])
def test_matches_fp64_reference_on_one_and_two_threads(monkeypatch, threads, cell, lbr, bias, h0, c0):
    submitted = []
    real = cpu_dnnl_rnn._second_thread
    monkeypatch.setattr(cpu_dnnl_rnn, "_second_thread", lambda: (submitted.append(1), real())[1])
    torch.set_num_threads(threads)
    fn = _kernel(cell, lbr, 4)
    for seed in (1, 2):                                 # the second call reuses the primitives, new values
        case = steps._case(cell, 3, 2, 5, 4, 2, bias, h0, c0, seed=seed + lbr)
        base._check(fn(*steps._args(case)), base._ref(cell, lbr, case, "bidirectional"))
    assert len(submitted) == (2 if threads > 1 else 0)      # the reverse direction on a second thread on 2 threads


def test_each_direction_is_a_one_thread_primitive(monkeypatch):
    """Made on 2 threads, each primitive is still made for one (libdnnl's OpenMP count when oneDNN makes it)."""
    made = []
    real = cpu_dnnl_rnn.RnnPrimitive.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self.threads)
    monkeypatch.setattr(cpu_dnnl_rnn.RnnPrimitive, "__init__", spy)
    torch.set_num_threads(2)
    case = steps._case("lstm", 3, 1, 5, 4, 2, seed=3)
    _kernel("lstm", 0, 4)(*steps._args(case))
    assert made == [1, 1]


def test_offered_for_bidirectional_layers_after_the_one_primitive_tactic():
    ctx = KernelContext(device="cpu")
    for cell in ("lstm", "gru"):
        names = lambda d: [t.name for t in tactics_for("RNN", {"cell": cell, "hidden_size": 4,   # noqa: E731
                                                                 "direction": d}, ctx)]
        both = names("bidirectional")
        assert DIRS[cell] in both and both.index(DIRS[cell]) == both.index(base.TACTIC[cell]) + 1
        assert DIRS[cell] not in names("forward") and DIRS[cell] not in names("reverse")


@pytest.mark.parametrize("cell,lbr,states,outs", [("lstm", 0, "hc", ["y", "yh", "yc"]), ("gru", 1, "h", ["y", "yh"]),
                                                  ("gru", 0, "", ["yh"])])
def test_engine_on_two_threads_matches_onnxruntime(monkeypatch, cell, lbr, states, outs):
    case = steps._case(cell, 4, 2, 6, 5, 2, seed=7)
    data, feeds = base._onnx_rnn(cell, lbr, case, "bidirectional", states, outs)
    monkeypatch.setitem(TACTICS, "RNN", [t for t in TACTICS["RNN"] if t.name == DIRS[cell]])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "RNN"] == [DIRS[cell]]
    ctx = engine.context(threads=2)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    for _ in range(2):
        got = ctx.run(feeds)
        for name, r in zip(outs, ref):
            assert np.abs(got[name] - r).max() <= steps._bound(r), name
