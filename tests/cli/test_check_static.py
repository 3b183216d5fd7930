"""`kiln check` of a static model answers from closed-form shape rules (kiln.ir.shape_rules, the view shapes
and host shape arithmetic of kiln.passes.symbolic) where they follow every layer, without the build's steps:
its verdict is the one the build's steps give (the same check with the closed-form path switched off, so
``prepare`` runs), on models that it clears and on models whose shapes are refused or that it leaves to the
build's steps."""
from __future__ import annotations

import importlib
import io
from contextlib import redirect_stdout

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln.cli
import kiln.onnx

check_module = importlib.import_module("kiln.onnx.check")


def _model(nodes, inputs, inits, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.UNDEFINED, None)],
                          [numpy_helper.from_array(v if isinstance(v, np.ndarray) else
                                                   rng.standard_normal(v).astype(np.float32), n)
                           for n, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def conv_gemm_matmul() -> onnx.ModelProto:
    """Conv → BatchNorm → Relu → MaxPool → Flatten → Gemm → MatMul → Softmax."""
    n = helper.make_node
    return _model([n("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
                   n("BatchNormalization", ["c", "s", "o", "m", "v"], ["bn"]), n("Relu", ["bn"], ["r"]),
                   n("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), n("Flatten", ["p"], ["f"]),
                   n("Gemm", ["f", "fw", "fb"], ["g"], transB=1), n("MatMul", ["g", "mw"], ["mm"]),
                   n("Softmax", ["mm"], ["y"])], [("x", [2, 3, 16, 16])],
                  [("w", (8, 3, 3, 3)), ("b", (8,)), ("s", (8,)), ("o", (8,)), ("m", (8,)),
                   ("v", np.full(8, 0.5, np.float32)), ("fw", (10, 128)), ("fb", (10,)), ("mw", (10, 4))])


def attention_block() -> onnx.ModelProto:
    """x[1,6,16] → LayerNorm → q/k/v MatMuls → Reshape (constant) → Transpose → scores → Softmax → context."""
    n = helper.make_node
    heads = np.array([1, 6, 2, 8], np.int64)
    nodes = [n("LayerNormalization", ["x", "g", "be"], ["ln"], axis=-1)]
    for p in "qkv":
        nodes += [n("MatMul", ["ln", f"w{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  n("Reshape", [f"{p}1", "heads"], [f"{p}2"]), n("Transpose", [f"{p}2"], [p], perm=[0, 2, 1, 3])]
    nodes += [n("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), n("MatMul", ["q", "kt"], ["qk"]),
              n("Mul", ["qk", "scale"], ["sc"]), n("Softmax", ["sc"], ["a"]), n("MatMul", ["a", "v"], ["ctx"]),
              n("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3]), n("Reshape", ["ct", "flat"], ["cf"]),
              n("Gelu", ["cf"], ["y"], domain="")]
    inits = [("g", (16,)), ("be", (16,)), ("heads", heads), ("flat", np.array([1, 6, 16], np.int64)),
             ("scale", np.full((), 0.35, np.float32))]
    inits += [(f"w{p}", (16, 16)) for p in "qkv"] + [(f"b{p}", (16,)) for p in "qkv"]
    return _model(nodes, [("x", [1, 6, 16])], inits, opset=20)


def decoder() -> onnx.ModelProto:
    """ConvTranspose → Concat (skip) → Conv 1x1 → ReduceMean → Sigmoid → Squeeze → Unsqueeze."""
    n = helper.make_node
    return _model([n("ConvTranspose", ["x", "w"], ["u"], strides=[2, 2]), n("Concat", ["u", "skip"], ["c"], axis=1),
                   n("Conv", ["c", "w1"], ["h"]), n("ReduceMean", ["h", "ax"], ["r"], keepdims=1),
                   n("Sigmoid", ["r"], ["s"]), n("Squeeze", ["s", "sq"], ["q"]), n("Unsqueeze", ["q", "sq"], ["y"])],
                  [("x", [1, 4, 5, 5]), ("skip", [1, 2, 10, 10])],
                  [("w", (4, 3, 2, 2)), ("w1", (1, 5, 1, 1)), ("ax", np.array([2, 3], np.int64)),
                   ("sq", np.array([3], np.int64))], opset=18)


def flatten_by_shape() -> onnx.ModelProto:
    """A torch export's flatten: Shape → Gather → Unsqueeze, Concat with -1 → Reshape → Gemm."""
    n = helper.make_node
    return _model([n("Relu", ["x"], ["r"]), n("Shape", ["r"], ["s"]), n("Gather", ["s", "zero"], ["b"], axis=0),
                   n("Unsqueeze", ["b", "ax"], ["bu"]), n("Concat", ["bu", "minus1"], ["target"], axis=0),
                   n("Reshape", ["r", "target"], ["f"]), n("Gemm", ["f", "w"], ["y"], transB=1)],
                  [("x", [2, 3, 4, 4])], [("zero", np.array(0, np.int64)), ("ax", np.array([0], np.int64)),
                                          ("minus1", np.array([-1], np.int64)), ("w", (5, 48))])


def k_mismatch() -> onnx.ModelProto:
    """A MatMul whose inner dims differ (6 vs 5): no rule answers, the build's steps decide."""
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 6])], [("w", (5, 3))])


def too_large() -> onnx.ModelProto:
    """A 1x1 convolution to 4096 channels at 256x256 (1 GiB of float32 output): over the closed-form bound."""
    return _model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 1, 256, 256])], [("w", (4096, 1, 1, 1))])


def resize() -> onnx.ModelProto:
    """Resize by constant scales: a kind without a closed-form rule here."""
    return _model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest")], [("x", [1, 2, 4, 4])],
                  [("sc", np.array([1, 1, 2, 2], np.float32))])


CLEARED = {"conv_gemm_matmul": conv_gemm_matmul, "attention_block": attention_block, "decoder": decoder,
           "flatten_by_shape": flatten_by_shape}
LEFT_TO_THE_BUILD = {"k_mismatch": k_mismatch, "too_large": too_large, "resize": resize}


def _verdict(path, monkeypatch, closed_form: bool) -> tuple[int, str, list]:
    """`kiln check` output and exit code, and kiln.onnx.check's findings, with or without the closed form."""
    if not closed_form:
        monkeypatch.setattr(check_module, "_nothing_to_refuse", lambda net: False)
    out = io.StringIO()
    with redirect_stdout(out):
        code = kiln.cli.main(["check", str(path)])
    return code, out.getvalue(), kiln.onnx.check(str(path))


@pytest.mark.parametrize("name", sorted(CLEARED) + sorted(LEFT_TO_THE_BUILD))
def test_the_closed_form_verdict_is_the_build_steps(name, tmp_path, monkeypatch):
    model = {**CLEARED, **LEFT_TO_THE_BUILD}[name]()
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    cleared = check_module._nothing_to_refuse(kiln.onnx.parse(model))
    assert cleared == (name in CLEARED)
    fast = _verdict(path, monkeypatch, True)
    assert fast == _verdict(path, monkeypatch, False)
    if cleared:
        assert fast[0] == 0 and fast[2] == [] and "every node is supported" in fast[1]


def test_a_shape_the_tactic_refuses_goes_to_the_build_steps(tmp_path, monkeypatch):
    """A convolution whose kernel is larger than its input: the closed form declines it, and the verdict is
    the build's steps'."""
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 1, 2, 2])], [("w", (1, 1, 3, 3))])
    assert not check_module._nothing_to_refuse(kiln.onnx.parse(model))
    path = tmp_path / "small.onnx"
    onnx.save(model, str(path))
    assert _verdict(path, monkeypatch, True) == _verdict(path, monkeypatch, False)


@pytest.mark.parametrize("name", ["conv_bn", "unet", "mobilenet_v3"])
def test_test_models_at_a_static_batch(name, model_case, tmp_path, monkeypatch):
    """The suite's exported models (dynamic batch fixed at 1): cleared, and the same verdict as the build's."""
    model = onnx.load(str(model_case(name).path))
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    assert check_module._nothing_to_refuse(kiln.onnx.parse(model))
    assert _verdict(path, monkeypatch, True) == _verdict(path, monkeypatch, False)


@pytest.mark.parametrize("name", ["flatten_by_shape", "too_large"])
def test_the_network_keeps_its_shapes(name):
    """The closed form writes the shapes it follows into the tensors and puts the parsed ones back (the build's
    steps, which run on the same network where it declines, see what the parser gave)."""
    net = kiln.onnx.parse({**CLEARED, **LEFT_TO_THE_BUILD}[name]())
    before = {t.name: t.shape for t in net.tensors.values()}
    check_module._nothing_to_refuse(net)
    assert {t.name: t.shape for t in net.tensors.values()} == before
