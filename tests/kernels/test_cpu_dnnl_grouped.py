"""The ``onednn_cached`` convolution tactic (kernels/cpu_dnnl.py) on grouped and depthwise convolutions, and with
the activations whose oneDNN eltwise post-op takes the layer's alpha and beta (leaky_relu, hard_sigmoid, clip) or
none (gelu, gelu_tanh): against FP64 torch references written out here, and a small squeeze-excitation network
(depthwise, HardSigmoid(alpha, beta), LeakyRelu, Clip) with every convolution on the tactic against ONNX Runtime.
Skipped where no oneDNN library is installed (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)."""
from __future__ import annotations

import io
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.kernels import cpu_dnnl
from kiln.kernels.cpu_dnnl import eltwise_post_op, make_convolution_onednn_cached
from kiln.kernels.registry import KernelContext, tactics_for
from test_cpu_dnnl import cached_engine
from test_cpu_conv import _check     # the FP32 bound: max abs error <= 1e-5 + 1e-4 * max|ref|

pytestmark = pytest.mark.skipif(cpu_dnnl.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")

CPU = KernelContext(device="cpu", precision="fp32", layer_name="conv")

# activation -> (alpha, beta, FP64 reference with those parameters), written out (not kiln's activation table)
ACTS = {
    None: (None, None, lambda t: t),
    "relu": (None, None, lambda t: t.clamp(min=0)),
    "hard_swish": (None, None, lambda t: t * (t + 3).clamp(0, 6) / 6),
    "hard_sigmoid": (1 / 6, 0.5, lambda t: (t / 6 + 0.5).clamp(0, 1)),          # torch's Hardsigmoid export
    "leaky_relu": (0.1, None, lambda t: torch.where(t > 0, t, 0.1 * t)),
    "clip": (0.0, 6.0, lambda t: t.clamp(0.0, 6.0)),                             # ReLU6
    "gelu": (None, None, lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))),
    "gelu_tanh": (None, None, lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))),
}


def _attrs(act=None, groups=4, stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), **extra):
    attrs = {"stride": list(stride), "pads": list(pads), "dilation": list(dilation), "groups": groups,
             "activation": act, **extra}
    alpha, beta, _ = ACTS.get(act, (None, None, None))
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    return attrs


def _operands(n=2, cin=8, cout=16, groups=4, size=9, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size + 2, generator=g)
    w = torch.randn(cout, cin // groups, k, k, generator=g) * 2 / (cin // groups * k * k) ** 0.5
    b = torch.randn(cout, generator=g)
    return x, w, b


def _reference(x, w, b, attrs, act_ref, residual=None):
    """FP64: the padded grouped convolution, then act(y + r) or act(y) + r as the layer says."""
    begins, ends = attrs["pads"][:2], attrs["pads"][2:]
    y = F.conv2d(F.pad(x.double(), [begins[1], ends[1], begins[0], ends[0]]), w.double(),
                 None if b is None else b.double(), attrs["stride"], 0, attrs["dilation"], attrs["groups"])
    if residual is None:
        return act_ref(y)
    if attrs.get("residual_after_activation"):
        return act_ref(y) + residual.double()
    return act_ref(y + residual.double())


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [
    {"groups": 4},                                                             # grouped
    {"groups": 8, "cin": 8, "cout": 8},                                        # depthwise
    {"groups": 8, "cin": 8, "cout": 16},                                       # depthwise, channel multiplier 2
])
@pytest.mark.parametrize("geometry", [
    {},
    {"stride": (2, 2)},
    {"stride": (2, 1), "pads": (1, 0, 2, 1), "dilation": (1, 2)},            # asymmetric padding, dilation
    {"k": 5, "pads": (2, 2, 2, 2), "stride": (2, 2)},                           # MobileNet's 5x5 stride 2
])
def test_grouped_activation_and_geometry_match_fp64(act, shape, geometry):
    geometry = dict(geometry)
    x, w, b = _operands(k=geometry.pop("k", 3), **shape)
    attrs = _attrs(act, groups=shape["groups"], **geometry)
    y, = make_convolution_onednn_cached(attrs, CPU)(x, w, b)
    _check(y, _reference(x, w, b, attrs, ACTS[act][2]))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", [None, "relu", "hard_sigmoid"])
@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])     # added after / fused
def test_depthwise_residual_matches_fp64_and_is_not_written(act, after, layout):
    x, w, b = _operands(cin=8, cout=8, groups=8)
    r = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=layout)
    kept = r.clone()
    attrs = _attrs(act, groups=8, residual=True, residual_after_activation=after)
    y, = make_convolution_onednn_cached(attrs, CPU)(x, w, b, r)
    _check(y, _reference(x, w, b, attrs, ACTS[act][2], r))
    assert torch.equal(r, kept)


def test_layer_parameters_reach_the_post_op():
    """alpha and beta come from the layer (HardSigmoid's ONNX default 0.2 / 0.5, another pair, a leaky slope,
    clip bounds), so a primitive made for one pair computes that pair."""
    x, w, b = _operands(groups=2)
    for act, alpha, beta, ref in [
            ("hard_sigmoid", 0.2, 0.5, lambda t: (0.2 * t + 0.5).clamp(0, 1)),
            ("hard_sigmoid", 0.35, 0.25, lambda t: (0.35 * t + 0.25).clamp(0, 1)),
            ("leaky_relu", 0.3, 0.0, lambda t: torch.where(t > 0, t, 0.3 * t)),
            ("clip", -0.5, 0.75, lambda t: t.clamp(-0.5, 0.75))]:
        attrs = {**_attrs(act, groups=2), "alpha": alpha, "beta": beta}
        assert eltwise_post_op(attrs)[1:] == (alpha, beta if act != "leaky_relu" else 0.0)
        y, = make_convolution_onednn_cached(attrs, CPU)(x, w, b)
        _check(y, _reference(x, w, b, attrs, ref))


def test_parameters_without_an_exact_post_op_are_not_offered():
    names = lambda attrs: [t.name for t in tactics_for("Convolution", attrs, CPU)]  # noqa: E731
    assert "onednn_cached" in names(_attrs("hard_sigmoid", groups=8))
    for bad in [{"activation": "clip", "alpha": 2.0, "beta": 1.0},          # lo > hi: oneDNN's clip gives lo
                {"activation": "hard_sigmoid", "alpha": float("nan"), "beta": 0.5},
                {"activation": "leaky_relu", "alpha": float("inf")},
                {"activation": "hard_sigmoid", "alpha": "0.2", "beta": [1]},
                {"activation": "elu", "alpha": 1.0},
                {"activation": "mish"}]:
        attrs = {**_attrs(groups=8), **bad}
        assert eltwise_post_op(attrs) is None
        assert "onednn_cached" not in names(attrs)


def test_grouped_operands_that_disagree_are_refused_before_onednn():
    """x's channels not groups times the weight's, or output channels not a multiple of groups (a damaged
    engine), never reach the primitive, which would read past the weight: torch's convolution refuses them."""
    x, w, b = _operands(groups=4)
    fn = make_convolution_onednn_cached(_attrs("relu", groups=4), CPU)
    with pytest.raises(RuntimeError):
        fn(x, w[:, :1].contiguous(), b)                    # 4 groups x 1 channel: x has 8
    with pytest.raises(RuntimeError):
        fn(x[:, :4], w, b)
    with pytest.raises(RuntimeError):
        fn(x, w[:14].contiguous(), b[:14].contiguous())     # 14 outputs in 4 groups
    with pytest.raises(RuntimeError):
        fn(x, w, b[:3].contiguous())


def test_depthwise_shapes_and_weights_change():
    attrs = _attrs("hard_swish", groups=8, stride=(2, 2))
    fn = make_convolution_onednn_cached(attrs, CPU)
    ref = ACTS["hard_swish"][2]
    x1, w1, b1 = _operands(n=1, cin=8, cout=8, groups=8, size=9, seed=1)
    x2, _, _ = _operands(n=3, cin=8, cout=8, groups=8, size=14, seed=2)
    for x in (x1, x2, x1):
        _check(fn(x, w1, b1)[0], _reference(x, w1, b1, attrs, ref))
    w2 = w1 * -2.0
    _check(fn(x1, w2, None)[0], _reference(x1, w2, None, attrs, ref))


def test_repeated_input_layouts_take_the_checked_path_only_when_they_match():
    """After a channels-last FP32 input has been checked, calls with the same shape but other strides, dtype,
    weights, bias or a residual still give the right result (they are checked again, not sent to the kept
    primitive)."""
    attrs = _attrs("relu", groups=2, residual=True)
    ref_act = ACTS["relu"][2]
    fn = make_convolution_onednn_cached(attrs, CPU)
    x, w, b = _operands(groups=2)
    xc = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        _check(fn(xc, w, b)[0], _reference(xc, w, b, attrs, ref_act))
    _check(fn(x, w, b)[0], _reference(x, w, b, attrs, ref_act))                        # NCHW strides
    x64 = xc.double().contiguous(memory_format=torch.channels_last)
    _check(fn(x64, w, b)[0], _reference(xc, w, b, attrs, ref_act))                     # cast to the weight's
    w2, b2 = w * 0.5, b - 1.0
    _check(fn(xc, w2, b)[0], _reference(xc, w2, b, attrs, ref_act))
    _check(fn(xc, w2, b2)[0], _reference(xc, w2, b2, attrs, ref_act))
    r = torch.randn(2, 16, 9, 11).contiguous(memory_format=torch.channels_last)
    _check(fn(xc, w2, b2, r)[0], _reference(xc, w2, b2, attrs, ref_act, r))
    _check(fn(xc, w2, b2)[0], _reference(xc, w2, b2, attrs, ref_act))
    with pytest.raises(RuntimeError):
        fn(xc, w2[:, :2].contiguous(), b2)          # a weight that disagrees with x after x was checked


def test_torchs_onednn_is_offered_only_where_this_tactic_is_not():
    """``onednn`` (torch's op: the same oneDNN convolution with per-call setup) is left out of the timed
    candidates where ``onednn_cached`` runs the layer, and offered where it does not (a fused pool, an
    activation without an exact post-op, no library)."""
    names = lambda attrs: [t.name for t in tactics_for("Convolution", attrs, CPU)]  # noqa: E731
    for attrs in (_attrs("relu"), _attrs("hard_sigmoid", groups=8), _attrs(None, groups=1)):
        got = names(attrs)
        assert "onednn_cached" in got and "onednn" not in got
    for attrs in (_attrs("relu", groups=1, pool={"kernel": [2, 2]}), _attrs("mish", groups=1)):
        got = names(attrs)
        assert "onednn" in got and "onednn_cached" not in got


def test_one_column_wide_tactic_runs_on_cached_primitives(monkeypatch):
    """``onednn_wide`` turns a one-column image on its side and runs it through this tactic's primitives."""
    from kiln.kernels.cpu_conv_wide import make_convolution_onednn_wide
    made = _recording(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 41, 1, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 8, 5, 1, generator=g) / 40 ** 0.5, torch.randn(16, generator=g)
    attrs = _attrs("hard_swish", groups=1, stride=(2, 1), pads=(2, 0, 1, 0))
    y, = make_convolution_onednn_wide(attrs, CPU)(x, w, b)
    _check(y, _reference(x, w, b, attrs, ACTS["hard_swish"][2]))
    assert made == [((2, 8, 1, 41), False)]


def _recording(monkeypatch) -> list:
    """Each primitive made from now on, as (input shape, nchw)."""
    made, real = [], cpu_dnnl.Primitive

    def recording(lib, shape, *rest, nchw=False):
        made.append((shape, nchw))
        return real(lib, shape, *rest, nchw=nchw)
    monkeypatch.setattr(cpu_dnnl, "Primitive", recording)
    return made


@pytest.mark.parametrize("geometry", [{"stride": (2, 2)}, {"groups": 3, "cin": 3, "cout": 6, "pads": (0, 1, 2, 1)}])
def test_an_nchw_image_is_read_as_it_is(monkeypatch, geometry):
    """An NCHW input of fewer than FIRST_CONV_CHANNELS channels (the stem) goes into the primitive as it is and its
    output is reordered into NHWC; channels-last or wider inputs, and calls with a residual, take the NHWC path."""
    made = _recording(monkeypatch)
    geometry = {"groups": 1, "cin": 3, "cout": 16, **geometry}
    cin, cout, groups = geometry.pop("cin"), geometry.pop("cout"), geometry["groups"]
    x, w, b = _operands(cin=cin, cout=cout, groups=groups)
    attrs = _attrs("hard_swish", **geometry, residual=True)
    ref = _reference(x, w, b, attrs, ACTS["hard_swish"][2])
    fn = make_convolution_onednn_cached(attrs, CPU)
    for _ in range(2):
        y, = fn(x, w, b)
        _check(y, ref)
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert made == [((2, cin, 9, 11), True)]
    _check(fn(x.contiguous(memory_format=torch.channels_last), w, b)[0], ref)
    assert made[1:] == [((2, cin, 9, 11), False)]
    r = torch.randn(ref.shape).float().contiguous(memory_format=torch.channels_last)
    _check(fn(x, w, b, r)[0], _reference(x, w, b, attrs, ACTS["hard_swish"][2], r))
    assert made[2][1] is False
    wide = _operands(cin=8 * groups, cout=cout, groups=groups)
    _check(fn(*wide)[0], _reference(*wide, attrs, ACTS["hard_swish"][2]))
    assert made[-1] == ((2, 8 * groups, 9, 11), False)


def test_an_nchw_input_with_only_a_reference_kernel_takes_the_nhwc_path(monkeypatch):
    """Where oneDNN would run its reference convolution on the NCHW input (here: the implementation's name cannot
    be read, which counts as that), the input is made channels-last instead, once decided per shape."""
    made = _recording(monkeypatch)
    monkeypatch.setattr(cpu_dnnl, "_QUERY_IMPL_INFO_STR", 0)
    x, w, b = _operands(cin=3, cout=16, groups=1)
    attrs = _attrs("relu", groups=1)
    fn = make_convolution_onednn_cached(attrs, CPU)
    for _ in range(2):
        _check(fn(x, w, b)[0], _reference(x, w, b, attrs, ACTS["relu"][2]))
    assert made == [((2, 3, 9, 11), True), ((2, 3, 9, 11), False)]


class _SE(nn.Module):
    """MobileNetV3's inverted residual with squeeze-excitation, then a grouped convolution with LeakyRelu and a
    residual, and a gate convolution whose HardSigmoid is given other parameters than torch's after export."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 24, 1)
        self.dw = nn.Conv2d(24, 24, 5, 2, 2, groups=24)
        self.fc1, self.fc2 = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.project = nn.Conv2d(24, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, 1, 1, groups=2)
        self.gate = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.hardswish(self.expand(x))
        y = F.hardswish(self.dw(y))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y * s)
        y = F.leaky_relu(self.grouped(y), 0.2) + y
        z = self.gate(y)
        return F.hardsigmoid(z) + F.relu6(y)       # the export's last HardSigmoid gets alpha 0.2, beta 0.4


def test_se_network_matches_onnxruntime(monkeypatch):
    """Every convolution of a small SE network on this tactic (the builder's choice narrowed to it), against ONNX
    Runtime at batch 1 and 3."""
    import onnxruntime as ort
    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(_SE().eval(), (torch.randn(1, 8, 16, 16),), f, input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    model = onnx.load_from_string(f.getvalue())
    gate = [node for node in model.graph.node if node.op_type == "HardSigmoid"][-1]
    del gate.attribute[:]
    gate.attribute.extend([onnx.helper.make_attribute("alpha", 0.2), onnx.helper.make_attribute("beta", 0.4)])
    data = model.SerializeToString()
    engine = cached_engine(monkeypatch, data, (8, 16, 16))
    convs = {layer["name"]: layer["tactic"] for layer in engine.layers if layer["kind"] == "Convolution"}
    assert len(convs) == 7 and set(convs.values()) == {"onednn_cached"}, convs
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context()
    for n in (1, 3, 1):
        x = np.random.default_rng(n).standard_normal((n, 8, 16, 16)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        got = next(iter(ctx.run({"x": x}).values()))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
