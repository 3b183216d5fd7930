"""docs/contributing.md's "Adding a layer kind" example, run as written: its three snippets make a
Softcap kind that a custom-domain ONNX node parses into, builds and runs, checked against numpy."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln.errors import NetworkError
from kiln.ir import layers
from kiln.ir.layers import LAYER_KINDS, attr, attr_default, define_layer
from kiln.kernels import registry as kernels
from kiln.onnx import registry as converters

DOC = Path(__file__).resolve().parents[2] / "docs" / "contributing.md"


def _snippets() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Adding a layer kind"):]
    section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def softcap():
    """The example's kind, tactic and converter, registered for one test and removed after it."""
    namespace = {"define_layer": define_layer, "attr": attr, "attr_default": attr_default, "torch": torch,
                 "tactic": kernels.tactic, "converter": converters.converter}
    kernels._load_all()
    converters._load_all()
    try:
        for code in _snippets():
            exec(compile(code, str(DOC), "exec"), namespace)        # noqa: S102 - the documented example
        yield
    finally:
        LAYER_KINDS.pop("Softcap", None)
        kernels.TACTICS.pop("Softcap", None)
        converters.CONVERTERS.pop(("com.example", "Softcap"), None)


def _model(cap: float | None):
    attrs = {} if cap is None else {"cap": cap}
    node = helper.make_node("Softcap", ["x"], ["y"], name="cap", domain="com.example", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.example", 1)])


def test_the_documented_kind_parses_builds_and_runs(softcap) -> None:
    assert len(_snippets()) == 3
    x = np.random.default_rng(0).normal(0.0, 40.0, (2, 5)).astype(np.float32)
    for cap in (None, 5.0):
        engine = kiln.build(kiln.onnx.parse(_model(cap)), kiln.BuildConfig(device="cpu"))
        got = engine.context().run({"x": x})["y"]
        c = 30.0 if cap is None else cap
        np.testing.assert_allclose(got, c * np.tanh(x.astype(np.float64) / c), rtol=1e-6, atol=1e-5)


def test_the_documented_schema_refuses_a_bad_attribute(softcap) -> None:
    net = kiln.Network("t")
    x = net.add_input("x", "float32", (2,))
    with pytest.raises(NetworkError, match="'cap'"):
        net.add_layer("Softcap", [x], {"cap": "big"})
    assert layers.attr_default("Softcap", "cap") == 30.0
