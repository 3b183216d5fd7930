"""The ``onednn_cached`` convolution tactic (kernels/cpu_dnnl.py: a oneDNN primitive made once per layer and
input shape, called through oneDNN's C API): each activation, residual placement and geometry against an FP64
torch reference, shapes and weights that change, inputs in other layouts, thread counts, and a small CNN
built with it against ONNX Runtime. Skipped where no oneDNN library is installed (pip install onednn-cpu-gomp,
or KILN_ONEDNN_LIBRARY)."""
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
from kiln.kernels import cpu_dnnl
from kiln.kernels.cpu_dnnl import make_convolution_onednn_cached
from kiln.kernels.registry import TACTICS, KernelContext, tactics_for
from test_cpu_conv import _check, _reference     # FP64 convolution with the layer's epilogue; the FP32 bound

pytestmark = pytest.mark.skipif(cpu_dnnl.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")

CPU = KernelContext(device="cpu", precision="fp32", layer_name="conv")

# the activations the tactic fuses as oneDNN eltwise post-ops (test_cpu_conv's FP64 references check them)
ACTS = [None, "relu", "sigmoid", "tanh", "silu", "hard_swish"]


def _attrs(act=None, stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), **extra):
    return {"stride": list(stride), "pads": list(pads), "dilation": list(dilation), "groups": 1, "activation": act,
            **extra}


def _operands(n=2, cin=8, cout=16, size=9, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size + 2, generator=g)
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g)
    return x, w, b


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("geometry", [
    {},
    {"stride": (2, 2)},
    {"stride": (2, 1), "pads": (1, 0, 2, 1), "dilation": (1, 2)},     # asymmetric padding, dilation
    {"pads": (0, 0, 0, 0)},
])
def test_activation_and_geometry_match_fp64(act, geometry):
    x, w, b = _operands()
    attrs = _attrs(act, **geometry)
    y, = make_convolution_onednn_cached(attrs, CPU)(x, w, b)
    _check(y, _reference(x, w, b, attrs))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])     # added after / fused
def test_residual_matches_fp64_and_is_not_written(act, after, layout):
    x, w, b = _operands()
    r = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=layout)
    kept = r.clone()
    attrs = _attrs(act, residual=True, residual_after_activation=after)
    y, = make_convolution_onednn_cached(attrs, CPU)(x, w, b, r)
    _check(y, _reference(x, w, b, attrs, r))
    assert torch.equal(r, kept)


@pytest.mark.parametrize("after", [False, True])
def test_residual_is_a_post_op_in_the_layers_order(monkeypatch, after):
    """A channels-last residual of the output's shape is fused (binary add post-op) in the layer's order; a
    broadcast one, or one in NCHW memory, is added after the primitive."""
    made = []
    real = cpu_dnnl.Primitive

    def recording(*args, **kwargs):
        made.append(args[-1])
        return real(*args, **kwargs)
    monkeypatch.setattr(cpu_dnnl, "Primitive", recording)
    x, w, b = _operands()
    attrs = _attrs("silu", residual=True, residual_after_activation=after)
    fn = make_convolution_onednn_cached(attrs, CPU)
    r = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(6))
    r = r.contiguous(memory_format=torch.channels_last)
    _check(fn(x, w, b, r)[0], _reference(x, w, b, attrs, r))
    act = ("eltwise", *cpu_dnnl._ELTWISE["silu"])
    assert made == [(act, ("add",)) if after else (("add",), act)]
    rb = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(7))
    _check(fn(x, w, b, rb)[0], _reference(x, w, b, attrs, rb))
    assert made[1] == ((act,) if after else ())
    _check(fn(x, w, b, r.contiguous())[0], _reference(x, w, b, attrs, r))
    assert len(made) == 2


def test_without_bias_and_one_by_one():
    x, w, _ = _operands(k=1)
    attrs = _attrs("silu", pads=(0, 0, 0, 0))
    fn = make_convolution_onednn_cached(attrs, CPU)
    torch.full((4096,), 7.0).sum()         # freed memory with other values around
    y, = fn(x, w, None)
    _check(y, _reference(x, w, None, attrs))


def test_operands_that_disagree_are_refused_before_onednn():
    """A weight with fewer input channels than x, or a short bias (a damaged engine), never reaches the
    primitive, which would read past them: torch's convolution refuses them."""
    x, w, b = _operands()
    fn = make_convolution_onednn_cached(_attrs("relu"), CPU)
    with pytest.raises(RuntimeError, match="channels"):
        fn(x, w[:, :4].contiguous(), b)
    with pytest.raises(RuntimeError):
        fn(x, w, b[:3].contiguous())


def test_shapes_and_weights_change():
    """A primitive per input shape (the first one again after another), a new one for a new weight tensor."""
    attrs = _attrs("relu", stride=(2, 2))
    fn = make_convolution_onednn_cached(attrs, CPU)
    x1, w1, b1 = _operands(n=1, size=9, seed=1)
    x2, _, _ = _operands(n=3, size=14, seed=2)
    for x in (x1, x2, x1):
        _check(fn(x, w1, b1)[0], _reference(x, w1, b1, attrs))
    w2 = w1 * -2.0
    _check(fn(x1, w2, b1)[0], _reference(x1, w2, b1, attrs))
    b2 = b1 + 1.0
    _check(fn(x1, w2, b2)[0], _reference(x1, w2, b2, attrs))


@pytest.mark.parametrize("mode", ["act", "add", "sum", "nchw"])
def test_operands_at_new_and_reused_addresses(mode):
    """One primitive fed the same input tensor refilled in place, new input tensors, outputs kept alive (so the
    next output lands elsewhere) or dropped (so it may land at the same address), and residuals at new and reused
    addresses (added as a post-op, or summed into in place): every call reads and writes the operands it is given
    (fails where a changed address is not passed on to oneDNN)."""
    g = torch.Generator().manual_seed(11)
    nchw = mode == "nchw"
    cin = 3 if nchw else 8
    attrs = _attrs("relu", residual=mode in ("add", "sum"))
    fn = make_convolution_onednn_cached(attrs, CPU)
    _, w, b = _operands(cin=cin, seed=3)

    def fresh(shape):
        t = torch.randn(shape, generator=g)
        return t if nchw else t.contiguous(memory_format=torch.channels_last)
    x = fresh((2, cin, 9, 11))
    kept = []
    for i in range(8):
        if i in (2, 5):
            x.copy_(torch.randn(x.shape, generator=g))      # the same address, new values
        elif i % 2:
            x = fresh((2, cin, 9, 11))
        r = fresh((2, 16, 9, 11)).contiguous(memory_format=torch.channels_last) if attrs["residual"] else None
        want = _reference(x, w, b, attrs, r)
        if mode == "sum":
            y, = fn(x, w, b, r, into=True)
            assert y is r                                   # summed into the residual tensor itself
        else:
            y, = fn(x, w, b, r)
        _check(y, want)
        if i % 3 == 0:
            kept.append(y)


def test_inputs_in_other_layouts():
    """NCHW input, a channel slice of an NHWC tensor (a Split output) and a transposed view all read right."""
    x, w, b = _operands(cin=8)
    attrs = _attrs("silu")
    fn = make_convolution_onednn_cached(attrs, CPU)
    wide = torch.randn(2, 16, 9, 11).contiguous(memory_format=torch.channels_last)
    for inp in (x, wide[:, 8:], x.transpose(2, 3).contiguous().transpose(2, 3)):
        _check(fn(inp, w, b)[0], _reference(inp, w, b, attrs))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    x, w, b = _operands(n=2, cin=16, cout=32, size=20)
    attrs = _attrs("silu")
    fn = make_convolution_onednn_cached(attrs, CPU)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(fn(x, w, b)[0], _reference(x, w, b, attrs))
    finally:
        torch.set_num_threads(before)


def test_meta_tensors_give_the_output_shape():
    x, w, b = _operands()
    y, = make_convolution_onednn_cached(_attrs("relu", stride=(2, 2), pads=(1, 1, 0, 0)), CPU)(x.to("meta"), w, b)
    assert y.is_meta and tuple(y.shape) == (2, 16, 4, 5)
    y, = make_convolution_onednn_cached(_attrs("relu"), CPU)(x[:0], w, b)    # an empty batch
    assert tuple(y.shape) == (0, 16, 9, 11)


def test_offered_where_it_runs(monkeypatch):
    names = lambda attrs, ctx: [t.name for t in tactics_for("Convolution", attrs, ctx)]  # noqa: E731
    assert "onednn_cached" in names(_attrs("silu"), CPU)
    for attrs, ctx in [(_attrs("mish"), CPU), (_attrs(pool={"kernel": [2, 2]}), CPU),
                       ({**_attrs(), "stride": [1], "pads": [0, 0], "dilation": [1]}, CPU),
                       (_attrs(), KernelContext(device="cpu", precision="fp16")),
                       (_attrs(), KernelContext(device="cpu", input_dtypes=("float64",)))]:
        assert "onednn_cached" not in names(attrs, ctx)
    monkeypatch.setattr(cpu_dnnl, "library", lambda: None)
    assert "onednn_cached" not in names(_attrs(), CPU)


def test_a_missing_library_is_not_offered(monkeypatch, tmp_path):
    monkeypatch.setitem(cpu_dnnl._loaded, "lib", cpu_dnnl._loaded.get("lib"))     # restored after the test
    cpu_dnnl._loaded.pop("lib")
    monkeypatch.setenv(cpu_dnnl.LIBRARY_ENV, str(tmp_path / "libdnnl.so.3"))
    assert cpu_dnnl.library() is None
    cpu_dnnl._loaded.pop("lib")
    (tmp_path / "libdnnl.so.3").write_bytes(b"not a library")
    assert cpu_dnnl.library() is None


class _Block(nn.Module):
    """Convolutions with the epilogues nudenet's C2f blocks have: SiLU, a residual after the activation, a
    strided asymmetric padding, a 1x1 without activation, then a pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.c1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.down = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 24, 3, 2))
        self.pw = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        s = F.silu(self.stem(x))
        y = F.silu(self.c1(s)) + s
        y = F.relu(self.down(y))
        return self.head(self.pw(y).mean((2, 3)))


def _forced_engine(monkeypatch) -> tuple[bytes, kiln.Engine]:
    """The small CNN's ONNX bytes and its CPU engine with every convolution on this tactic."""
    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(_Block().eval(), (torch.randn(1, 3, 16, 16),), f, input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    data = f.getvalue()
    return data, cached_engine(monkeypatch, data, (3, 16, 16))


def cached_engine(monkeypatch, data: bytes, chw: tuple[int, int, int]) -> kiln.Engine:
    """The CPU engine of ``data`` (input x, batch 1..3 of ``chw``) with every convolution onednn_cached can run on
    it, and torch's tactic for the rest."""
    tactics_for("Convolution", _attrs(), CPU)       # load every kernel module before narrowing the table
    mine = next(t for t in TACTICS["Convolution"] if t.name == "onednn_cached")
    torch_t = next(t for t in TACTICS["Convolution"] if t.name == "torch")
    rest = dataclasses.replace(torch_t, supports=lambda attrs, ctx: not mine.supports(attrs, ctx))
    with monkeypatch.context() as m:
        m.setitem(TACTICS, "Convolution", [mine, rest])
        return kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", profiles={"x": (
            (1, *chw), (2, *chw), (3, *chw))}))


def test_an_engine_loaded_without_the_library_is_refused_in_one_line(monkeypatch, tmp_path):
    _, engine = _forced_engine(monkeypatch)
    engine.save(str(tmp_path / "m.kiln"))
    monkeypatch.setattr(cpu_dnnl, "library", lambda: None)
    with pytest.raises(kiln.KilnError) as err:
        kiln.load(str(tmp_path / "m.kiln")).context()
    msg = str(err.value)
    assert "\n" not in msg and "onednn_cached" in msg and "kiln[cpu-onednn]" in msg


def test_model_matches_onnxruntime(monkeypatch):
    """A small CNN with every convolution on this tactic, against ONNX Runtime; batch 1 and 3."""
    import onnxruntime as ort
    data, engine = _forced_engine(monkeypatch)
    convs = [layer["tactic"] for layer in engine.layers if layer["kind"] == "Convolution"]
    assert convs == ["onednn_cached"] * 4
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context()
    for n in (1, 3, 1):
        x = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        got = next(iter(ctx.run({"x": x}).values()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
