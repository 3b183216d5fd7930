"""Converters and ONNX's operator versions: the schema in force comes from onnx.defs, and a converter
is not used for a version of its op that ONNX made after the opsets the converters were written for."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.errors import UnsupportedOperatorError
from kiln.onnx import registry


def _cast_model(opset: int) -> onnx.ModelProto:
    node = helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.FLOAT16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_schema_versions_come_from_onnx_defs() -> None:
    """Cast's schema versions (onnx's operator changelog): 21, 23 and 24 among them."""
    assert registry.schema_since("Cast", 22) == 21
    assert registry.schema_since("Cast", 23) == 23
    assert registry.schema_since("Cast", 24) == 24
    assert registry.schema_since("Relu", 24) == 14
    assert registry.schema_since("NotAnOp", 24) is None
    assert registry.schema_since("FusedConv", 1, "com.microsoft") is None


def test_a_change_after_the_checked_opset_is_not_given_to_an_old_converter(monkeypatch) -> None:
    """Cast gained round_mode in opset 24. With converters checked only up to opset 23, a Cast-24 node
    is refused with the reason, a Cast-23 node still converts, and an op unchanged since (Relu) too."""
    monkeypatch.setattr(registry, "CHECKED_OPSET", 23)
    assert registry.lookup("Cast", 23) is not None
    assert registry.lookup("Cast", 24) is None
    assert registry.lookup("Relu", 24) is not None           # Relu's schema at opset 24 is Relu-14
    assert registry.stale_reason("Cast", 23) is None
    assert "opset 24" in registry.stale_reason("Cast", 24)
    kiln.onnx.parse(_cast_model(23))
    with pytest.raises(UnsupportedOperatorError) as info:
        kiln.onnx.parse(_cast_model(24))
    msg = str(info.value)
    assert "\n" not in msg and "'cast'" in msg and "ONNX changed Cast in opset 24" in msg and "plugin" in msg, msg


def test_every_opset_onnx_defines_is_checked() -> None:
    """CHECKED_OPSET keeps up with the installed onnx: every model the installed onnx can describe is
    converted as before (no schema version is newer than the checked opset)."""
    from onnx import defs
    assert registry.CHECKED_OPSET >= defs.onnx_opset_version()
    net = kiln.onnx.parse(_cast_model(24))
    engine = kiln.build(net, kiln.BuildConfig(device="cpu"))
    got = engine.context().run({"x": np.array([1.5, -2.25], np.float32)})["y"]
    assert got.dtype == np.float16 and got.tolist() == [1.5, -2.25]
