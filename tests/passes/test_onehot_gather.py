"""One-hot GEMMs as row gathers (passes/onehot_gather.py): which graphs become a Gather, out-of-range indices give the
one-hot's zero row, element-wise work after the gather moves onto the table, and the CPU engine computes what ONNX
Runtime computes on the original model either way."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from _models import corpus_model

K, N, L = 7, 5, 9
RNG = np.random.default_rng(11)
W = RNG.standard_normal((K, N)).astype(np.float32)
B = RNG.standard_normal(N).astype(np.float32)
ONNX_INT = {np.int32: TensorProto.INT32, np.int64: TensorProto.INT64, np.uint8: TensorProto.UINT8,
            np.int8: TensorProto.INT8}


def _model(dtype=np.int32, const=None, w=W, tail: bool = True, idx_last: int = 1, extra=None) -> bytes:
    """idx [2, L] → Unsqueeze(-1) (idx_last > 1: Tile it) → Equal(·, const) → Cast(float) → MatMul(w), then with
    ``tail`` + B, tanh, ·0.5 and the square of that (a product of two gathered operands); ``extra`` is added last."""
    const = np.arange(K).reshape(1, 1, K) if const is None else const
    inits = [numpy_helper.from_array(np.asarray(const).astype(dtype), "c"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.asarray([-1], np.int64), "ax"), numpy_helper.from_array(B, "b"),
             numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [helper.make_node("Unsqueeze", ["idx", "ax"], ["u1"])]
    if idx_last > 1:
        inits.append(numpy_helper.from_array(np.asarray([1, 1, idx_last], np.int64), "reps"))
        nodes.append(helper.make_node("Tile", ["u1", "reps"], ["u"]))
    else:
        nodes.append(helper.make_node("Identity", ["u1"], ["u"]))
    nodes += [helper.make_node("Equal", ["u", "c"], ["eq"]), helper.make_node("Cast", ["eq"], ["oh"], to=TensorProto.FLOAT),
              helper.make_node("MatMul", ["oh", "w"], ["mm"], name="dense")]
    out = "mm"
    if tail:
        nodes += [helper.make_node("Add", ["mm", "b"], ["biased"]), helper.make_node("Tanh", ["biased"], ["t"]),
                  helper.make_node("Mul", ["half", "t"], ["h"]), helper.make_node("Mul", ["h", "h"], ["sq"])]
        out = "sq"
    if extra is not None:
        inits.append(numpy_helper.from_array(extra, "extra"))
        nodes.append(helper.make_node("Add", [out, "extra"], ["y"]))
        out = "y"
    nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(nodes, "onehot", [helper.make_tensor_value_info("idx", ONNX_INT[dtype], [2, L])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _indices(dtype) -> np.ndarray:
    """In-range indices and, where the type holds them, -1, K, K+3, -K and the type's extremes."""
    info = np.iinfo(dtype)
    special = [v for v in (-1, K, K + 3, -K, info.min, info.max, 0, K - 1) if info.min <= v <= info.max]
    x = RNG.integers(0, K, (2, L)).astype(dtype)
    x.reshape(-1)[:len(special)] = special
    return x


def _engine(data: bytes):
    return kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))


def _check(data: bytes, engine, x: np.ndarray) -> None:
    got = np.asarray(engine.context().run({"idx": x})["out"], np.float64)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"idx": x})[0]
    assert got.shape == ref.shape
    assert (np.isnan(got) == np.isnan(ref)).all()
    ok = ~np.isnan(ref)
    assert np.abs(got[ok] - ref[ok]).max() <= 1e-5 + 1e-4 * np.abs(ref[ok]).max()


def _kinds(engine) -> list[str]:
    return [layer["kind"] for layer in engine.layers]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int8, np.uint8])
def test_onehot_product_and_its_tail_become_one_gather(dtype):
    """Equal, Cast, MatMul, the bias, tanh and both products leave: one Gather of a K+1-row table, after the
    clamp of the indices (no lower clamp for unsigned ones); out-of-range indices give ONNX Runtime's result."""
    data = _model(dtype)
    engine = _engine(data)
    kinds = _kinds(engine)
    assert kinds.count("Gather") == 1 and not {"MatMul", "FullyConnected", "Cast", "Activation", "Pointwise"} & set(kinds)
    elementwise = [layer["attrs"]["op"] for layer in engine.layers if layer["kind"] == "ElementWise"]
    assert elementwise == (["max", "min"] if np.iinfo(dtype).min < 0 else ["min"])
    _check(data, engine, _indices(dtype))


def test_product_alone_reads_weight_rows_and_a_zero_row():
    """Without a tail the Gather's output is W's rows, exactly, and a zero row out of range."""
    data = _model(tail=False)
    engine = _engine(data)
    assert "Gather" in _kinds(engine) and "MatMul" not in _kinds(engine)
    x = _indices(np.int32)
    got = np.asarray(engine.context().run({"idx": x})["out"])
    inside = (x >= 0) & (x < K)
    want = np.where(inside[..., None], W[np.clip(x, 0, K - 1)], 0.0)
    np.testing.assert_array_equal(got, want)
    _check(data, engine, x)


def test_transposed_weight():
    """A MatMul reading W as [N, K] with transpose_b (a hand-built network) gathers W.T's rows."""
    net = kiln.Network()
    x = net.add_input("idx", "int64", (3, 1))
    eq = net.add_layer("ElementWise", [x, net.add_constant(np.arange(K, dtype=np.int64))], {"op": "equal"},
                       output_dtypes=["bool"])
    cast = net.add_layer("Cast", [eq.outputs[0]], {"to": "float32"})
    mm = net.add_layer("MatMul", [cast.outputs[0], net.add_constant(W.T.copy())], {"transpose_b": True})
    net.mark_output(mm.outputs[0], "out")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu"))
    assert "Gather" in _kinds(engine) and not {"MatMul", "FullyConnected"} & set(_kinds(engine))
    idx = np.asarray([[2], [K], [-1]], np.int64)
    got = np.asarray(engine.context().run({"idx": idx})["out"])
    np.testing.assert_array_equal(got, np.stack([W[2], np.zeros(N, np.float32), np.zeros(N, np.float32)]))


@pytest.mark.parametrize("kw", [
    {"const": np.arange(1, K + 1).reshape(1, 1, K)},                # 1..K, not 0..K-1
    {"const": np.arange(K)[::-1].reshape(1, 1, K).copy()},          # reversed
    {"idx_last": K, "const": np.arange(K).reshape(1, 1, K)},        # the index's last axis is K: a mask, not a one-hot
    {"w": np.where(np.eye(K, N, dtype=bool), np.float32(np.inf), W)},  # 0·inf is NaN in the product
], ids=["offset_range", "reversed", "index_axis_not_one", "weight_with_inf"])
def test_left_alone(kw):
    data = _model(**kw)
    engine = _engine(data)
    assert "Gather" not in _kinds(engine) and {"MatMul", "FullyConnected"} & set(_kinds(engine))
    _check(data, engine, _indices(np.int32))


def test_table_keeps_its_ops_when_larger_than_the_gather():
    """K + 1 rows against 4 indices: the one-hot still becomes a Gather, the tail stays on the gathered rows."""
    k = 40
    w = RNG.standard_normal((k, N)).astype(np.float32)
    net = kiln.Network()
    x = net.add_input("idx", "int32", (4, 1))
    eq = net.add_layer("ElementWise", [x, net.add_constant(np.arange(k, dtype=np.int32))], {"op": "equal"},
                       output_dtypes=["bool"])
    cast = net.add_layer("Cast", [eq.outputs[0]], {"to": "float32"})
    mm = net.add_layer("MatMul", [cast.outputs[0], net.add_constant(w)], {})
    act = net.add_layer("Activation", [mm.outputs[0]], {"type": "tanh"})
    net.mark_output(act.outputs[0], "out")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu"))
    assert "Gather" in _kinds(engine) and "Activation" in _kinds(engine)
    idx = np.asarray([[3], [k], [-2], [k - 1]], np.int32)
    got = np.asarray(engine.context().run({"idx": idx})["out"], np.float64)
    want = np.tanh(np.where(((idx >= 0) & (idx < k)), w[np.clip(idx[:, 0], 0, k - 1)], 0.0).astype(np.float64))
    assert np.abs(got - want).max() <= 4 * 2.0 ** -24


def test_constant_along_the_index_axes_stays_after_the_gather():
    """An Add of a constant that varies along the gathered positions is not moved onto the table."""
    extra = RNG.standard_normal((1, L, N)).astype(np.float32)
    data = _model(extra=extra)
    engine = _engine(data)
    kinds = _kinds(engine)
    assert "Gather" in kinds and ("ElementWise" in kinds or "Pointwise" in kinds)
    assert any(layer["kind"] in ("ElementWise", "Pointwise") and layer["attrs"].get("op") != "min"
               and layer["attrs"].get("op") != "max" for layer in engine.layers)
    _check(data, engine, _indices(np.int32))


def test_magika_dense_is_one_gather():
    """magika (jax2tf one_hot over 257 byte values, Dense_0, bias, tanh-GELU): one Gather of a 258-row table;
    against ONNX Runtime with bytes inside and outside 0..256."""
    cl, model, path = corpus_model("magika")
    engine = cl.build_engine(path, model)
    dense0 = [layer for layer in engine.layers if any("Dense_0" in o or "ApplyActivation_0" in o or "one_hot" in o
                                                      for o in layer.get("origin") or ())]
    assert sorted(layer["kind"] for layer in dense0) == ["ElementWise", "ElementWise", "Gather", "Shuffle", "Squeeze"]
    assert [layer["kind"] for layer in engine.layers].count("FullyConnected") == 1         # Dense_1 only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ctx = engine.context()
    for lo, hi in [(0, 257), (-300, 600)]:
        x = RNG.integers(lo, hi, (1, 2048)).astype(np.int32)
        got = np.asarray(next(iter(ctx.run({"bytes": x}).values())), np.float64)
        ref = session.run(None, {"bytes": x})[0]
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_long_chain_reading_its_value_twice_folds_in_time():
    """40 layers t + t after the gather: each reads one tensor twice, so following tables back to their constants
    must visit each layer once (a walk that does not remember what it saw takes 2^depth steps)."""
    net = kiln.Network()
    x = net.add_input("idx", "int64", (K + 1, 1))          # K + 1 rows in the table: as many as the indices
    eq = net.add_layer("ElementWise", [x, net.add_constant(np.arange(K, dtype=np.int64))], {"op": "equal"},
                       output_dtypes=["bool"])
    cast = net.add_layer("Cast", [eq.outputs[0]], {"to": "float32"})
    t = net.add_layer("MatMul", [cast.outputs[0], net.add_constant(W)], {}).outputs[0]
    for _ in range(40):
        t = net.add_layer("ElementWise", [t, t], {"op": "sum"}).outputs[0]
    net.mark_output(t, "out")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu"))
    assert _kinds(engine).count("Gather") == 1 and "Pointwise" not in _kinds(engine)
    assert [layer["attrs"]["op"] for layer in engine.layers if layer["kind"] == "ElementWise"] == ["max", "min"]
    idx = np.asarray([[0], [3], [K - 1], [1], [K], [-1], [-K], [2 ** 40]], np.int64)
    got = np.asarray(engine.context().run({"idx": idx})["out"])
    want = np.zeros((K + 1, N), np.float32)
    want[:4] = W[[0, 3, K - 1, 1]] * np.float32(2.0 ** 40)
    np.testing.assert_array_equal(got, want)
