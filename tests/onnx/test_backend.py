"""kiln.onnx.backend (the ONNX Backend API), bad input through it, the exclusion file and kiln check's reasons."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln.onnx.backend as backend
from kiln.errors import KilnError, ParseError, UnsupportedOperatorError
from kiln.onnx.conformance import load_exclusions, op_of_case

HERE = Path(__file__).parent


def _model(nodes, inputs, outputs, opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_static_model_runs_and_matches_numpy():
    m = _model([helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
               [_vi("a", [2, 3]), _vi("b", [3])], [_vi("y", [2, 3])])
    rep = backend.prepare(m, "CPU")
    a, b = np.random.randn(2, 3).astype(np.float32), np.random.randn(3).astype(np.float32)
    (y,) = rep.run([a, b])
    np.testing.assert_allclose(y, np.maximum(a + b, 0), rtol=1e-6)


def test_dynamic_dims_build_per_input_shape():
    m = _model([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [_vi("x", ["n", 4])], [_vi("y", [])])
    rep = backend.prepare(m)
    for n in (1, 5, 5, 2):
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        np.testing.assert_allclose(rep.run([x])[0], x.sum(), rtol=1e-6)
    assert len(rep._contexts) == 3          # one engine per distinct shape


def test_input_with_unnamed_dynamic_dims_builds_at_run():
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    m = _model([helper.make_node("Neg", ["x"], ["y"])], [x_info], [_vi("y", [None, None])])
    x = np.ones((2, 2), np.float32)
    np.testing.assert_array_equal(backend.prepare(m).run([x])[0], -x)


def test_zero_d_inputs_stay_zero_d():
    m = _model([helper.make_node("Mul", ["a", "b"], ["y"])], [_vi("a", []), _vi("b", [])], [_vi("y", [])])
    y = backend.prepare(m).run([np.float32(3), np.float32(4)])[0]
    assert y.shape == () and y == 12


def test_run_node_and_devices():
    node = helper.make_node("Sub", ["x", "y"], ["z"])
    x, y = np.ones((2, 2), np.float32), np.full((2, 2), 3, np.float32)
    np.testing.assert_array_equal(backend.run_node(node, [x, y])[0], x - y)
    assert backend.supports_device("CPU")
    assert not backend.supports_device("TPU")


def test_narrow_types_cross_the_boundary():
    import ml_dtypes
    m = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN)],
               [_vi("x", [4])], [_vi("y", [4], TensorProto.FLOAT8E4M3FN)], opset=21)
    x = np.array([0.3, 1000.0, -np.inf, np.nan], np.float32)
    (y,) = backend.prepare(m).run([x])
    assert y.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(y.astype(np.float32)[:3], [0.3125, 448, -448])     # saturated
    assert np.isnan(y.astype(np.float32)[3])


# ---- bad input: one-line KilnErrors, never a crash -------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith("."), text
    return text


def test_invalid_model_is_a_parse_error():
    # reads a value nothing produces: onnx.checker rejects it
    m = _model([helper.make_node("Relu", ["missing"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(ParseError) as e:
        backend.prepare(m)
    assert "not valid ONNX" in _one_line(e.value)


def test_wrong_attribute_type_is_a_parse_error():
    node = helper.make_node("Transpose", ["x"], ["y"], perm=1.5)     # perm must be ints
    m = _model([node], [_vi("x", [2, 3])], [_vi("y", [3, 2])])
    with pytest.raises(KilnError) as e:
        backend.prepare(m)
    _one_line(e.value)


def test_unsupported_op_names_node_op_domain_opset():
    m = _model([helper.make_node("FooBar", ["x"], ["y"], name="foo", domain="my.dom")],
               [_vi("x", [2])], [_vi("y", [2])], extra_opsets=[helper.make_opsetid("my.dom", 3)])
    with pytest.raises(UnsupportedOperatorError) as e:
        backend.prepare(m)
    msg = _one_line(e.value)
    for part in ("'foo'", "FooBar", "my.dom", "opset 3", "plugin"):
        assert part in msg


def test_wrong_input_count_and_dtype_are_kiln_errors():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])
    rep = backend.prepare(m)
    with pytest.raises(KilnError):
        rep.run([np.zeros(2, np.float32), np.zeros(2, np.float32)])
    with pytest.raises(KilnError):
        rep.run([np.zeros(2, np.int64)])
    with pytest.raises(KilnError):
        rep.run([np.zeros(3, np.float32)])


def test_unknown_device_is_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(KilnError, match="not supported by the Kiln backend"):
        backend.prepare(m, "TPU")


@pytest.mark.parametrize("kind,case", [("node", "test_equal_string"),
                                       ("simple", "test_strnorm_model_monday_casesensintive_lower"),
                                       ("node", "test_image_decoder_decode_png_rgb")])
def test_excluded_cases_fail_cleanly(kind, case):
    """Excluded cases still end in one KilnError (strings refused by name, unsupported ops named)."""
    import os

    from onnx.backend.test.loader import load_model_tests
    c = next(c for c in load_model_tests(kind=kind) if c.name == case)
    model = c.model if c.model is not None else onnx.load(os.path.join(c.model_dir, "model.onnx"))
    with pytest.raises(KilnError) as e:
        backend.prepare(model).run(c.data_sets[0][0] if c.data_sets else [np.array(["Monday"], object)])
    _one_line(e.value)


# ---- the exclusion file and the support report ----------------------------------------------------

def test_every_exclusion_has_a_reason_and_matches_a_case():
    from onnx.backend.test.loader import load_model_tests
    names = {c.name for kind in ("node", "real", "simple", "pytorch-converted", "pytorch-operator")
             for c in load_model_tests(kind=kind)}
    exclusions = load_exclusions(HERE / "conformance_exclusions.toml")
    assert exclusions
    for e in exclusions:
        assert len(e.reason) > 20, e
        assert any(re.fullmatch(e.pattern, n) for n in names), f"{e.pattern!r} matches no case"


def test_exclusion_without_reason_is_rejected(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('[[exclude]]\npattern = "test_foo"\n')
    with pytest.raises(ValueError, match="reason"):
        load_exclusions(p)


def test_cases_map_to_ops():
    assert op_of_case("test_reduce_sum_keepdims_example") == "ReduceSum"
    assert op_of_case("test_castlike_FLOAT_to_FLOAT16_expanded") == "CastLike"
    assert op_of_case("test_sce_mean_3d") == "SoftmaxCrossEntropyLoss"
    assert op_of_case("test_PReLU_1d", "PyTorchConverted") == "(models)"
    assert op_of_case("test_loop11") == "Loop" and op_of_case("test_scan9_sum") == "Scan"
    assert op_of_case("test_less_equal_uint16_expanded") == "LessOrEqual"
    assert op_of_case("test_expand_dim_changed") == "Expand" and op_of_case("test_exp") == "Exp"


def test_check_gives_reasons():
    import kiln.onnx.check as check_module
    m = _model([helper.make_node("Relu", ["x"], ["a"]),
                helper.make_node("StringNormalizer", ["a"], ["b"], name="sn"),
                helper.make_node("FooBar", ["b"], ["y"], name="fb", domain="my.dom")],
               [_vi("x", [2])], [_vi("y", [2])], extra_opsets=[helper.make_opsetid("my.dom", 1)])
    found = check_module.check(m)
    assert [(f["name"], f["op_type"], f["domain"], f["opset"]) for f in found] == [
        ("sn", "StringNormalizer", "", 17), ("fb", "FooBar", "my.dom", 1)]
    assert all(f["reason"].endswith(".") and "plugin" in f["reason"] for f in found)
    assert check_module.check.__module__ == "kiln.onnx.check"
    import kiln.onnx
    assert [f["name"] for f in kiln.onnx.check(m)] == ["sn", "fb"]


def test_float8_weights_fold_and_survive_save_load(tmp_path):
    """Narrow-typed initializers and folded casts into them go through build, the engine file and run."""
    import ml_dtypes
    from onnx import numpy_helper

    import kiln
    w = numpy_helper.from_array(np.array([0.5, 2.0, -3.0], np.float32).astype(ml_dtypes.float8_e4m3fn), "w")
    c = numpy_helper.from_array(np.array([1.3, 500.0, -2.0], np.float32))
    nodes = [helper.make_node("Constant", [], ["c"], value=c),
             helper.make_node("Cast", ["c"], ["c8"], to=TensorProto.FLOAT8E4M3FN),
             helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["c8"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Sum", ["wf", "x", "cf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [_vi("x", [3])], [_vi("y", [3]), _vi("c8", [3], TensorProto.FLOAT8E4M3FN)],
                              initializer=[w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    engine = kiln.build(kiln.onnx.parse(m), kiln.BuildConfig(device="cpu"))
    engine.save(str(tmp_path / "f8.kiln"))
    out = kiln.load(str(tmp_path / "f8.kiln")).context().run({"x": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(out["y"], [1.75, 450.0, -5.0])       # 1.3 → 1.25, 500 saturates at 448
    assert out["c8"].dtype == ml_dtypes.float8_e4m3fn
