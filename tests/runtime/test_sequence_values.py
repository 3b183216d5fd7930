"""Sequence and optional values through the ExecutionContext: lists in, lists out, None for an empty optional.

References are computed with numpy; ONNX Runtime cross-checks the sequence model.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln


def _seq_model() -> onnx.ModelProto:
    """seq (list of [2, k] float) + x → insert x at the front → concat along axis 1, and the length."""
    seq_t = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, None]))
    nodes = [helper.make_node("SequenceInsert", ["seq", "x", "pos"], ["seq2"]),
             helper.make_node("ConcatFromSequence", ["seq2"], ["y"], axis=1),
             helper.make_node("SequenceLength", ["seq2"], ["n"])]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_value_info("seq", seq_t),
                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        initializer=[helper.make_tensor("pos", TensorProto.INT64, [], [0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_sequence_input_numpy_and_torch():
    model = _seq_model()
    ctx = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu")).context()
    seq = [np.random.rand(2, 1).astype(np.float32), np.random.rand(2, 4).astype(np.float32)]
    x = np.random.rand(2, 3).astype(np.float32)
    out = ctx.run({"seq": seq, "x": x})
    np.testing.assert_allclose(out["y"], np.concatenate([x] + seq, axis=1))
    assert int(out["n"]) == 3
    import onnxruntime as ort
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"seq": seq, "x": x})
    np.testing.assert_allclose(out["y"], ref[0])
    got = ctx.run({"seq": [torch.from_numpy(s) for s in seq], "x": torch.from_numpy(x)})
    assert isinstance(got["y"], torch.Tensor)


def test_sequence_output_is_a_list():
    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["parts"], axis=0, keepdims=0)], "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_value_info("parts", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, None)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ctx = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu")).context()
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    parts = ctx.run({"x": x})["parts"]
    assert isinstance(parts, list) and len(parts) == 3
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p, x[i])


def test_empty_optional_input_is_none():
    opt_t = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    graph = helper.make_graph(
        [helper.make_node("OptionalHasElement", ["o"], ["has"])], "opt", [helper.make_value_info("o", opt_t)],
        [helper.make_tensor_value_info("has", TensorProto.BOOL, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ctx = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu")).context()
    assert not bool(ctx.run({"o": None})["has"])
    assert bool(ctx.run({"o": np.zeros(2, np.float32)})["has"])


def test_sequence_input_refuses_a_non_list():
    ctx = kiln.build(kiln.onnx.parse(_seq_model()), kiln.BuildConfig(device="cpu")).context()
    with pytest.raises(kiln.KilnError, match="list of arrays"):
        ctx.run({"seq": np.zeros((2, 2), np.float32), "x": np.zeros((2, 3), np.float32)})
