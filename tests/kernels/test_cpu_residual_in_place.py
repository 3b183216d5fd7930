"""Residual adds into the residual's own memory (runtime/residual_in_place.py, ``onednn_cached``'s ``into``): the
tactic against an FP64 reference with the residual before and after the activation, a residual it must not
write (a view of it alive, another layout), and whole CPU engines with every convolution on ``onednn_cached``
against ONNX Runtime: chains of residual blocks, a residual read again after its add, a residual that is an
engine output or has a view alive, a residual after SiLU, a concatenation and a non-convolution consumer.
Skipped where no oneDNN library is installed."""
from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.kernels import cpu_dnnl
from kiln.kernels.cpu_dnnl import make_convolution_onednn_cached
from kiln.kernels.registry import KernelContext
from kiln.runtime import residual_in_place
from test_cpu_conv import _check, _reference     # FP64 convolution with the layer's epilogue; the FP32 bound
from test_cpu_dnnl import cached_engine

pytestmark = pytest.mark.skipif(cpu_dnnl.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")

CPU = KernelContext(device="cpu", precision="fp32", layer_name="conv")
CL = torch.channels_last


def _attrs(act, after=False, k=3):
    p = k // 2
    return {"stride": [1, 1], "pads": [p, p, p, p], "dilation": [1, 1], "groups": 1, "activation": act,
            "residual_after_activation": after}


def _operands(seed=0, n=2, c=8, size=7, k=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size + 1, generator=g).contiguous(memory_format=CL)
    w = torch.randn(c, c, k, k, generator=g) / (c * k * k) ** 0.5
    b = torch.randn(c, generator=g)
    r = torch.randn(n, c, size, size + 1, generator=g).contiguous(memory_format=CL)
    return x, w, b, r


@pytest.mark.parametrize("act,after", [("relu", False), (None, False), ("silu", True), ("relu", True)])
def test_into_writes_the_sum_over_the_residual(act, after):
    x, w, b, r = _operands()
    attrs = _attrs(act, after)
    ref = _reference(x, w, b, attrs, r)
    run = make_convolution_onednn_cached(attrs, CPU)
    assert run.sums_into_residual
    for _ in range(2):                              # the primitive made, then the kept one
        r2 = r.clone(memory_format=CL)
        y, = run(x, w, b, r2, into=True)
        assert y is r2                              # written in place
        _check(y, ref)
    y, = run(x, w, b, r)                            # without into: a fresh output, the residual as it was
    assert y.data_ptr() != r.data_ptr()
    _check(y, ref)
    _check(r, r.double())


def test_into_leaves_a_shared_or_other_layout_residual_alone():
    x, w, b, r = _operands(1)
    attrs = _attrs("relu")
    ref = _reference(x, w, b, attrs, r)
    run = make_convolution_onednn_cached(attrs, CPU)
    kept = r.clone(memory_format=CL)
    view = kept[:1]                                 # another tensor on the residual's memory
    y, = run(x, w, b, kept, into=True)
    assert y.data_ptr() != kept.data_ptr()
    _check(y, ref)
    assert torch.equal(kept, r) and view.shape[0] == 1
    nchw = r.contiguous()
    y, = run(x, w, b, nchw, into=True)
    assert y.data_ptr() != nchw.data_ptr() and torch.equal(nchw, r)
    _check(y, ref)


class _Blocks(nn.Module):
    """Residual blocks; ``case`` picks what else reads a residual."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.ModuleList(nn.Conv2d(8, 8, k, padding=k // 2) for k in (1, 3, 1, 3, 1))

    def forward(self, x):
        s = F.relu(self.stem(x))
        if self.case == "silu":                     # YOLO's bottleneck: s + silu(conv(silu(conv(s))))
            y = s + F.silu(self.c[1](F.silu(self.c[0](s))))
            return (y + F.silu(self.c[3](F.silu(self.c[2](y))))).mean((2, 3))
        y = F.relu(self.c[1](F.relu(self.c[0](s))) + s)
        if self.case == "read_after":               # s read again after its add
            return torch.cat([y, self.c[4](s)], 1)
        if self.case == "output":                   # s an engine output too
            return y, s
        if self.case == "view":                     # a reshape of s read after its add
            return y.mean((2, 3)) + s.reshape(s.shape[0], 8, -1).amax(2)
        z = F.relu(self.c[3](F.relu(self.c[2](y))) + y)
        return F.max_pool2d(torch.cat([z, self.c[4](z)], 1), 2)      # chain; concat and pool after


def _donated(ctx) -> int:
    return sum(isinstance(s.fn, functools.partial) and s.fn.keywords == {"into": True} for s in ctx.program.steps)


@pytest.mark.parametrize("case,donated", [("chain", 2), ("silu", 2), ("read_after", 0), ("output", 0), ("view", 0)])
def test_engines_match_onnxruntime(monkeypatch, case, donated):
    import onnxruntime as ort
    torch.manual_seed(0)
    model = _Blocks(case).eval()
    f = io.BytesIO()
    outs = ["y", "s"] if case == "output" else ["y"]
    torch.onnx.export(model, (torch.randn(1, 3, 12, 12),), f, input_names=["x"], output_names=outs,
                      opset_version=17, dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    data = f.getvalue()
    engine = cached_engine(monkeypatch, data, (3, 12, 12))
    convs = [layer for layer in engine.layers if layer["kind"] == "Convolution"]
    assert all(layer["tactic"] == "onednn_cached" for layer in convs)
    assert sum(len(layer["inputs"]) > 3 and layer["inputs"][3] is not None for layer in convs) >= (donated or 1)
    ctx = engine.context()
    assert _donated(ctx) == donated
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for n in (1, 3, 1):
        x = np.random.default_rng(n).standard_normal((n, 3, 12, 12)).astype(np.float32)
        refs = sess.run(None, {"x": x})
        got = ctx.run({"x": x})
        for name, ref in zip(outs, refs):
            assert got[name].shape == ref.shape
            assert np.abs(got[name] - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max(), name


def test_only_cpu_programs_are_rewired():
    class Fake:
        device = "cuda"
    assert residual_in_place.sum_into_residuals(Fake()) == 0
