"""On the CPU, a convolution is timed on the memory the engine hands it at run time in YOLOv8's C2f and FPN
patterns too: a channel Split of an NHWC map gives channel slices of that map's memory, a Concatenation of such
slices and NHWC maps is NHWC, and so is YOLO's Resize (integer nearest, asymmetric, floor) of an NHWC map; a
half-pixel Resize is not, and nor is a Concatenation with it. The builder's timing input
(``as_at_runtime``) is compared stride for stride with what each convolution step really receives, in an engine
whose convolutions all run ``onednn_cached`` (NHWC out whatever they are given; the rule's premise for a
convolution's output). Skipped where no oneDNN library is installed."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.builder.build import prepare
from kiln.builder.tactics import _layout_key, as_at_runtime
from kiln.kernels import cpu_dnnl
from kiln.kernels.registry import TACTICS, get_tactic

pytestmark = pytest.mark.skipif(cpu_dnnl.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")


def _c2f_model() -> bytes:
    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)
    inits = [w("w1", (8, 4, 1, 1)), w("wb", (4, 4, 3, 3)), w("w2", (8, 12, 1, 1)), w("w3", (8, 8, 3, 3)),
             w("w4", (6, 16, 1, 1)), numpy_helper.from_array(np.array([4, 4], np.int64), "halves"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Split", ["c1", "halves"], ["s1", "s2"], axis=1, name="split"),
             helper.make_node("Conv", ["s2", "wb"], ["b1"], pads=[1, 1, 1, 1], name="conv_slice"),
             helper.make_node("Concat", ["s1", "s2", "b1"], ["cat"], axis=1, name="cat"),
             helper.make_node("Conv", ["cat", "w2"], ["c2"], name="conv_cat"),
             helper.make_node("Resize", ["c2", "", "scales"], ["up"], mode="nearest", name="up", nearest_mode="floor",
                              coordinate_transformation_mode="asymmetric"),
             helper.make_node("Conv", ["up", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv_up"),
             helper.make_node("Resize", ["c1", "", "scales"], ["up1"], mode="nearest", name="up1"),    # half_pixel
             helper.make_node("Concat", ["c3", "up1"], ["cat2"], axis=1, name="cat2"),
             helper.make_node("Conv", ["cat2", "w4"], ["y"], name="conv_cat2")]
    g = helper.make_graph(nodes, "c2f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_convolutions_are_timed_on_the_memory_they_are_given_at_run_time(monkeypatch) -> None:
    data = _c2f_model()
    net = prepare(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu")).net
    get_tactic("Convolution", "torch")              # every kernel module loaded before the table is narrowed
    monkeypatch.setitem(TACTICS, "Convolution", [t for t in TACTICS["Convolution"] if t.name == "onednn_cached"])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert {layer["tactic"] for layer in engine.layers if layer["kind"] == "Convolution"} == {"onednn_cached"}
    ctx = engine.context()
    seen: dict[str, tuple] = {}
    for step in ctx.program.steps:
        if step.kind == "Convolution":
            def record(*xs, body=step.fn, name=step.name):
                seen[name] = (tuple(xs[0].shape), xs[0].stride())
                return body(*xs)
            step.fn = record
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    got = ctx.run({"x": x})["y"]
    timed = {}
    for layer in net.layers:
        if layer.kind == "Convolution":
            t = layer.inputs[0]
            a = as_at_runtime(t, torch.zeros(seen[layer.name][0]))
            timed[layer.name] = (tuple(a.shape), a.stride())
    assert timed == seen
    assert set(seen) == {"conv1", "conv_slice", "conv_cat", "conv_up", "conv_cat2"}
    layouts = {n: _layout_key(torch.empty_strided(shape, strides)) for n, (shape, strides) in seen.items()}
    assert layouts["conv_cat"] == layouts["conv_up"] == ":cl" and layouts["conv_cat2"] == ""
    assert layouts["conv_slice"] == ":s(288, 1, 48, 8)"         # the second half of conv1's NHWC output
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 + 1e-4 * float(np.abs(ref).max()))
