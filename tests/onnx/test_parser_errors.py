"""The ONNX front end's failure modes, external data, and the opset range 11..21.

Graphs are built with onnx.helper; values are checked against ONNX Runtime.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from _models import assert_close_fp32, ort_run
from kiln.errors import ParseError, UnsupportedOperatorError


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    ids = [helper.make_opsetid(d, v) for d, v in opsets]
    ir = helper.find_min_ir_version_for([i for i in ids if i.domain in ("", "ai.onnx")])
    return helper.make_model(graph, opset_imports=ids, ir_version=ir)


def _vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _build_and_run(model_or_path, feeds: dict[str, np.ndarray], profiles=None) -> dict[str, np.ndarray]:
    net = kiln.onnx.parse(model_or_path)
    return kiln.build(net, kiln.BuildConfig(device="cpu", profiles=profiles)).context().run(feeds)


# ---- unsupported operators ------------------------------------------------------------------

def test_unsupported_custom_domain_op() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu0"),
                helper.make_node("FancyOp", ["r"], ["y"], name="fancy/1", domain="com.example", alpha=2.0)],
               [_vi("x", [2, 3])], [_vi("y", [2, 3])], opsets=(("", 17), ("com.example", 3)))
    with pytest.raises(UnsupportedOperatorError) as info:
        kiln.onnx.parse(m)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("'fancy/1'", "FancyOp", "com.example", "opset 3", "plugin", "kiln.Plugin", "--plugins"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert isinstance(info.value, ParseError)        # a ParseError too, for callers that catch broadly


_NOT_IN_KILN = ["StringNormalizer", "TfIdfVectorizer", "RegexFullMatch", "StringSplit", "ImageDecoder", "STFT",
                "MelWeightMatrix", "Bernoulli", "Multinomial"]


def _an_unsupported_standard_op() -> str:
    from kiln.onnx import lookup
    from kiln.plugins import load_builtins, registry
    load_builtins()
    for op in _NOT_IN_KILN:
        if lookup(op, 21) is None and registry.find(op, "kiln") is None and registry.find(op, "") is None:
            return op
    pytest.skip("every candidate op is supported now; pick another unsupported op for this test")


def test_unsupported_standard_op_names_ai_onnx_and_opset() -> None:
    op = _an_unsupported_standard_op()
    m = _model([helper.make_node(op, ["x"], ["y"], name="the_node")], [_vi("x", [4])], [_vi("y", [4])],
               opsets=(("", 19),))
    with pytest.raises(UnsupportedOperatorError) as info:
        kiln.onnx.parse(m)
    msg = str(info.value)
    assert "'the_node'" in msg and op in msg and "ai.onnx" in msg and "opset 19" in msg and "plugin" in msg, msg


def test_unnamed_unsupported_node_still_named() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Frobnicate", ["r"], ["y"], domain="x.y")],
               [_vi("x", [4])], [_vi("y", [4])], opsets=(("", 17), ("x.y", 1)))
    with pytest.raises(UnsupportedOperatorError) as info:
        kiln.onnx.parse(m)
    assert "Frobnicate" in str(info.value) and "'Frobnicate_2'" in str(info.value), str(info.value)


def test_check_lists_every_unsupported_node_without_building() -> None:
    op = _an_unsupported_standard_op()
    m = _model([helper.make_node("FancyOp", ["x"], ["a"], name="n1", domain="com.example"),
                helper.make_node("Relu", ["a"], ["b"], name="n2"),
                helper.make_node(op, ["b"], ["y"], name="n3")],
               [_vi("x", [4])], [_vi("y", [4])], opsets=(("", 17), ("com.example", 1)))
    problems = kiln.onnx.check(m)
    assert [(p["name"], p["op_type"], p["domain"], p["opset"]) for p in problems] == \
        [("n1", "FancyOp", "com.example", 1), ("n3", op, "", 17)]


def test_check_walks_subgraphs(tmp_path: Path) -> None:
    then_g = helper.make_graph([helper.make_node("FancyOp", ["x"], ["t"], name="inner", domain="com.example")],
                               "then", [], [_vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [_vi("e", [2])])
    m = _model([helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then_g, else_branch=else_g)],
               [_vi("c", [], TensorProto.BOOL), _vi("x", [2])], [_vi("y", [2])],
               opsets=(("", 17), ("com.example", 1)))
    onnx.save(m, str(tmp_path / "if.onnx"))
    problems = kiln.onnx.check(tmp_path / "if.onnx")
    assert [p["name"] for p in problems] == ["inner"], problems


# ---- malformed files ------------------------------------------------------------------------

def _one_line_parse_error(target) -> str:
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(target)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    msg = _one_line_parse_error(tmp_path / "nope.onnx")
    assert "nope.onnx" in msg and "does not exist" in msg


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 50, b"\x08\x07\x12\x05hello\x3a\xff\xff\xff\xff\x0f",
                                     os.urandom(2048)], ids=["garbage", "bad-varint", "random"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    msg = _one_line_parse_error(p)
    assert "bad.onnx" in msg


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty.onnx" in _one_line_parse_error(tmp_path / "empty.onnx")
    _one_line_parse_error(b"")
    _one_line_parse_error(b"\xff\xff\xff")


def test_truncated_protobuf(model_case, tmp_path: Path) -> None:
    """Cut the file anywhere: always one ParseError, never a protobuf or Python exception."""
    data = Path(model_case("conv_bn").path).read_bytes()
    p = tmp_path / "cut.onnx"
    for n in sorted(set(range(1, len(data), max(1, len(data) // 60))) | {len(data) - 1}):
        p.write_bytes(data[:n])
        _one_line_parse_error(p)
        _one_line_parse_error(data[:n])


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    assert str(tmp_path) in _one_line_parse_error(tmp_path)


def test_dangling_input_names_the_node() -> None:
    m = _model([helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")], [_vi("x", [2])], [_vi("y", [2])])
    msg = _one_line_parse_error(m)
    assert "'adder'" in msg and "'ghost'" in msg, msg


def test_input_without_shape() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [_vi("y", [2])])
    msg = _one_line_parse_error(m)
    assert "'x'" in msg and "shape" in msg, msg


# ---- external data --------------------------------------------------------------------------

def _external_model(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
                helper.make_node("MatMul", ["t", "w2"], ["u"]), helper.make_node("Add", ["u", "b"], ["y"])],
               [_vi("x", ["n", 8])], [_vi("y", ["n", 4])],
               [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b, "b")])
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(m, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (d / "weights.bin").stat().st_size >= (w1.nbytes + w2.nbytes + b.nbytes)
    return d / "model.onnx", {"x": rng.standard_normal((3, 8)).astype(np.float32)}


def test_external_data_model_loads_and_runs(tmp_path: Path, monkeypatch) -> None:
    path, feeds = _external_model(tmp_path)
    monkeypatch.chdir(tmp_path)          # data is found beside the model, not in the working directory
    got = _build_and_run(str(path), feeds, profiles={"x": ((1, 8), (3, 8), (4, 8))})
    ref = ort_run(path, feeds)
    assert_close_fp32(got["y"], ref["y"])


def test_external_data_relative_path(tmp_path: Path, monkeypatch) -> None:
    path, feeds = _external_model(tmp_path)
    monkeypatch.chdir(path.parent)
    got = _build_and_run("model.onnx", feeds, profiles={"x": ((3, 8), (3, 8), (3, 8))})
    assert_close_fp32(got["y"], ort_run(path, feeds)["y"])


def test_external_data_missing_file(tmp_path: Path) -> None:
    path, _ = _external_model(tmp_path)
    (path.parent / "weights.bin").unlink()
    msg = _one_line_parse_error(path)
    assert "model.onnx" in msg and "beside" in msg, msg


# ---- opsets 11..21 --------------------------------------------------------------------------

def opset_model(opset: int) -> onnx.ModelProto:
    """One small graph written the way each opset spells it (attributes that became inputs, etc.)."""
    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)      # noqa: E731
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)    # noqa: E731
    inits = [f32("scales", [1, 1, 2, 2]), f32("roi", []), f32("lo", -0.5), f32("hi", 0.7),
             i64("pads", [0, 0, 1, 0, 0, 2])]
    nodes = []
    if opset < 13:
        nodes.append(helper.make_node("Unsqueeze", ["x"], ["u"], axes=[1]))
    else:
        inits.append(i64("ax1", [1]))
        nodes.append(helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]))
    nodes.append(helper.make_node("Resize", ["u", "roi", "scales"], ["rs"], mode="nearest"))
    if opset < 13:
        nodes.append(helper.make_node("Squeeze", ["rs"], ["sq"], axes=[1]))
        nodes.append(helper.make_node("Split", ["sq"], ["a", "b"], axis=2, split=[5, 7]))
        nodes.append(helper.make_node("ReduceSum", ["sq"], ["rsum"], axes=[2], keepdims=1))
    else:
        nodes.append(helper.make_node("Squeeze", ["rs", "ax1"], ["sq"]))
        inits += [i64("split", [5, 7]), i64("ax2", [2])]
        nodes.append(helper.make_node("Split", ["sq", "split"], ["a", "b"], axis=2))
        nodes.append(helper.make_node("ReduceSum", ["sq", "ax2"], ["rsum"], keepdims=1))
    nodes += [helper.make_node("Slice", ["b", "s0", "s1", "s2"], ["bs"]),
              helper.make_node("Add", ["a", "bs"], ["c"]),
              helper.make_node("Softmax", ["c"], ["sm"], axis=1),       # 2-D coercion before opset 13
              helper.make_node("Clip", ["sm", "lo", "hi"], ["cl"]),
              helper.make_node("Pad", ["cl", "pads"], ["p"], mode="constant")]
    inits += [i64("s0", [1]), i64("s1", [6]), i64("s2", [2])]
    if opset < 18:
        nodes.append(helper.make_node("ReduceMean", ["p"], ["y"], axes=[1], keepdims=0))
        nodes.append(helper.make_node("ReduceMax", ["rsum"], ["z"], axes=[1, 2], keepdims=0))
    else:
        inits += [i64("ax_m", [1]), i64("ax_x", [1, 2])]
        nodes.append(helper.make_node("ReduceMean", ["p", "ax_m"], ["y"], keepdims=0))
        nodes.append(helper.make_node("ReduceMax", ["rsum", "ax_x"], ["z"], keepdims=0))
    outputs = [_vi("y", ["n", None]), _vi("z", ["n"])]
    if opset >= 17:
        inits += [f32("g", np.linspace(0.5, 1.5, 5)), f32("beta", np.linspace(-1, 1, 5))]
        nodes.append(helper.make_node("LayerNormalization", ["a", "g", "beta"], ["ln"], axis=-1, epsilon=1e-5))
        last = "ln"
        if opset >= 20:
            nodes.append(helper.make_node("Gelu", ["ln"], ["ge"], approximate="tanh"))
            last = "ge"
        outputs.append(_vi(last, ["n", 8, 5]))
    return _model(nodes, [_vi("x", ["n", 4, 6])], outputs, inits, opsets=(("", opset),))


@pytest.mark.parametrize("opset", range(11, 22))
def test_opsets_11_to_21(opset: int, tmp_path: Path) -> None:
    m = opset_model(opset)
    onnx.checker.check_model(m, full_check=True)
    path = tmp_path / f"opset{opset}.onnx"
    onnx.save(m, str(path))
    feeds = {"x": np.random.default_rng(opset).standard_normal((3, 4, 6)).astype(np.float32)}
    ref = ort_run(path, feeds)
    got = _build_and_run(path, feeds, profiles={"x": ((1, 4, 6), (3, 4, 6), (4, 4, 6))})
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert_close_fp32(got[k], ref[k], f"opset {opset} output {k}")
