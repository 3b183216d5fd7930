"""The CPU convolution tactics of kernels/cpu_conv.py (oneDNN with fused post-ops, one GEMM on
channels-last memory, one GEMM for 1-D convolutions): each epilogue and geometry against an FP64 torch
reference, and whole models built with them against ONNX Runtime."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kiln
import kiln.onnx
from kiln.kernels import cpu_conv
from kiln.kernels.cpu_conv import (make_convolution_gemm1d_cpu, make_convolution_gemm_cpu, make_convolution_onednn,
                                   onednn_available)
from kiln.kernels.registry import TACTICS, KernelContext, tactics_for

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN fused convolution")

CPU = KernelContext(device="cpu", precision="fp32", layer_name="conv")
MAKERS = {"onednn": make_convolution_onednn, "gemm": make_convolution_gemm_cpu}

# FP64 references of the activations, written out (not kiln's activation table)
REF_ACT = {
    None: lambda t: t,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": lambda t: t * torch.sigmoid(t),
    "hard_swish": lambda t: t * (t + 3).clamp(0, 6) / 6,
    "leaky_relu": lambda t: torch.where(t > 0, t, 0.1 * t),
    "clip": lambda t: t.clamp(-1.0, 2.5),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5)),
    "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t ** 3))),
    "hard_sigmoid": lambda t: (t / 6 + 0.5).clamp(0, 1),
    "elu": lambda t: torch.where(t > 0, t, 0.7 * torch.expm1(t)),
    "mish": lambda t: t * torch.tanh(torch.log1p(torch.exp(t))),
}
ACT_PARAMS = {"leaky_relu": (0.1, None), "clip": (-1.0, 2.5), "hard_sigmoid": (1 / 6, 0.5), "elu": (0.7, None)}


def _attrs(act=None, stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1, **extra):
    attrs = {"stride": list(stride), "pads": list(pads), "dilation": list(dilation), "groups": groups,
             "activation": act, **extra}
    if act in ACT_PARAMS:
        attrs["alpha"], attrs["beta"] = ACT_PARAMS[act]
    return attrs


def _operands(n=2, cin=8, cout=16, size=9, k=3, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size, generator=g)
    w = torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5
    b = torch.randn(cout, generator=g)
    return x, w, b


def _reference(x, w, b, attrs, residual=None):
    begins, ends = attrs["pads"][:2], attrs["pads"][2:]
    xp = F.pad(x.double(), [begins[1], ends[1], begins[0], ends[0]])
    y = F.conv2d(xp, w.double(), None if b is None else b.double(), attrs["stride"], 0, attrs["dilation"],
                 attrs["groups"])
    act = REF_ACT[attrs.get("activation")]
    if residual is None:
        return act(y)
    if attrs.get("residual_after_activation"):
        return act(y) + residual.double()
    return act(y + residual.double())


def _check(got, ref):
    """FP32 agreement: max abs error <= 1e-5 + 1e-4 * max|ref| (the tolerance every FP32 row must meet)."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = float((got.double() - ref).abs().max())
    bound = 1e-5 + 1e-4 * float(ref.abs().max())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("tactic", list(MAKERS))
@pytest.mark.parametrize("act", list(REF_ACT))
def test_activation_epilogue_matches_fp64(act, tactic):
    x, w, b = _operands()
    attrs = _attrs(act)
    y, = MAKERS[tactic](attrs, CPU)(x, w, b)
    _check(y, _reference(x, w, b, attrs))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("tactic", list(MAKERS))
@pytest.mark.parametrize("act", [None, "relu", "sigmoid", "silu"])
@pytest.mark.parametrize("after", [False, True])
def test_residual_epilogue_matches_fp64(act, after, tactic):
    x, w, b = _operands()
    r = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(5))
    attrs = _attrs(act, residual=True, residual_after_activation=after)
    r_before = r.clone()
    y, = MAKERS[tactic](attrs, CPU)(x, w, b, r)
    _check(y, _reference(x, w, b, attrs, r))
    assert torch.equal(r, r_before), "the residual input must not be written"


@pytest.mark.parametrize("tactic", list(MAKERS))
@pytest.mark.parametrize("case", [
    dict(stride=(2, 2)),
    dict(pads=(0, 0, 1, 1)),                      # asymmetric (SAME_UPPER-style) padding
    dict(pads=(2, 2, 2, 2), dilation=(2, 2)),
    dict(groups=8),                               # depthwise
    dict(groups=2, stride=(2, 1), pads=(1, 0, 1, 0)),
])
def test_geometry_matches_fp64(case, tactic):
    groups = case.get("groups", 1)
    if groups > 1 and tactic == "gemm":
        pytest.skip("the GEMM tactic runs ungrouped convolutions only")
    x, w, b = _operands(cin=8, cout=8 if groups == 8 else 16, groups=groups)
    attrs = _attrs("relu", **case)
    y, = MAKERS[tactic](attrs, CPU)(x, w, b)
    _check(y, _reference(x, w, b, attrs))


@pytest.mark.parametrize("case", [dict(), dict(stride=(2, 2), pads=(0, 1, 1, 0))])
def test_one_by_one_gemm(case):
    x, w, b = _operands(k=1)
    attrs = _attrs("hard_swish", **{"pads": (0, 0, 0, 0), **case})
    y, = make_convolution_gemm_cpu(attrs, CPU)(x, w, b)
    _check(y, _reference(x, w, b, attrs))


def test_gemm_in_slices_matches_one_gemm(monkeypatch):
    """Past IM2COL_BYTES the patches are made a few output rows at a time: the same result."""
    x, w, b = _operands(n=3, size=13)
    attrs = _attrs("relu", stride=(2, 1), pads=(1, 0, 2, 1))
    whole, = make_convolution_gemm_cpu(attrs, CPU)(x, w, b)
    monkeypatch.setattr(cpu_conv, "IM2COL_BYTES", 3 * 12 * 8 * 9 * 4)     # ~3 of 7 output rows per slice
    sliced, = make_convolution_gemm_cpu(attrs, CPU)(x, w, b)
    _check(sliced, _reference(x, w, b, attrs))
    assert torch.equal(whole, sliced)


@pytest.mark.parametrize("tactic", list(MAKERS))
def test_no_bias_and_fused_max_pool(tactic):
    x, w, _ = _operands()
    attrs = _attrs("relu", pool={"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1]})
    y, = MAKERS[tactic](attrs, CPU)(x, w)
    ref = F.max_pool2d(_reference(x, w, None, attrs), 3, 2, 1)
    _check(y, ref)


@pytest.mark.parametrize("tactic", list(MAKERS))
def test_packed_weight_follows_shape_and_weight_changes(tactic):
    """One layer meets several input shapes (a dynamic profile) and, for a weight computed at run
    time, a new weight tensor each call: every result is that call's convolution."""
    x, w, b = _operands(n=1, size=7)
    attrs = _attrs("silu")
    run = MAKERS[tactic](attrs, CPU)
    for n, size in [(1, 7), (3, 11), (1, 7), (2, 5)]:
        xi = torch.randn(n, 8, size, size)
        _check(run(xi, w, b)[0], _reference(xi, w, b, attrs))
    w2 = torch.randn_like(w)
    _check(run(x, w2, b)[0], _reference(x, w2, b, attrs))
    _check(run(x, w, b)[0], _reference(x, w, b, attrs))


@pytest.mark.parametrize("tactic", list(MAKERS))
def test_meta_tensors_give_the_output_shape(tactic):
    x, w, b = _operands()
    y, = MAKERS[tactic](_attrs("relu", stride=(2, 2), pads=(1, 1, 0, 0)), CPU)(x.to("meta"), w, b)
    assert y.is_meta and tuple(y.shape) == (2, 16, 4, 4)


def test_offered_only_for_fp32_2d_cpu(monkeypatch):
    monkeypatch.setattr("kiln.kernels.cpu_dnnl.library", lambda: None)      # onednn_cached: tests/kernels/test_cpu_dnnl.py
    names = lambda attrs, ctx: [t.name for t in tactics_for("Convolution", attrs, ctx)]  # noqa: E731
    assert names(_attrs(), CPU) == ["torch", "onednn", "gemm"]
    assert names(_attrs(groups=2), CPU) == ["torch", "onednn"]
    assert names(_attrs(), KernelContext(device="cpu", precision="fp16")) == ["torch"]
    assert names(_attrs(), KernelContext(device="cpu", input_dtypes=("float64",))) == ["torch"]
    assert names({**_attrs(), "stride": [1], "pads": [0, 0], "dilation": [1]}, CPU) == ["torch", "gemm1d"]
    assert names({**_attrs(groups=2), "stride": [1], "pads": [0, 0], "dilation": [1]}, CPU) == ["torch"]
    monkeypatch.setattr("kiln.kernels.cpu_conv.onednn_available", lambda: False)
    assert names(_attrs(), CPU) == ["torch", "gemm"]


class _Block(nn.Module):
    """Convolutions with each epilogue the passes fuse: BN+ReLU, a residual add, hardswish, SiLU,
    a depthwise convolution, a strided asymmetric padding, then a pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.c1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.down = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(24, 24, 3, 2))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(self.c1(s) + s)
        y = F.hardswish(self.dw(y))
        y = F.silu(self.pw(y))
        y = self.down(y)
        return self.head(y.mean((2, 3)))


def _force(monkeypatch, name):
    """Only tactic ``name`` for the convolutions it supports; torch for the others. ``onednn`` is offered where
    ``onednn_cached`` is not: forced, it stands in for a machine without oneDNN's library."""
    if name == "onednn":
        monkeypatch.setattr("kiln.kernels.cpu_dnnl.library", lambda: None)
    mine = next(t for t in TACTICS["Convolution"] if t.name == name)
    torch_t = next(t for t in TACTICS["Convolution"] if t.name == "torch")
    rest = dataclasses.replace(torch_t, supports=lambda attrs, ctx: not mine.supports(attrs, ctx))
    monkeypatch.setitem(TACTICS, "Convolution", [mine, rest])


@pytest.mark.parametrize("forced", ["onednn", "gemm", None])
def test_model_matches_onnxruntime(monkeypatch, forced):
    """A small CNN built for the CPU, with every convolution on one tactic (forced) or as the build's
    timing chose, against ONNX Runtime; batch 1 and 3 on a dynamic-batch engine."""
    import onnxruntime as ort
    torch.manual_seed(0)
    model = _Block().eval()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), f, input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    data = f.getvalue()
    tactics_for("Convolution", _attrs(), CPU)       # load every kernel module before narrowing the table
    if forced:
        _force(monkeypatch, forced)
    net = kiln.onnx.parse(data)
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": ((1, 3, 16, 16), (2, 3, 16, 16),
                                                                             (3, 3, 16, 16))}))
    if forced:
        convs = [layer for layer in engine.layers if layer["kind"] == "Convolution"]
        assert len(convs) == 5      # the depthwise one runs on torch where GEMM is forced
        assert sum(layer["tactic"] == forced for layer in convs) == (5 if forced == "onednn" else 4)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context()
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        got = next(iter(ctx.run({"x": x}).values()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


# (batch, Cin, Cout, kernel, stride, dilation, length, pads): silero VAD's short-window convolutions, its STFT
# (one input channel, a 256-tap window every 128 samples), a dilated asymmetric one, a 1x1 head
CONV1D = [(1, 129, 128, 3, 1, 1, 4, (1, 1)), (1, 1, 258, 256, 128, 1, 832, (0, 0)), (2, 6, 5, 5, 2, 2, 23, (2, 3)),
          (3, 16, 1, 1, 1, 1, 1, (0, 0))]


@pytest.mark.parametrize("case", CONV1D)
@pytest.mark.parametrize("act,residual,after", [(None, False, False), ("relu", False, False),
                                                ("sigmoid", True, False), ("silu", True, True)])
def test_gemm1d_matches_fp64(case, act, residual, after):
    n, cin, cout, k, stride, dil, length, pads = case
    g = torch.Generator().manual_seed(k + length)
    x = torch.randn(n, cin, length, generator=g)
    w = torch.randn(cout, cin, k, generator=g) / (cin * k) ** 0.5
    b = torch.randn(cout, generator=g)
    attrs = {"stride": [stride], "pads": list(pads), "dilation": [dil], "groups": 1, "activation": act,
             **({"residual_after_activation": True} if after else {})}
    y = F.conv1d(F.pad(x.double(), pads), w.double(), b.double(), stride, 0, dil)
    r = torch.randn(y.shape, generator=g) if residual else None
    ref = (REF_ACT[act](y) + r.double()) if after else REF_ACT[act](y + (r.double() if residual else 0))
    run = make_convolution_gemm1d_cpu(attrs, CPU)
    got = run(x, w, b, r)[0]
    assert got.transpose(1, 2).is_contiguous()          # [N, Cout, Lo] over channels-last memory
    _check(got, ref)
    _check(run(got.new_tensor(x), w, b, r)[0], ref)    # a second call reuses the kept buffers
    _check(run(x.transpose(1, 2).contiguous().transpose(1, 2), w, b, r)[0], ref)   # a channels-last input
    assert make_convolution_gemm1d_cpu(attrs, CPU)(x.to("meta"), w, b, r)[0].shape == ref.shape


def test_1d_model_on_gemm1d_matches_onnxruntime(monkeypatch):
    """An audio-style stack of 1-D convolutions (strided, padded, ReLU, a residual) with every convolution on
    the 1-D GEMM tactic, against ONNX Runtime, at two lengths of one dynamic-length engine."""
    import onnxruntime as ort

    class Audio(nn.Module):
        def __init__(self):
            super().__init__()
            self.stft = nn.Conv1d(1, 16, 32, 16)
            self.c1 = nn.Conv1d(16, 16, 3, 1, 1)
            self.c2 = nn.Conv1d(16, 8, 3, 2, 1)

        def forward(self, x):
            s = torch.relu(self.stft(x))
            return self.c2(torch.relu(self.c1(s)) + s)
    torch.manual_seed(1)
    f = io.BytesIO()
    torch.onnx.export(Audio().eval(), (torch.randn(1, 1, 256),), f, input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {2: "t"}}, dynamo=False)
    data = f.getvalue()
    tactics_for("Convolution", _attrs(), CPU)
    _force(monkeypatch, "gemm1d")
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", profiles={
        "x": ((1, 1, 64), (1, 1, 256), (1, 1, 512))}))
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "Convolution"] == ["gemm1d"] * 3
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context()
    for t in (96, 512):
        x = np.random.default_rng(t).standard_normal((1, 1, t)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        got = next(iter(ctx.run({"x": x}).values()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_gemm1d_kept_buffers_follow_shape_and_weight_changes():
    """The patch and padded-input buffers are kept per input shape (the bias column of ones and the zero borders
    stay intact across calls), and a new weight or bias tensor is laid out afresh."""
    attrs = {"stride": [1], "pads": [2, 1], "dilation": [2], "groups": 1, "activation": "relu"}
    run = make_convolution_gemm1d_cpu(attrs, CPU)
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(6, 4, 3, generator=g), torch.randn(6, generator=g)
    w2, b2 = torch.randn(6, 4, 3, generator=g), torch.randn(6, generator=g)

    def ref(x, w, b):
        return F.relu(F.conv1d(F.pad(x.double(), [2, 1]), w.double(), b.double(), 1, 0, 2))
    for length, weight, bias in [(7, w, b), (11, w, b), (7, w, b), (7, w2, b), (7, w2, b2), (11, w, None),
                                 (7 + 2 * cpu_conv.MAX_PACKED_SHAPES, w, b), (7, w, b)]:
        x = torch.randn(2, 4, length, generator=g) * 100      # large values: a stale border or bias column shows
        if bias is None:
            got = run(x, weight)[0]
            want = F.relu(F.conv1d(F.pad(x.double(), [2, 1]), weight.double(), None, 1, 0, 2))
        else:
            got, want = run(x, weight, bias)[0], ref(x, weight, bias)
        _check(got, want)


@pytest.mark.parametrize("pads", [(0, 0), (1, 2)])
def test_gemm1d_repeated_calls_follow_layout_weight_bias_and_buffers(pads):
    """Calls at an input (shape, strides) already run take a shorter path: it must follow a second layout of the
    same shape, a new weight or bias tensor (or none), residual calls in between, and kept buffers dropped and
    made again (MAX_PACKED_SHAPES other shapes in between)."""
    attrs = {"stride": [2], "pads": list(pads), "dilation": [1], "groups": 1, "activation": "relu"}
    run = make_convolution_gemm1d_cpu(attrs, CPU)
    g = torch.Generator().manual_seed(8)
    w, b = torch.randn(6, 4, 3, generator=g), torch.randn(6, generator=g)
    w2, b2 = torch.randn(6, 4, 3, generator=g), torch.randn(6, generator=g)

    def ref(x, w, b, r=None):
        y = F.conv1d(F.pad(x.double(), list(pads)), w.double(), None if b is None else b.double(), 2)
        return F.relu(y + (0 if r is None else r.double()))

    def new(length, channels_last=False):
        x = torch.randn(2, 4, length, generator=g) * 10
        return x.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else x
    steps = [(new(9), w, b), (new(9), w, b), (new(9, True), w, b), (new(9), w, b), (new(9), w2, b), (new(9), w2, b),
             (new(9, True), w2, b), (new(9), w2, b2), (new(9, True), w2, b2), (new(9), w2, None),
             (new(9, True), w2, None), (new(9), w2, b2), ("residual", w2, b2), (new(9), w2, b2)]
    steps += [(new(11 + i), w2, b2) for i in range(cpu_conv.MAX_PACKED_SHAPES + 1)] + [(new(9), w2, b2)] * 2
    for x, weight, bias in steps:
        if isinstance(x, str):
            x = new(9)
            r = torch.randn(ref(x, weight, bias).shape, generator=g)
            _check(run(x, weight, bias, r)[0], ref(x, weight, bias, r))
            continue
        _check(run(x, weight, bias)[0], ref(x, weight, bias))


def test_gemm1d_a_weight_of_another_kernel_size_at_the_same_input_shape():
    """A weight computed at run time may change its kernel size while the input shape stays: the kept buffers
    follow it."""
    run = make_convolution_gemm1d_cpu({"stride": [1], "pads": [1, 1], "dilation": [1], "groups": 1}, CPU)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 3, 10, generator=g)
    for k in (3, 5, 3):
        w, b = torch.randn(4, 3, k, generator=g), torch.randn(4, generator=g)
        _check(run(x, w, b)[0], F.conv1d(F.pad(x.double(), [1, 1]), w.double(), b.double()))
