"""Q/DQ folding into 8-bit layers (kiln/passes/fold_qdq.py) on models quantized by ONNX Runtime's own
quantize_static (QDQ format, per-channel int8 weights), checked against ONNX Runtime running the same model.

The fold is a CUDA-build step; these tests turn it on for CPU builds (``folds_quantization``), where the 8-bit
layers run their reference tactic, and run the Triton kernels of the same layers in TRITON_INTERPRET mode on
ONNX Runtime's own input codes."""
from __future__ import annotations

import importlib
import logging

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.ir.dtypes import torch_dtype
from kiln.kernels import KernelContext, get_tactic
from kiln.passes.fold_qdq import QuantizationWarning
from kiln.triton_support import HAS_TRITON, interpreting

from _quant_models import blobs, cnn, trained_mlp

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")
build_module = importlib.import_module("kiln.builder.build")


def _model(nodes: list, inits: list, x_shape: list, y_shape: list) -> onnx.ModelProto:
    """An opset-17 model of ``nodes`` from float input x to float output y."""
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def fold_on_cpu(monkeypatch):
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: config.optimization_level > 0)


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _quantize(model: onnx.ModelProto, calib: list[np.ndarray], tmp_path, activations) -> onnx.ModelProto:
    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, src)
    logging.disable(logging.WARNING)        # quantize_static's advice to pre-process the model
    try:
        quantization.quantize_static(str(src), str(dst), _Reader([{"x": c} for c in calib]),
                                     quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                     activation_type=activations, weight_type=quantization.QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(dst)


def _ort_codes(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime's outputs, every QuantizeLinear's codes among them, graph optimizations off (the Q/DQ
    nodes run as written, in FP32)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types = {i.name: i.data_type for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            m.graph.output.append(helper.make_tensor_value_info(n.output[0], types[n.input[2]], None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fp8 = {o.name for o in m.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT8E4M3FN}
    return {o.name: v.view(ml_dtypes.float8_e4m3fn) if o.name in fp8 else v       # FP8 comes back as its bits
            for o, v in zip(sess.get_outputs(), sess.run(None, {"x": x}))}


def _assert_codes_match(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    """8-bit codes of one tensor: within one step everywhere (a value within float rounding of a rounding
    boundary may go either way after differently ordered float sums), and nearly all equal."""
    a, b = ours.astype(np.int32), ref.astype(np.int32)
    assert a.shape == b.shape, name
    assert np.abs(a - b).max() <= 1, name
    assert np.mean(a == b) > 0.99 or np.sum(a != b) <= 2, name     # a small (pooled) tensor: two flips at most
    assert np.unique(b).size > min(10, b.size // 3), name      # a real spread of codes was compared


MODELS = {
    "cnn-uint8": (lambda: cnn(seed=1), (3, 8, 8), "QUInt8",
                  {"QConvolution": 2, "QFullyConnected": 1}),
    "cnn-int8": (lambda: cnn(seed=2), (3, 8, 8), "QInt8", {"QConvolution": 2, "QFullyConnected": 1}),
    "mlp-int8": (lambda: trained_mlp(steps=30), (16,), "QInt8", {"QFullyConnected": 2}),
}
# what ONNX Runtime quantizes that stays dequantized (the build names them): the pool and flatten between Q/DQ
# pairs, the MLP's bias adds
LEFT = {"cnn-uint8": ["Pooling", "Flatten"], "cnn-int8": ["Pooling", "Flatten"], "mlp-int8": ["ElementWise"]}


def _case(name: str, tmp_path):
    make, shape, acts, kinds = MODELS[name]
    rng = np.random.default_rng(7)
    if name.startswith("mlp"):
        calib = [blobs(16, seed=s)[0] for s in range(4)]
        x = blobs(32, seed=9)[0]
    else:
        calib = [rng.standard_normal((4, *shape)).astype(np.float32) for _ in range(4)]
        x = rng.standard_normal((6, *shape)).astype(np.float32)
    model = _quantize(make(), calib, tmp_path, getattr(quantization.QuantType, acts))
    return model, x, kinds


@pytest.mark.parametrize("name", list(MODELS))
def test_ort_qdq_model_folds_and_matches_onnxruntime(name, tmp_path, fold_on_cpu):
    model, x, kinds = _case(name, tmp_path)
    ref = _ort_codes(model, x)
    net = kiln.onnx.parse(model)
    codes = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for c in codes:
        net.mark_output(net.tensors[c])
    with pytest.warns(QuantizationWarning) as warned:
        engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    assert [str(w.message).split("kernel for ")[1].split()[0] for w in warned] == LEFT[name]
    found = [layer["kind"] for layer in engine.layers]
    assert {k: found.count(k) for k in kinds} == kinds
    assert not {"Convolution", "FullyConnected", "MatMul", "Gemm"} & set(found)
    assert {layer["precision"] for layer in engine.layers if layer["kind"] in kinds} == {"int8"}
    ours = engine.context().run({"x": x})
    for c in codes:
        _assert_codes_match(ours[c], ref[c], c)
    exact = np.all([(ours[c] == ref[c]).reshape(len(x), -1).all(1) for c in codes], axis=0)
    assert exact.sum() >= len(x) // 2
    y = model.graph.output[0].name
    np.testing.assert_array_equal(ours[y][exact], ref[y][exact])     # the same codes dequantize the same
    path = tmp_path / "m.kiln"
    engine.save(path)
    again = kiln.load(path).context().run({"x": x})
    np.testing.assert_array_equal(again[y], ours[y])


@pytest.mark.skipif(not HAS_TRITON or not interpreting(), reason="runs the Triton kernels in TRITON_INTERPRET mode")
@pytest.mark.parametrize("name", ["cnn-uint8", "mlp-int8"])
def test_triton_kernels_match_onnxruntime_layer_by_layer(name, tmp_path, fold_on_cpu):
    """Each 8-bit layer's Triton kernel, given ONNX Runtime's input codes, writes ONNX Runtime's output codes
    (within one step), as the reference tactic does."""
    model, x, kinds = _case(name, tmp_path)
    x = x[:4]
    ref = _ort_codes(model, x)
    prepared = build_module.prepare(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    layers = [layer for layer in prepared.net.layers if layer.kind in kinds]
    assert len(layers) == sum(kinds.values())
    for layer in layers:
        ins = [torch.from_numpy(np.asarray(t.value)) if t.is_constant else torch.from_numpy(ref[t.name])
               for t in layer.inputs]
        out = layer.outputs[0].name
        ctx = KernelContext(device="cpu", input_dtypes=tuple(t.dtype for t in layer.inputs))
        for tactic in ("triton_int8", "reference"):
            got = get_tactic(layer.kind, tactic).make(layer.attrs, ctx)(*ins)[0]
            assert got.dtype == torch_dtype(layer.outputs[0].dtype)
            _assert_codes_match(got.contiguous().numpy(), ref[out], f"{layer.name} {tactic}")


def test_cpu_builds_do_not_fold(tmp_path):
    model, x, _ = _case("cnn-int8", tmp_path)
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    kinds = {layer["kind"] for layer in engine.layers}
    assert "Convolution" in kinds and not {"QConvolution", "QFullyConnected"} & kinds
    y = model.graph.output[0].name
    ref = _ort_codes(model, x)[y]
    got = engine.context().run({"x": x})[y]
    step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    assert np.abs(got - ref).max() <= step * 1.001 and np.mean(got == ref) > 0.95


def _unfoldable() -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv with a float (unquantized) weight -> y: the activation is quantized, the weight is
    not, so no 8-bit kernel applies."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.2
    inits = [numpy_helper.from_array(np.asarray(0.02, np.float32), "s"),
             numpy_helper.from_array(np.asarray(0, np.int8), "z"), numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quant"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dequant"),
             helper.make_node("Conv", ["xd", "w"], ["y"], name="float_weight_conv", pads=[1, 1, 1, 1])]
    return _model(nodes, inits, [2, 4, 6, 6], [2, 8, 6, 6])


def test_unfoldable_pattern_warns_naming_the_node_and_stays_correct(fold_on_cpu):
    model = _unfoldable()
    x = np.random.default_rng(4).standard_normal((2, 4, 6, 6)).astype(np.float32)
    with pytest.warns(QuantizationWarning, match=r"1 layer\(s\) .* because its weight is not a constant quantized.*"
                                                 r": 'float_weight_conv' \(Convolution; ONNX float_weight_conv\)\.$"):
        engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu"))
    assert "Convolution" in {layer["kind"] for layer in engine.layers}
    ref = _ort_codes(model, x)
    got = engine.context().run({"x": x})["y"]
    # the same dequantized inputs and float weights: float32 sums of 36 terms apart
    np.testing.assert_allclose(got, ref["y"], rtol=1e-5, atol=1e-5 * np.abs(ref["y"]).max())
    np.testing.assert_array_equal(engine.context().run({"x": x})["y"], got)


def test_8bit_layers_are_timed_on_8bit_codes(tmp_path, fold_on_cpu):
    """The builder times an 8-bit layer's tactics on random 8-bit codes (int8/uint8 activations), as any layer's
    on random floats, and both tactics of a QFullyConnected agree closely enough to be candidates."""
    import json
    model, x, _ = _case("mlp-int8", tmp_path)
    cache = tmp_path / "t.timing"
    kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles={"x": x.shape},
                                                        timing_cache=str(cache)))
    entries = json.loads(cache.read_text())["entries"]
    # tactic times, not the per-layer thread-count entries (keyed by thread count: "1", "2", ...)
    timed = [times for key, times in entries.items() if "|QFullyConnected|" in key
             and not all(name.isdigit() for name in times)]
    assert len(timed) == 2
    for times in timed:
        assert set(times) == {"reference", "int_mm"} and all(np.isfinite(list(times.values())))


def _fp8_mlp() -> onnx.ModelProto:
    """x -> Q/DQ (FP8 E4M3, per tensor) -> MatMul with an FP8 weight per output channel -> + b -> ReLU -> Q/DQ:
    the explicit FP8 quantization NVIDIA's ModelOpt writes (opset 21)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    ws = (np.abs(w).max(0) / 448).astype(np.float32)

    def fp8(name: str, v: np.ndarray) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, v.shape,
                                  np.asarray(v).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes(), raw=True)
    inits = [numpy_helper.from_array(np.asarray(0.01, np.float32), "xs"), fp8("xz", np.zeros(())),
             fp8("wq", w / ws), numpy_helper.from_array(ws, "ws"), fp8("wz", np.zeros(24)),
             numpy_helper.from_array(np.asarray(0.05, np.float32), "ys"), fp8("yz", np.zeros(())),
             numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["yq"], name="qy"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dqy")]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _assert_fp8_match(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    """FP8 codes: nearly all equal, the rest one E4M3 step apart (at most 1/8 of the value, or a subnormal step)."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    assert np.mean(a == b) > 0.95, name
    assert np.all(np.abs(a - b) <= np.maximum(np.abs(b) / 8, 2.0 ** -9) * 1.0001), name
    assert np.unique(b).size > 20, name


def test_fp8_qdq_model_folds_and_matches_onnxruntime(fold_on_cpu):
    """MatMul + bias (which epilogue fusion makes a FullyConnected with the transposed weight) still folds into
    an FP8 QFullyConnected; its reference tactic, the scaled_mm GEMM and the Triton FP8 kernel (interpreted)
    write ONNX Runtime's FP8 codes."""
    model = _fp8_mlp()
    x = (np.random.default_rng(6).standard_normal((16, 32)) * 2).astype(np.float32)
    ref = _ort_codes(model, x)
    net = kiln.onnx.parse(model)
    net.mark_output(net.tensors["yq"])
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    assert [(layer["kind"], layer["precision"]) for layer in engine.layers if layer["kind"].startswith("Q")] == \
        [("QuantizeLinear", "fp32"), ("QFullyConnected", "fp8")]
    ours = engine.context().run({"x": x})
    _assert_fp8_match(ours["yq"], ref["yq"], "engine")
    layer = next(layer for layer in build_module.prepare(kiln.onnx.parse(model), kiln.BuildConfig(
        device="cpu", profiles={"x": x.shape})).net.layers if layer.kind == "QFullyConnected")
    xq = torch.from_numpy(ref["xq"].view(np.uint8).copy()).view(torch.float8_e4m3fn)
    ins = [xq] + [torch.from_numpy(np.asarray(t.value).view(np.uint8)).view(torch.float8_e4m3fn)
                  if t.dtype == "float8_e4m3fn" else torch.from_numpy(np.asarray(t.value)) for t in layer.inputs[1:]]
    ctx = KernelContext(device="cpu", input_dtypes=tuple(t.dtype for t in layer.inputs))
    tactics = ["reference", "scaled_mm"] + (["triton_fp8"] if HAS_TRITON and interpreting() else [])
    for tactic in tactics:
        got = get_tactic("QFullyConnected", tactic).make(layer.attrs, ctx)(*ins)[0]
        assert got.dtype == torch.float8_e4m3fn
        _assert_fp8_match(got.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), ref["yq"], tactic)


def _residual_cnn() -> onnx.ModelProto:
    """x[N,8,6,6] -> conv3x3 -> relu -> conv3x3 -> + x -> relu -> conv1x1(16) -> global pool -> Gemm -> y[N,5]:
    a ResNet basic block, whose second convolution takes the shortcut as its fused residual."""
    rng = np.random.default_rng(11)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
    inits = {"w1": w(8, 8, 3, 3), "b1": w(8, 1)[:, 0], "w2": w(8, 8, 3, 3), "b2": w(8, 1)[:, 0],
             "w3": w(16, 8, 1, 1), "b3": w(16, 1)[:, 0], "wf": w(5, 16), "bf": w(5, 1)[:, 0]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    return _model(nodes, [numpy_helper.from_array(v, k) for k, v in inits.items()], ["N", 8, 6, 6], ["N", 5])


def _ptq_with_codes(model: onnx.ModelProto, calib: np.ndarray, x: np.ndarray):
    """Kiln's --int8 (max calibrator) of ``model`` with its QuantizeLinear codes marked as outputs: (the network,
    the code tensors' names, a CPU build config for ``x``, the network run dequantized on ``x``)."""
    from kiln.builder.quant import quantize
    qnet = quantize(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}],
                                                             calibrator="max", profiles={"x": x.shape}))
    codes = [layer.outputs[0].name for layer in qnet.layers if layer.kind == "QuantizeLinear"]
    for c in codes:
        qnet.mark_output(qnet.tensors[c])
    config = kiln.BuildConfig(device="cpu", profiles={"x": x.shape})
    return qnet, codes, config, kiln.build(qnet, config).context().run({"x": x})


def test_kiln_ptq_network_folds_with_residual_and_float_outputs(monkeypatch):
    """Kiln's own --int8 quantization (Q/DQ on the inputs of convolutions and GEMMs) folds: the block's second
    convolution with its residual (the shortcut x read as the codes conv1 reads), layers whose float output feeds
    a pool or is the network's. Against the same
    network run dequantized: the 8-bit codes agree within one step, and where they all agree the output differs
    by at most the bias's rounding to int32 codes (half of x_scale * w_scale) plus float32 rounding."""
    rng = np.random.default_rng(12)
    calib = rng.standard_normal((16, 8, 6, 6)).astype(np.float32)
    x = rng.standard_normal((8, 8, 6, 6)).astype(np.float32)
    qnet, codes, config, ref = _ptq_with_codes(_residual_cnn(), calib, x)
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    engine = kiln.build(qnet, config)
    layers = {layer["name"]: layer for layer in engine.layers}
    assert [layers[n]["kind"] for n in ("conv1", "conv2", "conv3")] == ["QConvolution"] * 3
    assert len(layers["conv2"]["inputs"]) == 4                    # the shortcut, read as its codes
    assert layers["conv2"]["attrs"]["residual_scale"] == layers["conv1"]["attrs"]["x_scale"]
    assert [layers[n]["attrs"]["to"] for n in ("conv1", "conv2", "conv3")] == ["int8", "int8", "float32"]
    fc = next(layer for layer in engine.layers if layer["kind"] == "QFullyConnected")
    ours = engine.context().run({"x": x})
    for c in codes:
        _assert_codes_match(ours[c], ref[c], c)
    same = np.all([(ours[c] == ref[c]).reshape(len(x), -1).all(1) for c in codes], axis=0)
    assert same.sum() >= len(x) // 2
    ws = np.asarray(fc["attrs"]["w_scale"]["__array__"]["data"])
    bound = 0.5 * fc["attrs"]["x_scale"] * ws + 1e-5 * np.abs(ref["y"]).max()
    assert np.all(np.abs(ours["y"][same] - ref["y"][same]) <= bound)
    half = kiln.build(qnet, kiln.BuildConfig(device="cpu", precision="fp16", profiles={"x": x.shape}))
    halves = {layer["name"]: layer for layer in half.layers}
    assert [halves[n]["attrs"]["to"] for n in ("conv1", "conv2", "conv3")] == ["int8", "int8", "float16"]
    tensors = half.header["plan"]["tensors"]
    assert sorted(tensors[layer["inputs"][0]]["dtype"] for layer in half.layers if layer["kind"] == "QuantizeLinear") \
        == ["float16", "float32"]           # the pool's FP16 output is quantized as it is, the FP32 input x too
    # one Cast, of the FP16 output: the shortcut x reaches conv2 as codes, not as a float cast to FP16
    assert [layer["attrs"]["to"] for layer in half.layers if layer["kind"] == "Cast"] == ["float32"]
    y16 = half.context().run({"x": x})["y"]
    assert y16.dtype == np.float32
    assert np.linalg.norm(y16 - ours["y"]) <= 1e-2 * np.linalg.norm(ours["y"])
    if HAS_TRITON and interpreting():       # the residual convolution's Triton kernel on the same codes
        conv2 = next(layer for layer in build_module.prepare(qnet, config).net.layers if layer.name == "conv2")
        feeds = {**ours, "x": x}
        ins = [torch.from_numpy(np.asarray(t.value)) if t.is_constant else torch.from_numpy(feeds[t.name])
               for t in conv2.inputs]
        ctx = KernelContext(device="cpu", input_dtypes=tuple(t.dtype for t in conv2.inputs))
        got = get_tactic("QConvolution", "triton_int8").make(conv2.attrs, ctx)(*ins)[0]
        _assert_codes_match(got.contiguous().numpy(), ours[conv2.outputs[0].name], "conv2 triton_int8")


def _shortcut_block() -> onnx.ModelProto:
    """x -> Q/DQ -> conv3x3 (weight Q/DQ per channel) -> + DQ(x codes) -> ReLU -> Q/DQ -> y: the residual add's
    shortcut dequantized from 8-bit codes, where TensorRT's Q/DQ placement puts it."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.15
    ws = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.asarray(0.03, np.float32), "xs"),
             numpy_helper.from_array(np.asarray(0, np.int8), "xz"),
             numpy_helper.from_array(np.clip(np.rint(w / ws[:, None, None, None]), -127, 127).astype(np.int8), "wq"),
             numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(np.asarray(0.02, np.float32), "ys"),
             numpy_helper.from_array(np.asarray(-128, np.int8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "xd"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["yq"], name="qy"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dqy")]
    return _model(nodes, inits, ["N", 8, 7, 7], ["N", 8, 7, 7])


def test_dequantized_shortcut_is_read_as_codes(fold_on_cpu):
    """conv + DQ(shortcut codes) + ReLU -> Q folds into one QConvolution reading the shortcut's int8 codes (no
    float copy of it); the reference tactic and the Triton kernel write ONNX Runtime's codes."""
    model = _shortcut_block()
    x = (np.random.default_rng(22).standard_normal((2, 8, 7, 7)) * 1.5).astype(np.float32)
    ref = _ort_codes(model, x)
    net = kiln.onnx.parse(model)
    net.mark_output(net.tensors["yq"])
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    assert [layer["kind"] for layer in engine.layers] == ["QuantizeLinear", "QConvolution", "DequantizeLinear"]
    conv = engine.layers[1]
    assert conv["inputs"][0] == conv["inputs"][3] == "xq" and conv["attrs"]["residual_scale"] == np.float32(0.03)
    _assert_codes_match(engine.context().run({"x": x})["yq"], ref["yq"], "engine")
    layer = next(layer for layer in build_module.prepare(kiln.onnx.parse(model), kiln.BuildConfig(
        device="cpu", profiles={"x": x.shape})).net.layers if layer.kind == "QConvolution")
    ins = [torch.from_numpy(np.asarray(t.value)) if t.is_constant else torch.from_numpy(ref[t.name])
           for t in layer.inputs]
    ctx = KernelContext(device="cpu", input_dtypes=tuple(t.dtype for t in layer.inputs))
    for tactic in ["reference"] + (["triton_int8"] if HAS_TRITON and interpreting() else []):
        got = get_tactic("QConvolution", tactic).make(layer.attrs, ctx)(*ins)[0]
        _assert_codes_match(got.contiguous().numpy(), ref["yq"], tactic)


def _shared_output_block() -> onnx.ModelProto:
    """x -> conv_a -> relu = t; t -> conv_b -> + t -> relu -> y: t is both conv_b's input and its shortcut."""
    rng = np.random.default_rng(31)
    wa = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    wb = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.15
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "wa": wa, "ba": rng.standard_normal(8).astype(np.float32) * 0.1,
        "wb": wb, "bb": rng.standard_normal(8).astype(np.float32) * 0.1}.items()]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ca"], ["t"], name="relu_a"),
             helper.make_node("Conv", ["t", "wb", "bb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["cb", "t"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu_b")]
    return _model(nodes, inits, ["N", 4, 6, 6], ["N", 8, 6, 6])


def test_float_output_also_quantized_is_a_second_output(monkeypatch):
    """A float output that a QuantizeLinear reads besides other layers (conv_a's: conv_b's quantized input and its
    float shortcut) becomes conv_a's second output: its codes, from the float value as stored. The same codes
    as the separate QuantizeLinear (within one step, nearly all equal), in FP32 and FP16 builds; the Triton
    kernel writes both outputs too."""
    from kiln.builder.quant import quantize
    rng = np.random.default_rng(32)
    x = rng.standard_normal((4, 4, 6, 6)).astype(np.float32)
    qnet = quantize(kiln.onnx.parse(_shared_output_block()), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)}],
        calibrator="max", profiles={"x": x.shape}))
    t_codes = next(layer.outputs[0].name for layer in qnet.layers
                   if layer.kind == "QuantizeLinear" and layer.inputs[0].name == "t")
    qnet.mark_output(qnet.tensors[t_codes])
    qnet.mark_output(qnet.tensors["t"])
    for precision in ("fp32", "fp16"):
        config = kiln.BuildConfig(device="cpu", precision=precision, profiles={"x": x.shape})
        monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: False)
        ref = kiln.build(qnet, config).context().run({"x": x})
        monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
        engine = kiln.build(qnet, config)
        conv_a = next(layer for layer in engine.layers if layer["name"] == "conv_a")
        assert conv_a["kind"] == "QConvolution" and conv_a["outputs"][1] == t_codes     # (FP16: t is cast up after)
        assert "QuantizeLinear" not in {layer["kind"] for layer in engine.layers[1:]}    # only x's remains
        ours = engine.context().run({"x": x})
        _assert_codes_match(ours[t_codes], ref[t_codes], f"{precision} codes")
        # y: within 2% of its range (int32 bias codes, and in FP16 the rounding of t and y)
        np.testing.assert_allclose(ours["y"], ref["y"], rtol=0, atol=0.02 * np.abs(ref["y"]).max())
    if HAS_TRITON and interpreting():
        layer = next(layer for layer in build_module.prepare(qnet, kiln.BuildConfig(
            device="cpu", profiles={"x": x.shape})).net.layers if layer.name == "conv_a")
        codes_in = next(layer.outputs[0].name for layer in qnet.layers
                        if layer.kind == "QuantizeLinear" and layer.inputs[0].name == "x")
        feeds = {codes_in: _quantize_input(qnet, codes_in, x)}
        ins = [torch.from_numpy(np.asarray(t.value)) if t.is_constant else torch.from_numpy(feeds[t.name])
               for t in layer.inputs]
        ctx = KernelContext(device="cpu", input_dtypes=tuple(t.dtype for t in layer.inputs))
        want = get_tactic("QConvolution", "reference").make(layer.attrs, ctx)(*ins)
        got = get_tactic("QConvolution", "triton_int8").make(layer.attrs, ctx)(*ins)
        assert len(got) == 2
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-5)
        _assert_codes_match(got[1].contiguous().numpy(), want[1].numpy(), "triton second output")


def _quantize_input(qnet, codes: str, x: np.ndarray) -> np.ndarray:
    """The codes the network's QuantizeLinear named ``codes`` makes of ``x`` (numpy: round half to even)."""
    q = qnet.tensors[codes].producer
    s = float(np.asarray(q.inputs[1].value))
    return np.clip(np.rint(x / np.float32(s)), -128, 127).astype(np.int8)


def _conv_bn() -> onnx.ModelProto:
    """x -> conv3x3 -> BatchNormalization (one channel's gamma negative) -> relu -> conv1x1 -> y: a model exported
    with its batch norms, which the build folds into the convolutions after quantization put Q/DQ on them."""
    rng = np.random.default_rng(41)
    inits = {"w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
             "g": np.r_[-0.7, rng.uniform(0.5, 1.5, 7)].astype(np.float32),
             "beta": rng.standard_normal(8).astype(np.float32) * 0.1,
             "mean": rng.standard_normal(8).astype(np.float32) * 0.1,
             "var": rng.uniform(0.5, 2.0, 8).astype(np.float32),
             "w2": rng.standard_normal((6, 8, 1, 1)).astype(np.float32) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    return _model(nodes, [numpy_helper.from_array(v, k) for k, v in inits.items()], ["N", 4, 6, 6], ["N", 6, 6, 6])


def test_batch_norm_folded_into_a_quantized_conv_still_folds(monkeypatch):
    """Batch normalization folded into a convolution whose weight is quantized rescales each output channel: the
    weight is still the same codes, with scales gamma / sigma times theirs (a negative gamma too), so the layer
    folds; the same codes and outputs as the network run dequantized."""
    import warnings
    rng = np.random.default_rng(42)
    x = rng.standard_normal((4, 4, 6, 6)).astype(np.float32)
    qnet, codes, config, ref = _ptq_with_codes(_conv_bn(), rng.standard_normal((8, 4, 6, 6)).astype(np.float32), x)
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        engine = kiln.build(qnet, config)
    conv1 = next(layer for layer in engine.layers if layer["name"] == "conv1")
    assert conv1["kind"] == "QConvolution" and min(conv1["attrs"]["w_scale"]["__array__"]["data"]) < 0
    ours = engine.context().run({"x": x})
    for c in codes:
        _assert_codes_match(ours[c], ref[c], c)
    np.testing.assert_allclose(ours["y"], ref["y"], rtol=0, atol=0.02 * np.abs(ref["y"]).max())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_build_folds_and_matches_onnxruntime(name, precision, tmp_path):
    """On the GPU the build folds by itself, times the 8-bit tactics and runs them; the codes stay within one step
    of ONNX Runtime's."""
    model, x, kinds = _case(name, tmp_path)
    ref = _ort_codes(model, x)
    net = kiln.onnx.parse(model)
    codes = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for c in codes:
        net.mark_output(net.tensors[c])
    with pytest.warns(QuantizationWarning):
        engine = kiln.build(net, kiln.BuildConfig(device="cuda", precision=precision, profiles={"x": x.shape}))
    found = [layer["kind"] for layer in engine.layers]
    assert {k: found.count(k) for k in kinds} == kinds
    ours = engine.context().run({"x": x})
    for c in codes:
        a, b = ours[c].astype(np.int32), ref[c].astype(np.int32)
        assert np.abs(a - b).max() <= 1 and np.mean(a == b) > (0.99 if precision == "fp32" else 0.95), c


def _bottleneck_and_parallel() -> onnx.ModelProto:
    """x[16ch] -> 1x1 conv_a + ReLU = t; y1 = ReLU(conv_b(t) + downsample(x)) (a projection shortcut, which
    passes/fuse_projection.py merges into Conv1x1Sum); three MatMuls read the pooled p (parallel linear layers,
    which passes/fuse_parallel_linear.py merges); y = their sum."""
    rng = np.random.default_rng(51)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
    inits = {"wa": w(16, 16, 1, 1), "ba": w(16, 1)[:, 0], "wb": w(32, 16, 1, 1), "bb": w(32, 1)[:, 0],
             "wd": w(32, 16, 1, 1), "bd": w(32, 1)[:, 0], "m1": w(32, 24), "m2": w(32, 24), "m3": w(32, 24)}
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], name="conv_a"),
             helper.make_node("Relu", ["ca"], ["t"], name="relu_a"),
             helper.make_node("Conv", ["t", "wb", "bb"], ["cb"], name="conv_b"),
             helper.make_node("Conv", ["x", "wd", "bd"], ["cd"], name="downsample"),
             helper.make_node("Add", ["cb", "cd"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y1"], name="relu_b"),
             helper.make_node("GlobalAveragePool", ["y1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["p"], name="flat"),
             *[helper.make_node("MatMul", ["p", f"m{i}"], [f"q{i}"], name=f"mm{i}") for i in (1, 2, 3)],
             helper.make_node("Sum", ["q1", "q2", "q3"], ["y"], name="sum")]
    return _model(nodes, [numpy_helper.from_array(v, k) for k, v in inits.items()], ["N", 16, 6, 6], ["N", 24])


@pytest.mark.usefixtures("gpu_fusions")       # the float build makes the GPU's projection sum too
def test_fusions_leave_quantized_layers_to_the_fold(fold_on_cpu):
    """The fusions that merge convolutions (projection shortcut, 1x1 chains) or GEMMs reading one input leave the
    layers that read a dequantized activation alone, so the fold makes each an 8-bit layer instead of a float
    fused one reading dequantized values (the parallel 8-bit GEMMs then merge into one); the float build still
    fuses them; outputs as the dequantized network."""
    from kiln.builder.quant import quantize
    rng = np.random.default_rng(52)
    x = rng.standard_normal((4, 16, 6, 6)).astype(np.float32)
    model = _bottleneck_and_parallel()
    config = kiln.BuildConfig(device="cpu", profiles={"x": x.shape})
    float_kinds = [layer["kind"] for layer in kiln.build(kiln.onnx.parse(model), config).layers]
    assert "Conv1x1Sum" in float_kinds and float_kinds.count("FullyConnected") == 1      # fused when float
    qnet = quantize(kiln.onnx.parse(model), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": rng.standard_normal((8, 16, 6, 6)).astype(np.float32)}],
        calibrator="max", profiles={"x": x.shape}))
    engine = kiln.build(qnet, config)
    kinds = [layer["kind"] for layer in engine.layers]
    assert "Conv1x1Sum" not in kinds and kinds.count("QConvolution") == 3
    assert kinds.count("QFullyConnected") == 1 and "Split" in kinds   # the three 8-bit GEMMs merged after the fold
    ref = kiln.build(qnet, kiln.BuildConfig(device="cpu", profiles={"x": x.shape}, optimization_level=0))
    want = ref.context().run({"x": x})["y"]
    np.testing.assert_allclose(engine.context().run({"x": x})["y"], want, rtol=0, atol=0.02 * np.abs(want).max())
