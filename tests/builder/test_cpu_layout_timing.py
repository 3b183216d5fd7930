"""On the CPU, tactics are timed on the memory layout the engine will hand over at run time: the output of a
squeeze-excitation Mul (an NHWC map times a [N, C, 1, 1] gate) is NHWC, as torch's element-wise ops make it, so the
convolution after it is timed on NHWC input; a Mul of the network's own NCHW input stays NCHW."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.builder.build import prepare
from kiln.builder.tactics import _channels_last_at_runtime


def _se_model() -> bytes:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("GlobalAveragePool", ["c1"], ["pooled"]),
             helper.make_node("Sigmoid", ["pooled"], ["gate"]),
             helper.make_node("Mul", ["c1", "gate"], ["scaled"], name="se_mul"),
             helper.make_node("Conv", ["scaled", "w2"], ["y"], name="conv2"),
             helper.make_node("Mul", ["x", "x"], ["sq"], name="input_mul")]
    g = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("sq", TensorProto.FLOAT, None)], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_convolutions_are_timed_on_the_layout_they_are_given_at_run_time() -> None:
    """The timing rule against what the CPU engine really hands each convolution (its step's input, recorded)."""
    data = _se_model()
    net = prepare(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu")).net
    ctx = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu")).context()
    seen: dict[str, bool] = {}
    for step in ctx.program.steps:
        if step.kind == "Convolution":
            def record(*xs, body=step.fn, name=step.name):
                seen[name] = xs[0].is_contiguous(memory_format=torch.channels_last)
                return body(*xs)
            step.fn = record
    ctx.run({"x": np.zeros((2, 4, 9, 9), np.float32)})
    predicted = {layer.name: _channels_last_at_runtime(layer.inputs[0], torch.zeros(2, 8, 9, 9))
                 for layer in net.layers if layer.kind == "Convolution"}
    assert seen == predicted == {"conv1": False, "conv2": True}     # the SE product of an NHWC map is NHWC
    out = {t.name: t for layer in net.layers for t in layer.outputs}
    assert not _channels_last_at_runtime(out["sq"], torch.zeros(2, 4, 9, 9))     # the NCHW input squared


def test_se_engine_matches_onnxruntime() -> None:
    data = _se_model()
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 9)).astype(np.float32)
    got = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu")).context().run({"x": x})
    for name, ref in zip(["y", "sq"], ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})):
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5 + 1e-4 * float(np.abs(ref).max()))
