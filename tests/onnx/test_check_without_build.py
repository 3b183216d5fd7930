"""`kiln check` skips the build's steps (and torch) only where they provably refuse nothing: the networks it
clears pass ``prepare`` on the CPU, and every network outside the closed form still goes through ``prepare``."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln.onnx
from kiln.builder.config import BuildConfig
from kiln.builder.memory import DEVICE_QUERY_BYTES

check_module = importlib.import_module("kiln.onnx.check")    # the packages' ``check`` and ``build`` are functions
build_module = importlib.import_module("kiln.builder.build")
prepare = build_module.prepare


def _model(nodes, inputs, inits=(), opset=17):
    outs = [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.UNDEFINED, None)]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          outs, [numpy_helper.from_array(np.asarray(v), n) for n, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


_CLEARED = {
    "relu": _model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])]),
    "chain": _model([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["m"]),
                     helper.make_node("Softmax", ["m"], ["p"]), helper.make_node("Cast", ["p"], ["y"], to=10)],
                    [("x", [2, 3, 5])]),
    "broadcast": _model([helper.make_node("Add", ["x", "z"], ["a"]), helper.make_node("Max", ["a", "c"], ["y"])],
                        [("x", [3, 1]), ("z", [1, 4])], [("c", np.float32(0.5))]),
    "layernorm": _model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)], [("x", [2, 8])],
                        [("g", np.ones(8, np.float32)), ("b", np.zeros(8, np.float32))]),
    "conv": _model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 1, 4, 4])],
                   [("w", np.ones((1, 1, 3, 3), np.float32))]),
    "auto_pad": _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], auto_pad="SAME_UPPER")],
                       [("x", [1, 1, 4, 4])]),       # static shapes: the parser resolves the padding
    "flatten_gemm": _model([helper.make_node("Flatten", ["x"], ["f"]),
                            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)], [("x", [2, 3, 2])],
                           [("w", np.ones((5, 6), np.float32))]),
}


@pytest.mark.parametrize("name", sorted(_CLEARED))
def test_what_the_rule_clears_passes_the_builds_steps(name):
    net = kiln.onnx.parse(_CLEARED[name])
    assert check_module._nothing_to_refuse(net)
    prepare(net, BuildConfig(device="cpu"))          # refuses nothing (it would raise)
    assert kiln.onnx.check(_CLEARED[name]) == []


_BIG = 1 << 14          # [1, 2^14] + [2^14, 1] broadcasts to 2^28 elements: over the bound at 16 bytes each
_OUTSIDE = {
    "dynamic": _model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", 4])]),
    "tile": _model([helper.make_node("Tile", ["x", "r"], ["y"])], [("x", [1, 4])], [("r", np.array([2, 2]))]),
    "constant_of_shape": _model([helper.make_node("Shape", ["x"], ["s"]),
                                 helper.make_node("ConstantOfShape", ["s"], ["y"])], [("x", [1, 4])]),
    "resize": _model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest")], [("x", [1, 1, 4, 4])],
                     [("sc", np.array([1, 1, 2, 2], np.float32))]),
    "large": _model([helper.make_node("Add", ["x", "z"], ["y"])], [("x", [1, _BIG]), ("z", [_BIG, 1])]),
}


@pytest.mark.parametrize("name", sorted(_OUTSIDE))
def test_everything_else_runs_the_builds_steps(name, monkeypatch):
    net = kiln.onnx.parse(_OUTSIDE[name])
    assert not check_module._nothing_to_refuse(net)
    ran = []
    monkeypatch.setattr(build_module, "prepare", lambda network, config, progress=None: ran.append(config))
    kiln.onnx.check(_OUTSIDE[name], shapes={"x": (1, 4)} if name == "dynamic" else None)
    assert len(ran) == 1


def test_a_profile_another_device_or_fallback_runs_the_builds_steps(monkeypatch):
    ran = []
    monkeypatch.setattr(build_module, "prepare", lambda network, config, progress=None: ran.append(config.device))
    model = _CLEARED["relu"]
    kiln.onnx.check(model, shapes={"x": (1, 4)})
    kiln.onnx.check(model, device="cuda")
    kiln.onnx.check(model)
    kiln.onnx.check(model, device=None)
    assert ran == ["cpu", "cuda"]


def test_a_profile_that_does_not_fit_is_still_found():
    found = kiln.onnx.check(_CLEARED["relu"], shapes={"x": (1, 5)})
    assert [(f["stage"], f["name"]) for f in found] == [("build", "(model)")]
    assert "fixes it at 4" in found[0]["reason"]


def test_the_bound_is_the_builders():
    assert check_module._NO_REFUSAL_BYTES == DEVICE_QUERY_BYTES
