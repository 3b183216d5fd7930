"""CPU tactics are timed on the memory layout the engine hands them: a convolution reading another convolution's
output gets NHWC at run time (oneDNN and the GEMM tactic write it; torch's convolution keeps it), so its tactics are
timed on a channels-last input; a convolution reading the network's NCHW input is timed on NCHW."""
from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx


def test_a_convolution_after_a_convolution_is_timed_on_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w2")]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
                           helper.make_node("Relu", ["a"], ["r"], name="relu"),
                           helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="c2")], "cc",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    cache = tmp_path / "t.timing"
    engine = kiln.build(kiln.onnx.parse(m.SerializeToString()), kiln.BuildConfig(device="cpu",
                                                                                timing_cache=str(cache)))
    keys = list(json.loads(cache.read_text())["entries"])
    first = [k for k in keys if "(1, 3, 12, 12)" in k]
    second = [k for k in keys if "(1, 8, 12, 12)" in k and "Convolution" in k]
    assert len(first) == 1 and ":cl" not in first[0]          # the network input: NCHW
    assert len(second) == 1 and "(1, 8, 12, 12):torch.float32:cl" in second[0]
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        ref = F.conv2d(F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(numpy_helper.to_array(inits[0])),
                                       padding=1)), torch.from_numpy(numpy_helper.to_array(inits[1])), padding=1)
    np.testing.assert_allclose(engine.context().run({"x": x})["y"], ref.numpy(), rtol=1e-4, atol=1e-4)


def test_a_convolution_after_a_concatenation_of_convolutions_is_timed_on_channels_last(tmp_path):
    """torch.cat keeps its inputs' common NHWC layout: the convolution reading Concat(conv, conv) is timed on
    channels-last; one reading Concat(conv, the network input) on NCHW."""
    rng = np.random.default_rng(1)
    w = {n: (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in
         (("w1", (4, 3, 3, 3)), ("w2", (4, 3, 3, 3)), ("w3", (5, 8, 3, 3)), ("w4", (6, 7, 3, 3)))}
    conv = lambda i, wn, o: helper.make_node("Conv", [i, wn], [o], pads=[1, 1, 1, 1], name=o)  # noqa: E731
    g = helper.make_graph([conv("x", "w1", "a"), conv("x", "w2", "b"),
                           helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="cat1"),
                           conv("ab", "w3", "y"),
                           helper.make_node("Concat", ["a", "x"], ["ax"], axis=1, name="cat2"),
                           conv("ax", "w4", "z")], "cat",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 10, 10]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 10, 10])],
                          [numpy_helper.from_array(v, n) for n, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    cache = tmp_path / "t.timing"
    engine = kiln.build(kiln.onnx.parse(m.SerializeToString()), kiln.BuildConfig(device="cpu",
                                                                                timing_cache=str(cache)))
    keys = [k for k in json.loads(cache.read_text())["entries"] if "Convolution" in k]
    after_convs = [k for k in keys if "(1, 8, 10, 10)" in k]
    after_input = [k for k in keys if "(1, 7, 10, 10)" in k]
    assert len(after_convs) == 1 and "(1, 8, 10, 10):torch.float32:cl" in after_convs[0]
    assert len(after_input) == 1 and "(1, 7, 10, 10):torch.float32:cl" not in after_input[0]
    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    import onnxruntime as ort
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = engine.context().run({"x": x})
    for name, ref in zip(("y", "z"), want):
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4)
