"""The CPU FullyConnected tactics ``onednn_gemm`` and ``onednn_gemm_unfused`` (kernels/cpu_gemm.py): a oneDNN
matmul per row count on a padded plain copy of the weight. Activations, ranks, bias or none, a page-aligned
width, changing row counts and weights, against FP64 formulas; the padded layout read back; when they are
offered; an engine without the library refused; an MLP built with them (saved and loaded) against ONNX Runtime."""
from __future__ import annotations

import ctypes
import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kiln
import kiln.onnx
from kiln.builder.tactics import CPU_TIE_MARGIN, _fastest
from kiln.errors import IncompatibleEngineError
from kiln.kernels.cpu_gemm import PAD, PaddedWeight, make_fc_onednn_gemm, make_fc_onednn_gemm_unfused
from kiln.kernels.dnnl_api import P, library
from kiln.kernels.registry import TACTICS, KernelContext, get_tactic, tactics_for
from test_cpu_linear import CPU, _check      # FP32 products over K <= 24 terms: rounding is far below its bound
from test_cpu_linear_unfused import REF_ACT, _attrs

pytestmark = pytest.mark.skipif(library() is None, reason="oneDNN's library (kiln[cpu-onednn]) is not installed")

MAKERS = {"onednn_gemm": make_fc_onednn_gemm, "onednn_gemm_unfused": make_fc_onednn_gemm_unfused}
FUSABLE = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hard_swish", "clip", "leaky_relu")


def _ref(x, w, b, act):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return REF_ACT[act](y) if act else y


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("act", [None, *REF_ACT])
@pytest.mark.parametrize("shape,n", [((5, 24), 10), ((2, 3, 24), 10), ((3, 8), 1024)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64(name, act, shape, n, bias):
    if name == "onednn_gemm_unfused" and act is None:
        pytest.skip("offered only with an activation")
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(shape, generator=g)
    w = torch.randn(n, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    y, = MAKERS[name](_attrs(act), CPU)(x, w, b)
    _check(y, _ref(x, w, b, act))


def test_weight_rows_are_padded():
    lib = library()
    w, b = torch.randn(1024, 6), torch.randn(1024)
    packed = PaddedWeight(lib, w, b)
    assert (1024 + PAD) * 4 % 4096 != 0                # a row of a page-aligned width no longer is
    assert lib.lib.dnnl_memory_desc_get_size(packed.md) == 4 * 6 * (1024 + PAD)
    ptr = P()
    lib.lib.dnnl_memory_get_data_handle(packed.memory, ctypes.byref(ptr))
    rows = np.ctypeslib.as_array((ctypes.c_float * (6 * (1024 + PAD))).from_address(ptr.value)).reshape(6, -1)
    assert np.array_equal(rows[:, :1024], w.t().numpy())
    assert torch.equal(packed.bias, b) and packed.bias.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("name", list(MAKERS))
def test_row_counts_weights_and_layouts_change(name):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    run = MAKERS[name](_attrs("gelu"), CPU)
    for rows in (1, 7, 1, 3, 9, 2, 5, 11, 1):       # more row counts than primitives kept
        x = torch.randn(rows, 8, generator=g)
        _check(run(x, w, b)[0], _ref(x, w, b, "gelu"))
    for w2, b2 in ((torch.randn(6, 8, generator=g), b), (w, torch.randn(6, generator=g)), (w, None)):
        x = torch.randn(4, 8, generator=g)
        _check(run(x, w2, b2)[0], _ref(x, w2, b2, "gelu"))
    xt = torch.randn(8, 5, generator=g).t()            # a non-contiguous input, left unchanged
    before = xt.clone()
    _check(run(xt, w, b)[0], _ref(xt, w, b, "gelu"))
    assert torch.equal(xt, before)


def test_meta_mismatch_and_when_offered(monkeypatch):
    run = make_fc_onednn_gemm(_attrs("gelu"), CPU)
    y, = run(torch.empty(3, 5, 8, device="meta"), torch.randn(4, 8), None)
    assert y.is_meta and tuple(y.shape) == (3, 5, 4)
    with pytest.raises(RuntimeError):                  # operands that disagree never reach oneDNN
        run(torch.randn(3, 7), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError):
        run(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5))
    names = lambda attrs, ctx: [t.name for t in tactics_for("FullyConnected", attrs, ctx)]  # noqa: E731
    assert {"onednn_gemm", "onednn_gemm_unfused"} <= set(names(_attrs("gelu"), CPU))
    assert "onednn_gemm" in names(_attrs(None), CPU) and "onednn_gemm_unfused" not in names(_attrs(None), CPU)
    elu = names(_attrs("elu"), CPU)                    # no oneDNN post-op: only the unfused tactic
    assert "onednn_gemm_unfused" in elu and "onednn_gemm" not in elu
    for ctx in (KernelContext(device="cpu", precision="bf16"), KernelContext(device="cuda", precision="fp32"),
                KernelContext(device="cpu", precision="fp32", input_dtypes=("float16",))):
        assert not {"onednn_gemm", "onednn_gemm_unfused"} & set(names(_attrs("gelu"), ctx))
    monkeypatch.setattr("kiln.kernels.cpu_gemm.library", lambda: None)
    assert not {"onednn_gemm", "onednn_gemm_unfused"} & set(names(_attrs("gelu"), CPU))
    with pytest.raises(IncompatibleEngineError, match="onednn_gemm_unfused.*kiln\\[cpu-onednn\\]"):
        make_fc_onednn_gemm_unfused(_attrs("gelu"), CPU)


def test_a_tie_with_the_prepacked_tactics_keeps_the_padded_gemm():
    """The padded-weight tactics come before cpu_linear's prepacked ones in preference order, so a time within the
    CPU tie margin of theirs keeps the padded GEMM; one clearly slower does not."""
    for act, ours, theirs in ((None, "onednn_gemm", "onednn"), ("gelu", "onednn_gemm_unfused", "onednn_unfused")):
        cands = tactics_for("FullyConnected", _attrs(act), CPU)
        order = [t.name for t in cands]
        assert order.index(ours) < order.index(theirs) and order.index("onednn_gemm") < order.index("onednn")
        assert _fastest(cands, {theirs: 1.0, ours: 1.0 * (CPU_TIE_MARGIN - 0.01)}, CPU_TIE_MARGIN) == ours
        assert _fastest(cands, {theirs: 1.0, ours: 1.0 * (CPU_TIE_MARGIN + 0.01)}, CPU_TIE_MARGIN) == theirs


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 1024), nn.Linear(1024, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(F.gelu(self.a(x)))))


@pytest.mark.parametrize("name", list(MAKERS))
def test_mlp_matches_onnxruntime(monkeypatch, tmp_path, name):
    import onnxruntime as ort
    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(_MLP().eval(), (torch.randn(2, 7, 12),), f, input_names=["x"], opset_version=17,
                      dynamo=False)
    data = f.getvalue()
    # one candidate per layer, so nothing is timed: this tactic wherever it is offered
    mine = get_tactic("FullyConnected", name)
    plain = dataclasses.replace(get_tactic("FullyConnected", "torch"),
                                supports=lambda a, c: not mine.supports(a, c))
    monkeypatch.setitem(TACTICS, "FullyConnected", [mine, plain])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", optimization_level=3))
    tactics = [layer["tactic"] for layer in engine.layers if layer["kind"] == "FullyConnected"]
    assert tactics == ([name] * 3 if name == "onednn_gemm" else [name, name, "torch"])
    x = np.random.default_rng(0).standard_normal((2, 7, 12)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    engine.save(str(tmp_path / "mlp.kiln"))
    loaded = kiln.load(str(tmp_path / "mlp.kiln"))
    assert [layer["tactic"] for layer in loaded.layers if layer["kind"] == "FullyConnected"] == tactics
    for e in (engine, loaded):
        got = next(iter(e.context().run({"x": x}).values()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
