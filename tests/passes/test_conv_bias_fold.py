"""A constant per-channel sum after a convolution (passes/fuse_epilogue.py, "conv(x) + b -> conv with bias b"):
which graphs fold it into the convolution's bias, through which views, and the CPU engine computes what ONNX Runtime
computes on the original model either way."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.builder.build import prepare
from kiln.builder.shapes import infer_shapes
from kiln.passes import PassManager, default_passes, fusion_passes
from _models import corpus_model

C, CIN, L = 6, 4, 19
RNG = np.random.default_rng(7)
W = RNG.standard_normal((C, CIN, 5, 1)).astype(np.float32)
B0 = RNG.standard_normal(C).astype(np.float32)


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _gelu_tanh(x: str, out: str) -> list:
    """jax2tf's tanh-GELU: x · (½ · (1 + tanh(√(2/π) · (x + 0.044715 · x³))))."""
    c = {"k3": 0.044715, "s": float(np.sqrt(2 / np.pi)), "one": 1.0, "half": 0.5}
    consts = [helper.make_node("Constant", [], [f"{x}_{k}"], value=numpy_helper.from_array(np.float32(v)))
              for k, v in c.items()]
    steps = [("Mul", [x, x], "sq"), ("Mul", ["sq", x], "cube"), ("Mul", ["k3", "cube"], "kc"),
             ("Add", [x, "kc"], "in"), ("Mul", ["s", "in"], "sin"), ("Tanh", ["sin"], "t"), ("Add", ["one", "t"], "1t"),
             ("Mul", ["half", "1t"], "h")]
    local = lambda n: n if n == x else f"{x}_{n}"      # noqa: E731
    return consts + [helper.make_node(op, [local(i) for i in ins], [local(o)]) for op, ins, o in steps] + [
        helper.make_node("Mul", [x, f"{x}_h"], [out])]


def _model(bias: np.ndarray, conv_bias: bool = False, slice_axes=(0, 1, 2, 3), slice_ends=None, steps=None,
           squeeze: bool = True, relu: bool = False, tap: bool = False, gelu: bool = True,
           bias_first: bool = False) -> bytes:
    """x [1, CIN, L, 1] → Conv (5×1) → [Relu] → Slice → [Squeeze axis 3] → + bias → [tanh-GELU] → y (and the
    convolution's output as a second output with ``tap``)."""
    big = np.iinfo(np.int64).max
    ends = slice_ends if slice_ends is not None else [big] * len(slice_axes)
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(bias, "b"), _i64("sq_axes", [3]),
             _i64("starts", [0] * len(slice_axes)), _i64("ends", ends), _i64("axes", list(slice_axes))]
    conv_in = ["x", "w"]
    if conv_bias:
        inits.append(numpy_helper.from_array(B0, "b0"))
        conv_in.append("b0")
    slice_in = ["conv_act" if relu else "conv", "starts", "ends", "axes"]
    if steps is not None:
        inits.append(_i64("steps", steps))
        slice_in.append("steps")
    nodes = [helper.make_node("Conv", conv_in, ["conv"], kernel_shape=[5, 1], name="conv")]
    if relu:
        nodes.append(helper.make_node("Relu", ["conv"], ["conv_act"]))
    nodes.append(helper.make_node("Slice", slice_in, ["sliced"], name="slice"))
    if squeeze:
        nodes.append(helper.make_node("Squeeze", ["sliced", "sq_axes"], ["sq"], name="squeeze"))
    add_in = ["sq" if squeeze else "sliced", "b"]
    nodes.append(helper.make_node("Add", add_in[::-1] if bias_first else add_in, ["biased"], name="bias_add"))
    nodes += _gelu_tanh("biased", "y") if gelu else [helper.make_node("Identity", ["biased"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if tap:
        outs.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "conv_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, CIN, L, 1])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _optimized(data: bytes):
    net = kiln.onnx.parse(data)
    infer_shapes(net)
    PassManager(default_passes())(net)
    infer_shapes(net)
    PassManager(fusion_passes())(net)
    return net


def _bias_add_left(net) -> bool:
    return any("bias_add" in layer.origin and layer.kind not in ("Convolution", "FullyConnected")
               for layer in net.layers)


def _check_engine(data: bytes, folded: bool) -> None:
    """The CPU engine against ONNX Runtime (max abs error ≤ 1e-5 + 1e-4·max|ref|); the Add in a layer of its own
    (ElementWise or Pointwise) exactly when it was not folded."""
    x = RNG.standard_normal((1, CIN, L, 1)).astype(np.float32)
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    got = engine.context().run({"x": x})
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for name, r in zip([o.name for o in ref.get_outputs()], ref.run(None, {"x": x})):
        err = np.abs(np.asarray(got[name], np.float64) - r).max()
        assert err <= 1e-5 + 1e-4 * np.abs(r).max(), (name, err)
    outside = [la for la in engine.layers if "bias_add" in (la.get("origin") or ()) and la["kind"] != "Convolution"]
    assert bool(outside) != folded, [la["kind"] for la in outside]


@pytest.mark.parametrize("bias_shape, conv_bias", [((1, C, 1), False), ((C, 1), True), ((1,), False), ((), True)],
                         ids=["per_channel", "plus_conv_bias", "scalar_1d", "scalar"])
def test_bias_through_views_folds_into_conv(bias_shape, conv_bias):
    b = RNG.standard_normal(bias_shape).astype(np.float32)
    data = _model(b, conv_bias=conv_bias)
    net = _optimized(data)
    assert not _bias_add_left(net)
    (conv,) = [layer for layer in net.layers if layer.kind == "Convolution"]
    want = np.broadcast_to(b.reshape(-1), (C,)) + (B0 if conv_bias else 0)
    np.testing.assert_array_equal(conv.inputs[2].value, want.astype(np.float32))
    names = {t.name for layer in net.layers for t in layer.outputs}
    assert not names & {"conv", "sliced", "sq"}         # they hold conv + b now: not ONNX's values under ONNX's names
    assert "biased" in names or "y" in names
    _check_engine(data, folded=True)


def test_bias_right_after_conv_folds():
    """b + conv(x) (the constant first), no GELU: the engine's output is the convolution's."""
    b = RNG.standard_normal((C, 1, 1)).astype(np.float32)
    data = _model(b, squeeze=False, gelu=False, slice_axes=(2,), bias_first=True)
    assert not _bias_add_left(_optimized(data))
    _check_engine(data, folded=True)


@pytest.mark.parametrize("kw, bias_shape", [
    ({}, (1, 1, L - 4)),                                            # varies along the length, not the channels
    ({}, (1, C, L - 4)),                                            # a full tensor
    ({"tap": True}, (1, C, 1)),                                     # the convolution's output has a second reader
    ({"relu": True}, (1, C, 1)),                                    # the sum comes after an activation
    ({"slice_axes": (1,), "slice_ends": [C - 1]}, (1, C - 1, 1)),    # the slice drops a channel
    ({"slice_axes": (1,), "slice_ends": [-C - 1], "steps": [-1]}, (1, C, 1)),   # the slice reverses the channels
    ({"slice_axes": (0, 1, 2, 3), "steps": [1, 2, 1, 1]}, (1, C // 2, 1)),      # every other channel
], ids=["along_length", "full_tensor", "second_reader", "after_relu", "drops_channel", "reversed", "strided"])
def test_left_alone(kw, bias_shape):
    b = RNG.standard_normal(bias_shape).astype(np.float32)
    data = _model(b, **kw)
    assert _bias_add_left(_optimized(data))
    _check_engine(data, folded=False)


def test_magika_conv_carries_its_bias():
    """magika (jax2tf: Conv → Slice → Squeeze → Add bias → tanh-GELU): the Add is folded into the convolution and
    the GELU reads the convolution's views directly (its match with ONNX Runtime: tests/corpus/test_corpus.py)."""
    _, model, path = corpus_model("magika")
    net = prepare(kiln.onnx.parse(str(path)), kiln.BuildConfig(device="cpu", profiles=model.shapes())).net
    add = "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Conv_0/AddV2"
    (conv,) = [layer for layer in net.layers if layer.kind == "Convolution"]
    assert add in conv.origin and conv.inputs[2].shape == (conv.inputs[1].shape[0],)
    assert not [layer.kind for layer in net.layers if add in layer.origin and layer is not conv]
    (gelu,) = [layer for layer in net.layers if "ApplyActivation_1/Mul_5" in " ".join(layer.origin)]
    assert (gelu.kind, gelu.attrs.get("type")) == ("Activation", "gelu_tanh")


@pytest.mark.parametrize("bias_shape, folds", [((1, 1, 3), True), ((1, 3), True), ((3,), True),
                                               ((1, 1, 1, 3), False), ((2, 1, 3), False)],
                         ids=["leading_ones", "one_leading_one", "vector", "adds_an_axis", "broadcasts_rows"])
def test_matmul_bias_with_leading_ones_becomes_fully_connected(bias_shape, folds):
    """x [2, 5, 4] @ W [4, 3] + b → FullyConnected carrying b (then the tanh-GELU as its epilogue) where b's other
    axes are 1 and it adds no axis; against ONNX Runtime either way."""
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    b = RNG.standard_normal(bias_shape).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["biased"],
                                                                             name="bias_add")]
    nodes += _gelu_tanh("biased", "y")
    graph = helper.make_graph(nodes, "mm_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    net = _optimized(data)
    fcs = [layer for layer in net.layers if layer.kind == "FullyConnected"]
    assert bool(fcs) == folds and _bias_add_left(net) != folds
    if folds:
        assert fcs[0].attrs.get("activation") == "gelu_tanh"
        np.testing.assert_array_equal(fcs[0].inputs[2].value, b.reshape(-1))
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    got = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu")).context().run({"x": x})["y"]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
