"""Real protobuf-based model files (Caffe, TensorFlow GraphDef) against Google's protobuf runtime.

The reference messages (``_pbref``) carry only the fields each check needs, numbered as in caffe.proto and
TensorFlow's graph.proto; Kiln parses the same bytes with its own decoder and schema.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from ._pbref import messages, parse
from .test_real_files import real

_CAFFE = messages("caffe", {     # caffe.proto: NetParameter, LayerParameter (V2) and V1LayerParameter, BlobProto
    "NetParameter": [("layers", 2, "V1LayerParameter", True), ("layer", 100, "LayerParameter", True)],
    "LayerParameter": [("name", 1, "string", False), ("type", 2, "string", False), ("blobs", 7, "BlobProto", True)],
    "V1LayerParameter": [("name", 4, "string", False), ("blobs", 6, "BlobProto", True)],
    "BlobProto": [("data", 5, "float", True), ("shape", 7, "BlobShape", False),
                  ("raw_data_type", 10, "int32", False), ("raw_data", 12, "bytes", False)],   # OpenCV's FP16 blobs
    "BlobShape": [("dim", 1, "int64", True)]})

_TF = messages("tensorflow", {   # graph.proto, node_def.proto, attr_value.proto, tensor.proto
    "GraphDef": [("node", 1, "NodeDef", True)],
    "NodeDef": [("name", 1, "string", False), ("op", 2, "string", False), ("attr", 5, "AttrEntry", True)],
    "AttrEntry": [("key", 1, "string", False), ("value", 2, "AttrValue", False)],      # map<string, AttrValue>
    "AttrValue": [("tensor", 8, "TensorProto", False)],
    "TensorProto": [("dtype", 1, "int32", False), ("tensor_shape", 2, "TensorShapeProto", False),
                    ("tensor_content", 4, "bytes", False)],
    "TensorShapeProto": [("dim", 2, "Dim", True)],
    "Dim": [("size", 1, "int64", False)]})
_DT_FLOAT = 1
_OPENCV_RAW = {1: "<f4", 2: "<f2"}      # caffe.proto as OpenCV extends it: Type FLOAT = 1, FLOAT16 = 2

CAFFE = [("open-nsfw", "resnet_50_1by2_nsfw"), ("hyperlpr", "mininet_ssd_v1"), ("hyperlpr", "refinenet"),
         ("hyperlpr", "SegmenationFree-Inception"), ("res10-ssd", "res10_300x300_ssd_iter_140000"),
         ("res10-fp16", "res10_300x300_ssd_iter_140000_fp16")]


def _layer_weights(graph, node) -> list:
    """The weights feeding a node, in input order."""
    return [graph.weights[a.values[0]] for a in node.inputs if a.values and a.values[0] in graph.weights]


@pytest.mark.parametrize("source, stem", CAFFE, ids=[s for _, s in CAFFE])
def test_caffe_blobs_against_protobuf(source, stem):
    """Each layer's blobs are the weights Kiln shows for it, in order, with their shapes and values; the deploy
    prototxt beside the caffemodel shows the same values."""
    path = real(source, stem + ".caffemodel")
    net = parse(_CAFFE["NetParameter"], path.read_bytes())
    layers = [layer for layer in (list(net.layer) or list(net.layers)) if layer.blobs]
    assert layers
    g = open_model(path).graph
    deploy = open_model(path.with_suffix(".prototxt")).graph
    nodes, deploy_nodes = {n.name: n for n in g.nodes}, {n.name: n for n in deploy.nodes}
    assert len([n for n in g.nodes if _layer_weights(g, n)]) == len(layers)
    deployed = 0
    for layer in layers:
        shown = _layer_weights(g, nodes[layer.name])
        assert len(shown) == len(layer.blobs), layer.name
        other = _layer_weights(deploy, deploy_nodes[layer.name]) if layer.name in deploy_nodes else []
        deployed += bool(other)
        for k, blob in enumerate(layer.blobs):
            want = (np.frombuffer(blob.raw_data, _OPENCV_RAW[blob.raw_data_type]) if blob.raw_data
                    else np.array(blob.data, dtype=np.float32))
            assert want.size == math.prod(shown[k].shape) > 0, layer.name
            if blob.HasField("shape"):
                assert list(shown[k].shape) == list(blob.shape.dim), layer.name
            np.testing.assert_array_equal(shown[k].load().ravel(), want, err_msg=layer.name)
            if other:
                np.testing.assert_array_equal(other[k].load().ravel(), want, err_msg=layer.name)
    assert deployed >= len(layers) // 2        # training-only layers aside, the deploy net has the weights


def test_caffe_fp16_shrunk_model_against_its_fp32_original():
    """cv.dnn.shrinkCaffeModel's copy of OpenCV's face detector: convolution weights are the FP32 original's rounded
    to FP16, the batch-norm and scale blobs it keeps in FP32 are the original's exactly."""
    half = open_model(real("res10-fp16", "res10_300x300_ssd_iter_140000_fp16.caffemodel")).graph
    full = open_model(real("res10-ssd", "res10_300x300_ssd_iter_140000.caffemodel")).graph
    assert set(half.weights) == set(full.weights)
    kinds = Counter(w.dtype for w in half.weights.values())
    assert kinds["float16"] >= 40 and kinds["float32"] >= 40
    for name, w in half.weights.items():
        original = full.weights[name].load()
        want = original.astype(np.float16) if w.dtype == "float16" else original
        np.testing.assert_array_equal(w.load(), want, err_msg=name)


def test_tf_frozen_graph_against_protobuf():
    """RetinaFace's frozen GraphDef: Const nodes are the weights (4-D float kernels with their values), every
    other node is shown with its op, the Placeholder is the input."""
    path = real("retinaface", "frozen_graph.pb")
    ref = parse(_TF["GraphDef"], path.read_bytes()).node
    g = open_model(path).graph
    assert Counter(n.op_type for n in g.nodes) == Counter(n.op for n in ref if n.op not in ("Const", "Placeholder"))
    consts = [n for n in ref if n.op == "Const"]
    assert set(g.weights) == {n.name for n in consts} and len(consts) > 500
    assert [t.name for t in g.inputs] == [n.name for n in ref if n.op == "Placeholder"]
    kernels = 0
    for n in consts:
        t = next(a.value.tensor for a in n.attr if a.key == "value")
        dims = [d.size for d in t.tensor_shape.dim]
        if t.dtype == _DT_FLOAT and len(dims) == 4 and t.tensor_content:
            kernels += 1
            np.testing.assert_array_equal(g.weights[n.name].load(),
                                          np.frombuffer(t.tensor_content, "<f4").reshape(dims), err_msg=n.name)
    assert kernels >= 60                        # one per Conv2D / depthwise convolution
