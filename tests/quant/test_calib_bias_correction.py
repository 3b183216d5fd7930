"""Bias correction in post-training quantization: the corrected bias against the mean output shift computed
independently (torch convolutions and numpy matmuls of the float and quantized inputs and weights), end to end
against ONNX Runtime's FP32 outputs (on the calibration data a 1x1 convolution's per-channel mean error is zero),
calibrate.window_means against torch's unfold (padding, auto_pad SAME, strides, dilation), and the calibration
cache's means (round trip, damaged entries, caches made without them)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.errors import BuildError
from kiln.builder.quant import plan
from kiln.builder.quant.insert import corrected_bias, dequantize, quantize_weight, weight_scales

from _quant_models import _model

ort = pytest.importorskip("onnxruntime")
RNG = np.random.default_rng(11)


class _Layer:
    """The two things corrected_bias reads of a layer: its name and its inputs (bias at position 2)."""

    def __init__(self, bias: np.ndarray | None) -> None:
        class Const:
            is_constant = True
            value = bias
        self.name = "conv"
        self.inputs = [None, None] + ([Const()] if bias is not None else [])


def _quantized(w: np.ndarray) -> np.ndarray:
    s = weight_scales(w, 0, 127.0)
    return dequantize(quantize_weight(w, s, 0, 127.0), s, 0)


def _fake(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -127, 127) * scale


def _window_means(x: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    """The mean input each weight position [C, k, k] reads over samples and output positions, by torch's unfold."""
    cols = torch.nn.functional.unfold(torch.from_numpy(x), kernel, padding=padding, stride=stride)   # [N, C*k*k, L]
    return cols.mean(dim=(0, 2)).numpy().reshape(x.shape[1], kernel, kernel)


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 2, 1), (3, 1, 1)])
def test_corrected_bias_cancels_the_mean_shift_of_a_convolution(kernel, stride, padding):
    """The shift is E[conv(Q(x), Wq)] - E[conv(x, W)] per output channel, from torch; given the mean input of each
    weight position (torch's unfold, zero padding included), the corrected bias cancels it exactly."""
    c_in, c_out = 6, 5
    w = RNG.standard_normal((c_out, c_in, kernel, kernel)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    x = RNG.uniform(-2, 4, c_in)[None, :, None, None] + RNG.standard_normal((4, c_in, 7, 7))
    scale = np.abs(x).max() / 127 * 0.8                    # clips a little, so E[Q(x)] != E[x]
    wq, xq = _quantized(w), _fake(x, scale)
    conv = lambda a, k: torch.nn.functional.conv2d(torch.from_numpy(a), torch.from_numpy(k),  # noqa: E731
                                                   stride=stride, padding=padding).numpy()
    shift = (conv(xq, wq) - conv(x, w.astype(np.float64))).mean(axis=(0, 2, 3))
    means = _window_means(x, kernel, stride, padding), _window_means(xq, kernel, stride, padding)
    got = corrected_bias(_Layer(b), w, wq, *means)
    np.testing.assert_allclose(got, b - shift, rtol=0, atol=1e-5 * np.abs(shift).max() + 1e-6)
    assert np.abs(shift).max() > 1e-3                     # there was a shift to correct
    none = corrected_bias(_Layer(None), w, wq, *means)
    np.testing.assert_allclose(none, -shift, rtol=0, atol=1e-5 * np.abs(shift).max() + 1e-6)


@pytest.mark.parametrize("attrs", [{"pads": [1, 0, 2, 1], "strides": [2, 1]}, {"auto_pad": "SAME_UPPER",
                                                                               "strides": [2, 2]},
                                   {"auto_pad": "SAME_LOWER", "strides": [2, 2], "dilations": [2, 1]}])
def test_window_means_of_a_convolution_against_torch(attrs):
    """calibrate.window_means of a convolution (explicit pads, ONNX auto_pad SAME, dilation) against torch's
    unfold of the same zero-padded input, in float and fake-quantized with the input's range."""
    from kiln.builder.quant.calibrate import load_batches, window_means
    from kiln.builder.quant.insert import targets
    w = RNG.standard_normal((4, 5, 3, 3)).astype(np.float32)          # 5 channels: not an image stem
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 9, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, None, None])], {"w": w})
    net = kiln.onnx.parse(model)
    x = (RNG.standard_normal((6, 5, 9, 8)) + 1).astype(np.float32)
    amax = float(np.abs(x).max()) * 0.7
    got = window_means(net, [t.layer for t in targets(net, set())], {"x": amax}, load_batches([{"x": x}], net),
                       "cpu", "int8")["conv"]
    ref = onnx_reference_pads(attrs, x.shape[2:], (3, 3))
    d = attrs.get("dilations", [1, 1])
    for value, mean in zip((x.astype(np.float64), _fake(x.astype(np.float64), np.float32(amax / 127))), got):
        padded = np.pad(value, [(0, 0), (0, 0), (ref[0], ref[2]), (ref[1], ref[3])])
        cols = torch.nn.functional.unfold(torch.from_numpy(padded), 3, dilation=d, stride=attrs["strides"])
        np.testing.assert_allclose(mean, cols.mean(dim=(0, 2)).numpy().reshape(5, 3, 3), rtol=1e-12, atol=1e-12)


def onnx_reference_pads(attrs: dict, size: tuple, kernel: tuple) -> list[int]:
    """Begins then ends of the ONNX Conv's padding, as the ONNX spec defines auto_pad SAME."""
    if "pads" in attrs:
        return attrs["pads"]
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, attrs["strides"], attrs.get("dilations", [1, 1])):
        total = max((int(np.ceil(n / s)) - 1) * s + (k - 1) * d + 1 - n, 0)
        lower = total - total // 2 if attrs["auto_pad"] == "SAME_LOWER" else total // 2
        begins.append(lower)
        ends.append(total - lower)
    return begins + ends


def test_corrected_bias_of_a_fully_connected_layer_and_bad_statistics():
    w = RNG.standard_normal((4, 9)).astype(np.float32)        # [N, K], y = x @ w.T + b
    x = RNG.standard_normal((50, 9)) + 3.0
    xq = _fake(x, 0.05)
    wq = _quantized(w)
    shift = (xq @ wq.T - x @ w.T).mean(0)
    np.testing.assert_allclose(corrected_bias(_Layer(np.zeros(4, np.float32)), w, wq, x.mean(0), xq.mean(0)),
                               -shift, rtol=0, atol=1e-6)
    with pytest.raises(BuildError, match="has 9 weights per output channel but its calibration statistics hold 5"):
        corrected_bias(_Layer(None), w, wq, np.zeros(5), np.zeros(5))


def _conv_model(bias: bool) -> "object":
    """x[N,8,5,5] → Conv 1x1 (6 channels) → y: one layer, so its calibration error is the network's."""
    w = RNG.standard_normal((6, 8, 1, 1)).astype(np.float32) * 0.3
    inits = {"w": w, **({"b": RNG.standard_normal(6).astype(np.float32)} if bias else {})}
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], name="conv")
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 5, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 5, 5])], inits)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_build_has_no_mean_error_on_its_calibration_data(bias):
    """Inputs with large channel offsets make weight rounding shift every output channel's mean. With bias
    correction the INT8 engine's per-channel mean error against ONNX Runtime FP32 is zero on the calibration data
    (to float32 rounding) and far smaller than without it on held-out data of the same distribution."""
    model = _conv_model(bias)
    offsets = RNG.uniform(1, 5, 8).astype(np.float32)[None, :, None, None]
    calib = (offsets + RNG.standard_normal((32, 8, 5, 5))).astype(np.float32)
    held = (offsets + RNG.standard_normal((32, 8, 5, 5))).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = {}
    for correct in (True, False):
        engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(
            device="cpu", profiles={"x": calib.shape}, quantize="int8", calibration=[{"x": calib}],
            bias_correction=correct))
        assert engine.header["build"]["quantization"]["bias_correction"] is correct
        for name, x in (("calib", calib), ("held", held)):
            got = engine.context().run({"x": x})["y"].astype(np.float64)
            ref = sess.run(None, {"x": x})[0].astype(np.float64)
            errors[correct, name] = np.abs((got - ref).mean(axis=(0, 2, 3))).max()
    scale = float(np.abs(sess.run(None, {"x": calib})[0]).max())
    assert errors[True, "calib"] <= 1e-5 * scale
    assert errors[False, "calib"] > 1e-3 * scale             # there was a shift to correct
    assert errors[True, "held"] < 0.5 * errors[False, "held"]


def test_cache_holds_the_channel_means(tmp_path):
    """A cache written with bias correction gives back the same ranges and means (so the same engine), and its
    ranges serve a build without it; a cache made without bias correction, or with damaged means, is refused in
    one line and left as it is."""
    model = _conv_model(True)
    calib = (RNG.standard_normal((16, 8, 5, 5)) + 2).astype(np.float32)
    path = tmp_path / "c.json"
    cfg = dict(device="cpu", quantize="int8", calibration=[{"x": calib}], calib_cache=str(path), calibrator="max")
    first = plan(kiln.onnx.parse(model), kiln.BuildConfig(**cfg))
    again = plan(kiln.onnx.parse(model), kiln.BuildConfig(**{**cfg, "calibration": None}))
    assert again.amax == first.amax and list(first.means) == ["conv"] and list(again.means) == ["conv"]
    for a, b in zip(first.means["conv"], again.means["conv"]):
        np.testing.assert_array_equal(a.ravel(), b)
    np.testing.assert_allclose(first.means["conv"][0].ravel(), calib.astype(np.float64).mean(axis=(0, 2, 3)),
                               rtol=1e-12)
    plain = plan(kiln.onnx.parse(model), kiln.BuildConfig(**cfg, bias_correction=False))
    assert plain.amax == first.amax and plain.means == {}
    old = dict(cfg, calib_cache=str(tmp_path / "old.json"))
    plan(kiln.onnx.parse(model), kiln.BuildConfig(**old, bias_correction=False))
    with pytest.raises(BuildError, match="made with calibrator max, not calibrator max, quantize int8, "
                                         "bias_correction True"):
        plan(kiln.onnx.parse(model), kiln.BuildConfig(**{**old, "calibration": None}))
    doc = json.loads(path.read_text())
    doc["means"]["conv"]["quantized"] = doc["means"]["conv"]["quantized"][:-1]
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    with pytest.raises(BuildError, match="is damaged: 'means'"):
        plan(kiln.onnx.parse(model), kiln.BuildConfig(**cfg))
    assert path.read_bytes() == before
