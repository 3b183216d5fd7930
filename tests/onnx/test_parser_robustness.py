"""Bad model files and impossible sizes are refused in one line naming the culprit (issue 15).

Each case here was a traceback, a silent misreading or an attempt to allocate terabytes before:
invalid UTF-8 in names, damaged initializers and sparse initializers, graphs that break their
ops' schemas, profiles with negative dims, inputs and computed tensors larger than the machine.
A seeded mutation run checks that damaged files give nothing but one-line Kiln errors.
"""
from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import BuildError, KilnError, ParseError, UnsupportedOperatorError


def _model(nodes, inputs, outputs, inits=(), sparse=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), sparse_initializer=list(sparse))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _cpu(**kw) -> kiln.BuildConfig:
    return kiln.BuildConfig(device="cpu", **kw)


def _one_line(exc: BaseException, *parts: str) -> str:
    msg = str(exc)
    assert "\n" not in msg and "b'" not in msg and 'b"' not in msg, msg
    for p in parts:
        assert p in msg, f"{p!r} missing from: {msg}"
    return msg


def _with_bytes(model: onnx.ModelProto, marker: bytes, raw: bytes) -> bytes:
    """The serialized model with ``marker`` replaced by ``raw`` (same length: the protobuf stays valid)."""
    assert len(marker) == len(raw)
    data = model.SerializeToString()
    assert data.count(marker) >= 1
    return data.replace(marker, raw)


# ---- invalid UTF-8 in names ----------------------------------------------------------------------

def test_invalid_utf8_op_type_is_readable_in_the_error() -> None:
    m = _model([helper.make_node("QQQQ", ["x"], ["y"], name="node_one", domain="my.ops")],
               [_vi("x", [2])], [_vi("y", [2])])
    m.opset_import.append(helper.make_opsetid("my.ops", 1))
    data = _with_bytes(m, b"QQQQ", b"\xff\xfeQQ")
    with pytest.raises(UnsupportedOperatorError) as info:
        kiln.onnx.parse(data)
    _one_line(info.value, "'node_one'", "\\xff\\xfeQQ")


def test_invalid_utf8_node_name_becomes_text() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["h"], name="ZZZZ"), helper.make_node("Neg", ["h"], ["y"])],
               [_vi("x", [3])], [_vi("y", [3])])
    net = kiln.onnx.parse(_with_bytes(m, b"ZZZZ", b"Z\xc3\x28Z"))
    names = [layer.name for layer in net.layers]
    assert all(isinstance(n, str) for n in names), names
    assert "Z\\xc3(Z" in names
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    y = kiln.build(net, _cpu()).context().run({"x": x})["y"]
    np.testing.assert_array_equal(y, -np.maximum(x, 0))


def test_invalid_utf8_tensor_name_in_a_build_error_is_text() -> None:
    m = _model([helper.make_node("Relu", ["WWWW"], ["y"])], [_vi("WWWW", ["N", 3])], [_vi("y", ["N", 3])])
    net = kiln.onnx.parse(_with_bytes(m, b"WWWW", b"\x80WWW"))
    with pytest.raises(BuildError) as info:
        kiln.build(net, _cpu())
    _one_line(info.value, "\\x80WWW", "profile")


# ---- damaged initializers --------------------------------------------------------------------------

def test_initializer_with_negative_dim_is_refused() -> None:
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    c.dims[:] = [-4]                 # numpy would read -4 as "infer": four values
    m = _model([helper.make_node("Add", ["x", "c"], ["y"])], [_vi("x", [4])], [_vi("y", [4])], [c])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "Initializer 'c'", "[-4]")


def test_initializer_of_an_unsupported_type_is_refused() -> None:
    c = numpy_helper.from_array(np.zeros(2, np.float32), "c")
    c.data_type = 200
    m = _model([helper.make_node("Add", ["x", "c"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], [c])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "Initializer 'c'", "data type")


def _sparse(dims, values, indices):
    v = numpy_helper.from_array(np.asarray(values, np.float32), "s")
    i = numpy_helper.from_array(np.asarray(indices, np.int64), "s_idx")
    return helper.make_sparse_tensor(v, i, dims)


def _sparse_model(sp) -> onnx.ModelProto:
    return _model([helper.make_node("Add", ["x", "s"], ["y"])], [_vi("x", [4])], [_vi("y", [4])], sparse=[sp])


def test_sparse_initializer_is_densified() -> None:
    net = kiln.onnx.parse(_sparse_model(_sparse([4], [1.5, -2.0], [0, 3])))
    x = np.arange(4, dtype=np.float32)
    y = kiln.build(net, _cpu()).context().run({"x": x})["y"]
    np.testing.assert_array_equal(y, x + np.array([1.5, 0, 0, -2.0], np.float32))


def test_sparse_initializer_with_coordinates_is_densified() -> None:
    sp = _sparse([2, 2], [3.0, 4.0], [[0, 1], [1, 0]])
    m = _model([helper.make_node("Add", ["x", "s"], ["y"])], [_vi("x", [2, 2])], [_vi("y", [2, 2])], sparse=[sp])
    y = kiln.build(kiln.onnx.parse(m), _cpu()).context().run({"x": np.zeros((2, 2), np.float32)})["y"]
    np.testing.assert_array_equal(y, np.array([[0, 3], [4, 0]], np.float32))


@pytest.mark.parametrize("dims, values, indices, expect", [
    ([4], [1.0, 2.0], [0, 9], "outside"),                        # index past the end
    ([4], [1.0, 2.0], [-1, 0], "outside"),                       # negative index (numpy would wrap it)
    ([2, 2], [1.0], [[0, 5]], "outside"),                        # coordinate past its dim
    ([-5], [1.0], [0], "[-5]"),                                  # negative dim
    ([1 << 40, 1 << 20], [1.0], [0], "free"),                    # exabytes when dense
    ([4], [1.0, 2.0], [[0], [1], [2]], "indices of shape"),      # indices do not match the values
])
def test_bad_sparse_initializer_is_refused(dims, values, indices, expect) -> None:
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(_sparse_model(_sparse(dims, values, indices)))
    _one_line(info.value, "Sparse initializer 's'", expect)


def test_node_attribute_tensor_with_negative_dim_is_refused() -> None:
    t = numpy_helper.from_array(np.ones(3, np.float32), "v")
    t.dims[:] = [-3]
    m = _model([helper.make_node("Constant", [], ["c"], name="k", value=t), helper.make_node("Add", ["x", "c"], ["y"])],
               [_vi("x", [3])], [_vi("y", [3])])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "'k'", "'value'", "[-3]")


# ---- nodes that break their op's schema --------------------------------------------------------------

def test_empty_required_input_is_refused() -> None:
    m = _model([helper.make_node("Add", ["x", ""], ["y"], name="add0")], [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "'add0'", "required input 1")


def test_too_few_inputs_is_refused() -> None:
    m = _model([helper.make_node("Range", ["x"], ["y"], name="r")], [_vi("x", [])], [_vi("y", None)])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "'r'", "1 inputs", "takes 3")


def test_graph_attribute_of_the_wrong_type_is_refused() -> None:
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=3, else_branch=4)
    m = _model([node], [_vi("c", [], TensorProto.BOOL)], [_vi("y", None)])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "'branch'", "'else_branch'", "GRAPH")


def test_missing_required_attribute_is_refused() -> None:
    m = _model([helper.make_node("If", ["c"], ["y"], name="branch")], [_vi("c", [], TensorProto.BOOL)],
               [_vi("y", None)])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(m)
    _one_line(info.value, "'branch'", "required attribute")


def _nested_ifs(depth: int) -> bytes:
    """A model whose If nests ``depth`` levels deep (built field by field: onnx.helper copies through
    protobuf's decoder, which has a depth limit)."""
    m = _model([], [_vi("c", [], TensorProto.BOOL), _vi("x", [1])], [_vi("y", [1])])
    g = m.graph
    for i in range(depth):
        node = g.node.add()
        node.op_type, node.name = "If", f"if{i}"
        node.input.append("c")
        node.output.append("y" if i == 0 else "o")
        then_a, else_a = node.attribute.add(), node.attribute.add()
        then_a.name, then_a.type = "then_branch", onnx.AttributeProto.GRAPH
        else_a.name, else_a.type = "else_branch", onnx.AttributeProto.GRAPH
        leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "leaf", [], [_vi("e", [1])])
        else_a.g.CopyFrom(leaf)
        g = then_a.g
        g.name = f"level{i}"
        g.output.append(_vi("o", [1]))
    g.node.append(helper.make_node("Neg", ["x"], ["o"]))
    return m.SerializeToString()


def test_absurdly_deep_subgraphs_are_refused() -> None:
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(_nested_ifs(80))          # past protobuf's depth limit
    _one_line(info.value)


def test_deep_subgraphs_below_the_limit_build() -> None:
    net = kiln.onnx.parse(_nested_ifs(12))
    ctx = kiln.build(net, _cpu()).context()
    x = np.array([2.0], np.float32)
    np.testing.assert_array_equal(ctx.run({"c": np.array(True), "x": x})["y"], -x)
    np.testing.assert_array_equal(ctx.run({"c": np.array(False), "x": x})["y"], x)


def test_truncated_file_is_refused(tmp_path) -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])],
               [numpy_helper.from_array(np.ones(64, np.float32), "unused")])
    path = tmp_path / "cut.onnx"
    path.write_bytes(m.SerializeToString()[:-40])
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(path)
    _one_line(info.value, "cut.onnx")


# ---- profiles and sizes ----------------------------------------------------------------------------

def _relu_net(shape) -> kiln.Network:
    return kiln.onnx.parse(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", shape)], [_vi("y", shape)]))


@pytest.mark.parametrize("profile", [{"x": (-2, 3)}, {"x": ((1, 3), (2, 3), (-1, 3))}])
def test_negative_profile_dim_is_refused(profile) -> None:
    with pytest.raises(BuildError) as info:
        kiln.build(_relu_net(["N", 3]), _cpu(profiles=profile))
    _one_line(info.value, "'x'", "0 or more")


@pytest.mark.parametrize("profile", [{"x": 5}, {"x": ("a", 3)}, {"x": (1.5, 3)}, [(1, 3)]])
def test_malformed_profile_is_refused(profile) -> None:
    with pytest.raises(BuildError) as info:
        kiln.build(_relu_net(["N", 3]), _cpu(profiles=profile))
    _one_line(info.value, "rofile")


@pytest.mark.parametrize("shape", [[1 << 40, 3], [1 << 40, 1 << 40]])
def test_input_larger_than_memory_is_refused(shape) -> None:
    with pytest.raises(BuildError) as info:
        kiln.build(_relu_net(shape), _cpu())
    _one_line(info.value, "Input 'x'", "free on cpu")


def _ints(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v, np.int64), name)


@pytest.mark.parametrize("case", ["ConstantOfShape", "Range", "Expand", "Tile"])
def test_computed_tensor_of_terabytes_is_refused_naming_the_node(case) -> None:
    nodes, inits = {
        "ConstantOfShape": ([helper.make_node("ConstantOfShape", ["s"], ["z"], name="big"),
                             helper.make_node("Add", ["z", "x"], ["y"])], [_ints("s", [1 << 20, 1 << 20])]),
        "Range": ([helper.make_node("Range", ["a", "b", "d"], ["r"], name="big"),
                   helper.make_node("Cast", ["r"], ["z"], to=TensorProto.FLOAT), helper.make_node("Add", ["z", "x"], ["y"])],
                  [_ints("a", 0), _ints("b", 1 << 42), _ints("d", 1)]),
        "Expand": ([helper.make_node("Expand", ["x", "s"], ["y"], name="big")], [_ints("s", [1 << 21, 1 << 21, 1])]),
        "Tile": ([helper.make_node("Tile", ["x", "s"], ["y"], name="big")], [_ints("s", [1 << 40])]),
    }[case]
    m = _model(nodes, [_vi("x", [1])], [_vi("y", None)], inits)
    with pytest.raises(BuildError) as info:
        kiln.build(kiln.onnx.parse(m), _cpu())
    _one_line(info.value, "'big'", case, "TB")


# ---- a seeded run of damaged files --------------------------------------------------------------------

def _seed_models() -> list[bytes]:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "B")
    shape = _ints("sh", [1, -1])
    conv = _model([helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["c"], ["r"], name="relu"),
                   helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
                   helper.make_node("Reshape", ["p", "sh"], ["y"], name="reshape")],
                  [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 64])], [w, b, shape])
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [_vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [2])])
    cond = _model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                   helper.make_node("Greater", ["s", "z"], ["c"]),
                   helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [_vi("x", [2])], [_vi("y", [2])], [numpy_helper.from_array(np.float32(0), "z")])
    return [conv.SerializeToString(), cond.SerializeToString()]


_ODD = [-1, 0, 2, -4, 1 << 31, 1 << 40, -(1 << 62)]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """Bytes truncated or flipped, or one field of the model changed to an odd value."""
    kind = rng.randrange(3)
    if kind == 0:
        return data[:rng.randrange(len(data))]
    if kind == 1:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    m = onnx.load_from_string(data)
    g = m.graph
    what = rng.randrange(5)
    if what == 0:
        t = rng.choice(g.initializer)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice(_ODD)
    elif what == 1:
        dims = g.input[0].type.tensor_type.shape.dim
        dims[rng.randrange(len(dims))].dim_value = rng.choice(_ODD)
    elif what == 2:
        node = rng.choice(g.node)
        if node.attribute:
            a = rng.choice(node.attribute)
            a.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.STRING])
            a.ints[:] = [rng.choice(_ODD) for _ in range(rng.randint(0, 4))]
    elif what == 3:
        node = rng.choice(g.node)
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "missing"])
    else:
        rng.choice(g.initializer).data_type = rng.randrange(30)
    return m.SerializeToString()


def test_damaged_models_give_one_line_errors() -> None:
    rng = random.Random(15)
    seeds = _seed_models()
    outcomes = {"refused": 0, "built": 0}
    for _ in range(120):
        data = _mutate(rng, rng.choice(seeds))
        try:
            engine = kiln.build(kiln.onnx.parse(data), _cpu(optimization_level=0))
        except KilnError as exc:
            _one_line(exc)
            outcomes["refused"] += 1
        else:
            assert engine.header["plan"]["layers"]
            outcomes["built"] += 1
    assert outcomes["refused"] > 40 and outcomes["built"] > 5, outcomes
