"""A CPU program keeps Shape and Size steps' outputs per input shape (they depend on nothing else) where only steps
that make fresh tensors read them and none is returned (a caller may write into what the engine returns).
Results against ONNX Runtime over shapes."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.runtime.shape_cache import ShapeCache

ort = pytest.importorskip("onnxruntime")


def _model(return_shape: bool):
    """y = x reshaped to [Size(x) / Shape(x)[-1], Shape(x)[-1]] + 1, and Shape(x) itself as an output if asked."""
    i64 = TensorProto.INT64
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Gather", ["s", "last"], ["w"], axis=0),
             helper.make_node("Div", ["n", "w"], ["h"]),
             helper.make_node("Unsqueeze", ["h", "zero"], ["h1"]), helper.make_node("Unsqueeze", ["w", "zero"], ["w1"]),
             helper.make_node("Concat", ["h1", "w1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]), helper.make_node("Add", ["r", "one"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if return_shape:
        outs.append(helper.make_tensor_value_info("s", i64, [3]))
    inits = [helper.make_tensor("last", i64, [], [-1]), helper.make_tensor("zero", i64, [1], [0]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b", "c"])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _engine(data: bytes):
    return kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", optimization_level=0,
                                                              profiles={"x": [(1, 1, 1), (2, 3, 4), (4, 5, 6)]}))


def test_shape_and_size_steps_are_kept_per_input_shape():
    data = _model(return_shape=False)
    engine = _engine(data)
    ctx = engine.context(threads=1)
    caches = [s.fn for s in ctx.program.steps if s.kind in ("Shape", "Size")]
    assert len(caches) == 2 and all(isinstance(c, ShapeCache) for c in caches)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = [(2, 3, 4), (2, 3, 4), (1, 5, 6), (2, 3, 4), (4, 1, 2)]
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        got, ref = ctx.run({"x": x})["y"], sess.run(None, {"x": x})[0]
        assert got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
    assert [c.computed for c in caches] == [len(set(shapes))] * 2        # once per distinct shape


def test_a_returned_shape_is_computed_each_run_and_the_caller_may_write_into_it():
    data = _model(return_shape=True)
    engine = _engine(data)
    ctx = engine.context(threads=1)
    kinds = {s.kind: s.fn for s in ctx.program.steps}
    assert not isinstance(kinds["Shape"], ShapeCache) and isinstance(kinds["Size"], ShapeCache)
    x = np.ones((2, 3, 4), np.float32)
    first = ctx.run({"x": x})
    np.testing.assert_array_equal(first["s"], [2, 3, 4])
    first["s"][:] = 7
    second = ctx.run({"x": x})
    np.testing.assert_array_equal(second["s"], [2, 3, 4])
    np.testing.assert_array_equal(second["y"], np.full((6, 4), 2.0, np.float32))


def test_a_shape_read_through_a_view_is_computed_each_run():
    """head = Shape(x)[0:2] (a Slice, a view of the shape tensor) is returned: writing into it must not change the
    next run, so this Shape is not kept."""
    i64 = TensorProto.INT64
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "b", "e"], ["head"])]
    inits = [helper.make_tensor("b", i64, [1], [0]), helper.make_tensor("e", i64, [1], [2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b", "c"])],
                              [helper.make_tensor_value_info("head", i64, [2])], inits)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    ctx = _engine(data).context(threads=1)
    assert [isinstance(s.fn, ShapeCache) for s in ctx.program.steps if s.kind == "Shape"] == [False]
    x = np.ones((2, 3, 4), np.float32)
    first = ctx.run({"x": x})["head"]
    np.testing.assert_array_equal(first, [2, 3])
    first[:] = 9
    np.testing.assert_array_equal(ctx.run({"x": x})["head"], [2, 3])
