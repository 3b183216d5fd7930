"""Dims and shapes as exporters write them (issue 16, "what to build" 1), checked against ONNX Runtime.

- Unknown input dims written as -1, 0, an empty name, nothing at all, or a symbol are dynamic; the
  build's profile fixes them, and no hint ever suggests a negative dim.
- auto_pad SAME_UPPER/SAME_LOWER on Conv, MaxPool, AveragePool and ConvTranspose works on dynamic
  spatial dims once the profile fixes them (and on chains of such layers, which have no shapes at
  parse time); a range profile works where the padding does not depend on the size (stride 1), and
  is refused in one line naming the layer and the dims to fix where it does. ``kiln.onnx.check`` with
  the same shapes reports the same refusal.
- Shapes that only data determine (Shape→Gather→Concat→Reshape, Reshape with 0/-1, Expand to a
  computed shape, Range from a computed size, Tile from computed repeats, ConstantOfShape, Slice to
  a computed end, Resize to a computed size) build under a range profile and match at several sizes.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from _models import assert_close_fp32, ort_run
from kiln.errors import BuildError

RNG = np.random.default_rng(16)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _ints(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v, np.int64), name)


def _floats(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v, np.float32), name)


def _cpu(profiles=None, **kw) -> kiln.BuildConfig:
    return kiln.BuildConfig(device="cpu", profiles=profiles, **kw)


def _compare(tmp_path, model: onnx.ModelProto, profiles, shapes, name: str = "m") -> None:
    """Build once under ``profiles`` and match ONNX Runtime at every input shape in ``shapes``."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    ctx = kiln.build(kiln.onnx.parse(path), _cpu(profiles)).context()
    for shape in shapes:
        x = RNG.standard_normal(shape).astype(np.float32)
        got, ref = ctx.run({"x": x}), ort_run(path, {"x": x})
        for out, want in ref.items():
            assert_close_fp32(got[out], want, f"{out} at {shape}")


# ---- unknown dims --------------------------------------------------------------------------------------

def _relu_with_dim(form: str) -> onnx.ModelProto:
    x = _vi("x", [1, 3])
    dim = x.type.tensor_type.shape.dim[0]
    dim.Clear()
    if form == "-1":
        dim.dim_value = -1
    elif form == "0":
        dim.dim_value = 0
    elif form == "empty name":
        dim.dim_param = ""
    elif form == "symbol":
        dim.dim_param = "batch"
    return _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_vi("y", None)])


@pytest.mark.parametrize("form", ["-1", "0", "empty name", "missing", "symbol"])
def test_unknown_input_dims_are_dynamic(form) -> None:
    net = kiln.onnx.parse(_relu_with_dim(form))
    dim0, dim1 = net.inputs[0].shape
    assert isinstance(dim0, str) and dim1 == 3, net.inputs[0].shape
    with pytest.raises(BuildError) as info:
        kiln.build(net, _cpu())
    msg = str(info.value)
    assert "--shapes x:1x3" in msg and "-1" not in msg and "\n" not in msg, msg
    ctx = kiln.build(net, _cpu({"x": ((1, 3), (2, 3), (4, 3))})).context()
    for n in (1, 4):
        x = RNG.standard_normal((n, 3)).astype(np.float32)
        np.testing.assert_array_equal(ctx.run({"x": x})["y"], np.maximum(x, 0))


def test_profile_fixes_a_minus_one_dim_the_model_writes() -> None:
    net = kiln.onnx.parse(_relu_with_dim("-1"))
    x = RNG.standard_normal((1, 3)).astype(np.float32)
    np.testing.assert_array_equal(kiln.build(net, _cpu({"x": (1, 3)})).context().run({"x": x})["y"], np.maximum(x, 0))


def test_hand_built_minus_one_dim_is_dynamic_and_the_hint_positive() -> None:
    net = kiln.Network("api")
    x = net.add_input("x", "float32", (-1, 3, None))
    net.mark_output(net.add_activation(x, "relu").output)
    assert isinstance(x.shape[0], str) and x.shape[1] == 3 and isinstance(x.shape[2], str)
    with pytest.raises(BuildError) as info:
        kiln.build(net, _cpu())
    assert "--shapes x:1x3x1" in str(info.value) and "-1" not in str(info.value)


# ---- auto_pad SAME --------------------------------------------------------------------------------------

def _same_net(shape, mode: str, conv_stride: int = 2, pool_stride: int = 2) -> onnx.ModelProto:
    """Conv (SAME) → Conv (SAME, stride; ONNX Runtime refuses dilation with SAME) → MaxPool (SAME) → AveragePool (SAME, padding not
    counted) → AveragePool (SAME, padding counted): only the first layer's input has a shape at parse time."""
    w1 = _floats("W1", RNG.standard_normal((4, 2, 3, 3)) * 0.3)
    w2 = _floats("W2", RNG.standard_normal((4, 4, 2, 3)) * 0.3)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", auto_pad=mode),
             helper.make_node("Conv", ["a", "W2"], ["b"], name="conv2", auto_pad=mode, strides=[conv_stride] * 2),
             helper.make_node("MaxPool", ["b"], ["c"], name="maxpool", auto_pad=mode, kernel_shape=[3, 2],
                              strides=[pool_stride] * 2),
             helper.make_node("AveragePool", ["c"], ["d"], name="avgpool", auto_pad=mode, kernel_shape=[2, 3],
                              strides=[pool_stride, 1]),
             helper.make_node("AveragePool", ["d"], ["y"], name="avgpool_incl", auto_pad=mode, kernel_shape=[3, 3],
                              count_include_pad=1)]
    return _model(nodes, [_vi("x", shape)], [_vi("y", None)], [w1, w2])


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_on_a_static_chain(tmp_path, mode) -> None:
    _compare(tmp_path, _same_net([1, 2, 11, 10], mode), None, [(1, 2, 11, 10)])


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("dims", [[-1, 2, -1, -1], ["N", 2, "H", "W"]])
def test_same_padding_with_dynamic_dims_under_a_static_profile(tmp_path, mode, dims) -> None:
    model = _same_net(dims, mode)
    for shape in [(1, 2, 11, 10), (2, 2, 8, 13)]:          # odd and even sizes: the padding differs
        _compare(tmp_path, model, {"x": shape}, [shape])


def test_same_padding_at_stride_one_under_a_range_profile(tmp_path) -> None:
    model = _same_net(["N", 2, "H", "W"], "SAME_UPPER", conv_stride=1, pool_stride=1)
    profile = {"x": ((1, 2, 4, 4), (1, 2, 9, 9), (2, 2, 16, 16))}
    _compare(tmp_path, model, profile, [(1, 2, 4, 4), (2, 2, 9, 12), (1, 2, 16, 7)])


def test_same_padding_that_depends_on_a_ranged_dim_is_refused_naming_it() -> None:
    net = kiln.onnx.parse(_same_net(["N", 2, "H", "W"], "SAME_UPPER"))
    with pytest.raises(BuildError) as info:
        kiln.build(net, _cpu({"x": ((1, 2, 8, 8), (1, 2, 9, 9), (1, 2, 16, 16))}))
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("'conv2'", "SAME_UPPER", "stride [2, 2]", "'x' dims 2, 3", "min = max"):
        assert part in msg, f"{part!r} missing from: {msg}"
    # a range over the batch only leaves the spatial dims fixed: that builds
    ok = kiln.build(net, _cpu({"x": ((1, 2, 9, 9), (2, 2, 9, 9), (3, 2, 9, 9))}))
    assert ok.context().run({"x": np.zeros((3, 2, 9, 9), np.float32)})["y"].shape[0] == 3


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (4, 2), (2, 1), (1, 2), (2, 3)])
def test_conv_transpose_same_with_dynamic_dims(tmp_path, mode, kernel, stride) -> None:
    w = _floats("W", RNG.standard_normal((2, 3, kernel, kernel)))
    model = _model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], auto_pad=mode, strides=[stride] * 2)],
                   [_vi("x", [1, 2, -1, -1])], [_vi("y", None)], [w])
    for shape in [(1, 2, 5, 6), (1, 2, 4, 3)]:
        _compare(tmp_path, model, {"x": shape}, [shape])


def test_hand_built_same_padding() -> None:
    net = kiln.Network("api")
    x = net.add_input("x", "float32", (1, 1, "H", "W"))
    w = np.ones((1, 1, 3, 3), np.float32)
    conv = net.add_convolution(x, w, stride=(2, 2), auto_pad="SAME_UPPER")
    pool = net.add_pooling(conv.output, "max", (2, 2), stride=(2, 2), auto_pad="SAME_LOWER")
    net.mark_output(pool.output)
    xv = np.arange(35, dtype=np.float32).reshape(1, 1, 5, 7)
    y = kiln.build(net, _cpu({"x": xv.shape})).context().run({"x": xv})[pool.output.name]
    # SAME_UPPER 3x3 stride 2 on 5x7: outputs 3x4, padding (3-1)*2+3-5 = 2 and 3*2+3-7 = 2, one on each side
    padded = np.pad(xv[0, 0], ((1, 1), (1, 1)))
    conv_ref = np.array([[padded[i:i + 3, j:j + 3].sum() for j in range(0, 7, 2)] for i in range(0, 5, 2)])
    assert conv_ref.shape == (3, 4)
    # SAME_LOWER 2x2 stride 2 on 3x4: padding 1 row (at the start: LOWER) and 0 columns
    lower = np.pad(conv_ref, ((1, 0), (0, 0)), constant_values=-np.inf)
    pool_ref = np.array([[lower[i:i + 2, j:j + 2].max() for j in range(0, 4, 2)] for i in range(0, 4, 2)])
    np.testing.assert_array_equal(y[0, 0], pool_ref)


# ---- kiln check runs the build's shape checks ---------------------------------------------------------------

def test_check_reports_what_a_build_at_these_shapes_would_refuse() -> None:
    model = _same_net([1, 2, -1, -1], "SAME_UPPER")
    assert kiln.onnx.check(model) == []                                   # every op maps; shapes unknown
    assert kiln.onnx.check(model, shapes={"x": (1, 2, 11, 10)}) == []      # builds at these shapes
    found = kiln.onnx.check(model, shapes={"x": ((1, 2, 8, 8), (1, 2, 9, 9), (1, 2, 16, 16))})
    assert len(found) == 1, found
    f = found[0]
    assert (f["name"], f["op_type"], f["stage"]) == ("conv2", "Conv", "build"), f
    assert "'x' dims 2, 3" in f["reason"]


def test_check_of_a_static_model_runs_the_build_checks() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Tile", ["r", "reps"], ["y"], name="tile")],
                   [_vi("x", [1, 4])], [_vi("y", None)], [_ints("reps", [1 << 20, 1 << 20])])
    found = kiln.onnx.check(model)
    assert [(f["name"], f["op_type"]) for f in found] == [("tile", "Tile")], found
    assert "TB" in found[0]["reason"]


# ---- shapes that only data determine ------------------------------------------------------------------------

def _computed_shapes_model(dims) -> onnx.ModelProto:
    """The shape arithmetic exporters write, on x [N, 3, H, W]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["shp", "i2"], ["h"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "m1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),                 # Shape→Gather→Concat→Reshape
        helper.make_node("Reshape", ["x", "zero_m1"], ["flat0"]),                   # Reshape with 0 / -1
        helper.make_node("Sub", ["flat", "flat0"], ["zero"]),
        helper.make_node("Expand", ["bias", "shp"], ["bias_full"]),                 # Expand to a computed shape
        helper.make_node("Add", ["x", "bias_full"], ["xb"]),
        helper.make_node("Range", ["s0", "h", "s1"], ["pos"]),                      # Range from a computed size
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["posf", "ax1"], ["posc"]),
        helper.make_node("Add", ["xb", "posc"], ["xp"]),
        helper.make_node("ReduceMean", ["xp"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Slice", ["pooled", "s0v", "s1v", "ax0"], ["first"]),
        helper.make_node("Concat", ["n1", "one"], ["reps"], axis=0),
        helper.make_node("Tile", ["first", "reps"], ["tiled"]),                     # Tile from computed repeats
        helper.make_node("Slice", ["shp", "s0v", "two"], ["nc"]),
        helper.make_node("ConstantOfShape", ["nc"], ["ones"], value=_floats("v", [2.0])),
        helper.make_node("Mul", ["tiled", "ones"], ["t2"]),
        helper.make_node("Add", ["t2", "pooled"], ["y"]),
    ]
    inits = [_ints("i0", 0), _ints("i2", 2), _ints("ax0", [0]), _ints("ax1", [1]), _ints("m1", [-1]),
             _ints("zero_m1", [0, -1]), _floats("bias", np.arange(3).reshape(1, 3, 1, 1)), _ints("s0", 0),
             _ints("s1", 1), _ints("one", [1]), _ints("s0v", [0]), _ints("s1v", [1]), _ints("two", [2])]
    return _model(nodes, [_vi("x", dims)], [_vi("y", None), _vi("flat", None), _vi("zero", None)], inits)


@pytest.mark.parametrize("dims", [[-1, 3, -1, -1], ["N", 3, "H", "W"]])
def test_computed_shapes_build_under_a_range_profile(tmp_path, dims) -> None:
    profile = {"x": ((1, 3, 2, 2), (2, 3, 5, 4), (4, 3, 8, 8))}
    _compare(tmp_path, _computed_shapes_model(dims), profile, [(1, 3, 2, 2), (2, 3, 5, 4), (4, 3, 8, 7)])


def _attention_model() -> onnx.ModelProto:
    """Heads split and merged with dims computed from Shape (Div, Concat), then a Slice whose end is
    computed: x [N, S, 8] with two heads."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "i0"], ["n"]), helper.make_node("Gather", ["shp", "i1"], ["s"]),
        helper.make_node("Gather", ["shp", "i2"], ["c"]), helper.make_node("Div", ["c", "heads"], ["hd"]),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]), helper.make_node("Unsqueeze", ["s", "ax0"], ["s1"]),
        helper.make_node("Unsqueeze", ["hd", "ax0"], ["hd1"]),
        helper.make_node("Concat", ["n1", "s1", "heads1", "hd1"], ["split_shape"], axis=0),
        helper.make_node("MatMul", ["x", "Wq"], ["q"]),
        helper.make_node("Reshape", ["q", "split_shape"], ["qh"]),
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["qt"], ["qtT"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qt", "qtT"], ["att"]),
        helper.make_node("Softmax", ["att"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "qt"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["n1", "s1", "m1"], ["merge_shape"], axis=0),
        helper.make_node("Reshape", ["ot", "merge_shape"], ["merged"]),
        helper.make_node("Sub", ["s", "one_s"], ["sm1"]), helper.make_node("Unsqueeze", ["sm1", "ax0"], ["sm1u"]),
        helper.make_node("Slice", ["merged", "z1", "sm1u", "one1"], ["y"]),
    ]
    inits = [_ints("i0", 0), _ints("i1", 1), _ints("i2", 2), _ints("heads", 2), _ints("heads1", [2]),
             _ints("ax0", [0]), _ints("m1", [-1]), _ints("one_s", 1), _ints("z1", [0]), _ints("one1", [1]),
             _floats("Wq", RNG.standard_normal((8, 8)) * 0.3)]
    return _model(nodes, [_vi("x", [-1, -1, 8])], [_vi("y", None)], inits)


def test_heads_split_with_computed_dims_under_a_range_profile(tmp_path) -> None:
    profile = {"x": ((1, 2, 8), (2, 5, 8), (3, 9, 8))}
    _compare(tmp_path, _attention_model(), profile, [(1, 2, 8), (2, 5, 8), (3, 9, 8), (3, 4, 8)])


def test_resize_to_a_computed_size_under_a_range_profile(tmp_path) -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Slice", ["shp", "two", "four"], ["hw"]),
             helper.make_node("Shape", ["d"], ["dshp"]), helper.make_node("Slice", ["dshp", "zero", "two"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["d", "", "", "sizes"], ["u"], mode="nearest"),
             helper.make_node("Concat", ["x", "u"], ["y"], axis=1)]
    model = _model(nodes, [_vi("x", ["N", 2, -1, -1])], [_vi("y", None)],
                   [_ints("two", [2]), _ints("four", [4]), _ints("zero", [0])])
    profile = {"x": ((1, 2, 4, 4), (1, 2, 8, 8), (2, 2, 16, 16))}
    _compare(tmp_path, model, profile, [(1, 2, 4, 4), (2, 2, 8, 12), (2, 2, 9, 7)])
