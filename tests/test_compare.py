"""kiln compare: outputs and every intermediate tensor against ONNX Runtime, the first bad layer,
--reduce, input files and their errors, the CLI's exit codes."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.comparison import data_file_name, error_stats
from kiln.errors import KilnError
from kiln.plugins import Plugin, TensorDesc
from kiln.plugins.registry import registry as REGISTRY

pytest.importorskip("onnxruntime")


def _chain(n_before: int, bad_op: str, n_after: int, width: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x → (MatMul, Add, Tanh)… → bad_op → (Mul, Add, Neg)… → y, with distinct node names."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "x"

    def step(op, extra=None, attrs=None):
        nonlocal cur
        i = len(nodes)
        out = f"t{i}"
        ins = [cur] + ([extra] if extra else [])
        nodes.append(helper.make_node(op, ins, [out], name=f"{op.lower()}_{i}", **(attrs or {})))
        cur = out

    def const(shape, scale=1.0, offset=0.0):
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array((offset + rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name
    ops = ["MatMul", "Add", "Tanh"]
    for i in range(n_before):
        op = ops[i % 3]
        step(op, const((width, width), 0.5) if op == "MatMul" else const((width,)) if op == "Add" else None)
    step(bad_op)
    ops = ["Mul", "Add", "Neg"]          # keeps a perturbation's size, so the output shows it too
    for i in range(n_after):
        op = ops[i % 3]
        step(op, const((width,), 0.1, 1.0) if op == "Mul" else const((width,)) if op == "Add" else None)
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [4, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


class _WrongSoftsign(Plugin):
    """A test-only plugin that takes over ONNX Softsign and is slightly wrong (+0.05)."""
    name = "Softsign"
    version = "1"
    overrides_builtin = True

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        return [TensorDesc(inputs[0].shape, inputs[0].dtype)]

    def forward(self, inputs, outputs, workspace, tactic):
        x = inputs[0]
        torch.add(x / (1 + x.abs()), 0.05, out=outputs[0])


@pytest.fixture
def wrong_softsign():
    REGISTRY.register(_WrongSoftsign, source="test")
    yield
    REGISTRY.unregister("Softsign", "", "1")


# ---- statistics -------------------------------------------------------------------------------
def test_error_stats_values() -> None:
    ref = np.array([1.0, -2.0, 4.0, 0.0])
    got = np.array([1.0, -2.5, 4.0, 0.1])
    s = error_stats(got, ref, atol=0.0, rtol=0.1)
    assert s.max_abs == pytest.approx(0.5) and s.mean_abs == pytest.approx(0.15)
    assert s.rel_l2 == pytest.approx(math.sqrt(0.25 + 0.01) / math.sqrt(21.0))
    assert s.max_rel > 1e100                             # 0.1 against an exact zero
    assert s.passed is False                             # 0.5 > 0 + 0.1 * 4
    assert error_stats(got, ref, atol=0.0, rtol=0.13).passed is True     # 0.5 <= 0.52
    assert error_stats(got, ref, atol=0.0, rtol=0.1, stat="median").passed is True
    s = error_stats(np.array([np.inf, 1.0]), np.array([70000.0, 1.0]), 1e-2, 1e-2)
    assert s.nonfinite == 1 and not s.passed and s.metric == math.inf
    assert ("non-finite", 1) in s.histogram
    assert error_stats(np.array([np.inf]), np.array([np.inf]), 0, 0).passed       # inf where the reference has inf


# ---- outputs ----------------------------------------------------------------------------------
def test_fp32_model_passes_and_reports() -> None:
    m = _chain(6, "Softsign", 6)
    r = kiln.compare(m, device="cpu")
    assert r.passed and len(r.outputs) == 1
    o = r.outputs[0]
    assert o.shape == [4, 8] and o.stats.max_abs < 1e-5
    text = r.report()
    assert "PASS" in text and "|diff|" in text


def test_planted_wrong_layer_is_named(wrong_softsign) -> None:
    m = _chain(9, "Softsign", 9)
    r = kiln.compare(m, device="cpu", per_layer=True)
    assert not r.passed
    bad = [x for x in m.graph.node if x.op_type == "Softsign"][0]
    assert r.first_bad is not None and r.first_bad.node == bad.name and r.first_bad.op == "Softsign"
    assert r.first_bad.tensor == bad.output[0]
    # every layer before it agrees; it jumps
    before = [x for x in r.layers if x.index < r.first_bad.index]
    assert before and all(x.passed and x.stats.max_abs < 1e-5 for x in before)
    assert r.first_bad.growth > 1e3 and r.first_bad.stats.max_abs == pytest.approx(0.05, rel=1e-3)
    assert f"first bad layer: node {bad.name!r} (Softsign)" in r.report()


def _overflow_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((16, 16)) * 3.0).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Exp", ["r"], ["e"], name="exp"),
             helper.make_node("ReduceMean", ["e"], ["y"], name="mean", keepdims=0)]
    g = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_overflow_is_reported_at_the_exp() -> None:
    m = _overflow_model()
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    r = kiln.compare(m, precision="fp16", device="cpu", inputs={"x": x}, per_layer=True)
    assert not r.passed
    assert r.first_bad is not None and r.first_bad.node == "exp"
    assert r.first_bad.stats.nonfinite > 0 and r.first_bad.kiln_range[1] == math.inf
    assert r.first_bad.ref_range[1] > 65504                      # the reference's range shows why
    names = [x.node for x in r.layers]
    assert names.index("relu") < names.index("exp")       # MatMul+Relu fuse: compared at the Relu's output
    assert all(x.passed for x in r.layers if x.node in ("proj", "relu"))
    text = r.report()
    assert "overflow" in text and "65504" in text and "Kiln range" in text


def test_errors_json_is_what_the_viewer_reads(tmp_path, wrong_softsign) -> None:
    m = _chain(3, "Softsign", 3)
    path = tmp_path / "chain.onnx"
    onnx.save(m, path)
    r = kiln.compare(str(path), device="cpu", per_layer=True)
    out = r.save_errors(str(tmp_path / "e.json"))
    data = json.load(open(out))
    assert data["format"] == "kiln-compare-errors" and data["version"] == 1
    assert data["first_bad"]["node"] == r.first_bad.node
    bad = [t for t in data["tensors"] if not t["passed"]]
    assert bad and bad[0]["op"] == "Softsign"
    from kiln.viewer import accuracy
    report = accuracy.read_errors(out)                  # the viewer accepts the file as written
    assert len(report["tensors"]) == len(r.layers)


# ---- --reduce ---------------------------------------------------------------------------------
def test_reduce_200_nodes_to_the_bad_one(tmp_path, wrong_softsign) -> None:
    m = _chain(100, "Softsign", 99)
    assert len(m.graph.node) == 200
    out = tmp_path / "small.onnx"
    r = kiln.compare(m, device="cpu", reduce=True, reduce_output=str(out))
    assert r.reduced is not None and r.reduced.nodes <= 3
    small = onnx.load(out)
    assert "Softsign" in [n.op_type for n in small.graph.node]
    # the reduced model, with the data saved beside it, still fails
    data = str(out).replace(".onnx", "-data")
    r2 = kiln.compare(str(out), device="cpu", data=data)
    assert not r2.passed


def test_reduce_on_a_passing_model_is_an_error() -> None:
    with pytest.raises(KilnError, match="nothing to reduce"):
        kiln.compare(_chain(3, "Softsign", 3), device="cpu", reduce=True)


# ---- inputs and their errors ------------------------------------------------------------------
def test_inputs_from_npy_and_data_folder(tmp_path) -> None:
    m = _chain(3, "Softsign", 3)
    x = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r1 = kiln.compare(m, device="cpu", inputs={"x": str(tmp_path / "x.npy")})
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / data_file_name("x"), x)
    r2 = kiln.compare(m, device="cpu", data=str(d))
    assert r1.outputs[0].ref_range == r2.outputs[0].ref_range


@pytest.mark.parametrize("case, match", [
    ("shape", r"Input 'x' has shape \[4, 9\] but the model expects 4x8"),
    ("dtype", r"Input 'x' is float64 but the model expects float32"),
    ("name", r"no input named 'y'; its inputs are x"),
    ("missing", r"does not exist"),
])
def test_bad_inputs_one_line_errors(tmp_path, case, match) -> None:
    m = _chain(3, "Softsign", 3)
    arr = {"shape": np.zeros((4, 9), np.float32), "dtype": np.zeros((4, 8)), "name": np.zeros((4, 8), np.float32)}
    if case == "missing":
        inputs = {"x": str(tmp_path / "nope.npy")}
    else:
        np.save(tmp_path / "a.npy", arr[case])
        inputs = {"y" if case == "name" else "x": str(tmp_path / "a.npy")}
    with pytest.raises(KilnError, match=match) as info:
        kiln.compare(m, device="cpu", inputs=inputs)
    assert "\n" not in str(info.value)


def test_missing_reference_runtime(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # import fails as if not installed
    with pytest.raises(KilnError, match="needs ONNX Runtime.*pip install onnxruntime"):
        kiln.compare(_chain(2, "Softsign", 2), device="cpu")


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_exit_codes_and_files(tmp_path, capsys, monkeypatch, wrong_softsign) -> None:
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.onnx"
    onnx.save(_chain(3, "Tanh", 3), good)
    assert main(["compare", str(good), "--device", "cpu"]) == 0
    assert "PASSED" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    onnx.save(_chain(3, "Softsign", 3), bad)
    assert main(["compare", str(bad), "--device", "cpu", "--per-layer"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "first bad layer" in out and "kiln view" in out
    assert json.load(open(tmp_path / "bad.errors.json"))["first_bad"] is not None
    assert main(["compare", str(bad), "--device", "cpu", "--input", "x=missing.npy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error:") and err.count("\n") == 1


@pytest.mark.gpu
def test_cuda_fp16_per_layer(wrong_softsign) -> None:
    """On the GPU: an FP16 engine per layer against ONNX Runtime; the planted layer is still named."""
    m = _chain(9, "Softsign", 9)
    r = kiln.compare(m, precision="fp16", device="cuda", per_layer=True)
    assert r.device == "cuda" and not r.passed
    assert r.first_bad is not None and r.first_bad.op == "Softsign"
    before = [x for x in r.layers if x.index < r.first_bad.index]
    assert before and all(x.passed for x in before)


def test_reference_reads_a_newer_ir_version(monkeypatch) -> None:
    """An onnx package newer than ONNX Runtime stamps an IR version ORT refuses; the reference then
    runs a copy stamped with the version it reads."""
    import onnxruntime as ort
    real = ort.InferenceSession
    m = _chain(2, "Softsign", 2)
    limit = m.ir_version - 1

    def picky(model_bytes, *args, **kw):
        proto = onnx.ModelProto()
        proto.ParseFromString(model_bytes)
        if proto.ir_version > limit:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : Unsupported model IR version: {proto.ir_version}, "
                               f"max supported IR version: {limit}")
        return real(model_bytes, *args, **kw)
    monkeypatch.setattr(ort, "InferenceSession", picky)
    assert kiln.compare(m, device="cpu").passed


def test_passing_model_names_no_culprit() -> None:
    """FP16 turns an additive attention mask's -3.4e38 into -inf: an intermediate jump, but the outputs
    pass, so no layer is blamed; the report mentions it."""
    big = numpy_helper.from_array(np.array(-3.4e38, np.float32), "neg")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [helper.make_node("Where", ["m", "zero", "neg"], ["bias"], name="mask_bias"),
             helper.make_node("Add", ["x", "bias"], ["s"], name="add"),
             helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=-1)]
    g = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                                            helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], [big, zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mask = np.array([[True] * 4 + [False] * 2] * 2)
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    r = kiln.compare(m, precision="fp16", device="cpu", inputs={"x": x, "m": mask}, per_layer=True)
    assert r.passed and r.first_bad is None
    assert r.first_jump is not None and r.first_jump.node == "mask_bias"
    assert "every output passes" in r.report()


def test_errors_colour_the_engine_too(tmp_path, wrong_softsign) -> None:
    """Engine layers keep the ONNX names of the tensors they compute, so a per-layer report made on
    the model colours the built engine's fused layers as well, and outlines the plugin that is wrong."""
    from kiln.viewer import documents
    m = _chain(6, "Softsign", 5)
    r = kiln.compare(m, device="cpu", per_layer=True)
    errs = r.save_errors(str(tmp_path / "e.json"))
    engine = kiln.build(kiln.onnx.parse(m), kiln.BuildConfig(device="cpu", profiles={"x": (4, 8)}))
    engine.save(tmp_path / "m.kiln")
    pane = documents.build_document(tmp_path / "m.kiln", errors=errs).page["panes"][0]
    coloured = {n["name"]: n["err"] for n in pane["nodes"] if "err" in n}
    bad = [name for name, e in coloured.items() if e["first"]]
    assert len(bad) == 1 and coloured[bad[0]]["failed"]
    assert [layer["kind"] for layer in engine.layers if layer["name"] == bad[0]] == ["Plugin"]
    assert sum(not e["failed"] for e in coloured.values()) >= 2          # the fused layers before it pass


def test_sequence_outputs_compare_element_by_element() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("SequenceConstruct", ["r", "s"], ["seq"], name="seq")]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)])
    r = kiln.compare(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), device="cpu")
    assert r.passed and r.outputs[0].shape == [7] and r.outputs[0].stats.max_abs < 1e-6


def test_errors_colour_both_panes_of_engine_and_model(tmp_path, wrong_softsign) -> None:
    from kiln.viewer import documents
    m = _chain(4, "Softsign", 4)
    onnx.save(m, tmp_path / "m.onnx")
    r = kiln.compare(str(tmp_path / "m.onnx"), device="cpu", per_layer=True)
    errs = r.save_errors(str(tmp_path / "e.json"))
    kiln.build(kiln.onnx.parse(m), kiln.BuildConfig(device="cpu", profiles={"x": (4, 8)})).save(tmp_path / "m.kiln")
    page = documents.build_document(tmp_path / "m.onnx", engine=tmp_path / "m.kiln", errors=errs).page
    engine_pane, model_pane = page["panes"]
    assert any(n.get("err", {}).get("failed") for n in model_pane["nodes"])
    assert any(n.get("err", {}).get("failed") for n in engine_pane["nodes"])
    assert page["errors"]["pane"] == 1


def test_compare_keeps_a_scalar_input_scalar(tmp_path):
    """A rank-0 input (an audio model's sample rate) given as a 0-d array stays 0-d for both runtimes."""
    import onnx
    from onnx import TensorProto, helper

    import kiln
    g = helper.make_graph([helper.make_node("Cast", ["sr"], ["f"], to=TensorProto.FLOAT),
                           helper.make_node("Mul", ["x", "f"], ["y"])], "scalar",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.save(tmp_path / "sr.npy", np.array(16000, np.int64))
    result = kiln.compare(str(path), device="cpu", inputs={"sr": str(tmp_path / "sr.npy")}, per_layer=True)
    assert result.passed and result.first_jump is None
