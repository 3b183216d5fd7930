"""INT8 post-training quantization end to end on CPU: Kiln's engine of the quantized network against ONNX
Runtime running the same Q/DQ model (Kiln's scales exported into ONNX QuantizeLinear/DequantizeLinear nodes,
weights quantized by ONNX Runtime itself), and a trained classifier's top-1 agreement with FP32."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest

import kiln
import kiln.onnx
from kiln.builder.quant import dequantized_note, plan, quantize, quantized

from _quant_models import blobs, cnn, qdq_export, trained_mlp

ort = pytest.importorskip("onnxruntime")


def _ort(model: onnx.ModelProto, feeds: dict) -> dict:
    """ONNX Runtime with graph optimizations off: the Q/DQ nodes run as written, in FP32."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _codes(v: np.ndarray) -> np.ndarray:
    """8-bit codes as float64 values (FP8 codes may come back as their bits)."""
    if v.dtype == np.uint8 or v.dtype.name == "float8_e4m3fn":
        return v.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return v.astype(np.float64)


def _check_against_ort(model: onnx.ModelProto, calib: np.ndarray, x: np.ndarray, calibrator: str,
                       mode: str = "int8") -> None:
    """Kiln's 8-bit engine vs ONNX Runtime on the exported Q/DQ model. The 8-bit codes of every quantized
    activation agree within one step (a value within float rounding of a rounding boundary may go either way
    after the two runtimes' differently ordered float sums); a sample whose codes all agree has the same
    output to float32 rounding. FP8 post-training quantization is GPU-only, so its network is made here with
    the same plan and rewrite the build uses, then run dequantized on the CPU. Bias correction and smoothing are
    off: the exported model keeps the original weights and biases (test_calib_bias_correction.py checks the
    corrected biases, test_smooth.py the smoothed network)."""
    net = kiln.onnx.parse(model)
    config = kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator=calibrator,
                              profiles={"x": x.shape}, bias_correction=False, smoothing=False)
    if mode == "int8":
        qnet = quantize(net, config)
    else:
        p = plan(net, config)
        qnet = quantized(net, p.layers, p.amax, mode)
        assert all(layer.attrs["to"] == "float8_e4m3fn" for layer in qnet.layers if layer.kind == "QuantizeLinear")
        assert {layer.inputs[0].value.dtype.name for layer in qnet.layers
                if layer.kind == "DequantizeLinear" and layer.inputs[0].is_constant} == {"float8_e4m3fn"}
    codes = [layer.outputs[0] for layer in qnet.layers if layer.kind == "QuantizeLinear"]
    assert len(codes) >= 2
    for t in codes:
        qnet.mark_output(t)
    engine = kiln.build(qnet, kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    assert "8-bit kernels are GPU-only." in dequantized_note(engine.layers, "cpu")
    assert dequantized_note(kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": x.shape})).layers,
                            "cpu") is None
    ours = engine.context().run({"x": x})
    ref = _ort(qdq_export(model, qnet), {"x": x})
    same = np.ones(len(x), bool)
    for t in codes:
        a, b = _codes(ours[t.name]), _codes(ref[t.name])
        assert a.shape == b.shape
        step = 1.0 if mode == "int8" else np.maximum(np.abs(b) / 8, 2.0 ** -9) * 1.0001    # one code apart
        assert np.all(np.abs(a - b) <= step), t.name
        assert np.mean(a == b) > 0.995, t.name
        assert np.abs(b).max() > (60 if mode == "int8" else 200), t.name   # the scale uses the 8-bit range
        same &= (a == b).reshape(len(x), -1).all(axis=1)
    assert same.sum() >= len(x) // 2
    y, y_ref = ours["y"][same].astype(np.float64), ref["y"][same].astype(np.float64)
    assert np.abs(y - y_ref).max() <= 1e-5 * np.abs(y_ref).max() + 1e-6


@pytest.mark.parametrize("calibrator", ["max", "entropy"])
def test_cnn_int8_matches_onnxruntime_qdq(calibrator):
    rng = np.random.default_rng(3)
    calib = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    _check_against_ort(cnn(seed=1), calib, rng.standard_normal((8, 3, 8, 8)).astype(np.float32), calibrator)


@pytest.mark.parametrize("calibrator", ["max", "entropy"])
def test_cnn_fp8_rewrite_matches_onnxruntime_qdq(calibrator):
    rng = np.random.default_rng(4)
    calib = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    _check_against_ort(cnn(seed=2), calib, rng.standard_normal((8, 3, 8, 8)).astype(np.float32), calibrator, "fp8")


def test_depthwise_convolutions_stay_float():
    """PTQ leaves grouped convolutions and the stem over 3 image channels in the float precision (no 8-bit kernel
    for the first, a tile of padding for the second); the layers around them are quantized and the engine still
    matches ONNX Runtime on the exported Q/DQ model."""
    rng = np.random.default_rng(8)
    model = cnn(seed=4, depthwise=True)
    calib = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    qnet = quantize(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", quantize="int8",
                                                             calibration=[{"x": calib}], calibrator="max"))
    readers = {u.name for layer in qnet.layers if layer.kind == "DequantizeLinear" for u, _ in layer.outputs[0].uses}
    assert readers == {"conv2", "fc"}
    _check_against_ort(model, calib, rng.standard_normal((8, 3, 8, 8)).astype(np.float32), "max")


def test_residual_add_reads_its_shortcut_through_the_shortcut_q_dq_pair():
    """A residual add after a quantized conv reads its shortcut through the Q/DQ pair the shortcut already has for
    the conv (one scale, no new range; the build then reads it as 8-bit codes in the conv's epilogue); the engine
    matches ONNX Runtime on the exported Q/DQ model with that placement."""
    rng = np.random.default_rng(9)
    model = cnn(seed=5, residual=True)
    calib = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    qnet = quantize(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", quantize="int8",
                                                             calibration=[{"x": calib}], calibrator="max"))
    add = next(layer for layer in qnet.layers if layer.kind == "ElementWise" and layer.attrs["op"] == "sum")
    shortcut = add.inputs[1].producer
    assert shortcut.kind == "DequantizeLinear" and shortcut.inputs[0].producer.inputs[0].name == "r1"
    assert {u.name for u, _ in shortcut.outputs[0].uses} == {"conv2", add.name}
    assert add.inputs[0].producer.name == "conv2"
    _check_against_ort(model, calib, rng.standard_normal((8, 3, 8, 8)).astype(np.float32), "max")


def test_int8_defaults_to_the_mse_calibrator_and_fp8_to_max_with_bias_correction():
    assert kiln.BuildConfig(device="cuda", quantize="fp8", calibration=[{}]).calibrator == "max"
    assert kiln.BuildConfig(device="cuda", quantize="int8", calibration=[{}]).calibrator == "mse"
    assert kiln.BuildConfig(device="cuda", quantize="int8", calibration=[{}]).bias_correction is True
    assert kiln.BuildConfig(device="cuda", quantize="int8", calibration=[{}], calibrator="entropy").calibrator == \
        "entropy"
    assert kiln.BuildConfig(device="cuda", quantize="fp8", calibration=[{}], calibrator="entropy").calibrator == \
        "entropy"


def test_mlp_int8_matches_onnxruntime_qdq():
    calib, _ = blobs(64, seed=1)
    x, _ = blobs(32, seed=2)
    _check_against_ort(trained_mlp(steps=50), calib, x, "percentile")


@pytest.fixture(scope="module")
def classifier():
    return trained_mlp()


@pytest.mark.parametrize("calibrator", ["entropy", "max"])
def test_trained_classifier_top1_agreement(classifier, calibrator):
    """PTQ keeps the FP32 model's top-1 answer on held-out samples (a model with margins: it is trained, and
    the FP32 model itself is accurate). The max calibrator clips nothing, so its only error is rounding to
    one of 255 levels: a few percent of the signal at most. The entropy calibrator clips the long tail."""
    x, labels = blobs(400, seed=7)
    calib, _ = blobs(128, seed=5)
    ref = _ort(classifier, {"x": x})["y"]
    assert np.mean(ref.argmax(1) == labels) > 0.9
    config = kiln.BuildConfig(device="cpu", profiles={"x": x.shape}, quantize="int8", calibration=[{"x": calib}],
                              calibrator=calibrator)
    int8 = kiln.build(kiln.onnx.parse(classifier), config).context().run({"x": x})["y"]
    assert np.mean(int8.argmax(1) == ref.argmax(1)) >= 0.98
    rel = np.linalg.norm(int8 - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < (0.02 if calibrator == "max" else 0.2)      # quantized, and close


def test_excluded_layers_stay_float(classifier):
    net = kiln.onnx.parse(classifier)
    calib, _ = blobs(32, seed=5)
    qnet = quantize(net, kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}],
                                          calibrator="max", fp16_layers=("mm2",)))
    quantized = {u.name for layer in qnet.layers if layer.kind == "DequantizeLinear"
                 for u, _ in layer.outputs[0].uses}
    assert quantized == {"mm1"}
    qnet = quantize(net, kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}],
                                          calibrator="max"))
    quantized = {u.name for layer in qnet.layers if layer.kind == "DequantizeLinear"
                 for u, _ in layer.outputs[0].uses}
    assert quantized == {"mm1", "mm2"}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_gpu_ptq_build_runs_8bit_layers_and_matches_the_dequantized_network(mode):
    """``--int8``/``--fp8`` on the GPU: the convolutions become 8-bit layers, and the engine's output stays
    within a few percent of the same quantized network run dequantized in FP32 on the CPU, and near FP32."""
    rng = np.random.default_rng(6)
    model = cnn(seed=3)
    calib = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    net = kiln.onnx.parse(model)
    config = kiln.BuildConfig(device="cuda", precision="fp16", quantize=mode, calibration=[{"x": calib}],
                              profiles={"x": x.shape})
    engine = kiln.build(net, config)
    precisions = [layer.get("precision") for layer in engine.layers if layer["kind"] in ("QConvolution",
                                                                                          "QFullyConnected")]
    assert precisions and set(precisions) == {mode}
    ours = engine.context().run({"x": x})["y"]
    p = plan(net, kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}],
                                   calibrator=config.calibrator, smoothing=config.smoothing and mode == "int8"))
    deq = kiln.build(quantized(net, p.layers, p.amax, mode, p.means, p.smooth),
                     kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    ref_q = deq.context().run({"x": x})["y"]
    ref32 = _ort(model, {"x": x})["y"]
    assert np.linalg.norm(ours - ref_q) / np.linalg.norm(ref_q) < 0.05
    assert np.linalg.norm(ours - ref32) / np.linalg.norm(ref32) < 0.15
