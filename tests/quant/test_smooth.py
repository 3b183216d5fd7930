"""Activation smoothing (builder/quant/smooth.py): which activations are sites (homogeneous chains from a
constant-weight producer, read only by quantized layers), that rescaling keeps the network's function (ONNX
Runtime on the original model as the reference), that the smoothed activation's channel ranges are the float
ones divided by the factors, and the factors against SmoothQuant's formula computed in numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.builder.quant import smooth
from kiln.errors import BuildError
from kiln.builder.quant.insert import targets

from _quant_models import _model, cnn, mlp

ort = pytest.importorskip("onnxruntime")
RNG = np.random.default_rng(5)


def _act_chain(act: str) -> object:
    """x[N,4,6,6] → conv3x3(6) → ``act`` → conv1x1(5) → y."""
    w1 = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((5, 6, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node(act, ["c1"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])], {"w1": w1, "w2": w2})


def _bn_chain() -> object:
    """x[N,4,6,6] → conv3x3(6) → batch norm → relu → max pool 2x2 → conv1x1(5) → y."""
    w1 = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((5, 6, 1, 1)).astype(np.float32)
    bn = {"g": RNG.uniform(0.5, 2, 6), "b": RNG.standard_normal(6), "m": RNG.standard_normal(6),
          "v": RNG.uniform(0.5, 2, 6)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 3, 3])],
                  {"w1": w1, "w2": w2, **{k: v.astype(np.float32) for k, v in bn.items()}})


def _mlp() -> object:
    return mlp(RNG.standard_normal((8, 12)), RNG.standard_normal(12), RNG.standard_normal((12, 3)),
               RNG.standard_normal(3))


def _sites(model) -> tuple[object, list]:
    net = kiln.onnx.parse(model)
    return net, smooth.sites(net, targets(net, set()))


def _describe(found) -> dict[str, tuple]:
    return {s.tensor: (s.producer.name, [layer.name for layer in s.chain], sorted(r.name for r, _ in s.readers),
                       s.channel_axis) for s in found}


def test_sites_are_homogeneous_chains_read_only_by_quantized_layers():
    """conv → relu → conv (axis 1); conv → batch norm → relu → max pool → conv; conv → relu → global pool →
    flatten → Gemm (the last axis); MatMul → bias add → relu → MatMul; not through a residual add (a second, float reader), hard-swish or a sigmoid."""
    assert _describe(_sites(cnn())[1]) == {
        "r1": ("conv1", ["relu1"], ["conv2"], 1), "f": ("conv2", ["relu2", "gap", "flat"], ["fc"], -1)}
    assert _describe(_sites(_mlp())[1]) == {"h": ("mm1", ["add1", "relu"], ["mm2"], -1)}
    assert _sites(cnn(residual=True))[1] == []
    assert _describe(_sites(_act_chain("Relu"))[1]) == {"a": ("conv1", ["act"], ["conv2"], 1)}
    assert _describe(_sites(_bn_chain())[1]) == {"p1": ("conv1", ["bn", "relu", "pool"], ["conv2"], 1)}
    assert _sites(_act_chain("HardSwish"))[1] == []
    assert _sites(_act_chain("Sigmoid"))[1] == []


def _outputs(net, feed: dict[str, np.ndarray], extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    for name in extra:
        net.mark_output(net.tensors[name])
    shapes = {k: (v.shape, v.shape, v.shape) for k, v in feed.items()}
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", optimization_level=0, profiles=shapes))
    return {k: np.array(v, np.float64) for k, v in engine.context().run(feed).items()}


@pytest.mark.parametrize("make,shape", [(cnn, (3, 3, 8, 8)), (_mlp, (5, 8)), (_bn_chain, (2, 4, 6, 6)),
                                        (lambda: _act_chain("LeakyRelu"), (2, 4, 6, 6))])
def test_smoothing_keeps_the_function(make, shape):
    """Factors spread over four decades: the smoothed network's output is ONNX Runtime's on the original model
    within float32 rounding (relative L2 under 1e-5), and each site's activation is the original's divided by its
    factor, channel by channel."""
    model = make()
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    before, found = _sites(model)
    assert found
    scale = {s.tensor: np.exp(RNG.uniform(-4.6, 4.6, s.channels)) for s in found}
    net, again = _sites(model)
    smooth.apply(net, again, scale)
    names = tuple(s.tensor for s in found)
    got, orig = _outputs(net, {"x": x}, names), _outputs(before, {"x": x}, names)
    out = net.outputs[0].name
    assert np.linalg.norm(got[out] - ref) <= 1e-5 * np.linalg.norm(ref)
    for s in found:
        want = smooth.channel_amax(orig[s.tensor], s) / scale[s.tensor]
        np.testing.assert_allclose(smooth.channel_amax(got[s.tensor], s), want, rtol=1e-5, atol=1e-6 * want.max())


def test_factors_follow_smoothquant_and_keep_dead_channels():
    """s_c = a_c^alpha / w_c^(1 - alpha) over every reader's weight column, divided by the geometric mean of the
    live channels; a channel that never fired gets factor 1. With alpha 0.5 the smoothed activation's and weight
    columns' ranges meet: a_c / s_c = w_c * s_c."""
    net, found = _sites(cnn())
    site = next(s for s in found if s.tensor == "r1")
    w = np.abs(net.tensors["w2"].value.astype(np.float64)) if "w2" in net.tensors else \
        np.abs(site.readers[0][0].inputs[1].value.astype(np.float64))
    wcol = w.transpose(1, 0, 2, 3).reshape(8, -1).max(axis=1)
    a = np.array([0.01, 0.1, 1.0, 10.0, 100.0, 0.0, 3.0, 0.5])
    s = smooth.factors(site, a, alpha=0.5)
    live = a > 0
    raw = np.sqrt(a[live] / wcol[live])
    np.testing.assert_allclose(s[live], raw / np.exp(np.log(raw).mean()), rtol=1e-12)
    assert s[~live] == 1.0
    ratio = (a[live] / s[live]) / (wcol[live] * s[live])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    np.testing.assert_allclose(smooth.factors(site, a, alpha=0.0)[live], (1 / wcol[live]) /
                               np.exp(np.log(1 / wcol[live]).mean()), rtol=1e-12)


def _unbalanced(seed: int = 3) -> object:
    """x[N,3,8,8] → conv3x3(8) whose output channels span three decades → relu → conv3x3(16) → y: a per-tensor
    scale of the relu's output leaves the small channels a code or two."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)) * np.logspace(-2, 1, 8)[:, None, None, None]
    w2 = rng.standard_normal((16, 8, 3, 3)) / np.logspace(-2, 1, 8)[None, :, None, None] / 10
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
                  {"w1": w1.astype(np.float32), "w2": w2.astype(np.float32)})


def _int8_error(model, calib: np.ndarray, x: np.ndarray, ref: np.ndarray, cache: str | None = None,
                **settings) -> float:
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(
        device="cpu", optimization_level=0, profiles={"x": x.shape}, quantize="int8", calibration=[{"x": calib}],
        calib_cache=cache, **settings))
    got = engine.context().run({"x": x})["y"]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_smoothing_lowers_the_int8_error_of_unbalanced_channels(tmp_path):
    """Against ONNX Runtime's FP32 output on held-out inputs: with smoothing the INT8 error is under a tenth of the
    error without (one per-tensor scale over channels three decades apart), for max and mse alike; a rebuild from
    the calibration cache gives the same engine output."""
    model = _unbalanced()
    calib, x = RNG.standard_normal((32, 3, 8, 8)), RNG.standard_normal((8, 3, 8, 8))
    calib, x = calib.astype(np.float32), x.astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for calibrator in ("max", "mse"):
        plain = _int8_error(model, calib, x, ref, calibrator=calibrator, smoothing=False)
        smoothed = _int8_error(model, calib, x, ref, calibrator=calibrator)
        assert smoothed < 0.1 * plain, (calibrator, smoothed, plain)         # measured 0.018 against 0.71
    cache = str(tmp_path / "c.json")
    first = _int8_error(model, calib, x, ref, cache)
    assert "smooth" in json.loads(open(cache).read())
    assert _int8_error(model, calib[:1] * 0, x, ref, cache) == first


def test_cache_records_smoothing(tmp_path):
    """A cache made with smoothing serves only a smoothing build and one made without it only a build without (their
    ranges are of different networks); damaged or missing factors are refused in one line."""
    model = _unbalanced()
    calib = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    x = calib[:2]
    on, off = str(tmp_path / "on.json"), str(tmp_path / "off.json")
    _int8_error(model, calib, x, x[:, :1].repeat(16, 1), on)
    _int8_error(model, calib, x, x[:, :1].repeat(16, 1), off, smoothing=False)
    with pytest.raises(BuildError, match="was made with .*smoothing 0.5"):
        _int8_error(model, calib, x, x[:, :1].repeat(16, 1), on, smoothing=False)
    with pytest.raises(BuildError, match="was made with"):
        _int8_error(model, calib, x, x[:, :1].repeat(16, 1), off)
    doc = json.loads(open(on).read())
    for damage, why in ((lambda d: d["smooth"].update(r1=[1.0, -2.0]), "damaged: 'smooth'"),
                        (lambda d: d["smooth"].update(r1=[1.0] * 3), "3 smoothing factors for tensor 'r1'"),
                        (lambda d: d.pop("smooth"), "no smoothing factors for tensor 'r1'")):
        bad = json.loads(json.dumps(doc))
        damage(bad)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(BuildError, match=why) as err:
            _int8_error(model, calib, x, x[:, :1].repeat(16, 1), str(path))
        assert "\n" not in str(err.value)


def test_ranges_are_the_smoothed_networks():
    """plan's ranges of a smoothed activation (max calibrator, taken from the first run's channel maxima and the
    factors) are the largest magnitude of that activation in the smoothed network, run separately."""
    from kiln.builder.quant import plan
    model = _unbalanced()
    calib = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    net = kiln.onnx.parse(model)
    p = plan(net, kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator="max",
                                   profiles={"x": calib.shape}))
    assert list(p.smooth) == ["r1"] and p.smooth["r1"].shape == (8,)
    again = kiln.onnx.parse(model)
    smooth.apply(again, smooth.sites(again, targets(again, set())), p.smooth)
    r1 = _outputs(again, {"x": calib}, ("r1",))["r1"]
    assert p.amax["r1"] == pytest.approx(np.abs(r1).max(), rel=1e-6)
    plain = kiln.onnx.parse(model)
    raw = _outputs(plain, {"x": calib}, ("r1",))["r1"]
    assert np.abs(raw).max() > 5 * p.amax["r1"]          # the widest channel no longer sets the range



def test_fp8_is_not_smoothed(monkeypatch):
    """Smoothing is an INT8 measure: an FP8 plan of the same network (its device check lifted, so it plans on the
    CPU) has no factors."""
    import kiln.builder.quant as quant
    net = kiln.onnx.parse(_unbalanced())
    calib = RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)

    def planned(mode: str) -> dict:
        return quant.plan(net, kiln.BuildConfig(device="cpu", quantize=mode, calibration=[{"x": calib}],
                                                profiles={"x": calib.shape})).smooth
    assert list(planned("int8")) == ["r1"]
    monkeypatch.setattr(quant, "check_device", lambda *args: None)
    assert planned("fp8") == {}
