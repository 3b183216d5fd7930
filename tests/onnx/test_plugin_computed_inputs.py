"""ONNX nodes that Kiln runs as built-in plugins (GridSample, NonMaxSuppression, RoiAlign) reading tensors
another layer computes: their shapes are known only at build, so the parser must not ask the plugin for
output shapes then (it refused every such model with "got X ()"). Checked against ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

import kiln
import kiln.onnx


def _run_both(nodes, inputs, outputs, feeds, opset=16):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu"))
    got = engine.context().run(feeds)
    return [np.asarray(got[o.name]) for o in outputs], ref


def test_grid_sample_of_a_computed_tensor():
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 2, 5, 6)).astype(np.float32),
             "grid": rng.uniform(-1, 1, (1, 3, 4, 2)).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Tanh", ["grid"], ["g"]),
             helper.make_node("GridSample", ["r", "g"], ["y"], align_corners=1)]
    (got,), (ref,) = _run_both(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 2, 5, 6]),
                                       helper.make_tensor_value_info("grid", T.FLOAT, [1, 3, 4, 2])],
                               [helper.make_tensor_value_info("y", T.FLOAT, [1, 2, 3, 4])], feeds)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_nms_of_computed_boxes_keeps_int64_output():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 10, (1, 20, 2)).astype(np.float32)
    feeds = {"boxes": np.concatenate([xy, xy + rng.uniform(1, 4, (1, 20, 2)).astype(np.float32)], axis=2),
             "scores": rng.uniform(0, 1, (1, 1, 20)).astype(np.float32)}
    consts = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, dt, [1], [v]))
              for n, dt, v in (("k", T.INT64, 5), ("iou", T.FLOAT, 0.5), ("thr", T.FLOAT, 0.1))]
    nodes = consts + [helper.make_node("Identity", ["boxes"], ["b"]), helper.make_node("Sigmoid", ["scores"], ["s"]),
                      helper.make_node("NonMaxSuppression", ["b", "s", "k", "iou", "thr"], ["sel"])]
    (got,), (ref,) = _run_both(nodes, [helper.make_tensor_value_info("boxes", T.FLOAT, [1, 20, 4]),
                                       helper.make_tensor_value_info("scores", T.FLOAT, [1, 1, 20])],
                               [helper.make_tensor_value_info("sel", T.INT64, ["n", 3])], feeds)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
