"""The cleanup passes: each rewrite happens, and the rewritten network computes the same values.

Structure is checked on the pass's own output; values by building that output and
comparing with ONNX Runtime (for ONNX graphs) or numpy (for hand-built networks).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from _models import assert_close_fp32, export, ort_run, randomize_bn
from kiln.builder.shapes import infer_shapes
from kiln.passes import PassManager, default_passes
from kiln.passes.bn_fold import FoldBatchNorm
from kiln.passes.constant_fold import ConstantFold
from kiln.passes.dead_layers import RemoveDeadLayers
from kiln.passes.identity import RemoveIdentities

RNG = np.random.default_rng(0)


def kinds(net: kiln.Network) -> list[str]:
    return [l.kind for l in net.layers]


def build_run(net: kiln.Network, feeds: dict[str, np.ndarray], profiles=None) -> dict[str, np.ndarray]:
    return kiln.build(net, kiln.BuildConfig(device="cpu", profiles=profiles)).context().run(feeds)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---- constant folding -----------------------------------------------------------------------

def _foldable_onnx(path: Path) -> Path:
    """x + ((c * 2) - 1) reshaped by a shape computed from a static Shape: all but the Add/Reshape fold."""
    c = RNG.standard_normal((3, 4)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["c", "two"], ["c2"]),
             helper.make_node("Sub", ["c2", "one"], ["c3"]),
             helper.make_node("Exp", ["c3"], ["c4"]),
             helper.make_node("Add", ["x", "c4"], ["s"]),
             helper.make_node("Shape", ["s"], ["shp"]),
             helper.make_node("ReduceProd", ["shp"], ["n"], keepdims=1),
             helper.make_node("Reshape", ["s", "n"], ["y"])]
    g = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12])],
                          [numpy_helper.from_array(c, "c"), numpy_helper.from_array(np.float32(2), "two"),
                           numpy_helper.from_array(np.float32(1), "one")])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_constant_folding(tmp_path: Path) -> None:
    path = _foldable_onnx(tmp_path / "fold.onnx")
    net = kiln.onnx.parse(path)
    infer_shapes(net)
    before = kinds(net)
    result = ConstantFold()(net)
    assert result.modified and result.network is net
    assert len(net.layers) < len(before)
    assert "Shape" not in kinds(net) and "Unary" not in kinds(net)      # static Shape and the exp chain fold
    assert kinds(net).count("ElementWise") == 1                         # only x + c4 is left
    assert not ConstantFold()(net).modified                             # nothing left to fold
    feeds = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}
    assert_close_fp32(build_run(net, feeds)["y"], ort_run(path, feeds)["y"])


def test_constant_folding_keeps_huge_results_as_layers() -> None:
    net = kiln.Network("big")
    x = net.add_input("x", "float32", (1000,))
    shape = net.add_constant(np.array([1000], np.int64))
    fill = net.add_layer("ConstantOfShape", [shape], {"value": np.array([0.5], np.float32)}, name="fill")
    net.mark_output(net.add_elementwise(x, fill.output, "sum").output, "y")
    assert not ConstantFold(max_elements=100)(net).modified
    assert "ConstantOfShape" in kinds(net)
    assert ConstantFold()(net).modified
    assert "ConstantOfShape" not in kinds(net)
    xv = RNG.standard_normal(1000).astype(np.float32)
    np.testing.assert_allclose(build_run(net, {"x": xv})["y"], xv + 0.5, rtol=1e-6)


def test_constant_folding_of_an_output_keeps_its_name() -> None:
    net = kiln.Network("constout")
    x = net.add_input("x", "float32", (2,))
    c = net.add_unary(net.add_constant(np.array([1.0, 4.0], np.float32)), "sqrt", name="root").output
    net.mark_output(c, "root_out")
    net.mark_output(net.add_activation(x, "relu").output, "y")
    ConstantFold()(net)
    assert [t.name for t in net.outputs] == ["root_out", "y"]
    out = build_run(net, {"x": np.array([-1.0, 3.0], np.float32)})
    np.testing.assert_array_equal(out["root_out"], [1.0, 2.0])
    np.testing.assert_array_equal(out["y"], [0.0, 3.0])


# ---- dead-layer removal ---------------------------------------------------------------------

def test_dead_layer_removal() -> None:
    net = kiln.Network("dead")
    x = net.add_input("x", "float32", (2, 3))
    live = net.add_activation(x, "relu", name="live").output
    dead1 = net.add_unary(x, "exp", name="dead1").output
    net.add_elementwise(dead1, net.add_constant(np.ones((2, 3), np.float32), name="unused_w"), "sum", name="dead2")
    net.mark_output(live, "y")
    result = RemoveDeadLayers()(net)
    assert result.modified
    assert [l.name for l in net.layers] == ["live"]
    assert "unused_w" not in net.tensors and "dead1_out" not in net.tensors
    assert not RemoveDeadLayers()(net).modified
    xv = RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(build_run(net, {"x": xv})["y"], np.maximum(xv, 0))


def test_dead_layer_removal_keeps_layers_feeding_any_output() -> None:
    net = kiln.Network("keep")
    x = net.add_input("x", "float32", (4,))
    a = net.add_unary(x, "neg", name="a").output
    b = net.add_unary(a, "exp", name="b").output
    net.mark_output(a, "a")
    net.mark_output(b, "b")
    assert not RemoveDeadLayers()(net).modified
    assert [l.name for l in net.layers] == ["a", "b"]


def test_unused_onnx_branch_is_dropped(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["unused"]),
             helper.make_node("MatMul", ["unused", "w"], ["unused2"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                          [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")])
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "d.onnx")
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(device="cpu"))
    assert [l["kind"] for l in engine.layers] == ["Activation"]
    assert not engine.plan["weights"], "the unused MatMul weight must not be stored"
    feeds = {"x": RNG.standard_normal((2, 2)).astype(np.float32)}
    np.testing.assert_array_equal(engine.context().run(feeds)["y"], ort_run(path, feeds)["y"])


# ---- identity removal -----------------------------------------------------------------------

def test_identity_and_noop_removal() -> None:
    net = kiln.Network("ids")
    x = net.add_input("x", "float32", (2, 3))
    y = net.add_identity(x, name="id1").output
    y = net.add_cast(y, "float32", name="cast_same").output
    y = net.add_shuffle(y, reshape=(2, 3), name="reshape_same").output
    y = net.add_flatten(y, 1, name="flatten_same").output
    y = net.add_activation(y, "tanh", name="tanh").output
    y = net.add_identity(y, name="id2").output
    y = net.add_shuffle(y, first_transpose=(1, 0), name="real_transpose").output
    net.mark_output(y, "y")
    infer_shapes(net)
    result = RemoveIdentities()(net)
    assert result.modified
    assert [l.name for l in net.layers] == ["tanh", "real_transpose"]
    assert [t.name for t in net.outputs] == ["y"]
    xv = RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(build_run(net, {"x": xv})["y"], np.tanh(xv).T, rtol=1e-6)


def test_identity_to_output_renames_the_producer() -> None:
    net = kiln.Network("rename")
    x = net.add_input("x", "float32", (3,))
    r = net.add_activation(x, "relu", name="relu").output
    net.mark_output(net.add_identity(r, name="id").output, "out")
    RemoveIdentities()(net)
    assert [l.name for l in net.layers] == ["relu"]
    assert net.outputs[0].name == "out" and net.outputs[0].producer.name == "relu"


def test_identity_between_input_and_output_is_kept() -> None:
    net = kiln.Network("passthrough")
    x = net.add_input("x", "float32", (3,))
    net.mark_output(net.add_identity(x).output, "y")
    assert not RemoveIdentities()(net).modified
    xv = np.array([1.0, -2.0, 3.0], np.float32)
    np.testing.assert_array_equal(build_run(net, {"x": xv})["y"], xv)


def test_cast_to_another_dtype_is_kept() -> None:
    net = kiln.Network("cast")
    x = net.add_input("x", "float32", (3,))
    net.mark_output(net.add_cast(x, "int64").output, "y")
    infer_shapes(net)
    assert not RemoveIdentities()(net).modified


# ---- BatchNorm folding ----------------------------------------------------------------------

class _DeconvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.up(x))


class _SharedConvBN(nn.Module):
    """The conv output feeds the BN and something else: folding into the conv would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.bn_in = nn.BatchNorm2d(3)

    def forward(self, x):
        c = self.conv(self.bn_in(x))      # BN straight after the input: becomes a Scale
        return self.bn(c) + torch.relu(c)


class _ConvBNNoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=False, groups=1)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.dw(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("module,folded_into", [(_ConvBNNoBias, "Convolution"), (_DeconvBN, "Deconvolution"),
                                                (_SharedConvBN, None)], ids=["conv", "deconv-grouped", "shared"])
def test_batchnorm_folding(module, folded_into, tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = randomize_bn(module(), seed=7).eval()
    cin = 4 if module is _DeconvBN else 3
    path = export(m, (torch.randn(2, cin, 8, 8),), tmp_path / "bn.onnx", ["x"], ["y"], {"x": {0: "n"}, "y": {0: "n"}})
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    net = kiln.onnx.parse(path)
    n_bn = sum(1 for l in net.layers if l.kind == "Normalization")
    before = copy.deepcopy(net)
    assert FoldBatchNorm()(net).modified
    assert not [l for l in net.layers if l.kind == "Normalization"], kinds(net)
    if folded_into:
        assert len(net.layers) == len(before.layers) - n_bn, "each BN should disappear into its producer"
    else:
        assert kinds(net).count("Scale") == 2       # both BNs stay as one Scale each
    feeds = {"x": RNG.standard_normal((3, cin, 8, 8)).astype(np.float32)}
    profiles = {"x": ((1, cin, 8, 8), (3, cin, 8, 8), (4, cin, 8, 8))}
    ref = ort_run(path, feeds)["y"]
    assert_close_fp32(build_run(net, feeds, profiles)["y"], ref, "folded network")
    assert_close_fp32(build_run(before, feeds, profiles)["y"], ref, "network before the pass")


def test_default_passes_converge() -> None:
    """The pass manager stops: a second run over a settled network changes nothing."""
    net = kiln.Network("settle")
    x = net.add_input("x", "float32", (2, 3))
    c = net.add_unary(net.add_constant(np.full((2, 3), 4.0, np.float32)), "sqrt").output
    y = net.add_identity(net.add_elementwise(x, c, "prod").output).output
    net.add_unary(x, "exp")
    net.mark_output(y, "y")
    infer_shapes(net)
    assert PassManager(default_passes())(net).modified
    assert not PassManager(default_passes())(net).modified
    assert kinds(net) == ["ElementWise"]
    xv = RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(build_run(net, {"x": xv})["y"], xv * 2, rtol=1e-6)
