"""tf2onnx names a node's output "NODE:0", the name the first intermediate layer of a node that Kiln lowers to
several layers used to get. The tensor carrying an ONNX name must be the node's result: per-layer compare
matches tensors by name and would otherwise measure the node's first step against its output."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.onnx


def _model(op: str) -> bytes:
    nodes = [helper.make_node("Relu", ["x"], ["r:0"], name="r"), helper.make_node(op, ["r:0"], ["n:0"], name="n"),
             helper.make_node("Neg", ["n:0"], ["y:0"], name="y")]
    graph = helper.make_graph(nodes, "tf2onnx_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y:0", TensorProto.FLOAT, [2, 3, 4, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("op", ["LpNormalization", "MeanVarianceNormalization"])
def test_onnx_name_belongs_to_the_nodes_result(op):
    model = _model(op)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    net = kiln.onnx.parse(model)
    steps = [layer for layer in net.layers if "n" in layer.origin]
    assert len(steps) > 1                                   # lowered to several layers
    assert net.tensors["n:0"].producer is steps[-1]          # the name is on the node's result
    # the value under that name is ONNX Runtime's value of n:0
    m = onnx.load_from_string(model)
    m.graph.output.append(helper.make_tensor_value_info("n:0", TensorProto.FLOAT, [2, 3, 4, 5]))
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["n:0"], {"x": x})[0]
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu"))
    result = kiln.compare(onnx.load_from_string(model), engine=engine, inputs={"x": x}, per_layer=True)
    assert result.passed and result.first_jump is None and result.first_bad is None
    rec = next((r for r in result.layers if r.tensor == "n:0"), None)
    if op == "MeanVarianceNormalization" and rec is None:
        return                     # fused into one normalization layer by the build: nothing to compare under n:0
    assert rec is not None and rec.node == "n" and rec.stats.max_abs <= 1e-5 + 1e-4 * float(np.abs(ref).max())
