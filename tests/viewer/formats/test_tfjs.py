"""TensorFlow.js model.json + weight shards (graph and layers models), written as the converter lays them out."""
from __future__ import annotations

import json

import numpy as np

from kiln.viewer.formats import open_model

from .conftest import check_detect, check_export, edges, input_weight, node


def graph_model(d):
    topology = {"node": [
        {"name": "x", "op": "Placeholder", "attr": {"dtype": {"type": "DT_FLOAT"},
                                                     "shape": {"shape": {"dim": [{"size": "-1"}, {"size": "4"}]}}}},
        {"name": "dense/kernel", "op": "Const", "attr": {"dtype": {"type": "DT_FLOAT"}, "value": {"tensor": {
            "dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": "4"}, {"size": "2"}]}}}}},
        {"name": "dense/bias", "op": "Const", "attr": {"dtype": {"type": "DT_FLOAT"}, "value": {"tensor": {
            "dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": "2"}]}}}}},
        {"name": "dense/MatMul", "op": "MatMul", "input": ["x", "dense/kernel"],
         "attr": {"transpose_a": {"b": False}}},
        {"name": "dense/BiasAdd", "op": "BiasAdd", "input": ["dense/MatMul", "dense/bias"]},
        {"name": "Identity", "op": "Identity", "input": ["dense/BiasAdd"]},
    ], "versions": {"producer": 1482}}
    kernel = np.arange(8, dtype=np.float32).reshape(4, 2)
    data = kernel.tobytes() + np.array([10, 20], np.uint8).tobytes()
    (d / "group1-shard1of2.bin").write_bytes(data[:20])
    (d / "group1-shard2of2.bin").write_bytes(data[20:])
    manifest = [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"], "weights": [
        {"name": "dense/kernel", "shape": [4, 2], "dtype": "float32"},
        {"name": "dense/bias", "shape": [2], "dtype": "float32",
         "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}}]}]
    p = d / "model.json"
    p.write_text(json.dumps({"format": "graph-model", "generatedBy": "2.15.0", "convertedBy": "TensorFlow.js Converter",
                             "modelTopology": topology, "weightsManifest": manifest}))
    return p


def layers_model(d):
    topology = {"class_name": "Sequential", "keras_version": "tfjs-layers 4.0.0", "backend": "tensor_flow.js",
                "config": {"name": "seq", "layers": [
                    {"class_name": "Dense", "config": {"name": "d1", "units": 3, "activation": "relu",
                                                       "batch_input_shape": [None, 5]}},
                    {"class_name": "Dense", "config": {"name": "d2", "units": 1}}]}}
    w = [np.arange(15, dtype=np.float32).reshape(5, 3), np.zeros(3, np.float32),
         np.ones((3, 1), np.float32), np.zeros(1, np.float32)]
    (d / "weights.bin").write_bytes(b"".join(a.tobytes() for a in w))
    manifest = [{"paths": ["weights.bin"], "weights": [
        {"name": "d1/kernel", "shape": [5, 3], "dtype": "float32"}, {"name": "d1/bias", "shape": [3], "dtype": "float32"},
        {"name": "d2/kernel", "shape": [3, 1], "dtype": "float32"}, {"name": "d2/bias", "shape": [1], "dtype": "float32"}]}]
    p = d / "layers.json"
    p.write_text(json.dumps({"format": "layers-model", "modelTopology": topology, "weightsManifest": manifest}))
    return p


def test_graph_model(tmp_path):
    model = open_model(graph_model(tmp_path))
    g = model.graph
    assert model.format == "TensorFlow.js" and model.properties["model_format"] == "graph-model"
    assert [n.op_type for n in g.nodes] == ["MatMul", "BiasAdd", "Identity"]
    assert edges(g) == {("dense/MatMul", "dense/BiasAdd"), ("dense/BiasAdd", "Identity")}
    mm = node(g, "dense/MatMul")
    assert mm.group == ("dense",)
    k = input_weight(g, mm, "b")
    assert k.shape == [4, 2] and k.load()[3, 1] == 7   # spans both shards
    assert input_weight(g, node(g, "dense/BiasAdd"), "bias").load().tolist() == [4.0, 9.0]   # dequantized
    assert g.inputs[0].shape == [None, 4]


def test_layers_model(tmp_path):
    model = open_model(layers_model(tmp_path))
    g = model.graph
    assert model.properties["model_format"] == "layers-model"
    assert [n.op_type for n in g.nodes] == ["Dense", "Dense"] and edges(g) == {("d1", "d2")}
    assert input_weight(g, node(g, "d1"), "kernel").load()[4, 2] == 14
    assert g.inputs[0].shape == [None, 5]


def test_detect_damage_export(tmp_path):
    p = graph_model(tmp_path)
    check_detect(p, tmp_path, "TensorFlow.js", ".pb")
    text = p.read_text()
    bad = tmp_path / "bad.json"
    from .conftest import bounded_open
    from kiln.errors import ViewerError
    bad.write_text(text[: len(text) // 2])
    assert isinstance(bounded_open(bad), ViewerError)
    (tmp_path / "group1-shard2of2.bin").write_bytes(b"\0")   # truncated shard
    assert isinstance(bounded_open(p), ViewerError)
    check_export(open_model(layers_model(tmp_path)), tmp_path)


def test_weights_manifest_without_topology(tmp_path):
    """face-api.js ships ``*-weights_manifest.json``: a bare manifest list, its tensors shown by layer."""
    filters = np.arange(27, dtype=np.float32).reshape(3, 3, 3, 1)
    (tmp_path / "tiny_face_detector_model-shard1").write_bytes(
        filters.tobytes() + np.array([0, 2, 4], np.uint8).tobytes())
    manifest = [{"weights": [
        {"name": "conv0/filters", "shape": [3, 3, 3, 1], "dtype": "float32"},
        {"name": "conv0/bias", "shape": [3], "dtype": "float32",
         "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}}],
        "paths": ["tiny_face_detector_model-shard1"]}]
    p = tmp_path / "tiny_face_detector_model-weights_manifest.json"
    p.write_text(json.dumps(manifest))
    model = open_model(p)
    g = model.graph
    assert model.format == "TensorFlow.js" and model.properties["model_format"] == "weights manifest"
    np.testing.assert_array_equal(g.weights["conv0/filters"].load(), filters)
    assert g.weights["conv0/bias"].load().tolist() == [-1.0, 0.0, 1.0]
    layer = node(g, "conv0")
    assert {a.name for a in layer.inputs} == {"filters", "bias"}
    check_detect(p, tmp_path, "TensorFlow.js", ".bin")
