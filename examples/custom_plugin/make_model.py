"""Write model.onnx: Conv → SwishBeta (a custom-domain node) → GlobalAveragePool."""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make(path: str = "model.onnx") -> str:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("SwishBeta", ["c"], ["s"], name="swish", domain="com.example",
                         beta=1.7, plugin_namespace="example", plugin_version="1"),
        helper.make_node("GlobalAveragePool", ["s"], ["y"], name="pool"),
    ]
    graph = helper.make_graph(nodes, "swish_example",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 1, 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, path)
    return path


if __name__ == "__main__":
    print(make(sys.argv[1] if len(sys.argv) > 1 else "model.onnx"))
