"""One way from an ONNX node to a Plugin layer, for Kiln's built-in plugin ops (RoiAlign, ...) and for
a user's plugin alike: the plugin's ``onnx_fields`` reads the node's attributes, and a bad attribute
is refused in one line that names the node."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.errors import PluginError
from kiln.plugins import Plugin, TensorDesc, field, registry


def _roi_model(**attrs) -> object:
    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], name="roi", output_height=2, output_width=2,
                            **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                                            helper.make_tensor_value_info("rois", TensorProto.FLOAT, [1, 4]),
                                            helper.make_tensor_value_info("idx", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def test_builtin_plugin_op_errors_name_the_node() -> None:
    with pytest.raises(PluginError) as info:
        kiln.onnx.parse(_roi_model(mode="median"))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Node 'roi' (RoiAlign): ") and "'mode'" in msg and "median" in msg, msg


def test_builtin_plugin_op_reads_its_attributes() -> None:
    net = kiln.onnx.parse(_roi_model(mode="max", spatial_scale=0.5))
    (layer,) = [la for la in net.layers if la.kind == "Plugin"]
    plugin = layer.attrs["plugin"]
    assert (plugin.mode, plugin.spatial_scale, plugin.output_height, plugin.coordinate_transformation_mode) == \
        ("max", 0.5, 2, "half_pixel")


class _Scale(Plugin):
    """A user plugin that declares no onnx_fields: the node's attributes are its fields."""

    name = "ScaleBy"
    namespace = "test.nodes"
    version = "1"
    factor = field(float, 1.0)
    offsets = field(list, [])
    tactics = {"cpu": ("torch",), "cuda": ("torch",)}

    def output_descs(self, inputs):
        return [TensorDesc(inputs[0].shape, inputs[0].dtype)]

    def forward(self, inputs, outputs, workspace, tactic):
        outputs[0].copy_(inputs[0] * self.factor + sum(self.offsets))


def test_a_plugin_without_onnx_fields_takes_the_attributes_as_fields() -> None:
    assert _Scale.onnx_fields({"factor": 2.0}, 17) == {"factor": 2.0}
    node = helper.make_node("ScaleBy", ["x"], ["y"], name="s", domain="test.nodes", factor=3.0, offsets=[1, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.nodes", 1)])
    cls = registry.register(_Scale)
    try:
        engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu"))
        x = np.array([1.0, -2.0, 0.5], np.float32)
        np.testing.assert_allclose(engine.context().run({"x": x})["y"], x * 3.0 + 3.0)
        bad = helper.make_node("ScaleBy", ["x"], ["y"], name="s", domain="test.nodes", factor="big")
        model.graph.node[0].CopyFrom(bad)
        with pytest.raises(PluginError, match=r"^Node 's' \(ScaleBy\): .*'factor'"):
            kiln.onnx.parse(model)
    finally:
        registry.unregister(cls.name, cls.namespace, cls.version)
