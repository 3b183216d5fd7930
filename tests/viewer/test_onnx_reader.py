"""The ONNX reader: detection, shapes, lazy and external weights, subgraphs, categories, documentation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import ViewerError
from kiln.viewer import samples
from kiln.viewer.formats import detect, open_model
from kiln.viewer.formats import _onnx_proto as onnx_proto
from kiln.viewer.formats import onnx as reader


def test_detects_onnx_by_content(yolo_path, tmp_path):
    assert detect(yolo_path).name == "ONNX"
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(yolo_path.read_bytes())
    assert reader.sniff(renamed, renamed.read_bytes()[:4096])
    assert not reader.sniff(renamed, b"\x0a\x05hello")             # a TensorFlow GraphDef starts with field 1
    assert not reader.sniff(renamed, b"PK\x03\x04 zip")


def test_reads_yolo(yolo_path):
    m = open_model(yolo_path)
    assert m.format == "ONNX" and m.version == "opset 17" and m.producer == "pytorch 2.4.0"
    g = m.graph
    conv = g.nodes[0]
    assert conv.name == "/model.0/conv/Conv" and conv.category == "conv" and conv.group == ("model.0", "conv")
    assert [a.name for a in conv.inputs] == ["X", "W", "B"]
    assert conv.attributes["kernel_shape"] == [6, 6]
    out = conv.outputs[0].values[0]
    assert g.tensors[out].shape == [1, 16, 320, 320] and g.tensors[out].dtype == "float"
    assert "convolution" in conv.doc.lower() and "### Attributes" in conv.doc
    assert {n.category for n in g.nodes} >= {"conv", "activation", "elementwise", "pooling", "tensor", "shape"}
    assert m.file_size == yolo_path.stat().st_size


def test_weights_are_lazy(yolo_path, monkeypatch):
    calls = []
    real = onnx_proto.to_array
    monkeypatch.setattr(onnx_proto, "to_array", lambda t, *a, **k: calls.append(t.one("name")) or real(t, *a, **k))
    m = open_model(yolo_path)
    assert calls == []                                  # nothing converted while reading
    w = m.graph.weights["model.0.conv.weight"]
    assert w.shape == [16, 3, 6, 6] and w.nbytes == 16 * 3 * 6 * 6 * 4
    arr = w.load()
    assert arr.shape == (16, 3, 6, 6) and calls == ["model.0.conv.weight"]


def test_external_data_is_read_on_demand(tmp_path):
    model = samples.mini_yolo()
    expected = numpy_helper.to_array([t for t in model.graph.initializer if t.name == "model.1.conv.weight"][0])
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    m = open_model(tmp_path / "ext.onnx")
    w = m.graph.weights["model.1.conv.weight"]
    np.testing.assert_array_equal(w.load(), expected)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ViewerError, match="missing"):
        m.graph.weights["model.2.cv1.conv.weight"].load()


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    t = numpy_helper.from_array(np.ones(4, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Relu", ["w"], ["y"], name="r")], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
    sub = tmp_path / "sub"
    sub.mkdir()
    onnx.save(helper.make_model(g), sub / "m.onnx")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    m = open_model(sub / "m.onnx")
    with pytest.raises(ViewerError, match="outside"):
        m.graph.weights["w"].load()


def test_control_flow_bodies_become_subgraphs(control_flow_path):
    g = open_model(control_flow_path).graph
    if_node = next(n for n in g.nodes if n.op_type == "If")
    assert set(if_node.subgraphs) == {"then_branch", "else_branch"} and if_node.category == "control"
    assert if_node.inputs[-1].name == "(outer scope)" and "x" in if_node.inputs[-1].values
    els = if_node.subgraphs["else_branch"]
    assert [n.op_type for n in els.nodes] == ["Neg", "Sigmoid"]
    assert els.tensors["x"].shape == [2, 3]                 # outer-scope value keeps its shape
    loop = next(n for n in g.nodes if n.op_type == "Loop")
    assert [t.name for t in loop.subgraphs["body"].inputs] == ["iter", "cond_in", "acc_in"]


def test_text_format_and_custom_domain(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17, "kiln.plugins" : 1]>
    agraph (float[N, 4] x) => (float[N, 4] y) {
        t = Relu(x)
        y = kiln.plugins.MyPlugin <alpha = 0.5> (t)
    }"""
    p = tmp_path / "m.onnxtxt"
    p.write_text(text)
    g = open_model(p).graph
    assert [n.op_type for n in g.nodes] == ["Relu", "MyPlugin"]
    assert g.nodes[1].category == "plugin" and g.nodes[1].properties["domain"] == "kiln.plugins"
    assert g.nodes[1].attributes == {"alpha": 0.5}


def test_malformed_files_raise_one_clear_error(tmp_path, yolo_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(yolo_path.read_bytes()[:3000])
    with pytest.raises(ViewerError) as info:
        open_model(cut)
    assert "cut.onnx" in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ViewerError, match="not a model format|cannot be read|not a valid ONNX"):
        open_model(junk)
