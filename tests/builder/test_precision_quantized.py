"""FP16 builds of quantized models: the quantization keeps FP32 (Q/DQ pairs, integer ops and the float
arithmetic on their int32 sums), so an FP16 engine of a quantized model gives ONNX Runtime's FP32 answer
instead of values moved across quantization steps, or int32 sums overflowing FP16 into inf/NaN.
--fp32-layers patterns reach layers inside If branches.

References: ONNX Runtime (CPU, FP32) on models made by ONNX Runtime's own quantizers.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

F = TensorProto.FLOAT
RNG = np.random.default_rng(11)


def _w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _save(graph: onnx.GraphProto, path) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _ort(path: str, feeds: dict) -> dict:
    """ONNX Runtime with its graph optimizations off: Q/DQ nodes run as written, in FP32 (optimized, it fuses
    them into integer kernels whose requantization rounds some values to the neighbouring integer)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _fp16(path: str, feeds: dict, **config):
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(device="cpu", precision="fp16",
                                                                profiles={k: v.shape for k, v in feeds.items()},
                                                                **config))
    return engine, engine.context().run(feeds)


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def test_static_qdq_cnn_matches_fp32_reference(tmp_path):
    """A conv net quantized by quantize_static (QDQ, per-channel): every conv sits between DQ and Q, so the
    FP16 engine computes the quantized model exactly as ONNX Runtime does in FP32 (an FP16 conv output lands
    on other integers after the next QuantizeLinear: rel L2 of several percent before)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"])]
    inits = [numpy_helper.from_array(_w(16, 3, 3, 3), "w1"), numpy_helper.from_array(_w(16), "b1"),
             numpy_helper.from_array(_w(16, 16, 3, 3, scale=0.2), "w2"), numpy_helper.from_array(_w(16), "b2"),
             numpy_helper.from_array(_w(8, 16, 1, 1), "w3"), numpy_helper.from_array(_w(8), "b3")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", F, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", F, [1, 8, 12, 12])], initializer=inits)
    fp32 = _save(graph, tmp_path / "cnn.onnx")
    calib = [{"x": _w(1, 3, 12, 12, scale=1.0)} for _ in range(4)]
    qdq = str(tmp_path / "cnn_qdq.onnx")
    quantization.quantize_static(fp32, qdq, _Reader(calib), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, weight_type=quantization.QuantType.QInt8)
    feeds = {"x": _w(1, 3, 12, 12, scale=1.0)}
    ref = _ort(qdq, feeds)["y"]
    engine, got = _fp16(qdq, feeds)
    assert _rel_l2(got["y"], ref) <= 1e-5
    convs = [layer for layer in engine.layers if layer["kind"] == "Convolution"]
    assert convs and all(layer["precision"] == "fp32" for layer in convs)


def test_dynamic_quantized_matmul_does_not_overflow(tmp_path):
    """quantize_dynamic's MatMulInteger sums reach far past FP16's 65504 (K=512 products of 8-bit values):
    cast to FP16 they were inf and the output NaN/inf; kept FP32 they match ONNX Runtime."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", F, [4, 512])],
                              [helper.make_tensor_value_info("y", F, [4, 64])],
                              initializer=[numpy_helper.from_array(_w(512, 64), "w"),
                                           numpy_helper.from_array(_w(64), "b")])
    fp32 = _save(graph, tmp_path / "mm.onnx")
    dyn = str(tmp_path / "mm_dyn.onnx")
    quantization.quantize_dynamic(fp32, dyn, weight_type=quantization.QuantType.QInt8)
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(dyn).graph.node)
    feeds = {"x": _w(4, 512, scale=4.0)}
    ref = _ort(dyn, feeds)["y"]
    _, got = _fp16(dyn, feeds)
    assert np.isfinite(np.asarray(got["y"])).all()
    assert _rel_l2(got["y"], ref) <= 1e-3


def test_fp32_layers_reach_if_branches(tmp_path):
    """A --fp32-layers pattern naming a node inside an If branch keeps that layer FP32 (it used to match only
    top-level layers and fail with "matches no layer")."""
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "wt"], ["t_out"], name="branch_matmul")], "then",
                               [], [helper.make_tensor_value_info("t_out", F, [2, 8])],
                               initializer=[numpy_helper.from_array(_w(16, 8), "wt")])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_full"]),
                                helper.make_node("Slice", ["e_full", "s0", "s8", "ax"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", F, [2, 8])],
                               initializer=[numpy_helper.from_array(np.array([0], np.int64), "s0"),
                                            numpy_helper.from_array(np.array([8], np.int64), "s8"),
                                            numpy_helper.from_array(np.array([1], np.int64), "ax")])
    nodes = [helper.make_node("Tanh", ["x"], ["h"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 16]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", F, [2, 8])])
    path = _save(graph, tmp_path / "if.onnx")
    for cond in (True, False):
        feeds = {"x": _w(2, 16, scale=1.0), "c": np.array(cond)}
        ref = _ort(path, feeds)["z"]
        engine, got = _fp16(path, {"x": feeds["x"]} | {"c": feeds["c"]}, fp32_layers=["branch_matmul"])
        assert _rel_l2(got["z"], ref) <= 1e-2
